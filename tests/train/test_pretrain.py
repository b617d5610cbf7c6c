"""Generative pretraining: the token split, loss on real data, exact resume, DDP (gloo, 2 CPUs)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import scgpt_train.pretrain as pretrain_mod
from scgpt_runtime.tokens import TokenBlock
from scgpt_train.cells import load_cells
from scgpt_train.checkpoint import load_run
from scgpt_train.cli import cli
from scgpt_train.generative import add_unexpressed, split_generative
from scgpt_train.inference import embed
from scgpt_train.metrics import knn_probe
from scgpt_train.pretrain import PretrainConfig, pretrain

KANG = "labelled/kang2018_pbmc_counts.h5ad"
MOUSE = "unlabelled/smnn_mouse_2batch_900.h5ad"


def tokens_of(n_genes: list[int], width: int = 8) -> TokenBlock:
    B = len(n_genes)
    pad = np.arange(width)[None] > np.array(n_genes)[:, None]
    gene_ids = np.where(pad, 0, np.arange(width)[None] + 10 * np.arange(B)[:, None] + 100)
    gene_ids[:, 0] = 1  # <cls>
    values = np.where(pad, -2.0, np.arange(width, dtype=np.float32)[None] + 1)
    values[:, 0] = 0.0
    inputs = {"gene_ids": gene_ids, "values": values.astype(np.float32), "padding_mask": pad}
    return TokenBlock(inputs, np.array(n_genes), 0)


def test_split_generative_partitions_each_cell():
    tokens = tokens_of([7, 4, 0, 1])
    keys = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    b = split_generative(tokens, 0.5, keys, pad_id=0, pad_value=-2.0)
    for i, n in enumerate(tokens.n_genes):
        obs = b["pcpt_gene"][i][~b["pcpt_pad"][i]].tolist()
        gen = b["gen_gene"][i][~b["gen_pad"][i]].tolist()
        assert obs[0] == 1  # <cls> first, always observed
        assert len(gen) == int(np.floor(n * 0.5))
        genes = tokens.gene_ids[i][1 : n + 1].tolist()
        assert sorted(obs[1:] + gen) == genes  # every gene exactly once
        assert obs[1:] == sorted(obs[1:])  # order kept
        assert gen == sorted(gen)
        # values travel with their genes
        vals = dict(zip(tokens.gene_ids[i].tolist(), tokens.values[i].tolist(), strict=True))
        assert b["gen_values"][i][~b["gen_pad"][i]].tolist() == [vals[g] for g in gen]
        assert b["pcpt_values"][i][~b["pcpt_pad"][i]].tolist() == [vals[g] for g in obs]
    assert (b["pcpt_values"][b["pcpt_pad"]] == -2.0).all()


def test_add_unexpressed_queries_genes_of_other_cells_with_target_zero():
    tokens = tokens_of([7, 4, 0, 6])
    keys = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    b = split_generative(tokens, 0.5, keys, pad_id=0, pad_value=-2.0)
    out = add_unexpressed(b, 1.5, torch.Generator().manual_seed(1), pad_id=0)
    held = {i: set(tokens.gene_ids[i][1 : n + 1].tolist()) for i, n in enumerate(tokens.n_genes)}
    for i in range(len(tokens.n_genes)):
        before = b["gen_gene"][i][~b["gen_pad"][i]].tolist()
        after = out["gen_gene"][i][~out["gen_pad"][i]].tolist()
        values = out["gen_values"][i][~out["gen_pad"][i]].tolist()
        assert after[: len(before)] == before  # the generated genes stay, first
        assert values[: len(before)] == b["gen_values"][i][~b["gen_pad"][i]].tolist()
        new = after[len(before) :]
        assert len(new) == int(np.floor(len(before) * 1.5))
        assert len(set(new)) == len(new)
        assert not set(new) & held[i]
        assert set(new) <= set().union(*held.values())  # held by another cell of the batch
        assert values[len(before) :] == [0.0] * len(new)
        pads = out["gen_pad"][i].tolist()
        assert pads == sorted(pads)  # pads last
    assert (out["gen_gene"][out["gen_pad"]] == 0).all()
    assert torch.equal(out["pcpt_gene"], b["pcpt_gene"])  # observed tokens untouched


def config(shared_data, tmp_path, name="run", **kw) -> PretrainConfig:
    base = {
        "data": [str(shared_data / KANG)],
        "out": str(tmp_path / name),
        "max_steps": 8,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 2,
        "eval_every": 4,
        "checkpoint_every": 2,
        "log_every": 1,
        "val_cells": 64,
        "model": {"dropout": 0.0},
        "tokens": {"max_seq_len": 64},
    }
    return PretrainConfig(**{**base, **kw})


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_real_data(shared_data, tmp_path):
    cfg = config(
        shared_data,
        tmp_path,
        max_steps=40,
        eval_every=10,
        checkpoint_every=40,
        mlm_weight=0.5,
        model={},
        probe_data=[str(shared_data / KANG)],
        probe_label_key="cell_type",
        probe_where=("condition=control",),
    )
    last = pretrain(cfg)
    m = metrics(tmp_path / "run")
    probed = [r for r in m if "probe_knn_macro_f1" in r]
    assert [r["step"] for r in probed] == [10, 20, 30, 40]  # beside every val_loss
    assert all("val_loss" in r and 0 <= r["probe_knn_macro_f1"] <= 1 for r in probed)
    first = np.mean([r["loss"] for r in m[:5]])
    final = np.mean([r["loss"] for r in m[-5:]])
    assert final < 0.7 * first, (first, final)  # 40 steps from random weights: a clear fall
    val = [r["val_loss"] for r in m if "val_loss" in r]
    assert val[-1] < val[0]
    assert last["step"] == 40
    assert last["cells_per_s"] > 0
    model, info = load_run(tmp_path / "run")
    assert info.tokens.max_seq_len == 64
    assert info.provenance["data"][0]["file"].endswith(KANG)
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert torch.equal(saved["encoder.embedding.weight"], model.encoder.embedding.weight)
    cells = load_cells(
        cfg.probe_data, info.vocab, info.tokens, label_key="cell_type", where=cfg.probe_where
    )  # the last probe, again from the saved weights
    again = knn_probe(embed(model, cells.tokens), cells.labels.astype(str))
    assert again == {k: v for k, v in probed[-1].items() if k.startswith("probe_")}


def test_resume_repeats_the_uninterrupted_run(shared_data, tmp_path, monkeypatch):
    pretrain(config(shared_data, tmp_path, "whole"))
    save = pretrain_mod.save_checkpoint

    def save_then_die(run_dir, step, *args):
        save(run_dir, step, *args)
        if step == 4:
            raise KeyboardInterrupt  # the machine goes away right after a checkpoint

    monkeypatch.setattr(pretrain_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(shared_data, tmp_path, "cut"))
    monkeypatch.setattr(pretrain_mod, "save_checkpoint", save)
    pretrain(config(shared_data, tmp_path, "cut", resume=True))

    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    by_step = {r["step"]: r for r in cut}  # resumed steps 5..8 overwrite nothing earlier
    for r in whole:
        for key in ("loss", "gen_mse", "mvc_mse", "lr", "val_loss"):
            if key in r:
                # same ops in the same order on CPU: only the metrics' 6-digit rounding differs
                assert by_step[r["step"]][key] == pytest.approx(r[key], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(shared_data, tmp_path):
    """SIGKILL between the last checkpoint and the final weights (found by
    tools/fault_writes.py): --resume writes the final weights and summary from that checkpoint
    instead of calling the run complete; a metrics line cut short by the kill is left out."""
    pretrain(config(shared_data, tmp_path, "whole"))
    run = tmp_path / "whole"
    final, summary = (
        load_file(run / "model.safetensors"),
        json.loads((run / "summary.json").read_text()),
    )
    (run / "summary.json").unlink()
    torch.manual_seed(0)
    initial = {k: torch.randn_like(v) for k, v in final.items()}
    save_file(initial, run / "model.safetensors")  # what RUN holds until the end
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')
    pretrain(config(shared_data, tmp_path, "whole", resume=True))
    for k, v in load_file(run / "model.safetensors").items():
        assert torch.equal(v, final[k]), k
    assert json.loads((run / "summary.json").read_text())["loss"] == summary["loss"]


def test_cli_pretrain_json_and_bad_inputs(shared_data, tmp_path):
    run = tmp_path / "cli"
    args = [
        "pretrain",
        "--data",
        str(shared_data / "unlabelled"),
        "--out",
        str(run),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--json",
    ]
    result = CliRunner().invoke(
        cli, [*args, "--config", str(_write(tmp_path, {"tokens": {"max_seq_len": 32}}))]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 2
    files = json.loads((run / "config.json").read_text())["provenance"]["data"]
    assert len(files) == 7  # the folder's 3 Liao .h5 and 4 .h5ad files
    bad = CliRunner().invoke(
        cli, ["pretrain", "--data", str(tmp_path / "none*.h5ad"), "--out", str(run)]
    )
    assert bad.exit_code == 3
    assert "no .h5ad, .h5 or .h5mu file there" in bad.stderr
    bad = CliRunner().invoke(cli, [*args, "--config", str(_write(tmp_path, {"nope": 1}))])
    assert bad.exit_code == 2
    assert "unknown fields in --config: nope" in bad.stderr


def test_an_existing_run_is_kept_and_resume_takes_its_settings(shared_data, tmp_path):
    """A second pretraining into RUN is refused (exit 6) unless --overwrite; --resume in the
    README's form (other data, other options) continues with what RUN was started with, says
    which given options differ, and keeps one metrics row per step."""
    run = tmp_path / "run"
    base = [
        "pretrain",
        "--data",
        str(shared_data / KANG),
        "--out",
        str(run),
        "--batch-size",
        "8",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "100",
        "--config",
        _write(tmp_path, {"tokens": {"max_seq_len": 32}, "log_every": 1}),
    ]
    first = CliRunner().invoke(cli, [*base, "--max-steps", "2"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(cli, [*base, "--max-steps", "3"])
    assert again.exit_code == 6
    assert "exists; pass --overwrite to replace that run" in again.stderr
    liao = shared_data / "unlabelled/liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5"
    resume = ["pretrain", "--data", str(liao), "--out", str(run), "--resume", "--lr", "0.5"]
    resumed = CliRunner().invoke(cli, resume)
    assert resumed.exit_code == 0, resumed.output
    assert "these given options differ and are not used: --lr (given 0.5, run 0.001)" in (
        resumed.stderr
    )
    assert "--data (given" in resumed.stderr
    steps = [r["step"] for r in metrics(run)]
    assert steps == sorted(set(steps))  # no row twice
    replaced = CliRunner().invoke(cli, [*base, "--max-steps", "1", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert [r["step"] for r in metrics(run)] == [1]


def test_an_interrupted_checkpoint_write_exits_130_and_resume_continues(
    shared_data, tmp_path, monkeypatch, caplog
):
    """Ctrl-C inside the second checkpoint's write: exit 130, the log names the checkpoint
    --resume continues from, no half-written checkpoint is left, and --resume finishes."""
    import scgpt_train.checkpoint as checkpoint

    run = tmp_path / "run"
    args = ["pretrain", "--data", str(shared_data / KANG), "--out", str(run)]
    args += ["--batch-size", "8", "--checkpoint-every", "1", "--eval-every", "100"]
    args += ["--max-steps", "3", "--config", str(_write(tmp_path, {"tokens": {"max_seq_len": 32}}))]
    write_json, calls = checkpoint.write_json, []

    def interrupted(path, obj):
        if path.name == "state.json":
            calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr(checkpoint, "write_json", interrupted)
    stopped = CliRunner().invoke(cli, args)
    assert stopped.exit_code == 130, stopped.output
    assert f"--resume continues {run} from {run / 'checkpoints' / 'step-00000001'}" in (
        stopped.stderr
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    # Loading the unfinished run (to export or fine-tune it) takes the checkpoint, not the
    # initial weights in RUN/model.safetensors, and says so.
    caplog.handler.setLevel("WARNING")
    logging.getLogger().addHandler(caplog.handler)  # the CLI's basicConfig(force) removed it
    model, info = checkpoint.load_run(run)
    assert "an unfinished pretraining: using its latest checkpoint, step 1 of 3" in caplog.text
    assert info.provenance["checkpoint_step"] == 1
    saved = load_file(run / "checkpoints" / "step-00000001" / "model.safetensors")
    initial = load_file(run / "model.safetensors")
    name = "encoder.embedding.weight"
    assert torch.equal(model.state_dict()[name], saved[name])
    assert not torch.equal(saved[name], initial[name])
    monkeypatch.setattr(checkpoint, "write_json", write_json)
    resumed = CliRunner().invoke(cli, ["pretrain", "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in metrics(run) if "loss" in r][-1] == 3


def test_vocab_from_a_data_file(shared_data, tmp_path):
    # the Liao files (33,539 genes) trained on Kang's 6,998 genes: a small, PBMC-sized vocabulary
    liao = "unlabelled/liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5"
    run = tmp_path / "small-vocab"
    result = CliRunner().invoke(
        cli,
        [
            "pretrain",
            "--data",
            str(shared_data / liao),
            "--vocab",
            str(shared_data / KANG),
            "--out",
            str(run),
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--config",
            _write(tmp_path, {"tokens": {"max_seq_len": 16}}),
        ],
    )
    assert result.exit_code == 0, result.output
    vocab = json.loads((run / "vocab.json").read_text())
    assert len(vocab) == 6998 + 3
    assert load_run(run)[1].model.vocab_size == len(vocab)


def _write(tmp_path, obj) -> str:
    path = tmp_path / f"cfg{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_ddp_two_processes_match_one(shared_data, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same global batch gives the same first-step loss
    as one process, and the loss falls."""
    common = [
        "--data",
        str(shared_data / MOUSE),
        "--max-steps",
        "12",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--eval-every",
        "100",
        "--checkpoint-every",
        "100",
        "--config",
        _write(
            tmp_path, {"model": {"dropout": 0.0}, "tokens": {"max_seq_len": 64}, "log_every": 1}
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "scgpt_train.cli", "-q", "pretrain", *common, "--out", str(one)],
        check=True,
        env=env,
    )
    two = tmp_path / "two"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "scgpt_train.cli",
            "-q",
            "pretrain",
            *common,
            "--out",
            str(two),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    m1, m2 = metrics(one), metrics(two)
    # sums over two ranks of float32 partial sums: equal up to float32 rounding
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-5)
    assert np.mean([r["loss"] for r in m2[-3:]]) < np.mean([r["loss"] for r in m2[:3]])


