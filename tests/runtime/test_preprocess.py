"""normalize_total, log1p and highly variable genes against dense numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.preprocess import highly_variable_genes, log1p, normalize_total


def counts(seed: int = 0, n_cells: int = 300, n_genes: int = 500) -> np.ndarray:
    """Raw counts with gene-specific means, overdispersed genes, empty cells and genes."""
    rng = np.random.default_rng(seed)
    means = rng.lognormal(-1, 1.5, n_genes)
    size = np.where(rng.random(n_genes) < 0.1, 0.2, 5.0)  # 10% strongly overdispersed
    depth = rng.lognormal(0, 0.5, (n_cells, 1))
    x = rng.negative_binomial(size, size / (size + means * depth)).astype(np.float32)
    x[:, 7] = 0
    x[:, 8] = 3  # constant gene
    x[5] = 0  # empty cell
    return x


def blocks(x: np.ndarray, rows: int):
    for s in range(0, len(x), rows):
        yield CsrBlock.from_dense(x[s : s + rows], start=s)


def test_normalize_total_matches_dense():
    x = counts()
    got = normalize_total(CsrBlock.from_dense(x), target_sum=1e4).to_dense()
    sums = x.sum(axis=1, dtype=np.float64, keepdims=True)
    expected = np.divide(x * 1e4, sums, out=np.zeros(x.shape), where=sums > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.sum(axis=1)[sums[:, 0] > 0], 1e4, rtol=1e-5)
    assert not got[5].any()  # the empty cell stays empty


def test_normalize_total_keeps_the_pattern_and_stored_zeros():
    block = CsrBlock(
        data=np.array([0, 1, 3], dtype=np.float32),
        indices=np.array([0, 2, 3], dtype=np.int64),
        indptr=np.array([0, 1, 3], dtype=np.int64),
        n_cols=4,
    )
    out = normalize_total(block, target_sum=100)
    np.testing.assert_array_equal(out.data, [0, 25, 75])
    np.testing.assert_array_equal(out.indices, block.indices)
    with pytest.raises(ValueError, match="target_sum"):
        normalize_total(block, target_sum=0)


def test_log1p():
    x = counts()
    got = log1p(CsrBlock.from_dense(x)).to_dense()
    np.testing.assert_array_equal(got, np.log1p(x))


def dense_hvg(x: np.ndarray, n_top: int) -> np.ndarray:
    """scanpy's flavor="seurat" written out densely: normalise, log1p, expm1, bin, z-score."""
    sums = x.sum(axis=1, dtype=np.float64, keepdims=True)
    normalised = np.divide(x * 1e4, sums, out=np.zeros(x.shape), where=sums > 0)
    data = np.expm1(np.log1p(normalised))
    mean = data.mean(axis=0)
    var = data.var(axis=0, ddof=1)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    log_mean = np.log1p(mean)
    edges = np.linspace(log_mean.min(), log_mean.max(), 21)
    edges[0] -= (log_mean.max() - log_mean.min()) * 0.001
    which = np.searchsorted(edges, log_mean) - 1
    z = np.full(len(mean), np.nan)
    for b in range(20):
        genes = np.flatnonzero((which == b) & ~np.isnan(dispersion))
        if len(genes) == 1:
            z[genes] = 1.0
        elif len(genes) > 1:
            d = dispersion[genes]
            z[genes] = (d - d.mean()) / d.std(ddof=1)
    order = sorted(range(len(z)), key=lambda g: (np.isnan(z[g]), -np.nan_to_num(z[g]), g))
    return np.sort(order[:n_top])


@pytest.mark.parametrize("n_top", [1, 25, 200])
@pytest.mark.parametrize("rows", [1000, 64, 7])
def test_hvg_matches_dense_reference_in_one_pass(n_top, rows):
    x = counts(seed=n_top)
    got = highly_variable_genes(blocks(x, rows), n_top=n_top, n_genes=x.shape[1])
    np.testing.assert_array_equal(got, dense_hvg(x, n_top))
    assert got.dtype == np.int64


def test_hvg_finds_planted_variable_genes():
    # Poisson genes over a range of means, and 10 strongly overdispersed genes among them.
    rng = np.random.default_rng(1)
    means = np.geomspace(0.1, 30, 1000)
    x = rng.poisson(means, (500, 1000)).astype(np.float32)
    planted = np.sort(rng.choice(1000, 10, replace=False))
    x[:, planted] = rng.negative_binomial(0.3, 0.3 / (0.3 + means[planted]), (500, 10))
    got = highly_variable_genes(blocks(x, 128), n_top=10, n_genes=1000)
    np.testing.assert_array_equal(got, planted)


def test_hvg_edge_cases():
    x = counts(seed=2, n_genes=50)
    np.testing.assert_array_equal(highly_variable_genes(blocks(x, 50), 80, 50), np.arange(50))
    with pytest.raises(ValueError, match="n_top"):
        highly_variable_genes(blocks(x, 50), 0, 50)
    with pytest.raises(ValueError, match="columns"):
        highly_variable_genes(blocks(x, 50), 5, 49)
    with pytest.raises(ValueError, match="at least 2 cells"):
        highly_variable_genes(blocks(x[:1], 50), 5, 50)
