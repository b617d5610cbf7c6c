"""Perturbation prediction: flags reach the model, targets outside the panel, chunking, seeded
pairing, metrics against direct computations, the commands end to end and their errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from click.testing import CliRunner

from scgpt_runtime.io import open_counts
from scgpt_runtime.tokens import TokenConfig, tokenize
from scgpt_runtime.vocab import Vocab
from scgpt_train.checkpoint import load_run
from scgpt_train.cli import cli
from scgpt_train.model import ModelConfig, ScGPT
from scgpt_train.perturb import PerturbConfig, finetune_perturb, predict_cells
from scgpt_train.perturb_data import (
    FLAG_PAD,
    FLAG_PERTURBED,
    MASK_VALUE,
    condition_targets,
    load_screen,
    make_inputs,
    pair_controls,
    panel_chunks,
    sampled_columns,
)
from scgpt_train.perturb_metrics import (
    centroid_hits,
    condition_metrics,
    de_genes,
    linear_model,
    reverse_hits,
)

PAPALEXI = "wave2/perturbation/papalexi2021_thp1_eccite_sceptre_299genes.h5ad"
N_GENES = 24


def screen_file(path, n=60, seed=0):
    """A toy screen of 24 genes: ctrl; G1+ctrl silences G1 and G5; OUT+ctrl (OUT is not a
    measured gene) multiplies G7 by 6; OTHER+ctrl does nothing; 'unassigned' cells."""
    rng = np.random.default_rng(seed)
    conditions = ["ctrl", "G1+ctrl", "OUT+ctrl", "OTHER+ctrl", "unassigned"]
    label = np.repeat(conditions, n)
    rate = np.full((len(label), N_GENES), 4.0)
    rate[label == "G1+ctrl", 1] = rate[label == "G1+ctrl", 5] = 0.0
    rate[label == "OUT+ctrl", 7] *= 6
    obs = pd.DataFrame(
        {"condition": pd.Categorical(label)}, index=[f"c{i}" for i in range(len(label))]
    )
    var = pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)])
    ad.AnnData(rng.poisson(rate).astype(np.float32), obs=obs, var=var).write_h5ad(path)
    return path


def toy_vocab() -> Vocab:
    return Vocab.from_genes([f"G{i}" for i in range(N_GENES)] + ["OUT", "OTHER"])


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------------------- inputs


def test_condition_labels_in_the_gears_and_plain_conventions():
    assert condition_targets("ctrl", "ctrl") == ()
    assert condition_targets("STAT1+ctrl", "ctrl") == ("STAT1",)
    assert condition_targets("ctrl+STAT1", "ctrl") == ("STAT1",)
    assert condition_targets("STAT1", "non-targeting") == ("STAT1",)
    assert condition_targets("JAK2+STAT1", "ctrl") == ("JAK2", "STAT1")  # order-free
    assert condition_targets("non-targeting", "non-targeting") == ()


def test_flags_reach_the_model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("small", vocab_size=30, pad_id=0, n_pert=3, dropout=0.0)
    model = ScGPT(cfg).eval()
    genes = torch.arange(1, 11)[None]
    values = torch.rand(1, 10) * 5
    pad = torch.zeros(1, 10, dtype=torch.bool)
    flags = torch.zeros(1, 10, dtype=torch.long)
    flagged = flags.clone()
    flagged[0, 3] = 1
    plain = model(genes, values, pad, pert_flags=flags)["mlm_output"]
    marked = model(genes, values, pad, pert_flags=flagged)["mlm_output"]
    assert (plain - marked).abs().max() > 1e-3  # the flag changes every gene's prediction
    assert (plain - model(genes, values, pad, pert_flags=flags)["mlm_output"]).abs().max() == 0


def test_a_target_outside_the_panel_is_a_flagged_extra_token_that_survives_chunking(tmp_path):
    path = screen_file(tmp_path / "s.h5ad")
    vocab, tokens = toy_vocab(), TokenConfig(max_seq_len=8)
    screen = load_screen(path, vocab, tokens, "condition", "ctrl", exclude=("unassigned",))
    assert screen.genes == [f"G{i}" for i in range(N_GENES)]
    rows = np.flatnonzero(screen.is_control)[:3]
    targets = [("OUT",), ("G1",), ()]
    flagged = np.array([1])
    for columns in panel_chunks(N_GENES, flagged, room=6):  # 24 genes, 6 tokens per chunk
        assert 1 in columns
        assert len(columns) <= 6
        x = make_inputs(screen, rows, targets, vocab, tokens, columns)
        assert x.offset == 2  # <cls>, one extra slot
        assert x.gene_ids[0, 1] == vocab["OUT"]
        assert x.flags[0, 1] == FLAG_PERTURBED
        assert x.values[0, 1] == MASK_VALUE
        assert x.flags[1, 1] == FLAG_PAD
        assert x.padding_mask[1, 1]
        g1 = x.offset + int(np.flatnonzero(columns == 1)[0])
        assert x.flags[1, g1] == FLAG_PERTURBED
        assert x.flags[0, g1] == 0
        np.testing.assert_array_equal(x.values[2, x.offset :], screen.bins[rows[2], columns])
    chunks = panel_chunks(N_GENES, flagged, room=6)
    assert sorted(set(np.concatenate(chunks).tolist())) == list(range(N_GENES))
    picked = sampled_columns(N_GENES, np.array([1, 5]), 6, np.random.default_rng(0))
    assert len(picked) == 6
    assert {1, 5} <= set(picked.tolist())


def test_dense_bins_equal_the_runtime_tokens(shared_data):
    path = shared_data / PAPALEXI
    with open_counts(path) as counts:
        genes = [str(g) for g in counts.var["index"]]
    vocab = Vocab.from_genes([*genes, "IRF1"])
    tokens = TokenConfig(max_seq_len=400)
    screen = load_screen(path, vocab, tokens, None, "ctrl", where=("condition=ctrl",))
    assert len(screen.genes) == 299
    assert len(screen.conditions) == 1923
    with open_counts(path) as counts:
        block = next(counts.iter_blocks(20729))
        keep = np.flatnonzero(np.asarray(counts.read_obs("condition")) == "ctrl")
        ids = vocab.lookup(genes)
    tok = tokenize(block, ids, tokens, vocab.cls_id, vocab.pad_id).take(keep[:50])
    for i in range(50):
        n = tok.n_genes[i]
        dense = dict(zip(screen.gene_ids.tolist(), screen.bins[i].tolist(), strict=True))
        assert [dense[g] for g in tok.gene_ids[i, 1 : n + 1]] == tok.values[i, 1 : n + 1].tolist()
        assert sum(v > 0 for v in screen.bins[i]) == n  # zeros are bin 0, nothing else is
    raw = block.to_dense()[keep[:5]]
    expected = np.log1p(raw / raw.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(screen.expression[:5], expected, rtol=1e-5, atol=1e-6)


def test_pairing_is_seeded():
    controls = np.arange(100, 140)
    a = pair_controls(500, controls, np.random.default_rng(3))
    b = pair_controls(500, controls, np.random.default_rng(3))
    c = pair_controls(500, controls, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert set(a.tolist()) <= set(controls.tolist())
    assert len(set(a.tolist())) == 40  # 500 draws reach every control cell


# ---------------------------------------------------------------------------- metrics


def test_metrics_equal_direct_numpy():
    rng = np.random.default_rng(0)
    pred, true, ctrl, pert = rng.normal(size=(4, 30))
    de = np.array([2, 5, 7, 11])
    m = condition_metrics(pred, true, ctrl, pert, de)
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, true)[0, 1])
    assert m["pearson_delta"] == pytest.approx(np.corrcoef(pred - ctrl, true - ctrl)[0, 1])
    assert m["pearson_de_delta"] == pytest.approx(
        np.corrcoef(pred[de] - ctrl[de], true[de] - ctrl[de])[0, 1]
    )
    assert m["systema_delta"] == pytest.approx(np.corrcoef(pred - pert, true - pert)[0, 1])
    assert m["l2"] == pytest.approx(np.sqrt(((pred - true) ** 2).sum()))
    assert np.isnan(condition_metrics(ctrl, true, ctrl, pert, de)["pearson_delta"])


def test_de_genes_rank_by_welch_t():
    rng = np.random.default_rng(1)
    cells, controls = rng.normal(size=(40, 50)), rng.normal(size=(60, 50))
    cells[:, 10] += 3
    t = scipy.stats.ttest_ind(cells, controls, equal_var=False).statistic
    expected = np.sort(np.argsort(-np.abs(t))[:5])
    np.testing.assert_array_equal(de_genes(cells, controls, np.zeros(0, int), k=5), expected)
    assert 10 not in de_genes(cells, controls, np.array([10]), k=5)


def test_linear_model_is_the_closed_form_ridge():
    rng = np.random.default_rng(2)
    deltas = rng.normal(size=(8, 30))  # 8 training perturbations x 30 genes
    rows = [np.array([i]) for i in range(8)]
    predict = linear_model(deltas, rows, pcs=4, ridge=0.1)
    b = deltas.mean(0)
    u, s, _ = np.linalg.svd((deltas - b).T, full_matrices=False)
    G = u[:, :4] * s[:4]
    P = G[:8]
    W = np.linalg.inv(G.T @ G + 0.1 * np.eye(4)) @ G.T @ (deltas - b).T @ P
    W = W @ np.linalg.inv(P.T @ P + 0.1 * np.eye(4))
    np.testing.assert_allclose(predict(np.array([12])), b + G @ W @ G[12], atol=1e-10)
    np.testing.assert_allclose(predict(np.zeros(0, int)), b)  # outside the panel: the mean


def test_reverse_and_centroid_scores_share_ties():
    observed = np.array([1.0, 2.0, 3.0, 0.0])
    cands = {"a": observed * 2, "b": -observed, "c": observed[::-1].copy()}
    assert reverse_hits(cands, observed, "a") == (1.0, 1.0)
    const = {k: np.ones(4) for k in "abcd"}  # the mean baseline: one prediction for all
    assert reverse_hits(const, observed, "a") == (0.25, 0.75)  # exactly chance
    centroids = {"x": np.zeros(3), "y": np.ones(3)}
    assert centroid_hits({"x": np.full(3, 0.1)}, centroids) == {"x": 1.0}
    assert centroid_hits({"x": np.full(3, 0.5)}, centroids) == {"x": 0.5}


# ---------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perturb")
    path = screen_file(tmp / "screen.h5ad")
    cfg = PerturbConfig(
        data=[str(path)],
        perturbation_key="condition",
        out=str(tmp / "run"),
        from_scratch=True,
        exclude_target=("unassigned",),
        epochs=30,  # the extra-token effect (OUT) needs about 200 steps
        lr=3e-3,
        batch_size=32,
        val_fraction=0.0,
        seed=0,
        device="cpu",
    )
    return path, finetune_perturb(cfg), tmp


def test_the_model_learns_the_effects_it_trains_on(toy_run):
    path, summary, tmp = toy_run
    assert summary["train_conditions"] == ["G1+ctrl", "OTHER+ctrl", "OUT+ctrl"]
    model, info = load_run(tmp / "run")
    screen = load_screen(
        path, info.vocab, info.tokens, "condition", "ctrl", exclude=("unassigned",)
    )
    rows = np.flatnonzero(screen.is_control)
    ctrl = predict_cells(model, info, screen, rows, (), 64).mean(0)
    g1 = predict_cells(model, info, screen, rows, ("G1",), 64).mean(0)
    out = predict_cells(model, info, screen, rows, ("OUT",), 64).mean(0)
    observed = np.log1p(4.0 / (4 * N_GENES) * 1e4)  # about 6.0: the control level
    assert abs(ctrl[3] - observed) < 0.5
    # effects of 6 log units down (G1, G5) and 1.6 up (G7); half of each is plenty of margin
    assert g1[1] < ctrl[1] - 3
    assert g1[5] < ctrl[5] - 3
    assert abs(g1[3] - ctrl[3]) < 0.5
    assert out[7] > ctrl[7] + 0.8
    assert abs(out[3] - ctrl[3]) < 0.5


def test_the_same_seed_gives_the_same_run(toy_run, tmp_path):
    path, _summary, _tmp = toy_run
    args = {
        "data": [str(path)],
        "perturbation_key": "condition",
        "from_scratch": True,
        "exclude_target": ("unassigned",),
        "epochs": 2,
        "lr": 3e-3,
        "batch_size": 32,
        "seed": 5,
        "device": "cpu",
    }
    a = finetune_perturb(PerturbConfig(out=str(tmp_path / "a"), **args))
    b = finetune_perturb(PerturbConfig(out=str(tmp_path / "b"), **args))
    assert a["val_pearson_delta"] == b["val_pearson_delta"]
    wa, wb = load_run(tmp_path / "a")[0].state_dict(), load_run(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_predict_writes_one_row_per_target(toy_run, tmp_path):
    path, _, tmp = toy_run
    out = tmp_path / "pred.h5ad"
    r = run_cli(
        "perturb",
        "predict",
        "--from",
        tmp / "run",
        "--control",
        path,
        "--where",
        "condition=ctrl",
        "--target",
        "G1",
        "--target",
        "OUT+OTHER",
        "--n-cells",
        7,
        "--out",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    pred = ad.read_h5ad(out)
    assert list(pred.obs_names) == ["G1", "OUT+OTHER"]
    assert list(pred.var_names) == [f"G{i}" for i in range(N_GENES)]
    x = pred.X.toarray()
    assert x[0, 1] < x[0, 3] - 3  # G1 silenced
    cells = ad.read_h5ad(tmp_path / "pred.cells.h5ad")
    assert cells.shape == (14, N_GENES)
    assert list(cells.obs["target"][:7]) == ["G1"] * 7
    np.testing.assert_allclose(cells.X[:7].toarray().mean(0), x[0], rtol=1e-5, atol=1e-5)


def test_evaluate_reports_every_method(toy_run, tmp_path):
    path, _, _tmp = toy_run
    # a run that never saw OUT+ctrl, then scored on it
    r = run_cli(
        "finetune",
        "perturb",
        "--from-scratch",
        "--data",
        path,
        "--perturbation-key",
        "condition",
        "--exclude-target",
        "unassigned",
        "--exclude-target",
        "OUT",
        "--epochs",
        1,
        "--val-fraction",
        0,
        "--out",
        tmp_path / "held",
        "--json",
    )
    assert r.exit_code == 0, r.output
    r = run_cli(
        "perturb",
        "evaluate",
        "--from",
        tmp_path / "held",
        "--data",
        path,
        "--perturbation-key",
        "condition",
        "--exclude-target",
        "unassigned",
        "--reverse",
        "--json",
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["held_out"] == ["OUT+ctrl"]
    assert res["trained_on"] == ["G1+ctrl", "OTHER+ctrl"]
    assert set(res["summary"]) == {
        "scgpt",
        "control_mean",
        "train_mean",
        "linear",
        "embedding_ridge",
        "noise_ceiling",
    }
    assert res["summary"]["control_mean"]["all"]["pearson_delta"] is None  # a constant change
    assert res["summary"]["noise_ceiling"]["all"]["pearson_delta"] > 0.5  # G7 up in both halves
    assert res["summary"]["scgpt"]["out_of_panel"]["n"] == 1
    assert res["reverse"]["candidates"] == 3
    assert res["reverse"]["train_mean"]["top1"] == pytest.approx(
        1 / 3, abs=1e-4
    )  # JSON rounds to 4 places
    r = run_cli(
        "perturb",
        "evaluate",
        "--from",
        tmp_path / "held",
        "--data",
        path,
        "--perturbation-key",
        "condition",
        "--exclude-target",
        "unassigned",
        "--targets",
        "G1",
    )
    assert r.exit_code == 3
    assert "saw this condition in training" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--perturbation-key", "nope"], "has no obs column 'nope'"),
        (
            ["--perturbation-key", "condition", "--control", "CTRL"],
            "no cell has condition == 'CTRL'",
        ),
        (["--perturbation-key", "condition"], "'unassigned' is not a gene of the vocabulary"),
    ],
)
def test_finetune_refuses_bad_screens_in_one_line(toy_run, tmp_path, args, message):
    path, _, tmp = toy_run
    r = run_cli(
        "finetune", "perturb", "--from", tmp / "run", "--data", path, *args, "--out", tmp_path / "x"
    )
    assert r.exit_code == 3, r.output
    assert message in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_predict_refuses_a_target_outside_the_vocabulary(toy_run, tmp_path):
    path, _, tmp = toy_run
    r = run_cli(
        "perturb",
        "predict",
        "--from",
        tmp / "run",
        "--control",
        path,
        "--target",
        "STAT9",
        "--out",
        tmp_path / "p.h5ad",
    )
    assert r.exit_code == 3
    assert "'STAT9' is not in the run's vocabulary" in r.output
    assert len(r.output.strip().splitlines()) == 1
