"""Readers for single-cell count files: .h5ad (anndata 0.6 to 0.12), MuData .h5mu, 10x
Genomics HDF5 and 10x Matrix Market folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py

from ..errors import InputError
from .base import CountMatrix, damaged

__all__ = ["CountMatrix", "open_counts"]


def open_counts(
    path: str | Path,
    *,
    layer: str | None = None,
    use_raw: bool = True,
    genome: str | None = None,
    modalities: Sequence[str] | None = None,
) -> CountMatrix:
    """Open a .h5ad, .h5mu or 10x .h5 file, or a 10x Matrix Market folder (matrix.mtx.gz,
    features.tsv.gz, barcodes.tsv.gz; its gene expression), for streaming its counts.

    Counts come from `raw/X` when present, else `X`; `layer` names a layer instead and
    `use_raw=False` skips raw. `genome` picks one genome group of a multi-genome 10x v2 file.
    A .h5mu file opens as a MultiModalMatrix of `modalities` (default: all); a 10x file or
    folder does with `modalities` given (its feature types: rna, adt, atac, ...), else its gene
    expression.
    """
    path = Path(path)
    if path.is_dir():
        counts = _folder_reader(path, layer, genome, modalities)
    else:
        h5 = _open_hdf5(path)
        try:
            with damaged(path, "its layout"):
                counts = _reader(path, h5, layer, use_raw, genome, modalities)
        except BaseException:
            h5.close()
            raise
    if counts.n_cells == 0:
        counts.close()
        raise InputError(f"{path}: {counts.matrix} holds no cells")
    return counts


def _reader(
    path: Path,
    h5: h5py.File,
    layer: str | None,
    use_raw: bool,
    genome: str | None,
    modalities: Sequence[str] | None,
) -> CountMatrix:
    from .h5mu import is_mudata, read_mudata

    if is_mudata(h5):
        if genome is not None:
            raise InputError(f"{path}: is a MuData file; --genome applies to 10x files only")
        return read_mudata(path, h5, modalities=modalities, layer=layer, use_raw=use_raw)
    if _is_10x(h5):
        if layer is not None:
            raise InputError(f"{path}: is a 10x file, which has no layers (drop --layer)")
        from .tenx import TenxMatrix, feature_types

        if modalities is None:
            return TenxMatrix(path, h5, genome=genome)
        from .multimodal import by_feature_type

        def open_type(t: str) -> TenxMatrix:
            return TenxMatrix(path, h5, genome=genome, feature_type=t)

        return by_feature_type(path, open_type, feature_types(path, h5), modalities)
    if modalities is not None:
        raise InputError(f"{path}: holds one modality; --modalities applies to .h5mu and 10x files")
    if _is_h5ad(h5):
        if genome is not None:
            raise InputError(f"{path}: is an h5ad file; --genome applies to 10x files only")
        from .h5ad import H5adMatrix

        return H5adMatrix(path, h5, layer=layer, use_raw=use_raw)
    raise InputError(f"{path}: is HDF5 but neither an h5ad (anndata) nor a 10x matrix file")


def _folder_reader(
    path: Path, layer: str | None, genome: str | None, modalities: Sequence[str] | None
) -> CountMatrix:
    from .mtx import MtxMatrix, feature_types, is_mtx_folder

    if not is_mtx_folder(path):
        raise InputError(
            f"{path}: is a directory without matrix.mtx.gz or matrix.mtx, so neither a 10x "
            "Matrix Market folder nor a .h5ad or 10x .h5 file"
        )
    if layer is not None:
        raise InputError(
            f"{path}: is a 10x Matrix Market folder, which has no layers (drop --layer)"
        )
    if genome is not None:
        raise InputError(
            f"{path}: is a 10x Matrix Market folder, whose features name no genome (drop --genome)"
        )
    if modalities is None:
        return MtxMatrix(path)
    from .multimodal import by_feature_type

    def open_type(t: str) -> MtxMatrix:
        return MtxMatrix(path, feature_type=t)

    return by_feature_type(path, open_type, feature_types(path), modalities)


def _open_hdf5(path: Path) -> h5py.File:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if not h5py.is_hdf5(path):
            raise InputError(f"{path}: is not an HDF5 file (expected .h5ad or 10x .h5)") from e
        raise InputError(f"{path}: is damaged or truncated HDF5 ({e})") from e


def _is_10x(h5: h5py.File) -> bool:
    if "matrix" in h5 and isinstance(h5["matrix"], h5py.Group):
        return True
    # CellRanger v2: one group per genome, each with barcodes and a matrix in CSC parts.
    groups = [g for g in h5.values() if isinstance(g, h5py.Group)]
    return bool(groups) and all("indptr" in g or "barcodes" in g for g in groups) and "X" not in h5


def _is_h5ad(h5: h5py.File) -> bool:
    return h5.attrs.get("encoding-type") == "anndata" or "obs" in h5 or "X" in h5
