"""Decoding of h5ad obs and var tables, anndata 0.6 to 0.12: one small reader per layout era.

Columns dispatch on their (encoding-type, encoding-version) attributes, as anndata's own
registry does. Text comes back as object arrays of str with None for missing values, numbers as
numbers. Only obs, var and (for anndata < 0.7) uns/<col>_categories are ever read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import h5py
import numpy as np

from ..errors import InputError

Element = h5py.Group | h5py.Dataset


def encoding(elem: Element) -> tuple[str, str]:
    """The element's (encoding-type, encoding-version); ("", "") when written before anndata 0.7."""
    return _attr_str(elem, "encoding-type"), _attr_str(elem, "encoding-version")


@contextmanager
def reading(elem: Element) -> Iterator[None]:
    """Add the element path to any decoding error ("while reading obs/cell_type")."""
    try:
        yield
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
        where = elem.name.lstrip("/")
        raise InputError(f"{elem.file.filename}: {e} while reading {where}") from e


def as_text(values: np.ndarray) -> np.ndarray:
    """Any 1-D array as an object array of str; bytes are decoded as UTF-8, None stays None.
    A NUL byte inside a name is damage (no writer puts one there): ValueError."""
    if values.dtype.kind == "S":
        out = np.char.decode(values, "utf-8").astype(object)
    elif values.dtype.kind == "O":
        out = [v.decode() if isinstance(v, bytes) else v if v is None else str(v) for v in values]
        out = np.array(out, dtype=object)
    else:
        return values.astype(str).astype(object)
    check_no_nul(out)
    return out


def check_no_nul(names: np.ndarray) -> None:
    if any("\x00" in v for v in names if isinstance(v, str)):
        raise ValueError("a name holds a NUL byte: the file is damaged")


# Column readers, one per (encoding-type, encoding-version) anndata has written.


def _read_array_0_2_0(ds: h5py.Dataset) -> np.ndarray:
    if _is_string_dtype(ds.dtype):
        return _read_strings(ds)
    return ds[()]


def _read_string_array_0_2_0(ds: h5py.Dataset) -> np.ndarray:
    return _read_strings(ds)


def _read_categorical_0_2_0(g: h5py.Group) -> np.ndarray:
    return _decode_codes(g["codes"][()], _category_labels(g["categories"]))


def _read_nullable_integer_0_1_0(g: h5py.Group) -> np.ndarray:
    values = g["values"][()].astype(np.float64)
    values[g["mask"][()].astype(bool)] = np.nan
    return values


def _read_nullable_boolean_0_1_0(g: h5py.Group) -> np.ndarray:
    values = g["values"][()].astype(bool).astype(object)
    values[g["mask"][()].astype(bool)] = None
    return values


def _read_nullable_string_array_0_1_0(g: h5py.Group) -> np.ndarray:
    values = _read_strings(g["values"])
    values[g["mask"][()].astype(bool)] = None
    return values


def _read_unencoded(elem: Element) -> np.ndarray:
    """anndata < 0.7: a plain dataset; a categorical one names its categories by HDF5 reference."""
    if not isinstance(elem, h5py.Dataset):
        raise ValueError("a group without encoding attributes is not a table column")
    if "categories" in elem.attrs:
        # anndata 0.7: codes here, labels in <frame>/__categories/<col>, found by object reference.
        return _decode_codes(elem[()], _category_labels(elem.parent[elem.attrs["categories"]]))
    return _read_array_0_2_0(elem)


_COLUMN_READERS: dict[tuple[str, str], Callable[..., np.ndarray]] = {
    ("array", "0.2.0"): _read_array_0_2_0,
    ("string-array", "0.2.0"): _read_string_array_0_2_0,
    ("categorical", "0.2.0"): _read_categorical_0_2_0,
    ("nullable-integer", "0.1.0"): _read_nullable_integer_0_1_0,
    ("nullable-boolean", "0.1.0"): _read_nullable_boolean_0_1_0,
    ("nullable-string-array", "0.1.0"): _read_nullable_string_array_0_1_0,
    ("", ""): _read_unencoded,
}
_TEXT_ENCODINGS = ("string-array", "categorical", "nullable-string-array")


def read_column(elem: Element) -> np.ndarray:
    """One obs or var column, decoded by its encoding; errors name the element."""
    with reading(elem):
        reader = _COLUMN_READERS.get(encoding(elem))
        if reader is None:
            kind, version = encoding(elem)
            raise ValueError(f"unsupported encoding {kind!r} version {version!r}")
        values = reader(elem)
        if values.ndim != 1:
            raise ValueError(f"a table column must be 1-D, found shape {values.shape}")
        return values


def _is_text_column(elem: Element) -> bool:
    kind, _ = encoding(elem)
    if kind in _TEXT_ENCODINGS:
        return True
    if isinstance(elem, h5py.Dataset) and kind in ("", "array"):
        return "categories" in elem.attrs or _is_string_dtype(elem.dtype)
    return False


