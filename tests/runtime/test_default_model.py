"""The default model shipped in the package: present, intact, within its size budget, trained
on what its card says, with the held-out figures of its held-out build, and reproducing on a
fresh run the figures recorded on its own cells."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scgpt_runtime.bundle import load_bundle
from scgpt_runtime.served import default_bundle

ROOT = Path(__file__).resolve().parents[2]
PARAMETERS = 528_583  # the small preset with a 7-class head, as the card says
KANG_TYPES = ["B", "CD14+Mono", "CD4T", "CD8T", "Dendritic", "FCGR3A+Mono", "NK"]


def test_default_model_is_installed_intact_and_small():
    path = default_bundle()
    assert path is not None
    bundle = load_bundle(path)  # checks every sha256
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25_000_000
    assert bundle.labels == KANG_TYPES
    assert bundle.precisions == ["fp32", "fp16", "int8"]
    training = bundle.config["provenance"]["training"]
    assert [Path(d["file"]).name for d in training["data"]] == ["kang2018_pbmc_counts.h5ad"]
    # from random weights, on every labelled Kang cell
    assert training["from_run"] is None
    assert "--from-scratch" in training["command"]
    assert "--where" not in training["command"]
    own = {e["precision"]: e for e in bundle.evaluation if "measured_on" not in e}
    assert sorted(own) == ["fp16", "fp32", "int8"]
    for e in own.values():
        assert (e["where"], e["n_cells"]) == ([], 1975)  # all Kang cells: its training data
    held_out = {e["precision"]: e for e in bundle.evaluation if "measured_on" in e}
    assert sorted(held_out) == ["fp16", "fp32"]  # the held-out build's int8 failed validation
    for e in held_out.values():
        # measured on a sibling build that kept the stimulated cells out
        assert e["measured_on"]["bundle_sha256"] != bundle.sha256
        assert "--where condition=control" in e["measured_on"]["training_command"]
        assert (e["where"], e["n_cells"]) == (["condition=stimulated"], 1039)
        assert e["ece"] < e["ece_uncalibrated"]  # recorded as served and without the temperature


def test_default_model_is_format_2_with_a_fitted_temperature_and_gene_embeddings():
    bundle = load_bundle(default_bundle())
    assert bundle.config["format_version"] == 2
    assert bundle.parameters == PARAMETERS
    calibration = bundle.config["calibration"]
    assert calibration["n_cells"] == 196  # the fine-tuning's validation cells
    assert bundle.temperature == calibration["temperature"] > 0
    assert bundle.config["genes"]["shape"] == [len(bundle.vocab), 64]  # for `scgpt-run genes`


def test_model_card_quotes_the_recorded_figures():
    card = (ROOT / "docs" / "default-model.md").read_text()
    for e in load_bundle(default_bundle()).evaluation:
        assert f"{e['macro_f1']:.3f}" in card, e["precision"]
        assert f"{e['accuracy']:.3f}" in card, e["precision"]


def test_a_fresh_run_reproduces_the_recorded_macro_f1(shared_data, tmp_path):
    # the same script CI runs in a torch-free environment; it exits 1 on any difference
    kang = shared_data / "labelled" / "kang2018_pbmc_counts.h5ad"
    script = ROOT / "tools" / "check_default_model.py"
    result = subprocess.run(
        [sys.executable, script, kang, tmp_path], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["macro_f1"] == report["recorded_macro_f1"]
    assert report["n_cells"] == 1975
    assert set(report["held_out_macro_f1"]) == {"fp32", "fp16"}