def test_data_without_usable_genes_is_a_gene_match_error(shared_data, tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"CD3E": 0, "LYZ": 1, "<pad>": 2, "<cls>": 3, "<eoc>": 4}))
    args = [
        "pretrain",
        "--data",
        str(shared_data / MOUSE),
        "--out",
        str(tmp_path / "r"),
        "--vocab",
        str(vocab),
        "--max-steps",
        "1",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 4
    (line,) = result.stderr.strip().splitlines()
    assert f"{shared_data / MOUSE}: only 0 of 2 possible genes (0%) match the model" in line
    assert "--min-gene-fraction" not in line  # pretrain has no such option


def test_ecs_weight_adds_elastic_cell_similarity_to_the_loss(shared_data, tmp_path):
    pretrain(config(shared_data, tmp_path, max_steps=3, ecs_weight=2.0, mlm_weight=0.0))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 3
    for r in rows:
        assert 0 < r["ecs"] <= 1  # a mean of 1 - (relu(cos) - 0.8)^2 over pairs
        # float32 sums of parts near 1e3: about 1e-4 apart from the float64 sum of the logged parts
        assert r["loss"] == pytest.approx(r["gen_mse"] + r["mvc_mse"] + 2.0 * r["ecs"], rel=1e-6)


def test_contrast_and_unexpressed_queries_enter_the_loss(shared_data, tmp_path):
    kw = {"max_steps": 3, "contrast_weight": 3.0, "unexpressed_ratio": 1.0, "mlm_weight": 0.0}
    pretrain(config(shared_data, tmp_path, **kw))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 3
    for r in rows:
        assert 0 < r["contrast"] < 2 * math.log(16)  # InfoNCE over 16 cells starts near ln 16
        # float32 sums of parts near 1e3: about 1e-4 apart from the float64 sum of the logged parts
        assert r["loss"] == pytest.approx(
            r["gen_mse"] + r["mvc_mse"] + 3.0 * r["contrast"], rel=1e-6
        )
    plain = [r for r in metrics(pretrain_run(shared_data, tmp_path)) if "loss" in r]
    # the queried unexpressed genes (target 0) are in the generative loss: it differs
    assert rows[0]["gen_mse"] != pytest.approx(plain[0]["gen_mse"], rel=1e-3)


def pretrain_run(shared_data, tmp_path):
    pretrain(config(shared_data, tmp_path, name="plain", max_steps=1, mlm_weight=0.0))
    return tmp_path / "plain"
