"""In-memory matrices read like files: a dense numpy array or CSR parts with gene names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..csr import CsrBlock
from ..errors import InputError
from .base import CountMatrix


class ArrayCounts(CountMatrix):
    """An in-memory cells x genes matrix (dense numpy array or CSR parts) read like a file."""

    format = "array"

    def __init__(
        self,
        x: np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray],
        genes: list[str] | np.ndarray,
        cells: list[str] | np.ndarray | None = None,
    ):
        super().__init__(Path("<array>"), None)
        genes = np.asarray(genes).astype(str)
        if genes.ndim != 1:
            raise InputError("<array>: genes must be a 1-D list of gene names")
        self.n_genes = len(genes)
        self.var = {"index": genes}
        if isinstance(x, tuple) or hasattr(x, "indptr"):
            data, indices, indptr = (x.data, x.indices, x.indptr) if hasattr(x, "indptr") else x
            self.matrix = "csr"
            self._csr = _check_csr(
                np.asarray(data), np.asarray(indices), np.asarray(indptr), self.n_genes
            )
            self._dense = None
            self.n_cells = len(self._csr[2]) - 1
        else:
            x = np.asarray(x)
            if x.ndim != 2 or x.shape[1] != self.n_genes:
                raise InputError(
                    f"<array>: the matrix has shape {x.shape}; expected (cells, {self.n_genes}) "
                    "for the genes given"
                )
            if x.dtype.kind not in "biuf":
                raise InputError(f"<array>: the matrix holds {x.dtype}, not numbers")
            self.matrix, self._dense, self.n_cells = "dense", x, x.shape[0]
        self.obs_names = (
            np.arange(self.n_cells).astype(str) if cells is None else np.asarray(cells).astype(str)
        )
        if self.obs_names.shape != (self.n_cells,):
            raise InputError(f"<array>: {len(self.obs_names)} cell names for {self.n_cells} cells")

    def _blocks(self, block_size: int, start: int, stop: int) -> Iterator[CsrBlock]:
        for lo in range(start, stop, block_size):
            hi = min(lo + block_size, stop)
            if self._dense is not None:
                yield CsrBlock.from_dense(self._dense[lo:hi], start=lo)
                continue
            data, indices, indptr = self._csr
            a, b = indptr[lo], indptr[hi]
            yield CsrBlock(data[a:b], indices[a:b], indptr[lo : hi + 1] - a, self.n_genes, lo)

    def close(self) -> None:
        pass


def _check_csr(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR parts as float32 / int64, checked, with the columns of every row sorted."""
    if data.ndim != 1 or indices.shape != data.shape or indptr.ndim != 1 or len(indptr) < 1:
        raise InputError("<array>: CSR parts must be 1-D data, indices (same length) and indptr")
    indptr = indptr.astype(np.int64)
    if indptr[0] != 0 or indptr[-1] != len(data) or (np.diff(indptr) < 0).any():
        raise InputError("<array>: indptr must rise from 0 to the number of stored values")
    indices = indices.astype(np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= n_cols):
        raise InputError(f"<array>: column indices must be in 0..{n_cols - 1} (one per gene)")
    data = data.astype(np.float32)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    order = np.lexsort((indices, rows))
    if (np.diff(order) != 1).any():  # unsorted rows, as scipy allows
        data, indices = data[order], indices[order]
    if ((np.diff(indices) == 0) & (np.diff(rows) == 0)).any():
        raise InputError("<array>: a cell has two values for one gene (sum duplicates first)")
    return data, indices, indptr
