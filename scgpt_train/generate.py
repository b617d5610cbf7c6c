"""Pseudo-cell generation and completion of unmeasured genes (`scgpt-train generate`,
docs/generation.md).

Prompt: a cell type's prompt is the mean raw <cls> embedding of its reference cells (the
official maintainer's recipe, issue #38); with `prompt="cells"`, each generated cell has the
embedding of one reference cell of its type, drawn at random.
Decoders: "gen", the generative path: <cls> whose input embedding is the prompt, then one gen
token per gene (gene embedding + the gen flag, no value); a gen token attends to the prompt and
itself only, so genes are decoded in chunks exactly. "gepc": the GEPC decoder from the prompt
and the gene embeddings. Both predict a bin value per gene (a point estimate, trained by MSE).
Sampling: a generated bin is the prediction plus, per gene, the residual of a random reference
cell of the type (its true bin minus the same decoder's prediction from its own embedding),
rounded and clipped to 0 .. n_bins - 1: the decoder's own error, so zeros and spread come from
what the model gets wrong on real cells of the type.
Units: a bin b > 0 becomes the mean log1p(CP10k) of the type's reference values in bin b
(pooled over genes); bin 0 is 0. Completion uses the cell's own observed genes for that map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from scgpt_runtime.errors import InputError
from scgpt_runtime.tokens import TokenBlock

from .gene_data import GeneCells
from .inference import batch_inputs, embed
from .model import ScGPT

DECODERS = ("gen", "gepc")
PROMPTS = ("mean", "cells")
CHUNK = 512  # gen tokens per pass: exact, since a gen token attends to the prompt and itself
BATCH = 32


@dataclass
class Reference:
    """Reference cells of known types: embeddings, bins and values over the output genes."""

    cells: GeneCells  # genes, bins (zeros included), log1p(CP10k), labels
    embeddings: np.ndarray  # (n, d) raw <cls> outputs


def reference_of(model: ScGPT, cells: GeneCells, tokens: TokenBlock) -> Reference:
    """`cells` with the embeddings of `tokens` (the same cells, tokenized for the model)."""
    if cells.labels is None:
        raise ValueError("reference cells need labels")
    return Reference(cells, embed(model, tokens))


def gen_predictions(model: ScGPT, observed: tuple, gene_ids: np.ndarray, prompt=None):
    """(B, G) gen_pred (bins) of genes `gene_ids` after the observed tokens `observed` (gene
    ids, values, padding mask; (B, Lp) tensors), CHUNK gen tokens per pass: exact, since a gen
    token attends to the observed tokens and itself only. `prompt` (B, d): the <cls> input."""
    device = observed[0].device
    out = np.empty((len(observed[0]), len(gene_ids)), dtype=np.float32)
    for g0 in range(0, len(gene_ids), CHUNK):
        ids = torch.from_numpy(np.asarray(gene_ids[g0 : g0 + CHUNK], np.int64)).to(device)
        gen = ids[None].expand(len(out), -1)
        res = model.forward_generative(
            *observed,
            gen,
            torch.zeros(gen.shape, dtype=torch.bool, device=device),
            input_cell_emb=prompt,
        )
        out[:, g0 : g0 + len(ids)] = res["gen_pred"].float().cpu().numpy()
    return out


@torch.no_grad()
def decode(model: ScGPT, prompts: np.ndarray, gene_ids: np.ndarray, decoder: str, cls: tuple):
    """(B, G) float32 predicted bins of genes `gene_ids` from cell embeddings `prompts` (B, d);
    `cls` = (cls_id, cls_value) of the run."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.asarray(gene_ids, np.int64)).to(device)
    out = np.empty((len(prompts), len(gene_ids)), dtype=np.float32)
    for lo in range(0, len(prompts), BATCH):
        emb = torch.from_numpy(np.asarray(prompts[lo : lo + BATCH], np.float32)).to(device)
        B = len(emb)
        if decoder == "gepc":
            pred, _ = model.mvc_decoder(emb, model.encoder(ids[None].expand(B, -1)))
            out[lo : lo + B] = pred.float().cpu().numpy()
            continue
        cls_token = (  # <cls> alone, its input embedding replaced by the prompt
            torch.full((B, 1), cls[0], dtype=torch.int64, device=device),
            torch.full((B, 1), cls[1], dtype=torch.float32, device=device),
            torch.zeros((B, 1), dtype=torch.bool, device=device),
        )
        out[lo : lo + B] = gen_predictions(model, cls_token, gene_ids, prompt=emb)
    return out


