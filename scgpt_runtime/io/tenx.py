"""Reader for 10x Genomics HDF5 matrices: CellRanger 3+ (`/matrix`) and 2 (a group per genome).

Both store a genes x cells matrix in CSC parts (`data`, `indices`, `indptr`, `shape`), so the
columns of one cell are contiguous: read as they are, the parts are the CSR rows of cells x genes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..csr import CsrBlock
from ..errors import InputError
from .base import CountMatrix, row_extent
from .chunks import read_range
from .h5ad_elements import check_no_nul

_PARTS = ("barcodes", "data", "indices", "indptr", "shape")
_V3_FEATURES = ("id", "name", "feature_type")
_V2_FEATURES = ("genes", "gene_names")


class TenxMatrix(CountMatrix):
    """A 10x Genomics HDF5 matrix as cells x genes, streamed in row blocks.

    `genome` picks a genome group of a v2 file (required when it holds several) or keeps the
    features of one genome of a v3 file. `feature_type` keeps only v3 features of that type
    (None keeps all), remapping their columns.
    """

    def __init__(
        self,
        path: Path,
        h5: h5py.File,
        *,
        genome: str | None = None,
        feature_type: str | None = "Gene Expression",
    ):
        super().__init__(path, h5)
        if "matrix" in h5:
            self.format, self.matrix = "10x-v3", "matrix"
            group = h5["matrix"]
            _require(path, group, _PARTS, "group matrix")
            n_features, n_cells = _shape(path, group)
            features = _features_group(path, group)
            var = _v3_var(path, features, n_features)
            keep = _v3_keep(path, features, n_features, genome, feature_type)
        else:
            self.format = "10x-v2"
            self.matrix = _pick_genome(path, h5, genome)
            group = h5[self.matrix]
            _require(path, group, _PARTS + _V2_FEATURES, f"genome group {self.matrix}")
            n_features, n_cells = _shape(path, group)
            var = {
                "id": _strings(path, group, "genes", n_features),
                "name": _strings(path, group, "gene_names", n_features),
            }
            keep = None
        _check_strings(path, group["barcodes"], n_cells)
        self._barcodes = group["barcodes"]
        self._data, self._indices, self._indptr = group["data"], group["indices"], group["indptr"]
        _check_parts(path, group, n_cells)
        self._n_features = n_features
        self._col_map = None  # all-features column -> kept column, -1 = dropped
        if keep is not None and not keep.all():
            self._col_map = np.full(n_features, -1, dtype=np.int64)
            self._col_map[keep] = np.arange(int(keep.sum()))
            var = {k: v[keep] for k, v in var.items()}
        self.var = var
        self.n_cells = n_cells
        self.n_genes = len(var["id"])

    def _read_obs_names(self) -> np.ndarray:
        return _read_strings(self.path, self._barcodes)

    def _blocks(self, block_size: int, start: int, stop: int) -> Iterator[CsrBlock]:
        stored = min(len(self._data), len(self._indices))
        for lo in range(start, stop, block_size):
            hi = min(lo + block_size, stop)
            indptr = self._indptr[lo : hi + 1].astype(np.int64)
            where = f"{self.matrix}/indptr of cells {lo}-{hi}"
            a, b = row_extent(
                indptr, stored, self._n_features, self.path, where, lo, ("cell", "feature")
            )
            indptr -= a
            data = read_range(self._data, a, b, np.float32)
            indices = read_range(self._indices, a, b, np.int64)
            if len(indices) and (indices.min() < 0 or indices.max() >= self._n_features):
                raise InputError(
                    f"{self.path}: {self.matrix}/indices holds a feature outside "
                    f"0..{self._n_features - 1} in cells {lo}-{hi}"
                )
            if self._col_map is not None:
                indices = self._col_map[indices]
                kept = indices >= 0
                data, indices, indptr = data[kept], indices[kept], _compact(indptr, kept)
            data, indices, indptr = _sort_rows(data, indices, indptr, self.n_genes)
            yield CsrBlock(data, indices, indptr, self.n_genes, lo)


def feature_types(path: Path, h5: h5py.File) -> list[str]:
    """The feature types of a 10x file, in order of first appearance (v2: gene expression)."""
    if "matrix" not in h5:
        return ["Gene Expression"]
    features = _features_group(path, h5["matrix"])
    n = len(features["id"])
    return list(dict.fromkeys(_strings(path, features, "feature_type", n).tolist()))


def _sort_rows(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns strictly ascending within each row, duplicates summed (as scipy would)."""
    if len(indices) < 2:
        return data, indices, indptr
    step = np.diff(indices)
    row_ends = indptr[1:-1] - 1  # steps from a row's last value to the next row's first
    row_ends = row_ends[(row_ends >= 0) & (row_ends < len(step))]
    ascending = step > 0
    ascending[row_ends] = True
    if ascending.all():
        return data, indices, indptr
    descending = step < 0
    descending[row_ends] = True
    counts = np.diff(indptr)
    if descending.all():
        # CellRanger writes every cell's genes in descending order: reverse each row, no sort.
        order = np.repeat(indptr[:-1] + indptr[1:] - 1, counts) - np.arange(len(indices))
        return data[order], indices[order], indptr
    key = np.repeat(np.arange(len(counts), dtype=np.int64) * n_cols, counts) + indices
    order = np.argsort(key, kind="stable")
    data, indices, key = data[order], indices[order], key[order]
    first = np.empty(len(key), dtype=bool)
    first[0] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    if first.all():
        return data, indices, indptr
    starts = np.flatnonzero(first)
    return np.add.reduceat(data, starts), indices[starts], _compact(indptr, first)


