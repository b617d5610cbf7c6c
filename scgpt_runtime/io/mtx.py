"""Reader for 10x Genomics Matrix Market folders: matrix.mtx(.gz), features.tsv.gz (CellRanger 3+)
or genes.tsv(.gz) (CellRanger 2), and barcodes.tsv(.gz).

The matrix is features x cells in coordinate text whose entries may come in any order (cell by
cell, feature by feature), so streaming cells is a transpose. The text is parsed in chunks
(io.mtx_text) and its entries grouped by cell into buckets, as io.h5ad transposes CSC:
  memory  at most MEMORY_NNZ entries: one pass, the whole matrix one bucket, kept by the reader;
  spill   more: a first pass (once per reader) counts each cell's entries to size the buckets,
          a second appends each entry to its bucket's temporary files; a bucket is read back
          and sorted when its cells are asked for, one bucket in memory at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np

from ..csr import CsrBlock
from ..errors import InputError, OutputError
from .base import CountMatrix
from .h5ad import _SPILLED, _bucket_blocks, _bucket_bounds, _spill_entries, _take_file
from .mtx_text import count_lines, opened, read_entries, read_header, read_lines
from .tenx import _sort_rows

MATRIX_FILES = ("matrix.mtx.gz", "matrix.mtx")
FEATURE_FILES = ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
BARCODE_FILES = ("barcodes.tsv.gz", "barcodes.tsv")
GENE_EXPRESSION = "Gene Expression"  # the type of every feature of a CellRanger 2 genes.tsv

MEMORY_NNZ = 2**23  # entries transposed in memory (12 bytes each); a larger matrix spills
BUCKET_GRAIN = 256  # cells: buckets hold whole groups of this many (h5ad's are whole blocks)


class MtxMatrix(CountMatrix):
    """A 10x Matrix Market folder as cells x features, streamed in row blocks.

    `feature_type` keeps only the features of that type (CellRanger 3+'s third column; every
    feature of a genes.tsv is "Gene Expression"), remapping their columns; None keeps all.
    """

    format = "10x-mtx"

    def __init__(self, path: Path, *, feature_type: str | None = GENE_EXPRESSION):
        super().__init__(path, None)
        self._mtx = _find(path, MATRIX_FILES, "matrix")
        features = _find(path, FEATURE_FILES, "features")
        self._barcodes = _find(path, BARCODE_FILES, "barcodes")
        self.matrix = self._mtx.name
        with opened(self._mtx) as f:
            self._header = header = read_header(self._mtx, f)
        var = _read_features(features)
        n_barcodes = count_lines(self._barcodes)
        if header.n_features != len(var["id"]):
            raise InputError(
                f"{self._mtx}: its size line says {header.n_features} features but "
                f"{features.name} lists {len(var['id'])}"
            )
        if header.n_cells != n_barcodes:
            raise InputError(
                f"{self._mtx}: its size line says {header.n_cells} cells but "
                f"{self._barcodes.name} lists {n_barcodes} barcodes"
            )
        self._col_map = None  # all-features column -> kept column, -1 = dropped
        if feature_type is not None:
            keep = var["feature_type"] == feature_type
            if not keep.any():
                types = ", ".join(dict.fromkeys(var["feature_type"].tolist()))
                raise InputError(f"{features}: has no {feature_type!r} features (types: {types})")
            if not keep.all():
                self._col_map = np.full(header.n_features, -1, dtype=np.int64)
                self._col_map[keep] = np.arange(int(keep.sum()))
                var = {k: v[keep] for k, v in var.items()}
        self.var = var
        self.n_cells = header.n_cells
        self.n_genes = len(var["id"])
        self._cell_nnz: np.ndarray | None = None  # kept entries per cell, counted when needed
        self._bounds: np.ndarray | None = None  # first cell of each bucket, then n_cells
        self._tmp: tempfile.TemporaryDirectory | None = None  # the buckets' files
        self._on_disk: np.ndarray | None = None  # (n_buckets,) bool: its files are written
        self._bucket: CsrBlock | None = None  # the bucket read last, transposed

    def _read_obs_names(self) -> np.ndarray:
        return np.asarray(
            [line.split("\t", 1)[0] for line in read_lines(self._barcodes)], dtype=str
        )

    def _blocks(self, block_size: int, start: int, stop: int) -> Iterator[CsrBlock]:
        for first in range(start, stop, block_size):
            yield self._rows(first, min(first + block_size, stop))

    def close(self) -> None:
        self._bucket = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        super().close()

    def _rows(self, first: int, end: int) -> CsrBlock:
        """Cells [first, end) as one block (copied: the bucket is kept for the next block)."""
        pieces = []
        while first < end:
            bucket = self._bucket_of(first)
            a, b = first - bucket.start, min(end - bucket.start, bucket.n_rows)
            lo, hi = bucket.indptr[a], bucket.indptr[b]
            data, indices = bucket.data[lo:hi].copy(), bucket.indices[lo:hi].copy()
            pieces.append(
                CsrBlock(data, indices, bucket.indptr[a : b + 1] - lo, self.n_genes, first)
            )
            first = bucket.start + b
        return pieces[0] if len(pieces) == 1 else _stack(pieces)

    def _bucket_of(self, cell: int) -> CsrBlock:
        """The bucket of cells holding `cell` as one block: columns sorted, duplicates summed.

        Kept until another is needed, so that reading cells in order, block by block or in
        ranges of a few blocks (a MultiModalMatrix), transposes each bucket once."""
        bucket = self._bucket
        if bucket is not None and bucket.start <= cell < bucket.start + bucket.n_rows:
            return bucket
        self._bucket = None  # freed before the next one is made
        if self._header.nnz <= MEMORY_NNZ:
            first, end, entries = 0, self.n_cells, self._read_all()
        else:
            bounds = self._buckets()
            i = int(np.searchsorted(bounds, cell, side="right")) - 1
            if not self._on_disk[i]:  # a first read, or a second sweep: the files were taken
                self._spill()
            first, end = int(bounds[i]), int(bounds[i + 1])
            files = self._files(i)
            entries = [_take_file(file, dtype) for file, dtype in zip(files, _SPILLED, strict=True)]
            self._on_disk[i] = False
        blocks = _bucket_blocks(*entries, first, end, self.n_genes, end - first)
        del entries  # held here, the row ids would outlive their sort
        block = next(blocks)
        blocks.close()
        data, indices, indptr = _sort_rows(block.data, block.indices, block.indptr, self.n_genes)
        self._bucket = CsrBlock(data, indices, indptr, self.n_genes, first)
        return self._bucket

    def _read_all(self) -> list[np.ndarray]:
        """(cell, kept column, value) of every entry: a pass over the text."""
        nnz = self._header.nnz
        rows, cols = np.empty(nnz, np.int32), np.empty(nnz, np.int32)
        values = np.empty(nnz, np.float32)
        n = 0
        for r, c, v in self._entries():
            rows[n : n + len(r)], cols[n : n + len(r)], values[n : n + len(r)] = r, c, v
            n += len(r)
        return [rows[:n], cols[:n], values[:n]]

    def _buckets(self) -> np.ndarray:
        """First cell of each bucket, then n_cells: at most CSC_BUCKET_NNZ entries each."""
        if self._bounds is None:
            self._bounds = _bucket_bounds(self._nnz_per_cell(), BUCKET_GRAIN, 0)
            self._on_disk = np.zeros(len(self._bounds) - 1, dtype=bool)
        return self._bounds

    def _files(self, i: int) -> list[Path]:
        assert self._tmp is not None
        return [Path(self._tmp.name) / f"{i}.{part}" for part in ("row", "col", "value")]

    def _spill(self) -> None:
        """Every entry appended to the temporary files of its bucket: a pass over the text."""
        bounds, on_disk = self._buckets(), self._on_disk
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="scgpt-mtx-")
        spill = [self._files(i) for i in range(len(on_disk))]
        for file in chain.from_iterable(spill):  # what a sweep stopped early left
            file.unlink(missing_ok=True)
        on_disk[:] = False
        try:
            for entries in self._entries():
                _spill_entries(*entries, bounds, spill)
        except OSError as e:  # the disk of the temporary files: the input's errors are InputErrors
            raise OutputError(
                f"{self._tmp.name}: no room for the temporary files of a transpose "
                f"({e.strerror}); set TMPDIR to a larger disk"
            ) from e
        on_disk[:] = True

    def _nnz_per_cell(self) -> np.ndarray:
        """Kept entries of every cell: a pass over the text, once per reader."""
        if self._cell_nnz is None:
            counts = np.zeros(self.n_cells, dtype=np.int64)
            for rows, _, _ in self._entries():
                if len(rows):
                    first = int(rows.min())  # entries in cell order cover a few cells a chunk
                    found = np.bincount(rows - first)
                    counts[first : first + len(found)] += found
            self._cell_nnz = counts
        return self._cell_nnz

    def _entries(self) -> Iterator[list[np.ndarray]]:
        """(cell, kept column, value) of the entries, chunk by chunk in file order: int32,
        int32, float32."""
        for features, cells, values in read_entries(self._mtx, self._header):
            if self._col_map is not None:
                features = self._col_map[features]
                keep = features >= 0
                features, cells, values = features[keep], cells[keep], values[keep]
            yield [cells.astype(np.int32), features.astype(np.int32), values]


def _stack(pieces: list[CsrBlock]) -> CsrBlock:
    """Blocks of consecutive rows as one."""
    offsets = np.cumsum([0] + [p.nnz for p in pieces[:-1]])
    indptr = [pieces[0].indptr[:1]] + [
        p.indptr[1:] + o for p, o in zip(pieces, offsets, strict=True)
    ]
    return CsrBlock(
        np.concatenate([p.data for p in pieces]),
        np.concatenate([p.indices for p in pieces]),
        np.concatenate(indptr),
        pieces[0].n_cols,
        pieces[0].start,
    )


def feature_types(path: Path) -> list[str]:
    """The feature types of a 10x Matrix Market folder, in order of first appearance."""
    types = _read_features(_find(path, FEATURE_FILES, "features"))["feature_type"]
    return list(dict.fromkeys(types.tolist()))


def is_mtx_folder(path: Path) -> bool:
    """Whether `path` is a folder holding a matrix.mtx.gz or matrix.mtx."""
    return path.is_dir() and any((path / name).is_file() for name in MATRIX_FILES)


def _find(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"{folder}: 10x Matrix Market folder without its {what} file ({' or '.join(names)})"
    )


def _read_features(path: Path) -> dict[str, np.ndarray]:
    """id, name and feature_type of every line (further columns, such as ATAC's intervals, are
    not kept); a genes.tsv has no type column: all gene expression."""
    rows = [line.split("\t") for line in read_lines(path)]
    if not rows:
        raise InputError(f"{path}: lists no features")
    width = len(rows[0])
    ragged = [i for i, row in enumerate(rows) if len(row) != width]
    if ragged:
        i = ragged[0]
        raise InputError(
            f"{path}: line {i + 1} has {len(rows[i])} tab-separated fields, line 1 has {width}"
        )
    columns: list[Iterable[str]] = list(zip(*rows, strict=True))
    ids = columns[0]
    return {
        "id": np.asarray(ids, dtype=str),
        "name": np.asarray(columns[1] if width > 1 else ids, dtype=str),
        "feature_type": np.asarray(
            columns[2] if width > 2 else [GENE_EXPRESSION] * len(rows), dtype=str
        ),
    }
