"""The MuData reader (.h5mu): one AnnData group per modality under `mod/`, cells shared.

Layout (scverse mudata spec; docs/multiomics.md): root attributes `encoding-type` "MuData" and
`axis` (0: modalities share cells; absent means 0), `/mod/<name>` a full AnnData group read by
the h5ad reader, `/obs` the file's cell table, `/obsmap/<name>` the 1-based row of each cell in
that modality (0: not measured), `/obsm/<name>` presence masks. Older files (mudata < 0.2) have
no root attributes and no obsmap: a modality's rows are then found by cell name, else by the
presence mask, else (same number of cells) taken in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError
from .base import damaged
from .h5ad import H5adMatrix
from .h5ad_elements import open_frame
from .multimodal import MultiModalMatrix


def is_mudata(h5: h5py.File) -> bool:
    """A MuData file: its root says so, or (older files) it has `mod/` and no X of its own."""
    if h5.attrs.get("encoding-type") in ("MuData", b"MuData"):
        return True
    return isinstance(h5.get("mod"), h5py.Group) and "X" not in h5


def read_mudata(
    path: Path,
    h5: h5py.File,
    *,
    modalities: Sequence[str] | None = None,
    layer: str | None = None,
    use_raw: bool = True,
) -> MultiModalMatrix:
    """The cells of a .h5mu file with the features of `modalities` (default: all, in the
    file's mod-order) side by side; `layer` and `use_raw` apply per modality."""
    axis = int(h5.attrs.get("axis", 0))
    if axis != 0:
        raise InputError(
            f"{path}: a MuData file with axis {axis} (modalities share features, not cells) "
            "is not supported"
        )
    mods = h5.get("mod")
    if not isinstance(mods, h5py.Group) or not len(mods):
        raise InputError(f"{path}: MuData file without modalities under mod/")
    available = _modality_order(mods)
    names = list(modalities) if modalities is not None else available
    unknown = [m for m in names if m not in available]
    if unknown or not names:
        raise InputError(
            f"{path}: has no modality {', '.join(map(repr, unknown)) or '(none asked)'} "
            f"(modalities: {', '.join(available)})"
        )
    obs = open_frame(h5, "obs")
    opened = []
    for name in names:
        counts = H5adMatrix(path, mods[name], layer=layer, use_raw=use_raw)
        counts.matrix = f"mod/{name}/{counts.matrix}"
        if counts.n_cells == 0:
            raise InputError(f"{path}: modality {name} holds no cells")
        opened.append((name, counts))
    n_cells = _n_cells(h5, names[0], obs, opened[0][1])
    global_names = None if obs is None else obs.index()
    parts = [
        (name, counts, _row_map(path, h5, name, counts, n_cells, global_names))
        for name, counts in opened
    ]
    return MultiModalMatrix(path, h5, "h5mu", parts, obs=obs)


def _modality_order(mods: h5py.Group) -> list[str]:
    """Modality names in the file's `mod-order`, then any others sorted."""
    names = [k for k, v in mods.items() if isinstance(v, h5py.Group)]
    order = [
        o.decode() if isinstance(o, bytes) else str(o) for o in mods.attrs.get("mod-order", [])
    ]
    return [o for o in order if o in names] + sorted(n for n in names if n not in order)


def _n_cells(h5: h5py.File, first: str, obs, counts: H5adMatrix) -> int:
    """The file's number of cells: of obsmap, else the global obs, else the first modality's."""
    obsmap = h5.get("obsmap")
    if isinstance(obsmap, h5py.Group) and first in obsmap:
        return len(obsmap[first])
    return counts.n_cells if obs is None else obs.index_length()


def _row_map(
    path: Path,
    h5: h5py.File,
    name: str,
    counts: H5adMatrix,
    n_cells: int,
    names: np.ndarray | None,
) -> np.ndarray:
    """(n_cells,) int64 row of each cell in modality `name`, -1 where not measured."""
    obsmap = h5.get("obsmap")
    if isinstance(obsmap, h5py.Group) and name in obsmap:
        with damaged(path, f"obsmap/{name}"):
            rows = np.asarray(obsmap[name][()]).astype(np.int64).ravel() - 1
        bad = rows.max(initial=-1) >= counts.n_cells or rows.min(initial=0) < -1
        if len(rows) != n_cells or bad:
            raise InputError(
                f"{path}: obsmap/{name} does not map {n_cells} cells into the "
                f"{counts.n_cells} rows of modality {name}"
            )
        return rows
    if names is not None:  # older files: match the cells by name
        own = counts.obs_names
        if len(set(names)) == len(names) and len(set(own)) == len(own):
            index = {n: i for i, n in enumerate(own)}
            rows = np.array([index.get(n, -1) for n in names], dtype=np.int64)
            if (rows >= 0).sum() == counts.n_cells:
                return rows
    mask = _presence_mask(h5, name, n_cells)
    if mask is not None and int(mask.sum()) == counts.n_cells:
        rows = np.full(n_cells, -1, dtype=np.int64)
        rows[mask] = np.arange(counts.n_cells)
        return rows
    if counts.n_cells == n_cells:
        return np.arange(n_cells, dtype=np.int64)
    raise InputError(
        f"{path}: the {counts.n_cells} cells of modality {name} cannot be placed among the "
        f"file's {n_cells} (no obsmap, no matching cell names, no presence mask)"
    )


def _presence_mask(h5: h5py.File, name: str, n_cells: int) -> np.ndarray | None:
    obsm = h5.get("obsm")
    if not isinstance(obsm, h5py.Group) or not isinstance(obsm.get(name), h5py.Dataset):
        return None
    mask = np.asarray(obsm[name][()]).reshape(-1)
    return mask.astype(bool) if len(mask) == n_cells else None
