"""A block of rows of a cells x genes matrix in CSR form, the unit every reader yields."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CsrBlock:
    """Rows [start, start + n_rows) of a cells x genes matrix; columns sorted within each row."""

    data: np.ndarray  # (nnz,) float32
    indices: np.ndarray  # (nnz,) int64 column ids
    indptr: np.ndarray  # (n_rows + 1,) int64, indptr[0] == 0
    n_cols: int
    start: int = 0  # global index of the first row, so results never depend on block size

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def row_ids(self) -> np.ndarray:
        """Block-local row of every stored value, (nnz,) int64."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(self.indptr))

    @classmethod
    def from_dense(cls, x: np.ndarray, start: int = 0) -> CsrBlock:
        x = np.asarray(x)
        rows, cols = np.nonzero(x)
        indptr = np.zeros(x.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=x.shape[0]), out=indptr[1:])
        data = x[rows, cols].astype(np.float32)
        return cls(data, cols.astype(np.int64), indptr, x.shape[1], start)

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n_rows, self.n_cols), dtype=np.float32)
        out[self.row_ids, self.indices] = self.data
        return out

    def take(self, rows: np.ndarray) -> CsrBlock:
        """Block-local rows `rows` (ascending) as a block; its start is the first row's (rows need
        not be contiguous: do not bin a taken block with a seeded mode)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = np.diff(self.indptr)[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # positions of the kept values: each row's start, plus 0 .. length-1 within it
        at = np.repeat(self.indptr[rows] - indptr[:-1], lengths) + np.arange(indptr[-1])
        start = self.start + int(rows[0]) if len(rows) else self.start
        return CsrBlock(self.data[at], self.indices[at], indptr, self.n_cols, start)

    def dense_columns(self, columns: np.ndarray) -> np.ndarray:
        """(n_rows, len(columns)) float32 of the given columns, without a full dense copy."""
        lookup = np.full(self.n_cols, -1, dtype=np.int64)
        lookup[columns] = np.arange(len(columns))
        position = lookup[self.indices]
        keep = position >= 0
        out = np.zeros((self.n_rows, len(columns)), dtype=np.float32)
        out[self.row_ids[keep], position[keep]] = self.data[keep]
        return out

    def with_data(self, data: np.ndarray) -> CsrBlock:
        """The same sparsity pattern with new values."""
        return CsrBlock(data, self.indices, self.indptr, self.n_cols, self.start)
