"""The 2-D map of cell embeddings that reports draw: UMAP where umap-learn is installed (it is
part of the `[report]` extra), else PCA, both deterministic for a seed.

Above MAP_CELLS cells a uniform random subset (the seed's) is drawn, so a map of 10 million
cells costs what one of MAP_CELLS costs; the report says how many cells it shows. UMAP runs
with the seed on one thread (umap-learn's rule for reproducibility): about 25 s for 10,000
cells on one core, after a one-off 15 s for numba to compile (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import numpy as np

MAP_CELLS = 10_000
UMAP_NEIGHBOURS = 15  # umap-learn's default
METHODS = ("auto", "umap", "pca")


@dataclass
class Map:
    """2-D coordinates of a subset of cells."""

    xy: np.ndarray  # (m, 2) float32
    rows: np.ndarray  # (m,) int64: the cells shown, ascending indices into the input
    method: str  # "UMAP" or "PCA"
    n_cells: int  # cells in the input, shown or not


def map_cells(
    embedding: np.ndarray, seed: int = 0, max_cells: int = MAP_CELLS, method: str = "auto"
) -> Map:
    """The 2-D map of the rows of `embedding` (n, d), a subset above `max_cells`. `method`
    auto: UMAP if umap-learn is installed and there are enough cells for its neighbours."""
    if method not in METHODS:
        raise ValueError(f"map method must be one of {METHODS}, not {method!r}")
    n = len(embedding)
    rows = np.arange(n)
    if n > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    x = np.asarray(embedding[rows], dtype=np.float32)
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "umap" and not has_umap:
        raise ValueError("map method umap needs umap-learn: pip install 'scgpt-deploy[report]'")
    if method == "pca" or len(x) <= UMAP_NEIGHBOURS + 1 or not has_umap:
        return Map(pca_2d(x), rows, "PCA", n)
    return Map(_umap(x, seed), rows, "UMAP", n)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components, signs fixed (largest loading positive)."""
    centred = x.astype(np.float64) - x.mean(0)
    if len(x) < 2:
        return np.zeros((len(x), 2), dtype=np.float32)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])[:, None]
    xy = centred @ axes.T
    if xy.shape[1] < 2:  # one-dimensional embeddings
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy.astype(np.float32)


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import umap

    with warnings.catch_warnings():  # "n_jobs overridden to 1 by setting random_state"
        warnings.simplefilter("ignore", UserWarning)
        reducer = umap.UMAP(n_neighbors=UMAP_NEIGHBOURS, random_state=seed, n_jobs=1)
        return reducer.fit_transform(x).astype(np.float32)
