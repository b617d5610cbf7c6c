"""Fine-tuning: annotation on real data, integration's DSBN and DAB, weight transfer between
runs, the evaluate command, and the bad-input corpus."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from scgpt_train.cells import MISSING, load_cells, minibatches, stratified_split
from scgpt_train.checkpoint import load_run
from scgpt_train.cli import cli
from scgpt_train.decoders import AdversarialDiscriminator
from scgpt_train.finetune import AnnotateConfig, annotation_loss, finetune_annotate
from scgpt_train.inference import predict
from scgpt_train.integrate import IntegrateConfig, finetune_integrate, integration_losses
from scgpt_train.metrics import macro_f1

KANG = "labelled/kang2018_pbmc_counts.h5ad"
FAST = {"model": {"dropout": 0.0}, "tokens": {"max_seq_len": 64}, "lr": 1e-3, "val_fraction": 0}


def synthetic(path, n=120, labels=("A", "B", "C"), missing=0, seed=0):
    """Counts of `n` cells: each type expresses its own 8 marker genes; batch "b2" doubles the
    counts of the first 20 genes. The first `missing` cells have no label (NaN)."""
    rng = np.random.default_rng(seed)
    types = np.arange(n) % len(labels)
    batch = np.where(np.arange(n) % 2 == 0, "b1", "b2")
    rate = np.full((n, 40), 1.0)
    for t in range(len(labels)):
        rate[types == t, 8 * t : 8 * t + 8] = 12.0
    rate[batch == "b2", :20] *= 2
    label = np.array(labels, dtype=object)[types]
    label[:missing] = np.nan
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(label), "batch": batch}, index=[f"c{i}" for i in range(n)]
    )
    var = pd.DataFrame(index=[f"G{i}" for i in range(40)])
    ad.AnnData(rng.poisson(rate).astype(np.float32), obs=obs, var=var).write_h5ad(path)
    return path


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


# ---------------------------------------------------------------------------- annotation


def test_short_finetune_on_real_data_beats_the_majority_rate(shared_data, tmp_path):
    path = str(shared_data / KANG)
    cfg = AnnotateConfig(
        data=[path],
        label_key="cell_type",
        out=str(tmp_path / "run"),
        from_scratch=True,
        where=("condition=control",),
        epochs=5,
        **{**FAST, "val_fraction": 0.1},
    )
    summary = finetune_annotate(cfg)
    model, info = load_run(tmp_path / "run")
    assert info.labels == ["B", "CD14+Mono", "CD4T", "CD8T", "Dendritic", "FCGR3A+Mono", "NK"]
    assert summary["n_train"] + summary["n_val"] == 936
    test = load_cells(
        [path], info.vocab, info.tokens, label_key="cell_type", where=("condition=stimulated",)
    )
    pred = predict(model, info.labels, test.tokens)
    np.testing.assert_allclose(pred.probabilities.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(pred.conf_score, pred.probabilities.max(1))
    assert pred.probabilities.shape == (1039, 7)
    _, counts = np.unique(test.labels.astype(str), return_counts=True)
    majority = counts.max() / counts.sum()
    f1 = macro_f1(test.labels.astype(str), pred.predicted_labels)
    assert f1 > majority + 0.15, (f1, majority)  # a new condition, 5 short epochs from scratch
    assert (
        predict(model, info.labels, test.tokens, unknown_threshold=1.01).predicted_labels
        == "unknown"
    ).all()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["val_macro_f1"] == max(r["val_macro_f1"] for r in rows)  # best epoch kept
    # the head's temperature, fitted on the validation cells of the best epoch, is in the run
    assert info.calibration == summary["calibration"]
    assert info.calibration["n_cells"] == summary["n_val"]
    assert info.calibration["temperature"] > 0


def test_a_finetune_never_writes_into_its_start_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--out is the --from run"):
        AnnotateConfig(data=["x.h5ad"], label_key="y", out=str(run), from_run=str(run))


def test_missing_labels_are_left_out_of_the_loss(tmp_path):
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, MISSING, 2, MISSING, 1, 1])
    known = labels != MISSING
    expected = torch.nn.functional.cross_entropy(logits[known], labels[known])
    torch.testing.assert_close(annotation_loss(logits, labels), expected)
    assert annotation_loss(logits, torch.full((6,), MISSING)).item() == 0.0
    w = torch.tensor([1.0, 2.0, 0.5])
    weighted = (
        w[labels[known]]
        * torch.nn.functional.cross_entropy(logits[known], labels[known], reduction="none")
    ).sum() / w[labels[known]].sum()
    torch.testing.assert_close(annotation_loss(logits, labels, w), weighted)
    # end to end: 10 unlabelled cells are counted and excluded, not crashed on
    path = synthetic(tmp_path / "m.h5ad", missing=10)
    summary = finetune_annotate(
        AnnotateConfig(
            data=[str(path)],
            label_key="cell_type",
            out=str(tmp_path / "r"),
            from_scratch=True,
            epochs=1,
            **FAST,
        )
    )
    assert summary["n_unlabelled"] == 10
    assert summary["n_train"] == 110


def test_stratified_split_keeps_class_shares():
    codes = np.array([0] * 50 + [1] * 30 + [2] * 3 + [MISSING] * 5)
    train, val = stratified_split(codes, 0.2, seed=0)
    assert np.bincount(codes[val]).tolist() == [10, 6, 1]
    assert len(train) + len(val) == 83  # unlabelled cells in neither
    assert not set(train) & set(val)
    np.testing.assert_array_equal(stratified_split(codes, 0.2, seed=0)[1], val)


def test_class_weighting_and_freezing(tmp_path):
    path = synthetic(tmp_path / "s.h5ad")
    first = finetune_annotate(
        AnnotateConfig(
            data=[str(path)],
            label_key="cell_type",
            out=str(tmp_path / "a"),
            from_scratch=True,
            epochs=1,
            class_weight="balanced",
            **FAST,
        )
    )
    assert first["load_report"].startswith("trained from scratch")
    before, _ = load_run(tmp_path / "a")
    # from the run, new class names, everything but the classifier frozen
    relabel = synthetic(tmp_path / "r.h5ad", labels=("X", "Y", "Z", "W"))
    fast = {k: v for k, v in FAST.items() if k != "tokens"}
    finetune_annotate(
        AnnotateConfig(
            data=[str(relabel)],
            label_key="cell_type",
            out=str(tmp_path / "b"),
            from_run=str(tmp_path / "a"),
            epochs=1,
            freeze="encoder",
            **fast,
        )
    )
    after, info = load_run(tmp_path / "b")
    assert info.labels == ["W", "X", "Y", "Z"]
    assert info.tokens == load_run(tmp_path / "a")[1].tokens  # the run's TokenConfig is kept
    sa, sb = before.state_dict(), after.state_dict()
    for name in ("encoder.embedding.weight", "transformer_encoder.layers.0.linear1.weight"):
        torch.testing.assert_close(sa[name], sb[name])  # loaded and frozen
    assert not torch.equal(sa["cls_decoder._decoder.0.weight"], sb["cls_decoder._decoder.0.weight"])
    report = json.loads((tmp_path / "b" / "config.json").read_text())["provenance"]["load_report"]
    assert "cls_decoder.out_layer.weight" in report["dropped"]  # 3 classes -> 4: a new layer
    assert "cls_decoder.out_layer.weight" in report["new"]
    assert "encoder.embedding.weight" in report["loaded"]


# ---------------------------------------------------------------------------- integration


def integration_model(tmp_path):
    path = synthetic(tmp_path / "s.h5ad")
    cfg = IntegrateConfig(
        data=[str(path)],
        batch_key="batch",
        out=str(tmp_path / "int"),
        from_scratch=True,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        model={"dropout": 0.0},
        tokens={"max_seq_len": 64},
    )
    summary = finetune_integrate(cfg)
    model, info = load_run(tmp_path / "int")
    cells = load_cells([str(path)], info.vocab, info.tokens, batch_key="batch")
    return model, info, cells, cfg, summary


def test_integration_run_and_batch_pure_minibatches(tmp_path):
    _, info, _, _, summary = integration_model(tmp_path)
    assert info.batches == ["b1", "b2"]
    assert (info.model.n_dsbn, info.model.n_dab, info.model.n_batch_tokens) == (2, 2, 2)
    assert summary["cells_per_batch"] == [60, 60]
    assert {"gep", "gepc", "ecs", "dab", "loss"} <= set(summary)
    groups = np.arange(100) % 3
    batches = minibatches(np.arange(100), 8, np.random.default_rng(0), groups)
    assert all(len(np.unique(groups[b])) == 1 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))


def test_dsbn_trains_with_the_minibatch_statistics_of_its_batch(tmp_path):
    model, _, cells, cfg, _ = integration_model(tmp_path)
    model.train()
    bns = model.dsbn.bns
    tracked = [int(bn.num_batches_tracked) for bn in bns]
    rows = np.flatnonzero(cells.batches == "b2")[:16]
    t = cells.tokens
    ids, vals, pad = (torch.from_numpy(a[rows]) for a in (t.gene_ids, t.values, t.padding_mask))
    x = model.encoder(ids) + model.value_encoder(vals)  # (B, L, d) what DSBN normalises
    out = model.dsbn(x, torch.ones(16, dtype=torch.long))
    flat = x.reshape(-1, x.shape[-1])
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + bns[1].eps))
    assert int(bns[1].num_batches_tracked) == tracked[1] + 1  # only b2's BatchNorm moved
    assert int(bns[0].num_batches_tracked) == tracked[0]
    gen = torch.Generator().manual_seed(0)
    parts = integration_losses(model, ids, vals, pad, torch.ones(16, dtype=torch.long), cfg, gen)
    assert int(bns[1].num_batches_tracked) == tracked[1] + 2
    mixed = torch.tensor([0, 1] * 8)
    with pytest.raises(ValueError, match="single batch"):
        integration_losses(model, ids, vals, pad, mixed, cfg, gen)
    assert torch.isfinite(parts["loss"])


def test_dab_reverses_the_gradient_into_the_encoder(tmp_path):
    model, _, cells, _, _ = integration_model(tmp_path)
    model.train()
    t = cells.tokens
    rows = np.arange(8)
    ids, vals, pad = (torch.from_numpy(a[rows]) for a in (t.gene_ids, t.values, t.padding_mask))
    labels = torch.zeros(8, dtype=torch.long)
    disc: AdversarialDiscriminator = model.grad_reverse_discriminator
    encoder_w = model.transformer_encoder.layers[0].linear1.weight
    params = [encoder_w, disc.out_layer.weight]

    def grads(reverse: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        emb = model.cell_embedding(ids, vals, pad, labels)
        logits = disc(emb) if reverse else disc.out_layer(disc._decoder(emb))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return list(torch.autograd.grad(loss, params))

    (enc_rev, disc_rev), (enc_plain, disc_plain) = grads(True), grads(False)
    assert enc_plain.abs().sum() > 0
    torch.testing.assert_close(enc_rev, -enc_plain)  # the encoder learns to hide the batch
    torch.testing.assert_close(disc_rev, disc_plain)  # the discriminator learns to find it


# ---------------------------------------------------------------------------- CLI


def test_cli_annotate_evaluate_and_map(tmp_path, read_report):
    data = synthetic(tmp_path / "s.h5ad")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"dropout": 0.0}, "tokens": {"max_seq_len": 64}}))
    r = run_cli(
        "finetune",
        "annotate",
        "--from-scratch",
        "--data",
        data,
        "--label-key",
        "cell_type",
        "--out",
        tmp_path / "run",
        "--epochs",
        3,
        "--lr",
        1e-3,
        "--config",
        cfg,
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["classes"] == ["A", "B", "C"]
    r = run_cli(
        "evaluate",
        "--from",
        tmp_path / "run",
        "--data",
        data,
        "--label-key",
        "cell_type",
        "--reference",
        data,
        "--batch-key",
        "batch",
        "--predictions",
        tmp_path / "p.csv",
        "--report",
        tmp_path / "e.html",
        "--json",
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {"classifier", "knn", "integration"} <= set(res)
    check_evaluate_report(read_report(res["report"]), res)
    assert res["knn"]["n_reference"] == 120
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "cell,label,predicted_labels,conf_score,knn_labels"
    assert len(lines) == 121
    evaluate = ["evaluate", "--from", tmp_path / "run", "--data", data, "--label-key", "cell_type"]
    for where, code, says in [
        ("batch", 2, "--where takes COLUMN=VALUE, got 'batch'"),
        ("bacth=b0", 3, "bacth"),  # the file has no such column: an input error naming it
        ("batch=nope", 3, "no cell has batch == 'nope'"),
    ]:
        r = run_cli(*evaluate, "--where", where)
        assert (r.exit_code, "Traceback" in r.output) == (code, False), r.output
        assert says in r.stderr
    r = run_cli(
        "finetune",
        "integrate",
        "--from",
        tmp_path / "run",
        "--data",
        data,
        "--batch-key",
        "batch",
        "--out",
        tmp_path / "int",
        "--epochs",
        1,
    )
    assert r.exit_code == 0, r.output
    r = run_cli("evaluate", "--from", tmp_path / "int", "--data", data, "--label-key", "cell_type")
    assert r.exit_code == 3
    assert "DSBN" in r.stderr
    assert "--batch-key" in r.stderr


def check_evaluate_report(page, res):
    """Every section, and the numbers of evaluate --json."""
    page.check_self_contained()
    assert page.sections == ["evaluation", "classifier", "knn", "integration", "map"]
    for name in ("classifier", "knn"):
        m = res[name]
        scores = page.rows(f"{name}-scores")
        assert float(scores["accuracy"]) == m["accuracy"]
        assert float(scores["macro-F1"]) == m["macro_f1"]
        bases = m["baselines"]
        assert list(bases) == ["logistic regression", "PCA(50) + 10-NN"]
        shown = {r[0]: (float(r[1]), float(r[2])) for r in page.tables[f"{name}-baselines"][1:]}
        assert shown == {"scGPT": (m["accuracy"], m["macro_f1"])} | {
            b: (v["accuracy"], v["macro_f1"]) for b, v in bases.items()
        }
        for c, support, precision, recall, f1, *base in page.tables[f"{name}-per-class"][1:]:
            assert int(support) == m["support"][c]
            assert float(precision) == m["per_class_precision"][c]
            assert float(recall) == m["per_class_recall"][c]
            assert float(f1) == m["per_class_f1"][c]
            assert [float(v) for v in base] == [v["per_class_f1"][c] for v in bases.values()]
    # counts, shares and the reliability diagram of the head; counts and shares of kNN
    assert (len(page.images["classifier"]), len(page.images["knn"])) == (3, 2)
    integration = page.rows("integration")
    assert float(integration["avg_bio"]) == res["integration"]["avg_bio"]
    assert len(page.images["map"]) == 4  # truth, head, kNN, batch


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (
            "annotate",
            ["--label-key", "celltype"],
            "has no obs column 'celltype' (available: cell_type, batch)",
        ),
        (
            "annotate",
            ["--label-key", "cell_type", "--where", "batch=b3"],
            "no cell has batch == 'b3' (values: b1, b2)",
        ),
        (
            "annotate",
            ["--label-key", "cell_type", "--batch-key", "donor"],
            "has no obs column 'donor'",
        ),
        ("integrate", ["--batch-key", "donor"], "has no obs column 'donor'"),
        ("integrate", ["--batch-key", "batch", "--where", "batch=b1"], "integration needs two"),
    ],
)
def test_bad_input_is_one_line_exit_3(tmp_path, command, args, message):
    data = synthetic(tmp_path / "s.h5ad")
    r = run_cli(
        "finetune", command, "--from-scratch", "--data", data, "--out", tmp_path / "o", *args
    )
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {data}")
    assert message in lines[0]


def test_one_class_only_is_refused(tmp_path):
    data = synthetic(tmp_path / "one.h5ad", labels=("T",))
    r = run_cli(
        "finetune",
        "annotate",
        "--from-scratch",
        "--data",
        data,
        "--label-key",
        "cell_type",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 3
    assert "has only 'T'" in r.stderr
    assert "at least two classes" in r.stderr


def test_usage_errors(tmp_path):
    data = synthetic(tmp_path / "s.h5ad")
    base = ["finetune", "annotate", "--data", data, "--label-key", "cell_type", "--out", tmp_path]
    assert "either --from RUN or --from-scratch" in run_cli(*base).output
    assert run_cli(*base, "--from-scratch", "--where", "batch").exit_code == 2
    assert run_cli(*base, "--from-scratch", "--freeze", "all").exit_code == 2
    help_text = run_cli("finetune", "integrate", "--help").output
    assert "Examples:" in help_text
    assert "--ecs-weight" in help_text
    assert "Examples:" in run_cli("evaluate", "--help").output
