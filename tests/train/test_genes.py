"""Gene embeddings: the encoder output per gene and the contextual mean, against direct
computations, written as an .h5ad anndata reads."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.tokens import TokenConfig, tokenize
from scgpt_train.cli import cli

TOKENS = TokenConfig(max_seq_len=32)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, random_run):
    """A random small model over 15 genes, and 30 cells of the first 10 (G9 never expressed)."""
    tmp = tmp_path_factory.mktemp("genes")
    model, vocab = random_run(tmp / "run", [f"G{i}" for i in range(15)], TOKENS)
    x = np.random.default_rng(0).poisson(2.0, size=(30, 10)).astype(np.float32)
    x[:, 9] = 0
    obs = pd.DataFrame({"group": ["a", "b"] * 15}, index=[f"c{i}" for i in range(30)])
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(10)])).write_h5ad(
        tmp / "cells.h5ad"
    )
    return tmp, model, vocab, x


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_vocabulary_embeddings_are_the_gene_encoder_output(toy, tmp_path):
    tmp, model, vocab, _ = toy
    r = run_cli("genes", "embed", "--from", tmp / "run", "--out", tmp_path / "g.h5ad")
    assert r.exit_code == 0, r.output
    genes = ad.read_h5ad(tmp_path / "g.h5ad")
    assert list(genes.obs_names) == [f"G{i}" for i in range(15)]  # no special tokens
    assert genes.shape == (15, 64)
    with torch.no_grad():
        w = model.encoder.embedding.weight[vocab["G3"]]
        expected = torch.nn.functional.layer_norm(
            w, (64,), model.encoder.enc_norm.weight, model.encoder.enc_norm.bias
        )
    np.testing.assert_allclose(genes.X[3], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_contextual_embeddings_are_mean_token_outputs(toy, tmp_path):
    tmp, model, vocab, x = toy
    out = tmp_path / "c.h5ad"
    r = run_cli("genes", "embed", "--from", tmp / "run", "--data", tmp / "cells.h5ad",
                "--contextual", "--where", "group=a", "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    genes = ad.read_h5ad(out)
    assert list(genes.obs_names) == [f"G{i}" for i in range(10)]  # the data's genes only
    cells = x[::2]  # group a
    np.testing.assert_array_equal(genes.obs["n_cells"], (cells > 0).sum(0))
    assert np.isnan(genes.obsm["X_contextual"][9]).all()  # G9 is never a token
    # direct: the runtime's tokens of one cell at a time, G2's output averaged over the cells
    # that express it
    outs = []
    columns = vocab.lookup([f"G{j}" for j in range(10)])
    for row in cells[cells[:, 2] > 0]:
        tok = tokenize(CsrBlock.from_dense(row[None]), columns, TOKENS, vocab.cls_id, vocab.pad_id)
        tok = tok.trim()
        with torch.no_grad():
            h = model.encode(*(torch.from_numpy(a) for a in tok.inputs.values()))
        outs.append(h[0, tok.gene_ids[0].tolist().index(vocab["G2"])].numpy())
    got = genes.obsm["X_contextual"][2]
    np.testing.assert_allclose(got, np.mean(outs, 0), rtol=1e-4, atol=1e-5)  # float32 sums


def test_contextual_without_cells_is_a_one_line_error(toy, tmp_path):
    tmp, *_ = toy
    r = run_cli(
        "genes", "embed", "--from", tmp / "run", "--contextual", "--out", tmp_path / "x.h5ad"
    )
    assert r.exit_code == 3
    assert "--contextual needs cells" in r.output
    assert len(r.output.strip().splitlines()) == 1
