"""Per-cell normalisation and highly variable genes, on CSR blocks (numpy only, no scanpy)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .csr import CsrBlock

HVG_MEAN_BINS = 20  # scanpy's default n_bins for flavor="seurat"


CP10K = 1e4  # counts per 10,000: the scale of log1p(CP10k), scanpy's usual target_sum


def scale_rows(values: np.ndarray, indptr: np.ndarray, target_sum: float) -> np.ndarray:
    """`values` (laid out in rows by `indptr`) scaled so that each row sums to `target_sum`.

    Sums and scaling in float64, the result float32. Rows summing to 0 are left as they are.
    """
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    sums = np.bincount(rows, weights=values, minlength=len(indptr) - 1).astype(np.float64)
    scale = np.divide(target_sum, sums, out=np.ones_like(sums), where=sums != 0)
    return (values * scale[rows]).astype(np.float32)


def normalize_total(block: CsrBlock, target_sum: float = CP10K) -> CsrBlock:
    """Scale every cell to a total of `target_sum` (as scanpy's normalize_total); empty cells stay
    empty."""
    if not target_sum > 0:
        raise ValueError(f"target_sum must be > 0, not {target_sum}")
    return block.with_data(scale_rows(block.data, block.indptr, target_sum))


def log1p(block: CsrBlock) -> CsrBlock:
    """log(1 + x) of every stored value (float32)."""
    return block.with_data(np.log1p(np.asarray(block.data, dtype=np.float32)))


def highly_variable_genes(
    blocks: Iterable[CsrBlock], n_top: int, n_genes: int, among: np.ndarray | None = None
) -> np.ndarray:
    """Column indices (ascending) of the `n_top` most variable genes, in one pass over `blocks`.

    Follows scanpy's `highly_variable_genes(flavor="seurat")` on log1p(normalize_total(x, 1e4)):
    per gene the mean and variance (ddof=1) of the normalised counts (scanpy's expm1 of the log
    data); dispersion = var / mean, logged; genes put into 20 equal-width bins of log1p(mean);
    the dispersion z-scored within its bin (a bin with one gene gives 1). The top `n_top` by
    z-score are returned, ties to the lower column; genes with an undefined z-score (constant
    genes, bins of equal dispersions) come last.

    Args:
        blocks: row blocks of one cells x genes matrix of raw counts.
        n_top: number of genes to return; all genes where n_top >= n_genes.
        n_genes: number of columns of the matrix.
        among: the columns that may be chosen (None: all); every column still shapes the
            mean bins, as when scanpy ranks the genes of a whole file.
    """
    if n_top < 1:
        raise ValueError(f"n_top must be >= 1, not {n_top}")
    total = np.zeros(n_genes)
    total_sq = np.zeros(n_genes)
    n_cells = 0
    for block in blocks:
        if block.n_cols != n_genes:
            raise ValueError(f"a block has {block.n_cols} columns, expected {n_genes}")
        x = scale_rows(block.data, block.indptr, CP10K).astype(np.float64)
        total += np.bincount(block.indices, weights=x, minlength=n_genes)
        total_sq += np.bincount(block.indices, weights=x * x, minlength=n_genes)
        n_cells += block.n_rows
    if n_cells < 2:
        raise ValueError(f"highly variable genes need at least 2 cells, got {n_cells}")
    candidates = np.arange(n_genes) if among is None else np.unique(np.asarray(among, np.int64))
    if n_top >= len(candidates):
        return candidates.astype(np.int64)
    z = normalized_dispersion(total / n_cells, total_sq / n_cells, n_cells)[candidates]
    # Rank by z descending, NaN last, ties to the lower column: a stable sort of -z.
    ranking = np.argsort(np.where(np.isnan(z), np.inf, -z), kind="stable")
    return np.sort(candidates[ranking[:n_top]]).astype(np.int64)


def normalized_dispersion(mean: np.ndarray, mean_sq: np.ndarray, n_cells: int) -> np.ndarray:
    """Seurat's normalised dispersion per gene from the mean and mean square of its values."""
    var = np.maximum(mean_sq - mean * mean, 0.0) * (n_cells / (n_cells - 1))
    mean = np.where(mean == 0, 1e-12, mean)
    dispersion = var / mean
    with np.errstate(divide="ignore"):
        log_disp = np.log(np.where(dispersion == 0, np.nan, dispersion))
    log_mean = np.log1p(mean)

    # pandas.cut(log_mean, 20): equal-width bins over [min, max], right-closed, the lowest
    # edge lowered by 0.1% of the range so the minimum falls in the first bin.
    lo, hi = log_mean.min(), log_mean.max()
    if lo == hi:
        pad = 0.001 * abs(lo) if lo != 0 else 0.001
        lo, hi = lo - pad, hi + pad
        edges = np.linspace(lo, hi, HVG_MEAN_BINS + 1)
    else:
        edges = np.linspace(lo, hi, HVG_MEAN_BINS + 1)
        edges[0] -= (hi - lo) * 0.001
    which = np.clip(np.searchsorted(edges, log_mean, "left") - 1, 0, HVG_MEAN_BINS - 1)

    # Mean and standard deviation (ddof=1) of the defined dispersions in each bin.
    defined = ~np.isnan(log_disp)
    d = np.where(defined, log_disp, 0.0)
    count = np.bincount(which, weights=defined, minlength=HVG_MEAN_BINS)
    bin_mean = np.bincount(which, weights=d, minlength=HVG_MEAN_BINS) / np.maximum(count, 1)
    dev = np.where(defined, log_disp - bin_mean[which], 0.0)
    bin_ss = np.bincount(which, weights=dev * dev, minlength=HVG_MEAN_BINS)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_std = np.sqrt(bin_ss / (count - 1))
    # scanpy: a bin with a single gene has no std; its gene gets (disp - 0) / disp = 1.
    single = count == 1
    bin_std[single] = bin_mean[single]
    bin_mean[single] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (log_disp - bin_mean[which]) / bin_std[which]
