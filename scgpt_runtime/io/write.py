"""Writing results into .h5ad files that anndata reads: obs columns, obsm arrays and uns entries.

Every write goes to a temporary file beside the destination (io.atomic), so an interrupted
run never leaves a half-written file, even when writing in place. Encodings follow anndata's
on-disk spec (https://anndata.readthedocs.io/en/latest/fileformat-prose.html): dataframe 0.2.0
files get `categorical` groups; the older dataframe 0.1.0 files (anndata 0.7) get codes with a
`categories` reference into `obs/__categories`, as anndata 0.7 wrote them.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError, OutputError
from .atomic import atomic_path
from .base import HDF5_ERRORS, CountMatrix

__all__ = ["add_to_h5ad", "write_dense_h5ad", "write_new_h5ad", "write_tsv"]

_STR = h5py.string_dtype()  # variable-length UTF-8, what anndata writes for strings


def add_to_h5ad(
    src: Path,
    dst: Path | None = None,
    *,
    obs: Mapping[str, np.ndarray] | None = None,
    obsm: Mapping[str, np.ndarray] | None = None,
    uns: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Copy `src` to `dst` (None: in place) with obs columns, obsm arrays and uns entries added.

    String columns become categoricals (None or NaN: missing), numbers stay arrays; an existing
    column, obsm or uns entry of the same name is replaced. Returns the path written.
    """
    src = Path(src)
    dst = src if dst is None else Path(dst)
    obs, obsm, uns = dict(obs or {}), dict(obsm or {}), dict(uns or {})
    _check_target(dst, src, overwrite)
    dataframe_version, n_obs, index_key = _obs_layout(src)
    _check_sizes(n_obs, obs, obsm)
    _check_obs_names(dst, obs, index_key)
    with atomic_path(dst, copy_of=src) as tmp, _damage_in(src), h5py.File(tmp, "r+") as h5:
        for name, values in obs.items():
            _set_obs_column(h5["obs"], name, values, dataframe_version)
        _write_entries(_dict_group(h5, "obsm"), obsm)
        _write_entries(_dict_group(h5, "uns"), uns)
    return dst


@contextlib.contextmanager
def _damage_in(src: Path) -> Iterator[None]:
    """HDF5's errors while editing a copy of `src` are damage in `src` (an InputError), except
    those of the operating system (a full disk: an OSError with an errno, for atomic_path)."""
    try:
        yield
    except HDF5_ERRORS as e:
        if isinstance(e, OSError) and e.errno:
            raise
        raise InputError(f"{src}: damaged or malformed file: cannot add results to it ({e})") from e


