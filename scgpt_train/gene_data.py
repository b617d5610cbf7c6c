"""Cells as dense rows over chosen genes: the input of `genes programs` and `genes attention`.

The genes are those of the file that are in the run's vocabulary: its `n_top` most highly
variable (Seurat flavour over the cells that pass --where, every gene of the file shaping the
mean bins, as scanpy ranks a whole file), or a given list. Each cell is kept as its log1p(CP10k)
values (CP10k over every gene of the file) and its bins with zeros included (bin 0), binned
as the tokenizer bins (over every gene of the cell in the vocabulary; runtime `bin_dense`).
numpy and the runtime only (no torch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.errors import InputError
from scgpt_runtime.genes import match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.io.base import CountMatrix
from scgpt_runtime.obs import obs_strings, parse_where, selected
from scgpt_runtime.preprocess import CP10K, highly_variable_genes, log1p, normalize_total
from scgpt_runtime.tokens import TokenConfig, bin_dense
from scgpt_runtime.vocab import Vocab

log = logging.getLogger(__name__)

N_HVG = 1200  # genes of the official gene-network tutorial
BLOCK = 512  # rows binned at a time over every matched gene: 512 x genes float32


@dataclass
class GeneCells:
    """Cells of one file over chosen genes."""

    path: str
    genes: list[str]  # chosen genes (vocabulary names), file column order or as given
    gene_ids: np.ndarray  # (G,) their vocabulary ids
    rows: np.ndarray  # (n,) the cells' rows in the file
    n_file_cells: int
    expression: np.ndarray  # (n, G) float32 log1p(CP10k)
    bins: np.ndarray | None  # (n, G) float32 model input values, zeros included; None unasked
    labels: np.ndarray | None  # (n,) object: str or None, with label_key


def load_gene_cells(
    path: str | Path,
    vocab: Vocab,
    tokens: TokenConfig,
    *,
    genes: list[str] | None = None,
    n_top: int | None = N_HVG,
    also: tuple[str, ...] = (),
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
    label_key: str | None = None,
    max_cells: int | None = None,
    seed: int = 0,
    with_bins: bool = True,
) -> GeneCells:
    """The cells of `path` passing `where` (a seeded sample of `max_cells` of them, if more)
    over `genes` (each of the file and the vocabulary; the others are skipped with a warning)
    or the `n_top` most variable genes of the file in the vocabulary (None: all of them, in file
    order), then the genes of `also` that are of the file and the vocabulary but not yet chosen.
    `with_bins=False` skips the model inputs (binning every matched gene of every cell).
    InputError (one line) where no gene or no cell is left."""
    with open_counts(path) as counts:
        match = match_genes(counts.var, vocab, gene_column=gene_column, source=str(path))
        matched = np.flatnonzero(match.column_ids >= 0)
        keep = selected(counts, parse_where(where))
        if not keep.any():
            raise InputError(f"{path}: no cell passes --where {' '.join(where)}")
        rows = np.flatnonzero(keep)
        if max_cells is not None and len(rows) > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
        labels = obs_strings(counts.read_obs(label_key))[rows] if label_key else None
        if genes is None and n_top is None:
            columns = matched
        elif genes is None:
            columns = _variable_columns(counts, rows, matched, n_top)
        else:
            columns = _given_columns(path, match.column_ids, vocab, genes)
        columns = np.concatenate([columns, _more_columns(match.column_ids, vocab, also, columns)])
        gene_ids = match.column_ids[columns]
        chosen = np.searchsorted(matched, columns)  # each chosen column among the matched
        bins, expression = [], []
        for block in counts.iter_blocks(BLOCK):
            local = _local_rows(rows, block)
            if not len(local):
                continue
            if with_bins:
                # as the tokenizer bins: over every matched gene of the cell, on the whole
                # block (seeded binning depends on a cell's row), then the chosen genes
                every = bin_dense(block, matched, match.column_ids[matched], tokens)
                bins.append(every[np.ix_(local, chosen)])
            normed = log1p(normalize_total(block.take(local), CP10K))
            expression.append(normed.dense_columns(columns))
        n_file_cells = counts.n_cells
    return GeneCells(
        path=str(path),
        genes=[vocab.names[i] for i in gene_ids],
        gene_ids=gene_ids,
        rows=rows,
        n_file_cells=n_file_cells,
        expression=np.concatenate(expression),
        bins=np.concatenate(bins) if with_bins else None,
        labels=labels,
    )


def _local_rows(rows: np.ndarray, block: CsrBlock) -> np.ndarray:
    """The file rows `rows` (ascending) that fall in `block`, as block-local rows."""
    return rows[(rows >= block.start) & (rows < block.start + block.n_rows)] - block.start


def _variable_columns(
    counts: CountMatrix, rows: np.ndarray, matched: np.ndarray, n_top: int
) -> np.ndarray:
    """File columns of the `n_top` most variable of the `matched` columns, over `rows`."""
    blocks = (block.take(_local_rows(rows, block)) for block in counts.iter_blocks())
    return highly_variable_genes(blocks, n_top, counts.n_genes, among=matched)


def _more_columns(
    column_ids: np.ndarray, vocab: Vocab, genes: tuple[str, ...], chosen: np.ndarray
) -> np.ndarray:
    """File columns of `genes` (of the file and the vocabulary) not among `chosen`."""
    where = {int(i): c for c, i in enumerate(column_ids) if i >= 0}
    found = [where.get(vocab[g]) for g in genes if g in vocab]
    have = set(chosen.tolist())
    return np.array([c for c in dict.fromkeys(found) if c is not None and c not in have], np.int64)


def _given_columns(
    path: str | Path, column_ids: np.ndarray, vocab: Vocab, genes: list[str]
) -> np.ndarray:
    """File columns of the given genes, in their order; unknown genes skipped with a warning."""
    where = {int(i): c for c, i in enumerate(column_ids) if i >= 0}
    found = [(g, where.get(vocab[g])) if g in vocab else (g, None) for g in genes]
    missing = [g for g, c in found if c is None]
    if len(missing) == len(genes):
        raise InputError(
            f"{path}: none of the {len(genes)} genes given is a gene of the file in the run's "
            f"vocabulary (first: {genes[0]})"
        )
    if missing:
        log.warning(
            "%d of %d genes given are not in %s or the vocabulary (first: %s); skipped",
            len(missing),
            len(genes),
            path,
            missing[0],
        )
    return np.array([c for _, c in found if c is not None], dtype=np.int64)
