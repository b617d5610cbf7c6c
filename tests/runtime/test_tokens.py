"""Tokenization: a golden example, a per-cell reference, selection, and independence of blocking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scgpt_runtime import binning
from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.tokens import TokenBlock, TokenConfig, tokenize

PAD, CLS = 1000, 1001  # ids of <pad> and <cls> in the random tests


def test_golden_three_cells():
    # Vocabulary A B C D E <pad> <cls> <eoc> (ids 0..7); file genes C A X E B, X not in it.
    # The same example is worked through in docs/inputs.md.
    x = np.array([[3, 1, 5, 0, 1], [0, 0, 7, 0, 0], [2, 4, 0, 6, 9]], dtype=np.float32)
    column_ids = np.array([2, 0, -1, 4, 1])
    cfg = TokenConfig(max_seq_len=4, n_bins=5)
    tokens = tokenize(CsrBlock.from_dense(x, start=40), column_ids, cfg, cls_id=6, pad_id=5)
    np.testing.assert_array_equal(tokens.gene_ids, [[6, 0, 1, 2], [6, 5, 5, 5], [6, 0, 1, 4]])
    np.testing.assert_array_equal(tokens.values, [[0, 1, 1, 4], [0, -2, -2, -2], [0, 2, 4, 3]])
    np.testing.assert_array_equal(
        tokens.padding_mask,
        [[False, False, False, False], [False, True, True, True], [False, False, False, False]],
    )
    np.testing.assert_array_equal(tokens.n_genes, [3, 0, 3])
    np.testing.assert_array_equal(tokens.empty, [False, True, False])
    assert tokens.start == 40
    assert tokens.n_cells == 3
    assert tokens.gene_ids.dtype == np.int64
    assert tokens.values.dtype == np.float32
    assert tokens.padding_mask.dtype == bool

    zero_shot = TokenConfig(max_seq_len=4, n_bins=5, cls_value=-2)
    tokens = tokenize(CsrBlock.from_dense(x), column_ids, zero_shot, cls_id=6, pad_id=5)
    np.testing.assert_array_equal(tokens.values[:, 0], [-2, -2, -2])


def reference(x: np.ndarray, column_ids: np.ndarray, cfg: TokenConfig) -> tuple:
    """Cell by cell with np.quantile, np.digitize and sorts; "top" selection, deterministic bins."""
    n, width = len(x), cfg.max_seq_len
    gene_ids = np.full((n, width), PAD)
    values = np.full((n, width), cfg.pad_value, dtype=np.float32)
    mask = np.ones((n, width), dtype=bool)
    gene_ids[:, 0], values[:, 0], mask[:, 0] = CLS, cfg.cls_value, False
    n_genes = np.zeros(n, dtype=np.int64)
    for i, row in enumerate(x):
        cols = np.flatnonzero((row != 0) & (column_ids >= 0))
        v, g = row[cols], column_ids[cols]
        if len(v) == 0:
            continue
        if cfg.target_sum is not None:
            v = (v * (cfg.target_sum / v.astype(np.float64).sum())).astype(np.float32)
        if cfg.log1p:
            v = np.log1p(v)
        edges = np.quantile(v, np.linspace(0, 1, cfg.n_bins - 1))
        left, right = np.digitize(v, edges), np.digitize(v, edges, right=True)
        b = np.where(left != right, np.ceil((left + right) / 2), left)
        kept = np.lexsort((g, -v.astype(np.float64)))[: width - 1]  # top values, lower id
        kept = kept[np.argsort(g[kept])]
        k = len(kept)
        gene_ids[i, 1 : k + 1], values[i, 1 : k + 1], mask[i, 1 : k + 1] = g[kept], b[kept], False
        n_genes[i] = k
    return gene_ids, values, mask, n_genes


def random_cells(seed: int, n_cells: int = 50, n_cols: int = 400) -> tuple:
    """Raw counts with varied densities and empty rows, and a shuffled partial gene match."""
    rng = np.random.default_rng(seed)
    density = rng.random((n_cells, 1))
    x = (
        rng.negative_binomial(1, 0.3, (n_cells, n_cols))
        * (rng.random(x_shape := (n_cells, n_cols)) < density)
    ).astype(np.float32)
    x[::7] = 0
    column_ids = rng.permutation(PAD)[:n_cols]
    column_ids[rng.random(n_cols) < 0.2] = -1
    assert x_shape == x.shape
    return x, column_ids


def assert_same(tokens: TokenBlock, expected: tuple) -> None:
    gene_ids, values, mask, n_genes = expected
    np.testing.assert_array_equal(tokens.gene_ids, gene_ids)
    np.testing.assert_array_equal(tokens.values, values)
    np.testing.assert_array_equal(tokens.padding_mask, mask)
    np.testing.assert_array_equal(tokens.n_genes, n_genes)


CONFIGS = [
    TokenConfig(max_seq_len=1200),  # no cell is cut
    TokenConfig(max_seq_len=60),  # most cells are cut
    TokenConfig(max_seq_len=2, n_bins=3),
    TokenConfig(max_seq_len=40, target_sum=1e4, log1p=True, cls_value=-2, pad_value=-1),
    TokenConfig(max_seq_len=40, log1p=True, n_bins=101),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_equals_per_cell_reference(cfg):
    x, column_ids = random_cells(seed=cfg.max_seq_len)
    tokens = tokenize(CsrBlock.from_dense(x), column_ids, cfg, CLS, PAD)
    assert_same(tokens, reference(x, column_ids, cfg))


def test_chunked_tokenization_equals_reference(monkeypatch):
    monkeypatch.setattr(binning, "CHUNK_VALUES", 50)
    x, column_ids = random_cells(seed=3)
    cfg = TokenConfig(max_seq_len=30)
    tokens = tokenize(CsrBlock.from_dense(x), column_ids, cfg, CLS, PAD)
    assert_same(tokens, reference(x, column_ids, cfg))


BLOCKING_CONFIGS = [
    TokenConfig(max_seq_len=50),
    TokenConfig(max_seq_len=50, binning="official", selection="sample", seed=5, cls_value=-2),
    TokenConfig(max_seq_len=50, target_sum=1e4, log1p=True, selection="sample"),
]


@pytest.mark.parametrize("cfg", BLOCKING_CONFIGS)
@pytest.mark.parametrize("rows_per_block", [1, 2, 5])
def test_independent_of_blocking(cfg, rows_per_block):
    x, column_ids = random_cells(seed=11)
    whole = tokenize(CsrBlock.from_dense(x, start=500), column_ids, cfg, CLS, PAD)
    parts = [
        tokenize(
            CsrBlock.from_dense(x[s : s + rows_per_block], start=500 + s), column_ids, cfg, CLS, PAD
        )
        for s in range(0, len(x), rows_per_block)
    ]
    for name in ("gene_ids", "values", "padding_mask", "n_genes"):
        got = np.concatenate([getattr(p, name) for p in parts])
        np.testing.assert_array_equal(got, getattr(whole, name), err_msg=name)


@pytest.mark.parametrize("cfg", BLOCKING_CONFIGS)
def test_deterministic_across_calls(cfg):
    x, column_ids = random_cells(seed=12)
    block = CsrBlock.from_dense(x, start=7)
    a = tokenize(block, column_ids, cfg, CLS, PAD)
    b = tokenize(block, column_ids, cfg, CLS, PAD)
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    np.testing.assert_array_equal(a.values, b.values)


def test_top_keeps_the_highest_values_ties_to_lower_ids():
    # Genes 0..9 with values 1..10 reversed, and two genes tied at the cut: 9 places.
    x = np.array([[10, 9, 8, 7, 6, 5, 4, 3, 2, 2, 1]], dtype=np.float32)
    column_ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 8, 10])
    tokens = tokenize(CsrBlock.from_dense(x), column_ids, TokenConfig(max_seq_len=10), CLS, PAD)
    # Values 10..3 (genes 0..7) and, of the two 2s (genes 9 and 8), gene 8.
    np.testing.assert_array_equal(tokens.gene_ids[0, 1:], [0, 1, 2, 3, 4, 5, 6, 7, 8])
    # Bins are computed over all 11 genes before the cut: the lowest kept value is not bin 1.
    assert tokens.values[0, 9] > 1


def test_sample_is_a_seeded_uniform_subset():
    rng = np.random.default_rng(0)
    x = (rng.integers(1, 5, (300, 100))).astype(np.float32)  # every gene in every cell
    column_ids = np.arange(100)
    cfg = TokenConfig(max_seq_len=21, selection="sample")
    tokens = tokenize(CsrBlock.from_dense(x), column_ids, cfg, CLS, PAD)
    genes = tokens.gene_ids[:, 1:]
    assert np.all(np.diff(genes, axis=1) > 0)  # distinct, ascending
    np.testing.assert_array_equal(tokens.n_genes, 20)
    # Each gene is kept in 20% of the 300 cells (60, binomial sd ~7); a 40% band (3.4 sd) on a
    # fixed seed catches a selection biased towards low or high ids or values.
    counts = np.bincount(genes.ravel(), minlength=100)
    assert counts.min() > 36
    assert counts.max() < 84
    # Values are the bins of the kept genes, computed over all 100.
    expected = np.take_along_axis(
        tokenize(CsrBlock.from_dense(x), column_ids, TokenConfig(max_seq_len=101), CLS, PAD).values[
            :, 1:
        ],
        genes,
        axis=1,
    )
    np.testing.assert_array_equal(tokens.values[:, 1:], expected)
    other = tokenize(
        CsrBlock.from_dense(x),
        column_ids,
        TokenConfig(max_seq_len=21, selection="sample", seed=1),
        CLS,
        PAD,
    )
    assert (other.gene_ids != tokens.gene_ids).any(axis=1).mean() > 0.9


def test_cells_without_matched_genes_give_cls_only():
    x = np.array([[0, 0, 0], [4, 0, 0], [0, 0, 0]], dtype=np.float32)
    cfg = TokenConfig(max_seq_len=5)
    for column_ids in (np.array([-1, 3, 4]), np.array([-1, -1, -1])):
        tokens = tokenize(CsrBlock.from_dense(x), column_ids, cfg, CLS, PAD)
        np.testing.assert_array_equal(tokens.n_genes, [0, 0, 0])
        np.testing.assert_array_equal(tokens.gene_ids, [[CLS, PAD, PAD, PAD, PAD]] * 3)
        np.testing.assert_array_equal(tokens.padding_mask[:, 0], False)
        np.testing.assert_array_equal(tokens.padding_mask[:, 1:], True)
        assert tokens.empty.all()
        assert tokens.trim().gene_ids.shape == (3, 1)
    none = tokenize(CsrBlock.from_dense(np.zeros((0, 3), np.float32)), np.arange(3), cfg, CLS, PAD)
    assert none.gene_ids.shape == (0, 5)


def test_stored_zeros_are_dropped():
    block = CsrBlock(
        data=np.array([0, 2, 5], dtype=np.float32),
        indices=np.array([0, 1, 2], dtype=np.int64),
        indptr=np.array([0, 3], dtype=np.int64),
        n_cols=3,
    )
    tokens = tokenize(block, np.array([0, 1, 2]), TokenConfig(max_seq_len=4), CLS, PAD)
    np.testing.assert_array_equal(tokens.gene_ids, [[CLS, 1, 2, PAD]])


def test_normalisation_changes_bins_only_through_ties():
    # Integer counts stay distinct after scaling and log1p, so bins are unchanged.
    x, column_ids = random_cells(seed=13)
    block = CsrBlock.from_dense(x)
    raw = tokenize(block, column_ids, TokenConfig(max_seq_len=80), CLS, PAD)
    for cfg in (
        TokenConfig(max_seq_len=80, target_sum=1e4),
        TokenConfig(max_seq_len=80, log1p=True),
        TokenConfig(max_seq_len=80, target_sum=1e4, log1p=True),
    ):
        scaled = tokenize(block, column_ids, cfg, CLS, PAD)
        np.testing.assert_array_equal(scaled.gene_ids, raw.gene_ids)
        np.testing.assert_array_equal(scaled.values, raw.values)


def test_trim_drops_only_shared_padding():
    x, column_ids = random_cells(seed=14)
    tokens = tokenize(CsrBlock.from_dense(x), column_ids, TokenConfig(), CLS, PAD)
    trimmed = tokens.trim()
    width = trimmed.gene_ids.shape[1]
    assert width == tokens.n_genes.max() + 1
    np.testing.assert_array_equal(trimmed.values, tokens.values[:, :width])
    assert tokens.padding_mask[:, width:].all()


def test_config_round_trip():
    cfg = TokenConfig(max_seq_len=3001, binning="official", target_sum=1e4, log1p=True, seed=3)
    text = json.dumps(cfg.to_dict())
    assert TokenConfig.from_dict(json.loads(text)) == cfg
    assert TokenConfig.from_dict({}) == TokenConfig()
    assert TokenConfig.from_dict({"cls_value": -2}).cls_value == -2.0
    assert isinstance(TokenConfig(cls_value=-2).cls_value, float)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_seq_len": 1},
        {"max_seq_len": 12.5},
        {"n_bins": 2},
        {"binning": "random"},
        {"selection": "first"},
        {"target_sum": 0},
        {"target_sum": "1e4"},
        {"cls_value": float("nan")},
        {"log1p": "yes"},
        {"seed": True},
    ],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        TokenConfig(**kwargs)


def test_unknown_config_key_raises():
    with pytest.raises(ValueError, match="unknown token config keys"):
        TokenConfig.from_dict({"max_seq_len": 10, "pad_token": "<pad>"})


@pytest.mark.parametrize(
    ("column_ids", "message"),
    [
        (np.array([0, 1]), "shape"),
        (np.array([0, 0, 2]), "distinct"),
        (np.array([0, CLS, 2]), "distinct"),
        (np.array([PAD, 1, 2]), "distinct"),
    ],
)
def test_bad_column_ids_raise(column_ids, message):
    block = CsrBlock.from_dense(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=message):
        tokenize(block, column_ids, TokenConfig(), CLS, PAD)