def write_new_h5ad(
    dst: Path,
    counts: CountMatrix,
    *,
    obs: Mapping[str, np.ndarray] | None = None,
    obsm: Mapping[str, np.ndarray] | None = None,
    uns: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """A new .h5ad of the cells of `counts` (any input: a 10x file, a legacy anndata 0.6 file):
    X (CSR, float32, streamed in blocks), var (the gene columns; for 10x files the symbols as
    the index and the ids as gene_ids, as scanpy reads them), obs (the input's columns, then
    `obs`), obsm and uns. What scanpy opens as an annotated copy of the input."""
    dst = Path(dst)
    obs, obsm, uns = dict(obs or {}), dict(obsm or {}), dict(uns or {})
    _check_target(dst, None, overwrite)
    _check_sizes(counts.n_cells, obs, obsm)
    _check_obs_names(dst, obs, "_index")
    index_key, var = _var_columns(counts)
    with atomic_path(dst) as tmp, h5py.File(tmp, "w") as h5:
        _set_encoding(h5, "anndata", "0.1.0")
        _write_csr(h5, counts)
        _write_dataframe(h5, "obs", counts.obs_names)
        for name in counts.obs_columns:
            if name not in obs:
                _set_obs_column(h5["obs"], name, counts.read_obs(name), "0.2.0")
        for name, values in obs.items():
            _set_obs_column(h5["obs"], name, values, "0.2.0")
        _write_dataframe(h5, "var", var.pop(index_key))
        for name, values in var.items():
            _set_obs_column(h5["var"], name, values, "0.2.0")
        for key in ("obsm", "uns", "layers", "obsp", "varm", "varp"):
            _write_dict(h5, key, {})
        _write_entries(h5["obsm"], obsm)
        _write_entries(h5["uns"], uns)
    return dst


def write_dense_h5ad(
    dst: Path,
    x: np.ndarray,
    obs_names: np.ndarray,
    var_names: np.ndarray,
    *,
    obs: Mapping[str, np.ndarray] | None = None,
    obsm: Mapping[str, np.ndarray] | None = None,
    uns: Mapping[str, object] | None = None,
    var: Mapping[str, np.ndarray] | None = None,
    overwrite: bool = False,
) -> Path:
    """A new .h5ad of a dense float matrix `x` (rows `obs_names`, columns `var_names`, var
    columns `var`): for values that are not counts, such as gene embeddings or generated
    cells (X as anndata's dense array 0.2.0)."""
    dst, obs, obsm = Path(dst), dict(obs or {}), dict(obsm or {})
    if x.shape != (len(obs_names), len(var_names)):
        raise ValueError(f"x has shape {x.shape} for {len(obs_names)} x {len(var_names)} names")
    _check_target(dst, None, overwrite)
    _check_sizes(len(obs_names), obs, obsm)
    with atomic_path(dst) as tmp, h5py.File(tmp, "w") as h5:
        _set_encoding(h5, "anndata", "0.1.0")
        _set_encoding(
            h5.create_dataset("X", data=np.asarray(x, dtype=np.float32)), "array", "0.2.0"
        )
        _write_dataframe(h5, "obs", np.asarray(obs_names).astype(str))
        for name, values in obs.items():
            _set_obs_column(h5["obs"], name, values, "0.2.0")
        _write_dataframe(h5, "var", np.asarray(var_names).astype(str))
        for name, values in (var or {}).items():
            _set_obs_column(h5["var"], name, values, "0.2.0")
        for key in ("obsm", "uns", "layers", "obsp", "varm", "varp"):
            _write_dict(h5, key, {})
        _write_entries(h5["obsm"], obsm)
        _write_entries(h5["uns"], dict(uns or {}))
    return dst


def write_tsv(
    dst: Path, header: list[str], rows: Iterable[Iterable[object]], digits: int = 6
) -> Path:
    """A tab-separated table with a header line; floats to `digits` significant digits (9:
    float32 exactly); fields holding a tab, a newline or a quote are quoted as csv does."""
    with atomic_path(Path(dst)) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(f"{v:.{digits}g}" if isinstance(v, float) else v for v in row)
    return Path(dst)


def _var_columns(counts: CountMatrix) -> tuple[str, dict[str, np.ndarray]]:
    """The gene table of `counts` and its index column ("index"; 10x: the symbols)."""
    var = {k: np.asarray(v) for k, v in counts.var.items()}
    if "index" in var:
        return "index", var
    renamed = {"name": "index", "id": "gene_ids", "feature_type": "feature_types"}
    return "index", {renamed.get(k, k): v for k, v in var.items()}


def _write_csr(h5: h5py.File, counts: CountMatrix) -> None:
    """X as anndata's csr_matrix (encoding 0.1.0), appended block by block."""
    x = h5.create_group("X")
    _set_encoding(x, "csr_matrix", "0.1.0")
    x.attrs["shape"] = np.array([counts.n_cells, counts.n_genes], dtype=np.int64)
    data = x.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 16,))
    indices = x.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 16,))
    indptr = [np.zeros(1, dtype=np.int64)]
    for block in counts.iter_blocks():
        n, add = len(data), block.nnz
        data.resize((n + add,))
        indices.resize((n + add,))
        data[n:], indices[n:] = block.data, block.indices
        indptr.append(n + block.indptr[1:].astype(np.int64))
    x.create_dataset("indptr", data=np.concatenate(indptr))


# Destination checks and the atomic write


