"""Cell annotations (obs) as the commands use them: `--where COL=VALUE` filters and values as
strings with missing ones as None."""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .io.base import CountMatrix


def parse_where(where: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """ "COL=VALUE" filters -> [(COL, VALUE)]; a malformed one raises ValueError."""
    out = []
    for item in where:
        col, sep, value = item.partition("=")
        if not sep or not col:
            raise ValueError(f"--where takes COLUMN=VALUE, got {item!r}")
        out.append((col, value))
    return out


def obs_strings(values: np.ndarray) -> np.ndarray:
    """obs values as str objects; None, NaN and "" are missing (None); 3.0 -> "3"."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values.tolist()):
        if v is None or v == "" or (isinstance(v, float) and np.isnan(v)):
            out[i] = None
        elif isinstance(v, float) and v.is_integer():
            out[i] = str(int(v))
        else:
            out[i] = str(v)
    return out


def selected(counts: CountMatrix, filters: list[tuple[str, str]]) -> np.ndarray:
    """(n_cells,) bool: the cells whose obs COL equals VALUE for every (COL, VALUE) filter."""
    keep = np.ones(counts.n_cells, dtype=bool)
    for col, value in filters:
        found = obs_strings(counts.read_obs(col))
        keep &= found == value
        if not (found == value).any():
            seen = ", ".join(sorted({str(v) for v in found})[:10])
            raise InputError(f"{counts.path}: no cell has {col} == {value!r} (values: {seen})")
    return keep
