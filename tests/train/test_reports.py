"""`scgpt-train report RUN`: curves of every logged objective, the last logged values, a run
still training, and the usage errors."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from scgpt_train.cli import cli


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def fake_run(path, rows, done):
    """A run directory as a pretraining leaves it: config.json, metrics.jsonl (the last line
    cut short while training), summary.json once done."""
    path.mkdir()
    config = {"format_version": 2, "model": {"d_model": 64}, "train": {"max_steps": 40}}
    (path / "config.json").write_text(json.dumps(config | {"provenance": {"command": "x"}}))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (path / "metrics.jsonl").write_text(text if done else text + '{"step": 4')
    if done:
        (path / "summary.json").write_text(json.dumps(rows[-1]))
    return path


ROWS = [
    {
        "step": s,
        "loss": round(10 / s, 6),
        "gen_mse": round(8 / s, 6),
        "mvc_mse": round(2 / s, 6),
        "lr": 1e-4 * s,
        "grad_norm": 3.0,
        "cells_per_s": 50.0,
        "tokens_per_s": 9000.0,
    }
    | ({"val_loss": round(11.0 / s, 6)} if s % 2 == 0 else {})
    for s in (10, 20, 30)
]  # fmt: skip  (rounded to 6 decimals, as the trainers log)


@pytest.mark.parametrize("done", [True, False])
def test_run_report_draws_every_objective_and_the_last_values(tmp_path, read_report, done):
    run = fake_run(tmp_path / "run", ROWS, done)
    r = run_cli("report", run, "--out", tmp_path / "r.html", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output"] == str(tmp_path / "r.html")
    page = read_report(tmp_path / "r.html")
    page.check_self_contained()
    expected = ["run", "last", "objectives", "optimisation", "summary", "config"]
    assert page.sections == (expected if done else [s for s in expected if s != "summary"])
    state = page.rows("run-facts")["state"]
    assert state == ("complete" if done else "in progress: 3 rows logged")
    last = page.rows("last")
    assert {k: float(v) for k, v in last.items() if k != "metric"} == ROWS[-1]
    assert len(page.images["objectives"]) == 3  # loss (train and validation), gen_mse, mvc_mse
    assert len(page.images["optimisation"]) == 4  # lr, grad_norm, cells/s, tokens/s


def test_run_report_of_a_finetune_draws_its_validation_scores(tmp_path, read_report):
    rows = [
        {"epoch": e, "step": 27 * e, "loss": 1.0 / e, "lr": 1e-4, "val_macro_f1": 0.1 * e,
         "val_accuracy": 0.2 * e}
        for e in (1, 2)
    ]  # fmt: skip
    r = run_cli("report", fake_run(tmp_path / "ft", rows, True), "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    page = read_report(tmp_path / "r.html")
    assert len(page.images["validation"]) == 2  # val_accuracy, val_macro_f1


@pytest.mark.parametrize(
    ("out", "code", "says"),
    [("r.txt", 2, "a report is an .html file"), ("old.html", 6, "exists")],
)
def test_run_report_usage_and_output_errors(tmp_path, out, code, says):
    run = fake_run(tmp_path / "run", ROWS, True)
    (tmp_path / "old.html").write_text("keep")
    r = run_cli("report", run, "--out", tmp_path / out)
    assert (r.exit_code, "Traceback" in r.output) == (code, False), r.output
    assert says in r.stderr
    assert (tmp_path / "old.html").read_text() == "keep"


def test_run_report_without_the_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run_cli("report", fake_run(tmp_path / "run", ROWS, True), "--out", tmp_path / "r.html")
    assert r.exit_code == 2, r.output
    assert "pip install 'scgpt-deploy[report]'" in r.stderr