def _check_target(dst: Path, src: Path | None, overwrite: bool) -> None:
    if src is not None and not src.is_file():
        raise InputError(f"{src}: no such file")
    if dst.is_dir():
        raise OutputError(f"{dst}: is a directory; give a file name for the output")
    if not dst.parent.is_dir():
        raise OutputError(f"{dst}: folder {dst.parent} does not exist")
    in_place = src is not None and dst.exists() and dst.samefile(src)
    if dst.exists() and not in_place and not overwrite:
        raise OutputError(f"{dst}: exists; pass --overwrite")
    if dst.exists() and not os.access(dst, os.W_OK):
        # The folder may allow the rename, but a read-only file says "do not change me".
        raise OutputError(f"{dst}: is read-only; write the results to another file")


# What the source file looks like


def extensible(src: Path) -> bool:
    """Whether obs columns can be added to the .h5ad `src` (not a legacy anndata 0.6 file,
    whose obs is a compound dataset)."""
    with h5py.File(src, "r") as h5:
        return isinstance(h5.get("obs"), h5py.Group)


def _obs_layout(src: Path) -> tuple[str, int, str]:
    """(dataframe encoding version, n_obs, index key) of the obs dataframe of `src`."""
    try:
        h5 = h5py.File(src, "r")
    except OSError as e:
        raise InputError(f"{src}: cannot open as HDF5 ({e})") from e
    with h5:
        obs = h5.get("obs")
        if isinstance(obs, h5py.Dataset):
            raise OutputError(
                f"{src}: is a legacy anndata 0.6 file (obs is a compound dataset), which cannot be "
                "extended in place; write the results to a new .h5ad or .csv output instead"
            )
        if not isinstance(obs, h5py.Group):
            raise OutputError(f"{src}: has no obs dataframe to add columns to")
        version = _attr(obs, "encoding-version")
        index_key = _attr(obs, "_index")
        if _attr(obs, "encoding-type") != "dataframe" or version not in ("0.1.0", "0.2.0"):
            raise OutputError(
                f"{src}: obs has an unknown encoding ({_attr(obs, 'encoding-type')} {version}); "
                "write the results to a .csv output instead"
            )
        if not index_key or index_key not in obs:
            raise OutputError(f"{src}: obs has no index dataset {index_key!r}")
        return version, len(obs[index_key]), index_key


def _attr(obj: h5py.HLObject, key: str) -> str:
    value = obj.attrs.get(key, "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_sizes(n_obs: int, obs: dict[str, np.ndarray], obsm: dict[str, np.ndarray]) -> None:
    """Wrong lengths are a bug of the caller, not the user's input."""
    for name, values in obs.items():
        if np.ndim(values) != 1 or len(values) != n_obs:
            raise ValueError(f"obs column {name!r} has shape {np.shape(values)}, not ({n_obs},)")
    for key, values in obsm.items():
        if np.ndim(values) != 2 or len(values) != n_obs:
            raise ValueError(f"obsm {key!r} has shape {np.shape(values)}, not ({n_obs}, k)")


def _check_obs_names(dst: Path, obs: dict[str, np.ndarray], index_key: str) -> None:
    for name in obs:
        if not name or "/" in name or name in (index_key, "__categories"):
            raise OutputError(f"{dst}: {name!r} cannot be an obs column name here; choose another")


# obs columns


def _set_obs_column(obs: h5py.Group, name: str, values: np.ndarray, version: str) -> None:
    """Write or replace one column; a new name goes last in column-order."""
    if name in obs:
        del obs[name]
    if version == "0.1.0" and name in obs.get("__categories", {}):
        del obs["__categories"][name]
    values = np.asarray(values)
    if values.dtype.kind in "USO":
        codes, categories = _categorize(values)
        if version == "0.2.0":
            _write_categorical(obs, name, codes, categories)
        else:
            _write_categorical_0_1_0(obs, name, codes, categories)
    elif values.dtype.kind in "biuf":
        _write_array(obs, name, values)
    else:
        raise TypeError(f"obs column {name!r}: cannot write dtype {values.dtype}")
    order = _column_order(obs)
    if name not in order:
        obs.attrs.create("column-order", [*order, name], dtype=_STR)


def _column_order(obs: h5py.Group) -> list[str]:
    order = obs.attrs.get("column-order", [])
    return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]


