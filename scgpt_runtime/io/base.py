"""What every reader returns: a counts matrix streamed in row blocks, with gene and cell tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from ..csr import CsrBlock
from ..errors import InputError, ScgptError

# What h5py and HDF5 raise for a damaged or malformed file, depending on where the damage is.
HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)


@contextmanager
def damaged(path: Path, what: str) -> Iterator[None]:
    """Turn HDF5's errors for a damaged file, wherever they arise, into one InputError that
    names the file and what was being read."""
    try:
        yield
    except ScgptError:
        raise
    except HDF5_ERRORS as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: damaged or malformed file: cannot read {what} ({detail})") from e


class CountMatrix:
    """A cells x genes matrix of one file, read in row blocks so memory is bounded by the block.

    Subclasses set the attributes below in `__init__` and implement `_blocks`.
    """

    format: str  # "h5ad", "10x-v3", "10x-v2" or "10x-mtx"
    matrix: str  # which matrix: "raw/X", "X", "layers/counts", "matrix", "GRCh38", ...
    n_cells: int
    n_genes: int
    var: dict[str, np.ndarray]  # gene identifier columns (str arrays); the var index as "index"

    def __init__(self, path: Path, h5: h5py.File | None):
        self.path = path
        self.h5 = h5  # None for readers of other files (a 10x Matrix Market folder)

    @cached_property
    def obs_names(self) -> np.ndarray:
        """(n_cells,) str: the cell barcodes, read when first needed (a look at the header of a
        file of millions of cells stays small)."""
        with damaged(self.path, "the cell names"):
            return self._read_obs_names()

    def _read_obs_names(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def obs_columns(self) -> list[str]:
        """Names of the per-cell annotation columns (empty for 10x files)."""
        return []

    def read_obs(self, name: str) -> np.ndarray:
        """One obs column: numbers as numbers, strings and categories as str, missing as None."""
        raise InputError(f"{self.path}: has no obs column {name!r} (available: none)")

    def _blocks(self, block_size: int, start: int, stop: int) -> Iterator[CsrBlock]:
        raise NotImplementedError

    def iter_blocks(
        self, block_size: int = 2048, start: int = 0, stop: int | None = None
    ) -> Iterator[CsrBlock]:
        """Rows [start, stop) in blocks of at most `block_size` rows, float32 values, checked."""
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        with damaged(self.path, self.matrix):
            for block in self._blocks(block_size, start, stop):
                _check_values(block, self.path, self.matrix)
                yield block

    def close(self) -> None:
        if isinstance(self.h5, h5py.File):  # a modality of a .h5mu holds a group of its file
            self.h5.close()

    def __enter__(self) -> CountMatrix:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_values(block: CsrBlock, path: Path, matrix: str) -> None:
    if block.nnz and not np.isfinite(block.data).all():
        raise InputError(f"{path}: {matrix} holds NaN or infinite values")
    if block.nnz and block.data.min() < 0:
        raise InputError(f"{path}: {matrix} holds negative values; counts must be >= 0")


def row_extent(
    indptr: np.ndarray,
    n_values: int,
    row_length: int,
    path: Path,
    where: str,
    first: int = 0,
    nouns: tuple[str, str] = ("cell", "gene"),
) -> tuple[int, int]:
    """(first, last) value offsets of the rows an indptr slice spans (rows `first`..., `nouns`
    name rows and columns), checked: it must not decrease, give a row more values than its
    `row_length` columns (what bounds a block's memory), nor point outside the `n_values`
    stored values (a damaged or forged file)."""
    a, b = int(indptr[0]), int(indptr[-1])
    sizes = np.diff(indptr)
    if np.any(sizes < 0):
        raise InputError(f"{path}: {where} decreases")
    if len(sizes) and sizes.max() > row_length:
        i = int(sizes.argmax())
        raise InputError(
            f"{path}: {where}: {nouns[0]} {first + i} has {int(sizes[i])} values, more than "
            f"the {row_length} {nouns[1]}s of the file"
        )
    if a < 0 or b > n_values:
        raise InputError(f"{path}: {where} points at values {a}-{b} of {n_values} stored")
    return a, b