def _compact(indptr: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The indptr of the stored values where `kept` is True."""
    before = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(kept, out=before[1:])
    return before[indptr]


def _require(path: Path, group: h5py.Group, names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if not isinstance(group.get(n), h5py.Dataset)]
    if missing:
        raise InputError(f"{path}: 10x {where} has no {', '.join(missing)}")


def _shape(path: Path, group: h5py.Group) -> tuple[int, int]:
    """(n_features, n_cells) from the `shape` dataset."""
    shape = np.asarray(group["shape"][()]).ravel()
    if len(shape) != 2 or shape.dtype.kind not in "iu":
        raise InputError(f"{path}: 10x {group.name}/shape is not two integers: {shape}")
    return int(shape[0]), int(shape[1])


def _check_parts(path: Path, group: h5py.Group, n_cells: int) -> None:
    """Lengths and dtypes agree with the shape; value-level checks happen per block."""
    data, indices, indptr = group["data"], group["indices"], group["indptr"]
    where = f"{path}: 10x {group.name.lstrip('/')}"
    kinds = data.dtype.kind + indices.dtype.kind + indptr.dtype.kind
    if kinds[0] not in "iuf" or kinds[1] not in "iu" or kinds[2] not in "iu":
        raise InputError(
            f"{where}: data, indices and indptr must be numbers "
            f"(found {data.dtype}, {indices.dtype}, {indptr.dtype})"
        )
    if indptr.shape != (n_cells + 1,):
        raise InputError(
            f"{where}: indptr has {len(indptr)} entries but shape says {n_cells} cells "
            f"(expected {n_cells + 1})"
        )
    if data.shape != indices.shape:
        raise InputError(f"{where}: data has {len(data)} values but indices {len(indices)}")
    first, last = int(indptr[0]), int(indptr[-1])
    if first != 0 or last != len(data):
        raise InputError(
            f"{where}: indptr runs from {first} to {last} but data holds {len(data)} values"
        )


def _strings(path: Path, group: h5py.Group, name: str, n: int) -> np.ndarray:
    """A string dataset of `n` entries as a str array."""
    ds = group[name]
    _check_strings(path, ds, n)
    return _read_strings(path, ds)


def _check_strings(path: Path, ds: h5py.Dataset, n: int) -> None:
    if h5py.check_string_dtype(ds.dtype) is None or ds.shape != (n,):
        raise InputError(
            f"{path}: 10x {ds.name.lstrip('/')} should hold {n} strings "
            f"(found {ds.dtype}, shape {ds.shape})"
        )


def _read_strings(path: Path, ds: h5py.Dataset) -> np.ndarray:
    # errors="replace": some writers flag UTF-8 bytes as ASCII; a name is still better than a crash.
    names = np.asarray(ds.asstr(encoding="utf-8", errors="replace")[()], dtype=str)
    try:
        check_no_nul(names)
    except ValueError as e:
        raise InputError(f"{path}: {ds.name.lstrip('/')}: {e}") from e
    return names


def _features_group(path: Path, group: h5py.Group) -> h5py.Group:
    features = group.get("features")
    if not isinstance(features, h5py.Group):
        raise InputError(f"{path}: 10x group matrix has no features")
    missing = [n for n in _V3_FEATURES if not isinstance(features.get(n), h5py.Dataset)]
    if missing:
        raise InputError(
            f"{path}: 10x matrix/features has no {', '.join(missing)} "
            f"(CellRanger writes {', '.join(_V3_FEATURES)})"
        )
    return features


def _v3_var(path: Path, features: h5py.Group, n_features: int) -> dict[str, np.ndarray]:
    """id, name, then every other per-feature string field (gene_id, gene_name, genome, ...)."""
    names = ["id", "name"] + [
        k
        for k, ds in features.items()
        if k not in ("id", "name", "_all_tag_keys")
        and isinstance(ds, h5py.Dataset)
        and h5py.check_string_dtype(ds.dtype) is not None
        and ds.shape == (n_features,)
    ]
    return {k: _strings(path, features, k, n_features) for k in names}


def _v3_keep(
    path: Path,
    features: h5py.Group,
    n_features: int,
    genome: str | None,
    feature_type: str | None,
) -> np.ndarray | None:
    """Which features to keep, or None for all."""
    keep = None
    if feature_type is not None:
        types = _strings(path, features, "feature_type", n_features)
        keep = types == feature_type
        if not keep.any():
            raise InputError(
                f"{path}: has no {feature_type!r} features (types: {', '.join(np.unique(types))})"
            )
    if genome is not None:
        if not isinstance(features.get("genome"), h5py.Dataset):
            raise InputError(f"{path}: 10x matrix/features has no genome, so --genome cannot apply")
        genomes = _strings(path, features, "genome", n_features)
        if genome not in genomes:
            raise InputError(
                f"{path}: has no genome {genome!r} (genomes: {', '.join(np.unique(genomes))})"
            )
        keep = (genomes == genome) if keep is None else keep & (genomes == genome)
        if not keep.any():
            raise InputError(f"{path}: genome {genome!r} has no {feature_type!r} features")
    return keep


def _pick_genome(path: Path, h5: h5py.File, genome: str | None) -> str:
    """The v2 genome group to read: the only one, or the one asked for."""
    genomes = sorted(
        k for k, g in h5.items() if isinstance(g, h5py.Group) and ("indptr" in g or "barcodes" in g)
    )
    if genome is not None:
        if genome not in genomes:
            raise InputError(f"{path}: has no genome {genome!r} (genomes: {', '.join(genomes)})")
        return genome
    if len(genomes) > 1:
        raise InputError(f"{path}: holds genomes {', '.join(genomes)}; pick one with --genome")
    if not genomes:
        raise InputError(f"{path}: has no 10x genome group (expected barcodes, data, indptr, ...)")
    return genomes[0]
