"""Gene embeddings of a run (`scgpt-train genes embed`).

The gene embedding is the gene encoder's output, LayerNorm(embedding row), the vector the
official gene-network tutorial uses. With cells, the contextual embedding of a gene is the mean
transformer output at its token over every cell where it is a token (expressed and kept by
the run's tokenization): a data-dependent embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scgpt_runtime.errors import InputError
from scgpt_runtime.io.write import write_dense_h5ad
from scgpt_runtime.outputs import check_output
from scgpt_runtime.tokens import TokenBlock
from scgpt_runtime.vocab import SPECIALS

from .cells import load_cells
from .checkpoint import load_run
from .data import open_sources
from .distributed import resolve_device
from .inference import batch_inputs
from .model import ScGPT


@torch.no_grad()
def encoder_embeddings(model: ScGPT, ids: np.ndarray) -> np.ndarray:
    """(len(ids), d) gene encoder outputs of vocabulary ids."""
    device = next(model.parameters()).device
    return model.encoder(torch.from_numpy(np.asarray(ids, np.int64)).to(device)).cpu().numpy()


@torch.no_grad()
def contextual_embeddings(
    model: ScGPT, tokens: TokenBlock, n_vocab: int, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(n_vocab, d) mean transformer output per vocabulary id over `tokens`, and (n_vocab,)
    the number of cells behind each (0: NaN row)."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(n_vocab, model.cfg.d_model, dtype=torch.float64)
    counts = torch.zeros(n_vocab, dtype=torch.float64)
    for lo in range(0, tokens.n_cells, batch_size):
        rows = np.arange(lo, min(lo + batch_size, tokens.n_cells))
        genes, values, pad = batch_inputs(tokens, rows, device)
        out = model.encode(genes, values, pad).double().cpu()  # (B, L, d)
        real = ~pad.cpu()
        real[:, 0] = False  # <cls> is not a gene
        ids = genes.cpu()[real]
        sums.index_add_(0, ids, out[real])
        counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    mean = sums / counts.clamp(min=1)[:, None]
    mean[counts == 0] = float("nan")
    return mean.float().numpy(), counts.numpy().astype(np.int64)


def embed_genes(
    run: str,
    out: Path,
    *,
    data: list[str] | None = None,
    contextual: bool = False,
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write GENES.h5ad: obs_names = genes (the vocabulary's, or those of `data` in the
    vocabulary), X = gene encoder embeddings; with `contextual`, obsm["X_contextual"] and obs
    "n_cells". Returns a summary."""
    if contextual and not data:
        raise InputError("--contextual needs cells: give --data")
    check_output(out, overwrite=overwrite)
    model, info = load_run(run)
    model.to(resolve_device(device))
    vocab = info.vocab
    if data:
        sources = open_sources([Path(p) for p in data], vocab, gene_column)
        ids = np.unique(np.concatenate([s.column_ids[s.column_ids >= 0] for s in sources]))
    else:
        ids = np.array([i for i, n in enumerate(vocab.names) if n not in SPECIALS])
    names = np.array([vocab.names[i] for i in ids], dtype=object)
    obs: dict[str, np.ndarray] = {}
    obsm: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {"out": str(out), "genes": len(ids), "dim": model.cfg.d_model}
    if contextual:
        cells = load_cells(list(data), vocab, info.tokens, where=where, gene_column=gene_column)
        emb, n = contextual_embeddings(model, cells.tokens, len(vocab))
        obsm["X_contextual"], obs["n_cells"] = emb[ids], n[ids]
        summary.update(cells=cells.tokens.n_cells, genes_seen=int((n[ids] > 0).sum()))
    uns = {"scgpt_genes": {"run": str(run), "embedding": "gene encoder output",
                           "data": list(data or [])}}  # fmt: skip
    dims = np.array([f"dim{i}" for i in range(model.cfg.d_model)])
    write_dense_h5ad(out, encoder_embeddings(model, ids), names, dims, obs=obs, obsm=obsm,
                     uns=uns, overwrite=overwrite)  # fmt: skip
    return summary
