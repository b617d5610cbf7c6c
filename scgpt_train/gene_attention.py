"""Attention networks (`scgpt-train genes attention`): gene -> gene scores from the last
layer's attention, as the official attention-GRN tutorial computes them (docs/genes.md).

Each cell is one input: <cls>, then every chosen gene with its bins, zeros included (a fixed
gene set, as the tutorial). With x the last layer's input and q, k its Wqkv rows for Q and K,
per head S = q k^T (the tutorial's raw scores: no 1/sqrt(d) scale, no softmax). Without the
<cls> row and column, S (G x G) is rank-normalised by rows, R[i, j] = rank of S[i, j] in row i
/ G, then by columns, N[i, j] = rank of R[i, j] in column j / G (ranks 0 .. G-1, ties in
index order), then averaged over heads and cells: A. A[i, j] is how strongly gene i (the
query) attends to gene j (the key); the tutorial reads the targets of a TF as the top of its
column, so the edge TF -> target scores A[target, TF].
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scgpt_runtime.errors import InputError
from scgpt_runtime.genes import read_gene_list
from scgpt_runtime.io.write import write_tsv
from scgpt_runtime.outputs import check_output

from .gene_data import GeneCells, load_gene_cells
from .inference import load_for_inference
from .model import ScGPT, attn_bias, padding_attn_mask

N_HVG = 1000  # genes per cell input: cost grows as genes^2 per head and cell
MAX_CELLS = 500  # cells averaged per network (a seeded sample where more)
TOP = 1000  # edges written without --tf
BATCH = 4


def rank_normalize(scores: torch.Tensor) -> torch.Tensor:
    """(..., G, G) scores -> float32 ranks by rows, then by columns, each divided by G."""
    n = scores.shape[-1]
    by_rows = _ranks(scores) / n
    return (_ranks(by_rows.transpose(-1, -2)) / n).transpose(-1, -2)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank (0 .. n-1) of each entry within its last axis, float32; ties in index order."""
    order = torch.argsort(x, dim=-1, stable=True)
    steps = torch.arange(x.shape[-1], dtype=torch.float32, device=x.device).expand(order.shape)
    return torch.empty(order.shape, dtype=torch.float32, device=x.device).scatter_(-1, order, steps)


@torch.no_grad()
def last_layer_scores(model: ScGPT, gene_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, L) q k^T of the last layer, for inputs without padding."""
    pad = torch.zeros(gene_ids.shape, dtype=torch.bool, device=gene_ids.device)
    x, _ = model.embed_inputs(gene_ids, values)
    bias = attn_bias(padding_attn_mask(pad), x.dtype)
    layers = model.transformer_encoder.layers
    for layer in layers[:-1]:
        x = layer(x, bias)
    attn = layers[-1].self_attn
    B, L, d = x.shape
    q, k, _ = attn.Wqkv(x).split(d, dim=-1)
    q, k = (t.view(B, L, attn.n_head, -1).transpose(1, 2) for t in (q, k))  # (B, h, L, dh)
    return q @ k.transpose(-1, -2)


def attention_network(
    model: ScGPT,
    cells: GeneCells,
    rows: np.ndarray,
    cls_id: int,
    cls_value: float,
    tick: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(G, G) float64 A over the cells `rows` (see the module docstring); `tick(n)` after
    every n cells."""
    model.eval()
    device = next(model.parameters()).device
    G = len(cells.genes)
    total = np.zeros((G, G))
    ids = np.concatenate([[cls_id], cells.gene_ids]).astype(np.int64)
    for lo in range(0, len(rows), BATCH):
        batch = rows[lo : lo + BATCH]
        values = np.concatenate(
            [np.full((len(batch), 1), cls_value, np.float32), cells.bins[batch]], axis=1
        )
        gene_ids = torch.from_numpy(np.tile(ids, (len(batch), 1))).to(device)
        scores = last_layer_scores(model, gene_ids, torch.from_numpy(values).to(device))
        ranked = rank_normalize(scores[:, :, 1:, 1:]).mean(dim=1).sum(dim=0)
        total += ranked.double().cpu().numpy()
        if tick is not None:
            tick(len(batch))
    return total / len(rows)


