"""The .h5ad reader (anndata 0.6 to 0.12): counts streamed in row blocks, with obs and var.

The matrix is read in one of three ways, memory bounded by the block in each:
  csr    slices of indptr, indices and data per block, straight from the file;
  dense  X[r0:r1] per block, sparsified;
  csc    (cells x genes stored by gene) an external bucket transpose through temporary files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..csr import CsrBlock
from ..errors import InputError, OutputError
from .base import CountMatrix, damaged, row_extent
from .chunks import read_range
from .h5ad_elements import Frame, encoding, open_frame, reading

CSC_CHUNK = 2**22  # entries read from the file at a time when transposing CSC
CSC_BUCKET_NNZ = 2**23  # entries transposed in memory at once: about 250 MB at peak
CSC_BUCKET_ROWS = 2**16  # rows per bucket, so that rows sort by radix (whole blocks override it)

_SPILLED = (np.int32, np.int32, np.float32)  # row, col, value: one temporary file each per bucket


class H5adMatrix(CountMatrix):
    """Counts of an .h5ad file: `layers/<layer>` if given, else raw/X (when use_raw), else X."""

    format = "h5ad"

    def __init__(
        self, path: Path, h5: h5py.File, *, layer: str | None = None, use_raw: bool = True
    ):
        super().__init__(path, h5)
        layers = h5.get("layers")
        self.layers: list[str] = list(layers) if isinstance(layers, h5py.Group) else []
        raw_key = _raw_key(h5)
        self.has_raw = raw_key is not None
        if layer is not None:
            if layer not in self.layers:
                available = ", ".join(self.layers) or "none"
                raise InputError(f"{path}: has no layer {layer!r} (available layers: {available})")
            x_key, var_key = f"layers/{layer}", "var"
        elif use_raw and raw_key is not None:
            x_key, var_key = raw_key, raw_key[:-1] + "var"  # raw/var, or raw.var before 0.7
        elif _has_x(h5):
            x_key, var_key = "X", "var"
        else:
            raise InputError(_no_matrix_message(path, self.layers, self.has_raw))
        self.matrix = x_key
        self._x = h5[x_key]
        self._layout, (self.n_cells, self.n_genes) = _matrix_layout(self._x)
        var = open_frame(h5, var_key)
        self.var = _gene_columns(var, self.n_genes)
        self._check_length(var_key, len(self.var["index"]), self.n_genes, "columns")
        self._obs = open_frame(h5, "obs")
        n_obs = self.n_cells if self._obs is None else self._obs.index_length()
        self._check_length("obs", n_obs, self.n_cells, "rows")

    def _read_obs_names(self) -> np.ndarray:
        return _numbered(self.n_cells) if self._obs is None else self._obs.index()

    @property
    def obs_columns(self) -> list[str]:
        return [] if self._obs is None else list(self._obs.columns)

    def read_obs(self, name: str) -> np.ndarray:
        """One obs column: numbers as numbers, text and categories as str objects, missing as None.

        Nullable integers come back as float64 with NaN, nullable booleans as objects with None.
        """
        if name not in self.obs_columns:
            available = ", ".join(self.obs_columns) or "none"
            raise InputError(f"{self.path}: has no obs column {name!r} (available: {available})")
        assert self._obs is not None
        with damaged(self.path, f"obs/{name}"):
            return self._obs.read(name)

    def _blocks(self, block_size: int, start: int, stop: int) -> Iterator[CsrBlock]:
        if self._layout == "dense":
            return _dense_blocks(self._x, block_size, start, stop)
        if self._layout == "csr":
            return _csr_blocks(self._x, self.n_genes, block_size, start, stop)
        return _csc_blocks(self._x, self.n_cells, self.n_genes, block_size, start, stop)

    def _check_length(self, what: str, found: int, expected: int, axis: str) -> None:
        if found != expected:
            raise InputError(
                f"{self.path}: {what} has {found} entries but {self.matrix} has {expected} {axis}"
            )


def _raw_key(h5: h5py.File) -> str | None:
    if isinstance(h5.get("raw"), h5py.Group) and "X" in h5["raw"]:
        return "raw/X"
    return "raw.X" if "raw.X" in h5 else None  # anndata < 0.7 kept raw in top-level raw.* keys


def _has_x(h5: h5py.File) -> bool:
    return "X" in h5 and encoding(h5["X"])[0] != "null"


def _no_matrix_message(path: Path, layers: list[str], has_raw: bool) -> str:
    if has_raw:
        return f"{path}: holds no X; its counts are in raw/X (drop --no-raw)"
    if layers:
        return (
            f"{path}: holds no expression matrix in X or raw/X; "
            f"pass --layer (available layers: {', '.join(layers)})"
        )
    return f"{path}: holds no expression matrix (no X, no raw/X and no layers)"


def _matrix_layout(elem: h5py.Group | h5py.Dataset) -> tuple[str, tuple[int, int]]:
    """("csr" | "csc" | "dense", (n_cells, n_genes)) of a matrix element, by its encoding era."""
    with reading(elem):
        kind, version = encoding(elem)
        if isinstance(elem, h5py.Dataset):
            if elem.ndim != 2 or elem.dtype.kind not in "biuf":
                raise ValueError(
                    f"a dense matrix must be 2-D numbers, found {elem.dtype} {elem.shape}"
                )
            return "dense", (int(elem.shape[0]), int(elem.shape[1]))
        if (kind, version) in (("csr_matrix", "0.1.0"), ("csc_matrix", "0.1.0")):
            layout, shape = kind[:3], elem.attrs["shape"]
        elif kind == "" and "h5sparse_format" in elem.attrs:  # anndata < 0.7
            layout, shape = elem.attrs["h5sparse_format"], elem.attrs["h5sparse_shape"]
            layout = layout.decode() if isinstance(layout, bytes) else str(layout)
        else:
            raise ValueError(
                f"unsupported matrix encoding {kind!r} version {version!r} "
                "(expected csr_matrix, csc_matrix or a dense array)"
            )
        if layout not in ("csr", "csc"):
            raise ValueError(f"unknown sparse format {layout!r}")
        return layout, (int(shape[0]), int(shape[1]))


def _gene_columns(var: Frame | None, n_genes: int) -> dict[str, np.ndarray]:
    """The var index as "index", then every text column; missing labels become ""."""
    if var is None:
        return {"index": _numbered(n_genes)}
    columns = {"index": var.index()}
    for name in var.columns:
        if name != "index" and var.is_text(name):
            values = var.read(name)
            values[np.equal(values, None)] = ""
            columns[name] = values
    return columns


def _numbered(n: int) -> np.ndarray:
    """anndata's default index when a table is absent: "0", "1", ..."""
    return np.arange(n).astype(str).astype(object)


