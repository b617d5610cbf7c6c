"""How a batch of cells becomes the streams of a generative step: observed tokens (gene +
value, <cls> first), generated tokens (gene, no value, predicted), optionally masked observed
values and queried unexpressed genes. All randomness comes in as uniform keys or a generator,
so a step is reproducible from its seed."""

from __future__ import annotations

import torch

from scgpt_runtime.tokens import TokenBlock

MASK_VALUE = -1.0  # the official mask_value for masked observed values


def split_generative(
    tokens: TokenBlock, gen_fraction: float, keys: torch.Tensor, pad_id: int, pad_value: float
) -> dict[str, torch.Tensor]:
    """Split each cell's genes into observed and generated tokens.

    keys (B, >= L) uniform in [0, 1): a cell's `floor(n * gen_fraction)` genes of smallest key
    are generated. Both streams keep the genes' order; pads go last.
    """
    gene_ids = torch.from_numpy(tokens.gene_ids)  # (B, L)
    values = torch.from_numpy(tokens.values)  # (B, L)
    pad = torch.from_numpy(tokens.padding_mask)  # (B, L)
    n = torch.from_numpy(tokens.n_genes)  # (B,)
    B, L = gene_ids.shape
    k = keys[:B, :L].clone()
    k[:, 0] = -1.0  # <cls> is always observed
    k[pad] = 2.0
    rank = k.argsort(dim=1).argsort(dim=1)  # (B, L): 0 for <cls>, 1.. for genes by key
    n_gen = (n.to(torch.float64) * gen_fraction).floor().to(torch.int64)  # (B,)
    is_gen = (rank >= 1) & (rank <= n_gen[:, None]) & ~pad
    # Stable sort by stream: observed, then generated, then pads; order inside kept.
    stream = torch.where(pad, 2, is_gen.to(torch.int64))
    order = stream.argsort(dim=1, stable=True)
    gene_ids, values = gene_ids.gather(1, order), values.gather(1, order)
    n_obs = 1 + n - n_gen  # (B,) <cls> included
    Lp, Lg = int(n_obs.max()), max(int(n_gen.max()), 1)
    pos = torch.arange(L)
    pcpt_pad = pos[:Lp][None] >= n_obs[:, None]
    gen_idx = (n_obs[:, None] + torch.arange(Lg)[None]).clamp(max=L - 1)  # (B, Lg)
    gen_pad = torch.arange(Lg)[None] >= n_gen[:, None]
    return {
        "pcpt_gene": gene_ids[:, :Lp].masked_fill(pcpt_pad, pad_id),
        "pcpt_values": values[:, :Lp].masked_fill(pcpt_pad, pad_value),
        "pcpt_pad": pcpt_pad,
        "gen_gene": gene_ids.gather(1, gen_idx).masked_fill(gen_pad, pad_id),
        "gen_values": values.gather(1, gen_idx).masked_fill(gen_pad, 0.0),
        "gen_pad": gen_pad,
    }


def mask_observed(batch: dict[str, torch.Tensor], ratio: float, keys: torch.Tensor) -> torch.Tensor:
    """Replace `ratio` of the observed gene values with MASK_VALUE; returns the masked positions."""
    pad = batch["pcpt_pad"]
    masked = (keys[: pad.shape[0], : pad.shape[1]] < ratio) & ~pad
    masked[:, 0] = False  # never the <cls>
    batch["pcpt_target"] = batch["pcpt_values"].clone()
    batch["pcpt_values"] = batch["pcpt_values"].masked_fill(masked, MASK_VALUE)
    return masked


def add_unexpressed(
    batch: dict[str, torch.Tensor], ratio: float, generator: torch.Generator, pad_id: int
) -> dict[str, torch.Tensor]:
    """Append to each cell's generated tokens `floor(ratio x its generated count)` genes that
    other cells of the batch hold and it does not, with the target value 0.

    Without them every target is a gene the cell expresses, and its value is mostly the gene's
    usual rank: the cell embedding can ignore which genes are on, which is what tells cell types
    apart. A gene a long cell expressed but dropped (past max_seq_len) may be drawn with the
    target 0; it is among the cell's weakest, so 0 is close to its bin.
    """
    cls = batch["pcpt_gene"][:, :1]
    genes = torch.cat([batch["pcpt_gene"][:, 1:], batch["gen_gene"]], dim=1)  # (B, Lp-1+Lg)
    held = torch.cat([~batch["pcpt_pad"][:, 1:], ~batch["gen_pad"]], dim=1) & (genes != cls)
    pool = genes[held].unique()  # sorted ids held by some cell of the batch
    B, U = genes.shape[0], len(pool)
    present = torch.zeros(B, U, dtype=torch.bool)
    rows = torch.arange(B)[:, None].expand_as(genes)
    present[rows[held], torch.searchsorted(pool, genes[held])] = True
    n_gen = (~batch["gen_pad"]).sum(1)
    n_new = torch.minimum((n_gen.to(torch.float64) * ratio).floor().long(), (~present).sum(1))
    keys = torch.rand(B, U, generator=generator).masked_fill(present, 2.0)
    K = int(n_new.max()) if B else 0
    new = pool[keys.argsort(dim=1)[:, :K]]  # (B, K): candidates first, in random order
    new_pad = torch.arange(K)[None] >= n_new[:, None]
    gen_gene = torch.cat([batch["gen_gene"], new.masked_fill(new_pad, pad_id)], dim=1)
    gen_pad = torch.cat([batch["gen_pad"], new_pad], dim=1)
    gen_values = torch.cat([batch["gen_values"], torch.zeros(B, K)], dim=1)
    order = gen_pad.to(torch.int64).argsort(dim=1, stable=True)  # pads last again
    keep = max(int((~gen_pad).sum(1).max()), 1)
    order = order[:, :keep]
    return {
        **batch,
        "gen_gene": gen_gene.gather(1, order),
        "gen_values": gen_values.gather(1, order),
        "gen_pad": gen_pad.gather(1, order),
    }


def second_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generated genes with their values, after <cls>: a second view of each cell that
    shares no gene with its observed tokens (call before masking or adding queries)."""
    cls = batch["pcpt_gene"][:, :1], batch["pcpt_values"][:, :1]
    no_pad = torch.zeros_like(batch["gen_pad"][:, :1])
    return {
        "view_gene": torch.cat([cls[0], batch["gen_gene"]], dim=1),
        "view_values": torch.cat([cls[1], batch["gen_values"]], dim=1),
        "view_pad": torch.cat([no_pad, batch["gen_pad"]], dim=1),
    }
