"""A fast deterministic subset of the fuzz corpus (tools/fuzz_inputs.py --cases 80 --seed 0):
every broken file, bundle and reference gives exit 0 or one documented error line, never a
traceback, a hang or a crash, and no input is modified nor any output left half-written."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

from fuzz_corpus import make_seeds, zero_heap_object  # noqa: E402
from fuzz_inputs import fuzz  # noqa: E402

import scgpt_runtime.io.probe  # noqa: E402
from scgpt_runtime.cli import cli  # noqa: E402


def test_the_fuzz_corpus_gives_clean_errors_only(shared_data, tmp_path):
    report = fuzz(tmp_path / "fuzz", seed=0, n_cases=80, minutes=None)
    assert report["failures"] == []
    assert set(report["cases_by_kind"]) == {"h5ad", "10x", "bundle", "reference"}
    assert report["cases"] >= 60  # the rest: mutations that do not apply to their seed
    assert report["ok"] > 0  # some damage only changes values: a result, not an error
    assert report["error"] > report["ok"]


def test_a_file_that_loops_libhdf5_is_an_input_error(shared_data, tmp_path, monkeypatch):
    """The zero-sized global heap object of HDFGroup/hdf5#1707: libhdf5 never returns from
    reading the file's names; the metadata probe stops it and the command exits 3."""
    seed = make_seeds(tmp_path)[0]
    broken = tmp_path / "loops.h5ad"
    broken.write_bytes(zero_heap_object(seed.read_bytes(), np.random.default_rng(0), seed))
    monkeypatch.setattr(scgpt_runtime.io.probe, "DEADLINE", 3.0)  # its metadata reads in 0.2 s
    result = CliRunner().invoke(cli, ["inspect", str(broken)])
    assert result.exit_code == 3
    assert "HDF5 does not return while reading its metadata (stopped after 3 s" in result.stderr


@pytest.mark.parametrize("layout", ["csr", "v3"])
def test_the_generated_seeds_are_read_whole(shared_data, tmp_path, layout):
    """The seeds themselves are good files: damage is what the mutations add."""
    seeds = {p.stem.split("-")[-1]: p for p in make_seeds(tmp_path)[:5]}
    args = ["annotate", str(seeds[layout]), "--out", str(tmp_path / "o.csv")]
    args += ["--model", str(Path(__file__).parents[1] / "fixtures" / "bundles" / "small")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 61


def test_a_10x_file_with_a_damaged_b_tree_is_one_error_line(shared_data, tmp_path):
    """The defect the issue found: h5py's RuntimeError "incorrect B-tree node type" from a
    link check, a traceback with exit 1 before; now exit 3 naming the file."""
    seed = next(p for p in make_seeds(tmp_path) if p.name == "liao-v3.h5")
    data = bytearray(seed.read_bytes())
    data[data.index(b"TREE") + 4] = 7  # the node type: neither 0 (a group's) nor 1 (chunks')
    broken = tmp_path / "broken.h5"
    broken.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["inspect", str(broken), "--json"])
    assert result.exit_code == 3
    assert result.stderr.strip() == (
        f"Error: {broken}: damaged or malformed file: cannot read its layout (Unable to "
        "synchronously check link existence (incorrect B-tree node type))"
    )
