"""Several modalities of the same cells as one matrix: their features side by side.

A `MultiModalMatrix` streams the cells of a file with the features of modality 0, then of
modality 1, ... as columns; a cell a modality did not measure has no values in its columns.
Each modality is a reader of its own (an AnnData group of a .h5mu file, the features of one
type of a 10x file) with a map from the file's cells to its rows. Readers: h5mu.py (MuData)
and `by_feature_type` (10x files, whose feature types are the modalities).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..csr import CsrBlock
from ..errors import InputError
from .base import CountMatrix, damaged

# 10x feature types and the modality names they get (others: lower case, "_" for spaces).
FEATURE_TYPES = {"Gene Expression": "rna", "Antibody Capture": "adt", "Peaks": "atac"}


def feature_index(var: dict[str, np.ndarray]) -> np.ndarray:
    """A modality's feature names: the var index of an AnnData, the names of a 10x file."""
    return var["index"] if "index" in var else var.get("name", next(iter(var.values())))


@dataclass(frozen=True)
class ModalityPart:
    """One modality: its counts, and where each of the file's cells is in it."""

    name: str
    counts: CountMatrix
    rows: np.ndarray  # (n_cells,) int64: row of cell i in this modality, -1 = not measured
    columns: slice  # its columns among the side-by-side features

    @property
    def n_present(self) -> int:
        return int((self.rows >= 0).sum())


class MultiModalMatrix(CountMatrix):
    """Cells with the features of several modalities side by side (see the module doc).

    var holds "index" (feature names) and "modality" (each column's); a modality's own var
    is `part(name).counts.var`. `obs` is the file's cell table where it has one (a Frame)."""

    def __init__(
        self,
        path: Path,
        h5: h5py.File,
        fmt: str,
        parts: list[tuple[str, CountMatrix, np.ndarray]],
        obs_names: np.ndarray | None = None,
        obs=None,
    ):
        super().__init__(path, h5)
        self.format = fmt
        self._obs, self._names = obs, obs_names
        self.parts, offset = [], 0
        for name, counts, rows in parts:
            columns = slice(offset, offset + counts.n_genes)
            self.parts.append(ModalityPart(name, counts, rows, columns))
            offset += counts.n_genes
        self.n_cells = len(parts[0][2])
        self.n_genes = offset
        self.matrix = " + ".join(p.counts.matrix for p in self.parts)
        self.var = {
            "index": np.concatenate([feature_index(p.counts.var) for p in self.parts]),
            "modality": np.concatenate(
                [np.full(p.counts.n_genes, p.name, dtype=object) for p in self.parts]
            ),
        }

    @property
    def modalities(self) -> list[str]:
        return [p.name for p in self.parts]

    def part(self, name: str) -> ModalityPart:
        return next(p for p in self.parts if p.name == name)

    def presence(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Modality name -> (cells,) bool: which cells of [start, stop) it measured."""
        return {p.name: p.rows[start:stop] >= 0 for p in self.parts}

    def _read_obs_names(self) -> np.ndarray:
        if self._obs is not None:
            return self._obs.index()
        if self._names is not None:
            return self._names
        return self.parts[0].counts.obs_names

    @property
    def obs_columns(self) -> list[str]:
        return [] if self._obs is None else list(self._obs.columns)

    def read_obs(self, name: str) -> np.ndarray:
        """A column of the file's cell table (the modalities' own obs are not searched)."""
        if name not in self.obs_columns:
            available = ", ".join(self.obs_columns) or "none"
            raise InputError(f"{self.path}: has no obs column {name!r} (available: {available})")
        with damaged(self.path, f"obs/{name}"):
            return self._obs.read(name)

    def close(self) -> None:
        for p in self.parts:  # a part may hold more than the shared file: an mtx spill folder
            p.counts.close()
        super().close()

    def _blocks(self, block_size: int, start: int, stop: int) -> Iterator[CsrBlock]:
        for r0 in range(start, stop, block_size):
            r1 = min(r0 + block_size, stop)
            pieces = [_part_rows(p, r0, r1, block_size) for p in self.parts]
            yield _side_by_side(pieces, self.n_genes, r0)


def by_feature_type(
    path: Path, open_type, types: Sequence[str], modalities: Sequence[str] | None
) -> MultiModalMatrix:
    """A 10x file as modalities, one per feature type; `open_type(t)` opens the features of
    type t. `modalities` picks by modality name (FEATURE_TYPES), default all."""
    named = {FEATURE_TYPES.get(t, t.lower().replace(" ", "_")): t for t in dict.fromkeys(types)}
    names = list(modalities) if modalities is not None else list(named)
    unknown = [m for m in names if m not in named]
    if unknown:
        raise InputError(
            f"{path}: has no modality {', '.join(map(repr, unknown))} (feature types: "
            + ", ".join(f"{t} = {m}" for m, t in named.items())
            + ")"
        )
    opened = [(m, open_type(named[m])) for m in names]
    n = opened[0][1].n_cells
    parts = [(m, c, np.arange(n, dtype=np.int64)) for m, c in opened]
    first = opened[0][1]
    return MultiModalMatrix(path, first.h5, f"{first.format} by feature type", parts)


def _part_rows(part: ModalityPart, r0: int, r1: int, block_size: int) -> CsrBlock:
    """Cells [r0, r1) of one modality as a block of r1 - r0 rows (not measured: empty rows).

    The modality's rows between the first and last wanted are read block by block: bounded
    memory, and one read where the map is in order (as every writer we know makes it)."""
    rows = part.rows[r0:r1]
    n, wanted = r1 - r0, rows[rows >= 0]
    cells, pieces = [], []
    if len(wanted):
        for block in part.counts.iter_blocks(block_size, int(wanted.min()), int(wanted.max()) + 1):
            local = rows - block.start
            inside = np.flatnonzero((rows >= 0) & (local >= 0) & (local < block.n_rows))
            if len(inside):
                cells.append(inside)
                pieces.append(block.take(local[inside]))
    n_cols = part.counts.n_genes
    if not pieces:
        return CsrBlock(
            np.empty(0, np.float32), np.empty(0, np.int64), np.zeros(n + 1, np.int64), n_cols, r0
        )
    lengths = np.concatenate([np.diff(p.indptr) for p in pieces])
    of_value = np.repeat(np.concatenate(cells), lengths)
    order = np.argsort(of_value, kind="stable")  # by cell; a cell's columns stay in order
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(of_value, minlength=n), out=indptr[1:])
    data = np.concatenate([p.data for p in pieces])[order]
    indices = np.concatenate([p.indices for p in pieces])[order]
    return CsrBlock(data, indices, indptr, n_cols, r0)


def _side_by_side(pieces: list[CsrBlock], n_cols: int, start: int) -> CsrBlock:
    """The rows of several blocks (one per modality, same cells) joined, columns offset."""
    n_rows = pieces[0].n_rows
    offsets = np.cumsum([0] + [p.n_cols for p in pieces[:-1]])
    rows = np.concatenate([p.row_ids for p in pieces])
    order = np.argsort(rows, kind="stable")  # by cell; within it modalities, then columns
    data = np.concatenate([p.data for p in pieces])[order]
    indices = np.concatenate([p.indices + o for p, o in zip(pieces, offsets, strict=True)])[order]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return CsrBlock(data, indices, indptr, n_cols, start)
