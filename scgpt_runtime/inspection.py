"""`scgpt-run inspect`: what a data file holds and which matrix the model would read."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import InputError
from .genes import default_gene_column
from .io import open_counts

log = logging.getLogger(__name__)

N_OBS_COLUMNS = 20  # enough to spot the label and batch columns without flooding the screen


def inspect(
    path: str | Path,
    *,
    layer: str | None = None,
    use_raw: bool = True,
    genome: str | None = None,
    gene_column: str | None = None,
    block_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Describe a .h5ad or 10x .h5 file in one streaming pass over its counts.

    Returns the keys format, matrix, n_cells, n_genes, nnz, total_counts, integer_counts,
    gene_column and obs_columns. `progress(n, total)` is called after each block of n cells.
    """
    with open_counts(path, layer=layer, use_raw=use_raw, genome=genome) as counts:
        nnz, total, integer = 0, 0.0, True
        for block in counts.iter_blocks(block_size):
            nnz += int(np.count_nonzero(block.data))
            total += float(block.data.sum(dtype=np.float64))
            integer = integer and bool(np.all(block.data == np.round(block.data)))
            if progress:
                progress(block.n_rows, counts.n_cells)
        if gene_column is not None and gene_column not in counts.var:
            raise InputError(
                f"{counts.path}: has no gene column {gene_column!r} "
                f"(available: {', '.join(counts.var)})"
            )
        if not integer:
            log.warning(
                "%s: %s does not look like raw integer counts; scGPT expects raw counts "
                "(pass --layer or drop --no-raw to choose another matrix)",
                counts.path,
                counts.matrix,
            )
        return {
            "format": counts.format,
            "matrix": counts.matrix,
            "n_cells": counts.n_cells,
            "n_genes": counts.n_genes,
            "nnz": nnz,
            "total_counts": int(total) if integer else total,
            "integer_counts": integer,
            "gene_column": gene_column or default_gene_column(counts.var),
            "obs_columns": counts.obs_columns[:N_OBS_COLUMNS],
        }