# Matrix streaming.


def _dense_blocks(ds: h5py.Dataset, block_size: int, start: int, stop: int) -> Iterator[CsrBlock]:
    for r0 in range(start, stop, block_size):
        yield CsrBlock.from_dense(ds[r0 : min(r0 + block_size, stop)], start=r0)


def _csr_blocks(
    g: h5py.Group, n_cols: int, block_size: int, start: int, stop: int
) -> Iterator[CsrBlock]:
    indptr_ds, indices_ds, data_ds = g["indptr"], g["indices"], g["data"]
    stored = min(len(data_ds), len(indices_ds))
    for r0 in range(start, stop, block_size):
        r1 = min(r0 + block_size, stop)
        indptr = indptr_ds[r0 : r1 + 1].astype(np.int64)
        where = f"{g.name.lstrip('/')}/indptr of cells {r0}-{r1}"
        lo, hi = row_extent(indptr, stored, n_cols, Path(g.file.filename), where, r0)
        indptr -= lo
        indices = read_range(indices_ds, lo, hi, np.int64)
        data = read_range(data_ds, lo, hi, np.float32)
        _check_indices(indices, n_cols, g)
        if not _rows_sorted(indices, indptr):
            rows = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(indptr))
            order = np.lexsort((indices, rows))
            indices, data = indices[order], data[order]
        yield CsrBlock(data, indices, indptr, n_cols, r0)


def _rows_sorted(indices: np.ndarray, indptr: np.ndarray) -> bool:
    """Whether column ids rise within every row (anndata writes them so; other tools may not)."""
    rising = np.diff(indices) > 0
    starts = indptr[1:-1]
    starts = starts[(starts > 0) & (starts < len(indices))]
    rising[starts - 1] = True  # a row's first column may well be below the previous row's last
    return bool(rising.all())


