"""Per-cell value binning: each non-zero value becomes its quantile bin among the cell's values.

The official rule (scGPT `preprocess.binning`), per cell: `nz` = the cell's non-zero values,
`edges = np.quantile(nz, np.linspace(0, 1, n_bins - 1))`, `left = np.digitize(x, edges)` (edges
<= x), `right = np.digitize(x, edges, right=True)` (edges < x) and bin = ceil(u * (right - left) +
left) with u ~ U[0, 1) drawn from a global RNG. Where x equals repeated edges (raw counts: many
genes at 1 or 2) left > right and the bin is random in right+1..left, so official embeddings change
from run to run. Our modes:

- "deterministic" (default): bin = ceil((left + right) / 2), the official draw at u = 1/2: the
  middle of the tied range (its upper middle when the range has an even length). Where left ==
  right both rules give `left`.
- "official": the official rule with u = a hash of (seed, global cell index, gene id), so a seed
  reproduces the draw whatever the block size or order.

Both return a bin in 1..n_bins-1 for every stored non-zero value and 0 for stored zeros. Edges
equal `np.quantile`'s bit for bit (its 'linear' method is replicated, not called), so bins equal the
per-cell reference exactly. Everything is vectorised over the block: one stable sort of (cell,
value) keys, then counts of edges per sorted position.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from .csr import CsrBlock
from .errors import InputError

MODES = ("deterministic", "official")

# Hash streams: one per use of randomness, so the draws of different uses are independent.
STREAM_BINNING = 1
STREAM_SAMPLING = 2

# Rows are binned in chunks of about this many values, so the working arrays stay in the CPU
# cache (twice as fast as whole 2048-cell blocks); cells are independent, so results do not change.
CHUNK_VALUES = 1 << 16
CHUNK_ROWS = 4096

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def _splitmix_int(x: int) -> int:
    """The splitmix64 finaliser on one Python int (no numpy overflow warnings for scalars)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def cell_keys(seed: int, stream: int, cells: np.ndarray) -> np.ndarray:
    """The per-cell level of `hash64`: a uint64 key per global cell index."""
    key = _splitmix_int(_splitmix_int(seed + _GOLDEN) + stream * _GOLDEN)
    cells = np.asarray(cells, dtype=np.int64).view(np.uint64)
    return _splitmix(np.uint64(key) + (cells + np.uint64(1)) * np.uint64(_GOLDEN))


