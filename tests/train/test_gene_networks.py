"""Gene programs, attention networks and their evaluation: against direct numpy, scipy and
scikit-learn computations, deterministic for a seed, one-line errors on bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import hypergeom, rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.preprocess import highly_variable_genes
from scgpt_runtime.tokens import TokenConfig
from scgpt_train.cli import cli
from scgpt_train.gene_attention import last_layer_scores, rank_normalize
from scgpt_train.gene_evaluation import (
    auroc,
    average_precision,
    co_member_pairs,
    degree_matched_negatives,
    tf_task,
)
from scgpt_train.gene_programs import Programs, enrichment, find_programs
from scgpt_train.model import attn_bias, padding_attn_mask

TOKENS = TokenConfig(max_seq_len=32)
GENES = [f"G{i}" for i in range(40)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, random_run):
    """A random small model over 40 genes; 60 cells of 30 of them (two co-expressed modules)."""
    tmp = tmp_path_factory.mktemp("networks")
    model, vocab = random_run(tmp / "run", GENES, TOKENS)
    rng = np.random.default_rng(0)
    state = rng.integers(0, 2, 60)
    rates = np.full((60, 30), 1.0)
    rates[:, :10] += 6 * state[:, None]
    rates[:, 10:20] += 6 * (1 - state[:, None])
    x = rng.poisson(rates).astype(np.float32)
    obs = pd.DataFrame({"state": np.where(state, "on", "off")}, index=[f"c{i}" for i in range(60)])
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=GENES[:30])).write_h5ad(tmp / "cells.h5ad")
    return tmp, model, vocab


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_rank_normalisation_equals_direct_ranks():
    s = np.random.default_rng(1).normal(size=(2, 7, 7)).astype(np.float32)
    s[0, 3, :3] = 0.5  # ties: broken in index order
    by_rows = (rankdata(s, axis=-1, method="ordinal") - 1) / 7
    expected = (rankdata(by_rows, axis=-2, method="ordinal") - 1) / 7
    got = rank_normalize(torch.from_numpy(s)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-7)  # float32 of k / 7


def test_last_layer_scores_are_the_attention_logits(toy):
    _, model, vocab = toy
    ids = torch.tensor([[vocab.cls_id, *vocab.lookup(GENES[:9])]])
    values = torch.rand(1, 10) * 5
    scores = last_layer_scores(model, ids, values)
    # the layer's own attention: softmax(q k^T / sqrt(dh)) v, through out_proj
    x, _ = model.embed_inputs(ids, values)
    bias = attn_bias(padding_attn_mask(torch.zeros(1, 10, dtype=torch.bool)), x.dtype)
    for layer in model.transformer_encoder.layers[:-1]:
        x = layer(x, bias)
    attn = model.transformer_encoder.layers[-1].self_attn
    d, h = x.shape[-1], attn.n_head
    v = attn.Wqkv(x).split(d, dim=-1)[2].view(1, 10, h, -1).transpose(1, 2)
    y = torch.softmax(scores / (d // h) ** 0.5, dim=-1) @ v
    with torch.no_grad():
        expected = attn(x, bias)
        got = attn.out_proj(y.transpose(1, 2).reshape(1, 10, d))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # float32 matmul order


def test_auroc_and_average_precision_equal_scikit_learns():
    rng = np.random.default_rng(2)
    labels = rng.random(300) < 0.2
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    expected = average_precision_score(labels, scores)
    assert average_precision(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_degree_matched_negatives_keep_degrees_and_avoid_positives():
    rng = np.random.default_rng(0)
    sets = [set(rng.choice(list("abcdefghijklmnopqrst"), 5, replace=False)) for _ in range(8)]
    positives = co_member_pairs([{"a", "b", "c"}, {"c", "d"}], list("abcd"))
    np.testing.assert_array_equal(positives, [[0, 1], [0, 2], [1, 2], [2, 3]])
    positives = co_member_pairs(sets, list("abcdefghijklmnopqrst"))
    negatives = degree_matched_negatives(positives, rng)
    assert len(negatives) == len(positives)
    known = {tuple(p) for p in positives.tolist()}
    assert not known & {tuple(p) for p in negatives.tolist()}
    assert (negatives[:, 0] < negatives[:, 1]).all()
    assert set(negatives.ravel()) <= set(positives.ravel())  # only genes of the positives


def test_tf_task_scores_each_tf_column():
    directed = np.zeros((30, 30))
    directed[:12, 29] = 1.0  # TF 29's column ranks its 12 targets first
    edges = {29: set(range(12)), 0: {1, 2}}  # TF 0 has too few targets to count
    result = tf_task(directed, edges)
    assert result["n_tfs"] == 1
    assert result["auroc"] == 1.0
    assert result["auprc"] == 1.0
    assert result["positive_rate"] == pytest.approx(12 / 29)


def test_planted_programs_are_found_and_enriched():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16))
    emb = np.repeat(centres, 10, axis=0) + 0.05 * rng.normal(size=(30, 16))
    genes = [f"g{i}" for i in range(30)]
    programs = find_programs(genes, emb, resolution=1.0, seed=0)
    assert sorted(sorted(m) for m in programs.members) == [
        list(range(0, 10)),
        list(range(10, 20)),
        list(range(20, 30)),
    ]
    table = enrichment(programs, {"first": set(genes[:8]) | {"other"}}, "toy.gmt")
    hit = [r for r in table if r["overlap"] == 8]
    assert len(hit) == 1
    assert hit[0]["p"] == pytest.approx(hypergeom.sf(7, 30, 8, 10))
    assert hit[0]["q"] == pytest.approx(min(1.0, hit[0]["p"] * 3))  # 3 tests, one informative


def test_programs_command_is_deterministic_and_scores_cells(toy, tmp_path):
    tmp, _, _ = toy
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("MOD1\tx\t" + "\t".join(GENES[:10]) + "\nMOD2\tx\t" + "\t".join(GENES[10:20]))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.tsv"
        r = run_cli(
            "genes",
            "programs",
            "--from",
            tmp / "run",
            "--data",
            tmp / "cells.h5ad",
            "--out",
            out,
            "--min-size",
            "3",
            "--resolution",
            "1",
            "--label-key",
            "state",
            "--enrich",
            gmt,
            "--score-out",
            tmp_path / f"{name}.h5ad",
            "--seed",
            "4",
            "--json",
        )
        assert r.exit_code == 0, r.output
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    table = pd.read_csv(tmp_path / "a.tsv", sep="\t")
    assert set(table["gene"]) <= set(GENES[:30])
    scored = ad.read_h5ad(tmp_path / "a.h5ad")
    first = table[table["program"] == "P1"]["gene"].tolist()
    x = np.log1p(scored.X / scored.X.sum(1, keepdims=True) * 1e4)[
        :, [GENES.index(g) for g in first]
    ]
    z = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(scored.obs["program_P1"], z.mean(1), rtol=1e-4, atol=1e-5)
    by_label = pd.read_csv(tmp_path / "a.by_label.tsv", sep="\t", index_col=0)
    assert list(by_label.index) == ["off", "on"]
    assert by_label["n_cells"].sum() == 60
    assert (tmp_path / "a.enrichment.tsv").is_file()


def test_attention_command_writes_each_tfs_targets(toy, tmp_path):
    tmp, _, _ = toy
    out = tmp_path / "edges.tsv"
    r = run_cli(
        "genes",
        "attention",
        "--from",
        tmp / "run",
        "--data",
        tmp / "cells.h5ad",
        "--tf",
        "G3",
        "--contrast",
        "state=on:off",
        "--out",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    edges = pd.read_csv(out, sep="\t")
    assert set(edges["source"]) == {"G3"}
    assert len(edges) == 29
    assert "G3" not in set(edges["target"])
    assert (np.diff(edges["score"]) <= 0).all()  # best first
    assert edges["score"].abs().max() <= 1.0  # a difference of two rank means


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["programs", "--genes", "GENES"], "none of the 2 genes given"),
        (["attention", "--tf", "NOPE"], "--tf NOPE: not a gene of the run's vocabulary"),
        (["attention", "--tf", "G35"], "--tf G35: not a gene of"),
        (["programs", "--enrich", "GMT"], "no gene set shares a gene"),
        (["attention", "--contrast", "state=on"], "expected COL=A:B"),
    ],
)
def test_bad_inputs_are_one_line_errors(toy, tmp_path, args, message):
    tmp, _, _ = toy
    (tmp_path / "genes.txt").write_text("NOT_A_GENE\nALSO_NOT\n")
    (tmp_path / "sets.gmt").write_text("SET\tx\tFOO\tBAR\n")
    args = [str(tmp_path / "genes.txt") if a == "GENES" else a for a in args]
    args = [str(tmp_path / "sets.gmt") if a == "GMT" else a for a in args]
    r = run_cli(
        "genes",
        args[0],
        "--from",
        tmp / "run",
        "--data",
        tmp / "cells.h5ad",
        "--out",
        tmp_path / "o.tsv",
        *args[1:],
    )
    assert r.exit_code == 3, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o.tsv").exists()


def test_variable_genes_among_candidates_and_row_takes():
    x = np.random.default_rng(5).poisson(2.0, size=(50, 20)).astype(np.float32)
    x[:, 3] *= 5  # a very variable gene outside the candidates
    block = CsrBlock.from_dense(x)
    among = np.arange(5, 20)
    got = highly_variable_genes([block], 4, 20, among=among)
    assert len(got) == 4
    assert set(got) <= set(among)
    everything = highly_variable_genes([block], 20, 20)
    np.testing.assert_array_equal(highly_variable_genes([block], 20, 20, among=among), among)
    assert 3 in highly_variable_genes([block], 4, 20)
    assert len(everything) == 20
    rows = np.array([1, 4, 5, 30])
    np.testing.assert_array_equal(block.take(rows).to_dense(), x[rows])
    np.testing.assert_array_equal(block.dense_columns(np.array([7, 2])), x[:, [7, 2]])


def test_programs_object_names_its_programs():
    p = Programs(["a", "b", "c"], [[2, 0], [1]])
    assert p.names() == ["P1", "P2"]
    assert p.gene_lists() == [["c", "a"], ["b"]]