def _csc_blocks(
    g: h5py.Group, n_rows: int, n_cols: int, block_size: int, start: int, stop: int
) -> Iterator[CsrBlock]:
    """Rows of a CSC matrix: in memory when small, else an external bucket transpose.

    Pass 1 counts entries per row; rows are grouped into buckets of whole blocks holding at most
    CSC_BUCKET_NNZ entries; pass 2 reads the file column chunk by column chunk and appends each
    bucket's (row, col, value) entries to its own temporary files; each bucket is then sorted by
    row in memory. Columns rise within a bucket's files already, so a stable sort by row suffices.
    """
    if start >= stop:
        return
    indptr = g["indptr"][()].astype(np.int64)
    if len(indptr) != n_cols + 1:
        raise InputError(
            f"{g.file.filename}: {g.name.lstrip('/')}/indptr has {len(indptr)} "
            f"entries for {n_cols} columns"
        )
    stored = min(len(g["data"]), len(g["indices"]))
    where = f"{g.name.lstrip('/')}/indptr"
    row_extent(indptr, stored, n_rows, Path(g.file.filename), where, nouns=("gene", "cell"))
    if indptr[-1] <= CSC_BUCKET_NNZ:  # one bucket, never spilled
        entries = _csc_entries(g, indptr, 0, n_cols, n_rows, start, stop)
        yield from _bucket_blocks(*entries, start, stop, n_cols, block_size)
        return
    bounds = _bucket_bounds(_row_counts(g, n_rows)[start:stop], block_size, start)
    with tempfile.TemporaryDirectory(prefix="scgpt-csc-") as tmp:
        spill = [
            [Path(tmp) / f"{i}.{part}" for part in ("row", "col", "value")] for i in bounds[:-1]
        ]
        try:
            _spill_buckets(g, indptr, n_rows, bounds, spill)
        except OSError as e:  # the disk of the temporary files, not the input
            raise OutputError(
                f"{tmp}: no room for the temporary files of a CSC transpose ({e.strerror}); "
                "set TMPDIR to a larger disk"
            ) from e
        for i, files in enumerate(spill):
            entries = [_take_file(file, dtype) for file, dtype in zip(files, _SPILLED, strict=True)]
            blocks = _bucket_blocks(*entries, bounds[i], bounds[i + 1], n_cols, block_size)
            del entries  # held here, the bucket's row ids would outlive their sort
            yield from blocks


def _spill_buckets(
    g: h5py.Group, indptr: np.ndarray, n_rows: int, bounds: np.ndarray, spill: list[list[Path]]
) -> None:
    """Pass 2: append every entry to its bucket's files, reading CSC_CHUNK entries at a time."""
    for c0, c1 in _column_chunks(indptr, CSC_CHUNK):
        entries = _csc_entries(g, indptr, c0, c1, n_rows, bounds[0], bounds[-1])
        _spill_entries(*entries, bounds, spill)


def _spill_entries(
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    bounds: np.ndarray,
    spill: list[list[Path]],
) -> None:
    """Append entries (rows counted from bounds[0], changed in place) to their buckets' files
    (io.mtx spills through it too)."""
    bucket = np.searchsorted(bounds - bounds[0], rows, side="right") - 1
    rows -= (bounds[bucket] - bounds[0]).astype(np.int32)  # counted from the bucket's first
    order = _stable_order(bucket, len(spill))
    entries = [rows[order], cols[order], values[order]]
    ends = np.cumsum(np.bincount(bucket, minlength=len(spill)))
    for i in np.flatnonzero(np.diff(ends, prepend=0)):
        for file, part in zip(spill[i], entries, strict=True):
            with file.open("ab") as f:  # not tofile: it loses a short write silently
                f.write(np.ascontiguousarray(part[ends[i - 1] if i else 0 : ends[i]]).data)


