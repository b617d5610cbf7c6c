"""workflow/Snakefile run locally: two files (an .h5ad and a 10x .h5), two shards each, merged;
each merged output equals the unsharded scgpt-run output byte for byte."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from scgpt_runtime.cli import cli

SNAKEFILE = Path(__file__).resolve().parents[2] / "workflow" / "Snakefile"


@pytest.fixture(scope="module")
def snakemake() -> list[str]:
    if importlib.util.find_spec("snakemake") is None:
        pytest.skip("snakemake is not installed (pip install snakemake) to run workflow/Snakefile")
    return [sys.executable, "-m", "snakemake"]


def test_workflow_annotates_in_shards_and_merges(
    snakemake, served_bundle, kang_small, liao_small, tmp_path
):
    inputs = {"kang": kang_small, "liao": liao_small}
    config = {
        "model": str(served_bundle),
        "inputs": {k: str(v) for k, v in inputs.items()},
        "shards": 2,
        "format": "csv",
        "outdir": str(tmp_path / "results"),
        "threads": 1,
        "options": "--top-k 2",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = ["-s", SNAKEFILE, "--configfile", tmp_path / "config.json", "--cores", 2]
    args += ["--directory", tmp_path, "--quiet"]
    done = subprocess.run(
        [*snakemake, *map(str, args)], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name, path in inputs.items():
        merged = tmp_path / "results" / f"{name}.csv"
        whole = tmp_path / f"{name}.whole.csv"
        args = ["annotate", path, "--model", served_bundle, "--out", whole, "--top-k", 2]
        result = CliRunner().invoke(cli, list(map(str, args)))
        assert result.exit_code == 0, result.output
        assert merged.read_bytes() == whole.read_bytes()
    assert not list((tmp_path / "results" / "parts").glob("*.part"))  # temp(): removed


def test_the_example_configuration_runs_as_written(snakemake, tmp_path):
    """The README's command on workflow/config.example.yaml (default model, the shared files),
    only the results folder moved out of the checkout."""
    root = SNAKEFILE.parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = ["-s", SNAKEFILE, "--configfile", root / "workflow" / "config.example.yaml"]
    args += ["--config", f"outdir={tmp_path}", "--cores", 2, "--quiet"]
    done = subprocess.run(
        [*snakemake, *map(str, args)], capture_output=True, text=True, env=env, cwd=root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kang = (tmp_path / "kang.csv").read_text().splitlines()
    assert kang[0].startswith("cell,predicted_labels,conf_score")
    assert len(kang) > 1000
