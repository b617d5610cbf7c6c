"""scgpt-run through click's runner: outputs, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scgpt_runtime.cli import cli

KEYS = [
    "format",
    "matrix",
    "n_cells",
    "n_genes",
    "nnz",
    "total_counts",
    "integer_counts",
    "gene_column",
    "obs_columns",
]


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_h5ad(path, x, **obs):
    adata = ad.AnnData(
        X=sp.csr_matrix(np.asarray(x, dtype=np.float32)),
        obs={k: np.asarray(v) for k, v in obs.items()} or None,
    )
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"G{i}" for i in range(adata.n_vars)]
    adata.write_h5ad(path)
    return path


@pytest.fixture
def counts_file(tmp_path):
    x = np.array([[0, 1, 3], [2, 0, 0], [0, 0, 0], [5, 1, 1]])
    return write_h5ad(tmp_path / "small.h5ad", x, cell_type=["T", "B", "T", "NK"])


def test_inspect_json_has_exactly_the_documented_keys(counts_file):
    result = run("inspect", counts_file, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report) == KEYS
    assert report == {
        "format": "h5ad",
        "matrix": "X",
        "n_cells": 4,
        "n_genes": 3,
        "nnz": 6,
        "total_counts": 13,
        "integer_counts": True,
        "gene_column": "index",
        "obs_columns": ["cell_type"],
    }


def test_inspect_plain_text(counts_file):
    result = run("inspect", counts_file)
    assert result.exit_code == 0
    assert "n_cells:        4" in result.stdout
    assert "obs_columns:    cell_type" in result.stdout


def test_inspect_warns_when_values_are_not_counts(tmp_path):
    path = write_h5ad(tmp_path / "log.h5ad", [[0.5, 1.2], [0.0, 2.0]])
    result = run("inspect", path, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["integer_counts"] is False
    assert "does not look like raw integer counts" in result.stderr


def _bad_files(tmp_path, good):
    files = {}
    files["missing"] = (tmp_path / "nope.h5ad", "no such file")
    (tmp_path / "adir.h5ad").mkdir()
    files["directory"] = (tmp_path / "adir.h5ad", "is a directory")
    (tmp_path / "text.h5ad").write_text("cell,gene\n1,2\n")
    files["not hdf5"] = (tmp_path / "text.h5ad", "is not an HDF5 file")
    data = good.read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    files["truncated"] = (tmp_path / "cut.h5ad", "damaged or truncated")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["weights"] = np.zeros(3)
    files["neither"] = (tmp_path / "other.h5", "neither an h5ad")
    files["nan"] = (write_h5ad(tmp_path / "nan.h5ad", [[np.nan, 1.0]]), "NaN")
    files["negative"] = (write_h5ad(tmp_path / "neg.h5ad", [[-1.0, 1.0]]), "negative values")
    files["no cells"] = (write_h5ad(tmp_path / "empty.h5ad", np.zeros((0, 3))), "holds no cells")
    return files


BAD = ["missing", "directory", "not hdf5", "truncated", "neither", "nan", "negative", "no cells"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_3_no_traceback(tmp_path, counts_file, case):
    path, message = _bad_files(tmp_path, counts_file)[case]
    result = run("inspect", path)
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {path}:")
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_unknown_gene_column_is_an_input_error(counts_file):
    result = run("inspect", counts_file, "--gene-column", "symbols")
    assert result.exit_code == 3
    assert "no gene column 'symbols'" in result.stderr


def test_bad_flag_is_a_usage_error(counts_file):
    assert run("inspect", counts_file, "--no-such-flag").exit_code == 2


def test_help_has_examples_and_exit_codes():
    assert "Examples:" in run("inspect", "--help").stdout
    assert "Exit codes:" in run("--help").stdout


@pytest.mark.parametrize(
    "name",
    [
        "labelled/kang2018_pbmc_counts.h5ad",
        "unlabelled/liao2020_balf_GSM4475052_C149_filtered_feature_bc_matrix.h5",
    ],
)
def test_inspect_real_files_agrees_with_a_direct_read(shared_data, name):
    path = shared_data / name
    report = json.loads(run("inspect", path, "--json").stdout)
    if path.suffix == ".h5ad":
        x = ad.read_h5ad(path).X
        assert report["format"] == "h5ad"
    else:
        with h5py.File(path) as f:
            m = f["matrix"]
            genes = m["features/feature_type"][:] == b"Gene Expression"
            x = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), m["shape"][:])
            x = x.T.tocsc()[:, genes]
        assert report["format"] == "10x-v3"
    assert (report["n_cells"], report["n_genes"]) == x.shape
    assert report["nnz"] == sp.csr_matrix(x).count_nonzero()
    assert report["total_counts"] == int(x.sum())
    assert report["integer_counts"] is True


def test_device_cuda_without_a_gpu_is_one_line_only(kang_small, served_bundle, tmp_path):
    """onnxruntime's own native log lines (written by C++, past Python's stderr) stay hidden
    without -v: where CUDA cannot start, stderr is the one error line and exit 2."""
    cmd = [sys.executable, "-c", "from scgpt_runtime.cli import main; main()", "embed"]
    cmd += [str(kang_small), "--model", str(served_bundle), "--out", str(tmp_path / "e.npy")]
    p = subprocess.run([*cmd, "--device", "cuda"], capture_output=True, text=True)
    if p.returncode == 0:  # a machine where the CUDA provider runs
        assert "graphs on CUDAExecutionProvider" in p.stderr
    else:
        assert p.returncode == 2
        assert p.stderr.splitlines() == [p.stderr.strip()]
        assert p.stderr.startswith("Error: --device cuda: ")