def gene_hash(keys: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """The per-gene level of `hash64`, from `cell_keys` of each value's cell."""
    genes = np.asarray(genes, dtype=np.int64).view(np.uint64)
    return _splitmix(keys + (genes + np.uint64(1)) * np.uint64(_GOLDEN))


def hash64(seed: int, stream: int, cells: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """A counter-based uint64 hash of (seed, stream, global cell index, gene id), elementwise.

    Splitmix64 in three levels: a key per (seed, stream), one per cell, then one per gene.
    """
    return gene_hash(cell_keys(seed, stream, cells), genes)


def to_uniform(h: np.ndarray) -> np.ndarray:
    """uint64 hashes to float64 in [0, 1) (their top 53 bits)."""
    return (h >> np.uint64(11)) * (1.0 / (1 << 53))


def hash_uniform(seed: int, stream: int, cells: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """`hash64` mapped to float64 in [0, 1)."""
    return to_uniform(hash64(seed, stream, cells, genes))


def ordered_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint32 with the same order (IEEE bits; sign bit flipped, negatives inverted)."""
    flip = (x.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    return x.view(np.uint32) ^ flip


def row_chunks(indptr: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of about CHUNK_VALUES values (at least one row, at most CHUNK_ROWS)."""
    n_rows = len(indptr) - 1
    bounds = [0]
    while bounds[-1] < n_rows:
        r0 = bounds[-1]
        r1 = int(np.searchsorted(indptr, indptr[r0] + CHUNK_VALUES, "right")) - 1
        bounds.append(min(max(r1, r0 + 1), r0 + CHUNK_ROWS, n_rows))
    return list(pairwise(bounds))


def bin_rows(
    values: np.ndarray,
    indptr: np.ndarray,
    n_bins: int,
    mode: str,
    seed: int,
    start: int,
    genes: np.ndarray,
) -> np.ndarray:
    """Bins (int64) of `values` (float32, all non-zero) laid out in rows by `indptr`.

    `start` is the global index of the first row and `genes` the gene id of each value: both
    are hashed in the official mode.
    """
    if not np.isfinite(values).all():
        row = np.searchsorted(indptr, np.flatnonzero(~np.isfinite(values))[0], "right") - 1
        raise InputError(f"cell {start + row} holds a NaN or infinite value; values must be finite")
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.diff(indptr)
    full = np.flatnonzero(counts)  # non-empty rows; `rank` numbers them 0..R-1
    n_edges = n_bins - 1
    rank = np.repeat(np.arange(len(full), dtype=np.int64), counts[full])  # (nnz,)
    keys = rank << 32
    keys |= ordered_bits(values)
    order = np.argsort(keys, kind="stable")  # timsort: fast on keys already grouped by rows
    skeys = keys[order]

    # Edges per non-empty row, as np.quantile(..., method="linear") computes them: virtual index
    # (n - 1) * q; a float32 difference; numpy's _lerp (a + d*t, but b - d*(1-t) where t >= 0.5).
    n = counts[full][:, None]
    virtual = (n - 1) * np.linspace(0.0, 1.0, n_edges)  # (R, E) float64
    lo = np.floor(virtual)
    t = virtual - lo
    lo = np.minimum(lo.astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    first = indptr[full][:, None]
    a32 = values[order[first + lo]]  # (R, E) float32
    b32 = values[order[first + hi]]
    d = (b32 - a32).astype(np.float64)
    a, b = a32.astype(np.float64), b32.astype(np.float64)
    edges = np.where(t >= 0.5, b - d * (1 - t), a + d * t)  # a <= edges <= b

    # The first sorted position each edge counts for: values >= edge (left) and > edge (right).
    # From a <= edge <= b: if edge == a, the start (left) or end (right) of a's tie group; if
    # edge == b, the end of b's group (right); else position hi.
    new_group = np.empty(len(values), dtype=bool)
    new_group[0] = True
    np.not_equal(skeys[1:], skeys[:-1], out=new_group[1:])
    group = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    group_end = np.append(group_start[1:], len(values))
    lo, hi = first + lo, first + hi
    at_a, at_b = edges == a, edges == b
    first_ge = np.where(at_a, group_start[group[lo]], hi).ravel()
    first_gt = np.where(
        at_b, group_end[group[hi]], np.where(at_a, group_end[group[lo]], hi)
    ).ravel()

    # A value at sorted position i of row rank r has reached every edge of the r rows before
    # (an edge lies within its row's values, so its first position is at most the row's end),
    # plus the edges of its own row whose first position is <= i.
    def reached(*firsts: np.ndarray) -> np.ndarray:
        total = np.cumsum(np.bincount(np.concatenate(firsts), minlength=len(values) + 1))
        return total[: len(values)] - len(firsts) * n_edges * rank

    bins = np.empty(len(values), dtype=np.int64)
    if mode == "deterministic":
        bins[order] = (reached(first_ge, first_gt) + 1) // 2  # ceil((left + right) / 2)
    else:
        left, right = reached(first_ge), reached(first_gt)
        u = to_uniform(gene_hash(cell_keys(seed, STREAM_BINNING, start + full)[rank], genes[order]))
        drawn = np.ceil(u * (right - left) + left).astype(np.int64)
        # The draw lies in right+1..left where left > right, else it is left; the clip only
        # guards float rounding as u -> 1.
        bins[order] = np.minimum(np.maximum(drawn, right + 1), left)
    return bins


def bin_values(
    block: CsrBlock,
    n_bins: int = 51,
    mode: str = "deterministic",
    seed: int = 0,
    gene_ids: np.ndarray | None = None,
) -> CsrBlock:
    """Bin every cell's non-zero values into 1..n_bins-1 (stored zeros give 0).

    Args:
        block: rows of a cells x genes matrix; `block.start` names the cells for the hash.
        n_bins: number of bins including the zero bin (the official 51 gives 50 edges).
        mode: "deterministic" (the middle of a tied range) or "official" (a seeded random bin in
            the tied range, reproducible and independent of blocking).
        seed: seed of the official mode's hash.
        gene_ids: (n_cols,) gene id hashed for each column in the official mode (the vocabulary
            id, so draws do not depend on column order); default the column index.

    Returns:
        A block with the same sparsity pattern whose data are the bins (float32).
    """
    if mode not in MODES:
        raise ValueError(f"binning mode must be one of {MODES}, not {mode!r}")
    if n_bins < 3:
        raise ValueError(f"n_bins must be >= 3, not {n_bins}")
    data = np.asarray(block.data, dtype=np.float32)
    columns = np.asarray(block.indices, dtype=np.int64)
    genes = columns if gene_ids is None else np.asarray(gene_ids, dtype=np.int64)[columns]
    out = np.zeros(len(data), dtype=np.float32)
    for r0, r1 in row_chunks(block.indptr):
        a, b = block.indptr[r0], block.indptr[r1]
        nonzero = data[a:b] != 0
        kept = np.concatenate([[0], np.cumsum(nonzero)])[block.indptr[r0 : r1 + 1] - a]
        bins = bin_rows(
            data[a:b][nonzero], kept, n_bins, mode, seed, block.start + r0, genes[a:b][nonzero]
        )
        out[a:b][nonzero] = bins
    return block.with_data(out)