def parse_contrast(text: str) -> tuple[str, str, str]:
    """COL=A:B -> (COL, A, B)."""
    column, _, pair = text.partition("=")
    first, _, second = pair.partition(":")
    if not (column and first and second):
        raise InputError(f"--contrast {text}: expected COL=A:B (e.g. condition=stimulated:control)")
    return column, first, second


def write_attention(
    run: str,
    data: str,
    out: Path,
    *,
    tfs: tuple[str, ...] = (),
    genes_file: str | None = None,
    n_top: int = N_HVG,
    where: tuple[str, ...] = (),
    contrast: str | None = None,
    max_cells: int = MAX_CELLS,
    top: int = TOP,
    seed: int = 0,
    gene_column: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """EDGES.tsv (source, target, score): the targets of each TF of `tfs` (all genes, best
    first), or the `top` edges overall (self-edges left out); `progress(n, total)` as cells
    are done. Returns a summary."""
    check_output(out, overwrite=overwrite, source=Path(data))
    model, info = load_for_inference(run, device)
    genes = read_gene_list(genes_file) if genes_file else None
    column, first, second = parse_contrast(contrast) if contrast else (None, None, None)
    if unknown := [t for t in tfs if t not in info.vocab]:
        raise InputError(f"--tf {unknown[0]}: not a gene of the run's vocabulary")
    cells = load_gene_cells(
        data,
        info.vocab,
        info.tokens,
        genes=genes,
        n_top=n_top,
        also=tfs,  # a TF outside the network genes joins them
        where=where,
        gene_column=gene_column,
        label_key=column,
    )
    if absent := [t for t in tfs if t not in cells.genes]:
        raise InputError(f"--tf {absent[0]}: not a gene of {data}")
    rng = np.random.default_rng(seed)
    groups = {}
    for group in [first, second] if column else [None]:
        rows = (
            np.arange(len(cells.rows)) if group is None else np.flatnonzero(cells.labels == group)
        )
        if not len(rows):
            raise InputError(f"{data}: no cell has {column} == {group!r}")
        if len(rows) > max_cells:
            rows = np.sort(rng.choice(rows, max_cells, replace=False))
        groups[str(group or "all")] = rows
    total = sum(len(r) for r in groups.values())
    tick = None if progress is None else (lambda n: progress(n, total))
    networks = [
        attention_network(model, cells, rows, info.vocab.cls_id, info.tokens.cls_value, tick)
        for rows in groups.values()
    ]
    n_cells = {g: len(r) for g, r in groups.items()}
    a = networks[0] - networks[1] if column else networks[0]
    edges = _edges(a, cells.genes, tfs, top)
    write_tsv(out, ["source", "target", "score"], edges)
    return {
        "out": str(out),
        "genes": len(cells.genes),
        "cells": n_cells,
        "edges": len(edges),
        "tfs": list(tfs),
        "contrast": contrast,
    }


def _edges(a: np.ndarray, genes: list[str], tfs: tuple[str, ...], top: int) -> list[tuple]:
    """(source, target, score) rows: each TF's column best first, or the top edges overall."""
    a = a.copy()
    np.fill_diagonal(a, -np.inf)
    if tfs:
        rows = []
        for tf in tfs:
            j = genes.index(tf)
            order = np.argsort(-a[:, j], kind="stable")[: len(genes) - 1]
            rows += [(tf, genes[i], float(a[i, j])) for i in order]
        return rows
    flat = np.argsort(-a, axis=None, kind="stable")[: min(top, a.size - len(genes))]
    targets, sources = np.unravel_index(flat, a.shape)
    return [(genes[s], genes[t], float(a[t, s])) for t, s in zip(targets, sources, strict=True)]