def _csc_entries(
    g: h5py.Group, indptr: np.ndarray, c0: int, c1: int, n_rows: int, start: int, stop: int
) -> list[np.ndarray]:
    """(row - start, col, value) of the entries of columns [c0, c1) in rows [start, stop), in
    column order."""
    lo, hi = int(indptr[c0]), int(indptr[c1])
    rows = g["indices"][lo:hi].astype(np.int32)
    _check_indices(rows, n_rows, g)
    cols = np.repeat(np.arange(c0, c1, dtype=np.int32), np.diff(indptr[c0 : c1 + 1]))
    values = g["data"][lo:hi].astype(np.float32, copy=False)
    if start > 0 or stop < n_rows:
        keep = (rows >= start) & (rows < stop)
        rows, cols, values = rows[keep], cols[keep], values[keep]
    rows -= np.int32(start)
    return [rows, cols, values]


def _take_file(path: Path, dtype: type) -> np.ndarray:
    """A spilled array, deleting its file to free the disk as we go."""
    values = np.fromfile(path, dtype=dtype) if path.exists() else np.empty(0, dtype)
    path.unlink(missing_ok=True)
    return values


def _row_counts(g: h5py.Group, n_rows: int) -> np.ndarray:
    """Stored entries per row of a CSC matrix, reading its row ids CSC_CHUNK at a time."""
    indices = g["indices"]
    counts = np.zeros(n_rows, dtype=np.int64)
    for lo in range(0, indices.shape[0], CSC_CHUNK):
        rows = indices[lo : lo + CSC_CHUNK]
        _check_indices(rows, n_rows, g)
        counts += np.bincount(rows, minlength=n_rows)
    return counts


def _bucket_bounds(row_nnz: np.ndarray, block_size: int, start: int) -> np.ndarray:
    """First row of each bucket, then the end: whole blocks, at most CSC_BUCKET_NNZ entries and
    CSC_BUCKET_ROWS rows each; a single block over either limit gets a bucket of its own."""
    block_starts = np.arange(0, len(row_nnz), block_size)
    block_nnz = np.add.reduceat(row_nnz, block_starts) if len(row_nnz) else row_nnz
    bounds, held_nnz, held_rows = [0], 0, 0
    for first, nnz in zip(block_starts.tolist(), block_nnz.tolist(), strict=True):
        full = held_nnz + nnz > CSC_BUCKET_NNZ or held_rows + block_size > CSC_BUCKET_ROWS
        if held_rows and full:
            bounds.append(first)
            held_nnz, held_rows = 0, 0
        held_nnz, held_rows = held_nnz + nnz, held_rows + block_size
    bounds.append(len(row_nnz))
    return np.asarray(bounds, dtype=np.int64) + start


def _column_chunks(indptr: np.ndarray, chunk: int) -> Iterator[tuple[int, int]]:
    """Column ranges holding about `chunk` entries each (a single wider column is one range)."""
    c0, n_cols = 0, len(indptr) - 1
    while c0 < n_cols:
        c1 = int(np.searchsorted(indptr, indptr[c0] + chunk, side="right")) - 1
        c1 = min(max(c1, c0 + 1), n_cols)
        yield c0, c1
        c0 = c1


def _stable_order(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """A stable argsort of keys in [0, n_keys); numpy radix-sorts 16-bit integers, in O(n)."""
    return np.argsort(keys.astype(np.uint16) if n_keys <= 2**16 else keys, kind="stable")


def _bucket_blocks(
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    first: int,
    end: int,
    n_cols: int,
    block_size: int,
) -> Iterator[CsrBlock]:
    """CSR blocks of rows [first, end) from a bucket's entries in column order."""
    n_rows = end - first
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    order = _stable_order(rows, n_rows)
    del rows  # the bucket's peak memory is here: keep only what the blocks need
    cols, values = cols[order], values[order]
    del order
    for r0 in range(0, n_rows, block_size):
        r1 = min(r0 + block_size, n_rows)
        lo, hi = indptr[r0], indptr[r1]
        block_indptr = indptr[r0 : r1 + 1] - lo
        yield CsrBlock(
            values[lo:hi], cols[lo:hi].astype(np.int64), block_indptr, n_cols, first + r0
        )


def _check_indices(indices: np.ndarray, bound: int, g: h5py.Group) -> None:
    if indices.size and (indices.min() < 0 or indices.max() >= bound):
        raise InputError(
            f"{g.file.filename}: index {indices.max()} out of range 0..{bound - 1} "
            f"while reading {g.name.lstrip('/')}"
        )