# Tables: a group per dataframe (anndata >= 0.7), or one compound dataset (anndata < 0.7).


class GroupFrame:
    """An obs or var dataframe group, encoding 0.1.0 (anndata 0.7) or 0.2.0 (anndata >= 0.8)."""

    def __init__(self, group: h5py.Group):
        self.group = group
        with reading(group):
            kind, version = encoding(group)
            if (kind, version) not in (("dataframe", "0.1.0"), ("dataframe", "0.2.0")):
                raise ValueError(f"unsupported table encoding {kind!r} version {version!r}")
            self._index_key = _attr_str(group, "_index")
            order = group.attrs.get("column-order", [])
            # An empty column-order is written as an empty float array.
            self.columns = [c.decode() if isinstance(c, bytes) else str(c) for c in order]

    def index(self) -> np.ndarray:
        return as_text(read_column(self._element(self._index_key)))

    def index_length(self) -> int:
        """The number of rows, without reading the index."""
        elem = self._element(self._index_key)
        with reading(elem):
            if isinstance(elem, h5py.Dataset) and elem.ndim == 1:
                return len(elem)
        return len(self.index())  # an index in another form: read it (and its errors)

    def read(self, name: str) -> np.ndarray:
        return read_column(self._element(name))

    def is_text(self, name: str) -> bool:
        return _is_text_column(self._element(name))

    def _element(self, name: str) -> Element:
        with reading(self.group):
            if name not in self.group:
                raise ValueError(f"column {name!r} is listed in column-order but absent")
            return self.group[name]


class LegacyFrame:
    """anndata < 0.7: one compound dataset, the index first; categories in uns/<col>_categories."""

    def __init__(self, ds: h5py.Dataset, uns: h5py.Group | None):
        self.ds = ds
        self._uns = uns
        names = list(ds.dtype.names or ())
        with reading(ds):
            if not names:
                raise ValueError("a table dataset must have named fields")
        # anndata takes the first field as the index; it is named "index" in every writer we know.
        self._index_key = "index" if "index" in names else names[0]
        self.columns = [n for n in names if n != self._index_key]

    def index(self) -> np.ndarray:
        with reading(self.ds):
            return as_text(self._field(self._index_key))

    def index_length(self) -> int:
        return len(self.ds) if self.ds.ndim == 1 else len(self.index())

    def read(self, name: str) -> np.ndarray:
        with reading(self.ds):
            values = self._field(name)
            labels = self._categories(name)
            if labels is not None and values.dtype.kind in "iu" and np.all(values < len(labels)):
                # The same test anndata's _clean_uns uses to tell obs from var categories.
                return _decode_codes(values, labels)
            return values

    def is_text(self, name: str) -> bool:
        if _is_string_dtype(self.ds.dtype.fields[name][0]):
            return True
        return self._categories(name) is not None and self.read(name).dtype == object

    def _field(self, name: str) -> np.ndarray:
        values = self.ds.fields(name)[()]
        dtype = self.ds.dtype.fields[name][0]
        return as_text(values) if _is_string_dtype(dtype) else values

    def _categories(self, name: str) -> np.ndarray | None:
        key = f"{name}_categories"
        if self._uns is None or key not in self._uns:
            return None
        with reading(self._uns[key]):
            return _category_labels(self._uns[key])


Frame = GroupFrame | LegacyFrame


def open_frame(h5: h5py.File, key: str) -> Frame | None:
    """The obs or var table at `key` (also raw/var and anndata 0.6's raw.var); None if absent."""
    if key not in h5:
        return None
    elem = h5[key]
    if isinstance(elem, h5py.Group):
        return GroupFrame(elem)
    # Only anndata 0.6's own obs and var take their categories from uns, as in anndata.
    uns = h5["uns"] if key in ("obs", "var") and isinstance(h5.get("uns"), h5py.Group) else None
    return LegacyFrame(elem, uns)


# Helpers.


def _read_strings(ds: h5py.Dataset) -> np.ndarray:
    if _is_string_dtype(ds.dtype):
        return np.asarray(ds.asstr()[()], dtype=object)
    return as_text(ds[()])


def _category_labels(elem: Element) -> np.ndarray:
    """Category labels as str (numeric categories too: a label is a name here)."""
    labels = read_column(elem) if isinstance(elem, h5py.Group) else np.atleast_1d(elem[()])
    return as_text(labels)


def _decode_codes(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes).astype(np.int64)
    if codes.size and codes.max() >= len(labels):
        raise ValueError(f"category code {codes.max()} but only {len(labels)} categories")
    out = np.full(codes.shape, None, dtype=object)
    valid = codes >= 0  # -1 marks a missing value
    out[valid] = labels[codes[valid]]
    return out


def _is_string_dtype(dtype: np.dtype) -> bool:
    return h5py.check_string_dtype(dtype) is not None or dtype.kind in "SU"


def _attr_str(elem: Element, name: str) -> str:
    value = elem.attrs.get(name, "")
    return value.decode() if isinstance(value, bytes) else str(value)