def _categorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, sorted categories) of strings; None and NaN get code -1, as in pandas."""
    if values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8")
    missing = np.zeros(len(values), dtype=bool)
    if values.dtype.kind == "O":
        missing = np.equal(values, None) | (values != values)  # None, and NaN != NaN
    categories, inverse = np.unique(values[~missing].astype(str), return_inverse=True)
    widths = (np.int8, np.int16, np.int32, np.int64)
    dtype = next(t for t in widths if len(categories) < np.iinfo(t).max)  # as pandas picks
    codes = np.full(len(values), -1, dtype=dtype)
    codes[~missing] = inverse.ravel()
    return codes, categories


# Element writers, one per anndata encoding


def _set_encoding(obj: h5py.HLObject, encoding: str, version: str) -> None:
    obj.attrs["encoding-type"] = encoding
    obj.attrs["encoding-version"] = version


def _write_array(group: h5py.Group, key: str, values: np.ndarray) -> None:
    group.create_dataset(key, data=values)
    _set_encoding(group[key], "array", "0.2.0")


def _write_string_array(group: h5py.Group, key: str, values: np.ndarray) -> None:
    group.create_dataset(key, data=np.asarray(values).astype(str).astype(object), dtype=_STR)
    _set_encoding(group[key], "string-array", "0.2.0")


def _write_categorical(
    group: h5py.Group, key: str, codes: np.ndarray, categories: np.ndarray
) -> None:
    cat = group.create_group(key)
    _set_encoding(cat, "categorical", "0.2.0")
    cat.attrs["ordered"] = np.bool_(False)
    _write_array(cat, "codes", codes)
    _write_string_array(cat, "categories", categories)


def _write_categorical_0_1_0(
    group: h5py.Group, key: str, codes: np.ndarray, categories: np.ndarray
) -> None:
    """anndata 0.7's layout: codes in the column, categories in obs/__categories, by reference."""
    store = group.require_group("__categories")
    store.create_dataset(key, data=categories.astype(object), dtype=_STR)
    store[key].attrs["ordered"] = np.bool_(False)
    group.create_dataset(key, data=codes)
    group[key].attrs.create("categories", store[key].ref, dtype=h5py.ref_dtype)


def _write_scalar(group: h5py.Group, key: str, value: str | bool | int | float) -> None:
    if isinstance(value, str):
        group.create_dataset(key, data=value, dtype=_STR)
        _set_encoding(group[key], "string", "0.2.0")
    else:
        group.create_dataset(key, data=np.asarray(value))
        _set_encoding(group[key], "numeric-scalar", "0.2.0")


def _write_dict(group: h5py.Group, key: str, mapping: Mapping[str, object]) -> None:
    sub = group.create_group(key)
    _set_encoding(sub, "dict", "0.1.0")
    _write_entries(sub, mapping)


def _write_dataframe(group: h5py.Group, key: str, index: np.ndarray) -> None:
    """A dataframe with only its index; columns are added with `_set_obs_column`."""
    df = group.create_group(key)
    _set_encoding(df, "dataframe", "0.2.0")
    df.attrs["_index"] = "_index"
    df.attrs["column-order"] = np.array([], dtype=np.float64)  # what anndata writes for none
    _write_string_array(df, "_index", index)


def _write_entries(group: h5py.Group, mapping: Mapping[str, object]) -> None:
    """uns and obsm values by type; an existing entry of the same key is replaced."""
    for key, value in mapping.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"{group.name}: {key!r} cannot be a key")
        if key in group:
            del group[key]
        if isinstance(value, Mapping):
            _write_dict(group, key, value)
        elif isinstance(value, str | bool | int | float | np.generic):
            _write_scalar(group, key, value.item() if isinstance(value, np.generic) else value)
        elif isinstance(value, list | tuple | np.ndarray):
            array = np.asarray(value)
            if array.dtype.kind in "USO":
                _write_string_array(group, key, array)
            elif array.dtype.kind in "biuf":
                _write_array(group, key, array)
            else:
                raise TypeError(f"{group.name}/{key}: cannot write dtype {array.dtype}")
        else:
            raise TypeError(f"{group.name}/{key}: cannot write {type(value).__name__}")


def _dict_group(h5: h5py.File, key: str) -> h5py.Group:
    """The file's obsm or uns group, created with anndata's dict encoding where absent."""
    if key not in h5:
        _write_dict(h5, key, {})
    return h5[key]
