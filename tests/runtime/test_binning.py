"""Binning: equality with the per-cell official rule, reproducibility, independence of blocking."""

from __future__ import annotations

import numpy as np
import pytest

from scgpt_runtime import binning
from scgpt_runtime.binning import bin_values, hash64, hash_uniform
from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.errors import InputError


def reference(x: np.ndarray, n_bins: int, u: np.ndarray | None = None) -> np.ndarray:
    """The official rule cell by cell with np.quantile and np.digitize. u (same shape as x) gives
    the official draw; None gives the deterministic middle of the tied range."""
    out = np.zeros(x.shape, dtype=np.float32)
    for i, row in enumerate(x):
        cols = np.flatnonzero(row)
        if len(cols) == 0:
            continue
        nz = row[cols]
        edges = np.quantile(nz, np.linspace(0, 1, n_bins - 1))
        left = np.digitize(nz, edges)
        right = np.digitize(nz, edges, right=True)
        if u is None:
            out[i, cols] = np.where(left != right, np.ceil((left + right) / 2), left)
        else:
            out[i, cols] = np.ceil(u[i, cols] * (right - left) + left)
    return out


def tie_ranges(x: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) of every entry of x, 0 where x is 0."""
    left = np.zeros(x.shape, dtype=np.int64)
    right = np.zeros(x.shape, dtype=np.int64)
    for i, row in enumerate(x):
        cols = np.flatnonzero(row)
        if len(cols):
            edges = np.quantile(row[cols], np.linspace(0, 1, n_bins - 1))
            left[i, cols] = np.digitize(row[cols], edges)
            right[i, cols] = np.digitize(row[cols], edges, right=True)
    return left, right


def make(kind: str, seed: int = 0) -> np.ndarray:
    """Test matrices, float32, with awkward rows added: empty, one value, all equal, large."""
    rng = np.random.default_rng(seed)
    shape = (60, 300)
    sparse = rng.random(shape) < rng.random((shape[0], 1))  # row densities 0..1
    if kind == "counts":  # raw counts: mostly 1s and 2s, many ties
        x = rng.negative_binomial(1, 0.4, shape) * sparse
    elif kind == "float":  # log1p(normalised) values: few ties
        x = np.log1p(rng.lognormal(0, 2, shape)) * sparse
    elif kind == "large":  # values where float32 spacing is coarse
        x = np.round(rng.lognormal(10, 4, shape)) * sparse
    else:  # negative values are binned like any other non-zero
        x = rng.normal(0, 3, shape) * sparse
    x = x.astype(np.float32)
    x[0] = 0  # empty
    x[1] = 0
    x[1, 7] = 5  # a single value
    x[2] = np.where(x[2] != 0, 3, 0)  # all equal
    x[3, 0] = np.float32(3e38) if kind != "negative" else np.float32(-3e38)
    x[4] = np.arange(shape[1], dtype=np.float32) + 1  # no ties
    return x


@pytest.mark.parametrize("kind", ["counts", "float", "large", "negative"])
@pytest.mark.parametrize("n_bins", [3, 11, 51])
def test_deterministic_equals_per_cell_reference(kind, n_bins):
    x = make(kind, seed=n_bins)
    got = bin_values(CsrBlock.from_dense(x), n_bins=n_bins).to_dense()
    np.testing.assert_array_equal(got, reference(x, n_bins))


def test_known_values():
    # Cell [1, 1, 3] with 5 bins: edges 1, 1, 1.67, 3. The 1s reach two edges (left 2, right 0):
    # bin ceil(1) = 1; 3 reaches all four and exceeds three: bin ceil(3.5) = 4.
    # A single value reaches all edges and exceeds none: bin ceil(4 / 2) = 2.
    x = np.array([[1, 0, 1, 3], [0, 0, 9, 0]], dtype=np.float32)
    got = bin_values(CsrBlock.from_dense(x), n_bins=5).to_dense()
    np.testing.assert_array_equal(got, [[1, 0, 1, 4], [0, 0, 2, 0]])


def test_stored_zeros_get_bin_zero_and_keep_the_pattern():
    block = CsrBlock(
        data=np.array([0, 2, 5, 0, 1], dtype=np.float32),
        indices=np.array([0, 1, 2, 0, 3], dtype=np.int64),
        indptr=np.array([0, 3, 5], dtype=np.int64),
        n_cols=4,
    )
    out = bin_values(block, n_bins=5)
    np.testing.assert_array_equal(out.indices, block.indices)
    np.testing.assert_array_equal(out.indptr, block.indptr)
    assert out.data.dtype == np.float32
    np.testing.assert_array_equal(out.data, [0, 1, 4, 0, 2])


def test_chunked_binning_equals_reference(monkeypatch):
    # Blocks are binned in row chunks; tiny chunks must change nothing.
    monkeypatch.setattr(binning, "CHUNK_VALUES", 17)
    x = make("counts", seed=5)
    got = bin_values(CsrBlock.from_dense(x)).to_dense()
    np.testing.assert_array_equal(got, reference(x, 51))


def hash_draws(x: np.ndarray, seed: int, start: int = 0) -> np.ndarray:
    rows, cols = np.indices(x.shape)
    return hash_uniform(seed, binning.STREAM_BINNING, rows + start, cols)


@pytest.mark.parametrize("kind", ["counts", "float", "large"])
def test_official_equals_official_rule_with_hashed_u(kind):
    x = make(kind, seed=3)
    got = bin_values(CsrBlock.from_dense(x), mode="official", seed=11).to_dense()
    np.testing.assert_array_equal(got, reference(x, 51, u=hash_draws(x, seed=11)))


def test_official_bins_lie_in_the_tied_range():
    x = make("counts", seed=4)
    got = bin_values(CsrBlock.from_dense(x), mode="official", seed=1).to_dense()
    left, right = tie_ranges(x, 51)
    nz = x != 0
    tied = nz & (left > right)
    assert tied.sum() > 1000  # raw counts: most values are tied
    assert np.all(got[tied] >= right[tied] + 1)
    assert np.all(got[tied] <= left[tied])
    np.testing.assert_array_equal(got[nz & ~tied], left[nz & ~tied])
    assert got[nz].min() >= 1
    assert got[nz].max() <= 50


def test_official_is_seeded():
    block = CsrBlock.from_dense(make("counts", seed=6))
    first = bin_values(block, mode="official", seed=3).data
    np.testing.assert_array_equal(first, bin_values(block, mode="official", seed=3).data)
    other = bin_values(block, mode="official", seed=4).data
    assert (first != other).mean() > 0.3


def test_official_gene_ids_name_the_draws():
    # With gene_ids, a draw follows the gene, not its column: permuted columns, same bins.
    x = make("counts", seed=8)
    perm = np.random.default_rng(0).permutation(x.shape[1])
    genes = np.arange(x.shape[1]) + 100
    a = bin_values(CsrBlock.from_dense(x), mode="official", gene_ids=genes).to_dense()
    b = bin_values(CsrBlock.from_dense(x[:, perm]), mode="official", gene_ids=genes[perm])
    np.testing.assert_array_equal(a[:, perm], b.to_dense())


def test_official_draw_is_uniform_over_the_tied_range():
    # 400 cells of 500 genes: 400 genes at 1 (tied on 40 edges: left 40, right 0), 100 others.
    # Each bin 1..40 should get 1/40 of the 160,000 draws (4000, binomial sd ~62). The data and
    # seed are fixed, so the test cannot flake; a 10% (6 sd) band still catches a biased mapping
    # from u to bins (an off-by-one at either end gives a frequency of 0 or 2x).
    x = np.ones((400, 500), dtype=np.float32)
    x[:, 400:] = np.arange(2, 102, dtype=np.float32)
    got = bin_values(CsrBlock.from_dense(x), mode="official", seed=0).to_dense()
    left, right = tie_ranges(x[:1], 51)
    assert (left[0, 0], right[0, 0]) == (40, 0)
    freq = np.bincount(got[:, :400].astype(np.int64).ravel(), minlength=41)[1:]
    assert freq.sum() == 160_000
    np.testing.assert_allclose(freq, 4000, rtol=0.10)
    # Its mean matches the official draw's, (right + 1 + left) / 2.
    assert abs(got[:, :400].mean() - 20.5) < 0.1


def test_hash_golden_values():
    # Pins the hash: a seed must give the same official draws in every version.
    cells, genes = np.array([0, 0, 1, 5]), np.array([0, 1, 0, 60693])
    assert hash64(0, 1, cells, genes).tolist() == [
        2391539541053276776,
        920862675595841680,
        10910317525803880485,
        9177382796755713320,
    ]
    assert hash64(7, 2, np.array([123456789]), np.array([42])).tolist() == [2577856811923890503]
    u = hash_uniform(0, 1, cells, genes)
    np.testing.assert_allclose(u, [0.1296456183, 0.0499200657, 0.5914494982, 0.4975069183])


@pytest.mark.parametrize("mode", ["deterministic", "official"])
@pytest.mark.parametrize("rows_per_block", [1, 3, 17])
def test_independent_of_blocking(mode, rows_per_block):
    x = make("counts", seed=9)
    whole = bin_values(CsrBlock.from_dense(x, start=1000), mode=mode, seed=2).to_dense()
    parts = [
        bin_values(
            CsrBlock.from_dense(x[s : s + rows_per_block], start=1000 + s), mode=mode, seed=2
        )
        for s in range(0, len(x), rows_per_block)
    ]
    np.testing.assert_array_equal(np.vstack([p.to_dense() for p in parts]), whole)


def test_official_depends_on_the_global_cell_index():
    x = make("counts", seed=10)
    a = bin_values(CsrBlock.from_dense(x, start=0), mode="official").data
    b = bin_values(CsrBlock.from_dense(x, start=1), mode="official").data
    assert (a != b).any()


def test_empty_block():
    block = CsrBlock.from_dense(np.zeros((3, 4), dtype=np.float32))
    assert bin_values(block).nnz == 0
    none = CsrBlock.from_dense(np.zeros((0, 4), dtype=np.float32))
    assert bin_values(none, mode="official").n_rows == 0


def test_non_finite_values_raise():
    x = np.ones((3, 4), dtype=np.float32)
    x[2, 1] = np.nan
    with pytest.raises(InputError, match="cell 12 holds a NaN"):
        bin_values(CsrBlock.from_dense(x, start=10))


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"n_bins": 2}, "n_bins"), ({"mode": "x"}, "mode")]
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bin_values(CsrBlock.from_dense(np.ones((2, 2), dtype=np.float32)), **kwargs)