def bin_values(bins: np.ndarray, values: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_bins,) mean value of each bin over the entries given; bin 0 -> 0; a bin never seen
    takes the value of the nearest seen bins (linear between them, flat beyond)."""
    b = bins.astype(np.int64).ravel()
    total = np.bincount(b, weights=values.ravel(), minlength=n_bins)[:n_bins]
    count = np.bincount(b, minlength=n_bins)[:n_bins]
    seen = np.flatnonzero(count[1:] > 0) + 1
    table = np.zeros(n_bins)
    if len(seen):
        table[1:] = np.interp(np.arange(1, n_bins), seen, total[seen] / count[seen])
    return table


def generate(
    model: ScGPT,
    ref: Reference,
    counts_per_label: dict[str, int],
    *,
    decoder: str,
    prompt: str,
    cls: tuple,
    n_bins: int,
    seed: int,
    progress: Callable[..., None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(cells, genes) float32 log1p(CP10k) of generated cells and (cells,) their labels, in the
    order of `counts_per_label`; `progress(n, total)` after each type."""
    if decoder not in DECODERS or prompt not in PROMPTS:
        raise ValueError(f"decoder must be one of {DECODERS} and prompt one of {PROMPTS}")
    cells, ids = ref.cells, ref.cells.gene_ids
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for label, n in counts_per_label.items():
        rows = np.flatnonzero(cells.labels == label)
        if not len(rows):
            raise InputError(f"no reference cell has the label {label!r}")
        residuals = cells.bins[rows] - decode(model, ref.embeddings[rows], ids, decoder, cls)
        if prompt == "mean":
            pred = np.repeat(
                decode(model, ref.embeddings[rows].mean(0, keepdims=True), ids, decoder, cls),
                n,
                axis=0,
            )
        else:
            pred = decode(model, ref.embeddings[rng.choice(rows, n)], ids, decoder, cls)
        # per gene an independent reference cell's residual: the decoder's error on that gene
        draw = rng.integers(0, len(rows), size=(n, len(ids)))
        noisy = pred + np.take_along_axis(residuals, draw, axis=0)
        bins = np.clip(np.rint(noisy), 0, n_bins - 1)
        table = bin_values(cells.bins[rows], cells.expression[rows], n_bins)
        out.append(table[bins.astype(np.int64)].astype(np.float32))
        labels += [label] * n
        if progress is not None:
            progress(n, sum(counts_per_label.values()))
    return np.concatenate(out), np.array(labels, dtype=object)


@torch.no_grad()
def complete(
    model: ScGPT,
    tokens: TokenBlock,
    token_values: np.ndarray,
    target_ids: np.ndarray,
    n_bins: int,
    progress: Callable[..., None] | None = None,
) -> np.ndarray:
    """(cells, targets) float32 log1p(CP10k) predicted for genes `target_ids` of each cell
    from its tokens (the generative path, the cell's own <cls>); `token_values` (cells, L), the
    log1p(CP10k) of each token's gene, maps the cell's bins to values. `progress(n, total)`
    after each batch of cells."""
    model.eval()
    device = next(model.parameters()).device
    bins = np.empty((tokens.n_cells, len(target_ids)), dtype=np.int64)
    for lo in range(0, tokens.n_cells, BATCH):
        rows = np.arange(lo, min(lo + BATCH, tokens.n_cells))
        pred = gen_predictions(model, tuple(batch_inputs(tokens, rows, device)), target_ids)
        bins[rows] = np.clip(np.rint(pred), 0, n_bins - 1)
        if progress is not None:
            progress(len(rows), tokens.n_cells)
    out = np.empty(bins.shape, dtype=np.float32)
    for i in range(tokens.n_cells):
        n = int(tokens.n_genes[i])
        table = bin_values(tokens.values[i, 1 : 1 + n], token_values[i, 1 : 1 + n], n_bins)
        out[i] = table[bins[i]]
    return out


def token_expression(tokens: TokenBlock, gene_ids: np.ndarray, expression: np.ndarray):
    """(cells, L) the value in `expression` (cells, genes with vocabulary ids `gene_ids`) of
    each token's gene; 0 for <cls>, padding and genes not among them."""
    lookup = np.full(max(int(tokens.gene_ids.max()), int(gene_ids.max())) + 1, -1, np.int64)
    lookup[gene_ids] = np.arange(len(gene_ids))
    column = lookup[tokens.gene_ids]
    values = np.take_along_axis(expression, np.maximum(column, 0), axis=1)
    return np.where((column >= 0) & ~tokens.padding_mask, values, 0.0).astype(np.float32)
