"""Pseudo-cell generation and completion: deterministic for a seed, the prompt matters, the
generative path equals chunked decoding, observed genes untouched, one-line errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scgpt_runtime.tokens import TokenConfig
from scgpt_train.cli import cli
from scgpt_train.generate import bin_values, decode

TOKENS = TokenConfig(max_seq_len=24)
GENES = [f"G{i}" for i in range(40)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, random_run):
    """A random small model over 40 genes; 60 cells of 30 of them, two types."""
    tmp = tmp_path_factory.mktemp("generate")
    model, vocab = random_run(tmp / "run", GENES, TOKENS)
    rng = np.random.default_rng(0)
    kind = np.repeat([0, 1], 30)
    rates = np.full((60, 30), 1.0)
    rates[kind == 0, :10] += 8
    rates[kind == 1, 10:20] += 8
    x = rng.poisson(rates).astype(np.float32)
    obs = pd.DataFrame({"cell_type": np.where(kind, "B", "T")}, index=[f"c{i}" for i in range(60)])
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=GENES[:30])).write_h5ad(tmp / "ref.h5ad")
    return tmp, model, vocab, x


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def generated(tmp, out, *extra):
    r = run_cli(
        "generate",
        "--from",
        tmp / "run",
        "--data",
        tmp / "ref.h5ad",
        "--label-key",
        "cell_type",
        "--n-cells",
        "40",
        "--out",
        out,
        *extra,
    )
    assert r.exit_code == 0, r.output
    return ad.read_h5ad(out)


@pytest.mark.parametrize("decoder", ["gen", "gepc"])
def test_same_seed_same_cells_and_types_differ(toy, tmp_path, decoder):
    tmp = toy[0]
    a = generated(tmp, tmp_path / "a.h5ad", "--decoder", decoder, "--seed", "3")
    b = generated(tmp, tmp_path / "b.h5ad", "--decoder", decoder, "--seed", "3")
    c = generated(tmp, tmp_path / "c.h5ad", "--decoder", decoder, "--seed", "4")
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)
    assert a.shape == (80, 30)
    assert list(a.obs["cell_type"].value_counts().sort_index()) == [40, 40]
    assert set(a.obs["source"]) == {"generated"}
    assert a.uns["scgpt_generate"]["units"] == "log1p(CP10k)"
    assert np.isfinite(a.X).all()
    assert (a.X >= 0).all()
    assert a.X.std(axis=0).max() > 0  # cells vary
    t, bcells = a.X[a.obs["cell_type"] == "T"], a.X[a.obs["cell_type"] == "B"]
    assert np.abs(t.mean(0) - bcells.mean(0)).max() > 0.1  # two prompts, two means


def test_cell_prompts_vary_the_prediction_itself(toy, tmp_path):
    tmp = toy[0]
    mean = generated(tmp, tmp_path / "m.h5ad", "--seed", "5")
    cells = generated(tmp, tmp_path / "c.h5ad", "--seed", "5", "--prompt", "cells")
    again = generated(tmp, tmp_path / "c2.h5ad", "--seed", "5", "--prompt", "cells")
    np.testing.assert_array_equal(cells.X, again.X)
    assert not np.array_equal(mean.X, cells.X)


def test_the_gen_path_equals_one_pass_over_every_gene(toy):
    """Gen tokens see only the prompt and themselves, so chunks change nothing."""
    _, model, vocab, _ = toy
    prompts = np.random.default_rng(1).normal(size=(3, model.cfg.d_model)).astype(np.float32)
    ids = np.array(vocab.lookup(GENES[:30]))
    import scgpt_train.generate as g

    whole = decode(model, prompts, ids, "gen", (vocab.cls_id, 0.0))
    chunk, g.CHUNK = g.CHUNK, 7
    try:
        pieces = decode(model, prompts, ids, "gen", (vocab.cls_id, 0.0))
    finally:
        g.CHUNK = chunk
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-5)  # float32 sums by length


def test_bin_values_map_and_fill_gaps():
    bins = np.array([0, 1, 1, 3, 3])
    values = np.array([0.0, 1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(bin_values(bins, values, 5), [0, 1.5, 3.25, 5.0, 5.0])


def test_completion_keeps_observed_genes_and_adds_the_missing(toy, tmp_path):
    tmp, _, _, x = toy
    (tmp_path / "more.txt").write_text("G35\nG36\nG3\nNOT_A_GENE\n")
    out = tmp_path / "done.h5ad"
    r = run_cli(
        "generate",
        "--complete",
        "--from",
        tmp / "run",
        "--data",
        tmp / "ref.h5ad",
        "--genes",
        tmp_path / "more.txt",
        "--out",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    done = ad.read_h5ad(out)
    assert list(done.var_names) == [*GENES[:30], "G35", "G36"]  # G3 is measured already
    assert list(done.var["completed"]) == [False] * 30 + [True, True]
    expected = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(done.X[:, :30], expected, rtol=1e-6)  # float32 of the same sums
    assert np.isfinite(done.X[:, 30:]).all()
    assert (done.X[:, 30:] >= 0).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label-key", "cell_type", "--labels", "B,NOPE"], "no cell has cell_type == 'NOPE'"),
        (["--label-key", "missing"], "missing"),
        (["--complete", "--genes", "GENES"], "no gene that is in the run's vocabulary"),
        (["--label-key", "cell_type", "--genes", "UNKNOWN"], "none of the 1 genes given"),
    ],
)
def test_bad_inputs_are_one_line_errors(toy, tmp_path, args, message):
    tmp = toy[0]
    (tmp_path / "genes.txt").write_text("NOT_A_GENE\nG2\n")  # G2 is measured already
    (tmp_path / "unknown.txt").write_text("NOT_A_GENE\n")
    args = [str(tmp_path / "genes.txt") if a == "GENES" else a for a in args]
    args = [str(tmp_path / "unknown.txt") if a == "UNKNOWN" else a for a in args]
    r = run_cli(
        "generate",
        "--from",
        tmp / "run",
        "--data",
        tmp / "ref.h5ad",
        "--out",
        tmp_path / "o.h5ad",
        *args,
    )
    assert r.exit_code == 3, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o.h5ad").exists()
