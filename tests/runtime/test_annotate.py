"""scgpt-run annotate, embed, merge, info and inspect --model, end to end on real files through
click's runner: outputs against PyTorch, shard and merge identity, h5ad outputs read back with
anndata, interrupted in-place writes, and the bad-input corpus (exit codes, one-line errors)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from itertools import pairwise
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from scgpt_runtime import Model
from scgpt_runtime.cli import cli

N_CELLS = 200  # cells in the `reference` fixture (conftest.py): the subsets below hold them
FP32 = ("--precision", "fp32", "--device", "cpu")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def read_table(path: Path, delimiter: str = ",") -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Results against PyTorch


def test_annotate_csv_equals_pytorch(served_bundle, reference, kang_small, tmp_path):
    ref = reference["kang"]
    out = tmp_path / "labels.csv"
    result = ok("annotate", kang_small, "--model", served_bundle, "--out", out, "--top-k", 3, *FP32)
    assert result.stdout.startswith(f"wrote {out}: 200 cells")
    rows = read_table(out)
    labels = Model.load(served_bundle, device="cpu").labels
    top = ["top1_label", "top1_prob", "top2_label", "top2_prob", "top3_label", "top3_prob"]
    assert list(rows[0]) == ["cell", "predicted_labels", "conf_score", "n_genes", *top]
    assert [r["cell"] for r in rows] == list(ad.read_h5ad(kang_small).obs_names)
    assert [r["predicted_labels"] for r in rows] == [
        labels[i] for i in ref["class_probs"].argmax(1)
    ]
    conf = np.array([float(r["conf_score"]) for r in rows])
    np.testing.assert_allclose(conf, ref["class_probs"].max(1), rtol=1e-5, atol=1e-5)
    assert [int(r["n_genes"]) for r in rows] == ref["n_genes"].tolist()
    assert all(r["top1_label"] == r["predicted_labels"] for r in rows)
    assert all(
        float(r["top1_prob"]) >= float(r["top2_prob"]) >= float(r["top3_prob"]) for r in rows
    )


def test_annotate_10x_to_a_new_h5ad(served_bundle, reference, liao_small, tmp_path):
    ref = reference["liao"]
    out = tmp_path / "liao_scgpt.h5ad"
    ok("annotate", liao_small, "--model", served_bundle, "--out", out, "--prefix", "x_", *FP32)
    adata = ad.read_h5ad(out)
    with h5py.File(liao_small) as f:
        barcodes = f["matrix/barcodes"].asstr()[:]
    assert list(adata.obs_names) == list(barcodes)
    assert list(adata.obs.columns) == ["x_predicted_labels", "x_conf_score", "x_n_genes"]
    assert adata.obs["x_predicted_labels"].dtype == "category"
    np.testing.assert_allclose(adata.obsm["X_scGPT"], ref["cell_emb_normalized"], atol=1e-5)
    np.testing.assert_allclose(adata.obs["x_conf_score"], ref["class_probs"].max(1), atol=1e-5)
    uns = adata.uns["scGPT"]
    config = Path(served_bundle) / "config.json"
    assert uns["bundle_sha256"] == sha256(config)
    assert (uns["command"], uns["precision"], uns["input_format"]) == ("annotate", "fp32", "10x-v3")
    assert {"onnxruntime", "numpy", "scgpt-deploy"} <= set(uns["versions"])


def test_h5ad_output_is_a_copy_with_original_columns_untouched(served_bundle, kang_small, tmp_path):
    before = sha256(kang_small)
    out = tmp_path / "kang_scgpt.h5ad"
    ok("annotate", kang_small, "--model", served_bundle, "--out", out, "--top-k", 2)
    assert sha256(kang_small) == before
    src, got = ad.read_h5ad(kang_small), ad.read_h5ad(out)
    new = [
        "scgpt_predicted_labels",
        "scgpt_conf_score",
        "scgpt_n_genes",
        "scgpt_top1_label",
        "scgpt_top1_prob",
        "scgpt_top2_label",
        "scgpt_top2_prob",
    ]
    assert list(got.obs.columns) == list(src.obs.columns) + new
    for column in src.obs.columns:
        assert got.obs[column].equals(src.obs[column])
    assert (got.X != src.X).nnz == 0
    assert got.var.equals(src.var)
    assert got.obsm["X_scGPT"].shape == (N_CELLS, 64)


def test_inplace_adds_columns_and_keeps_the_rest(served_bundle, kang_small, tmp_path):
    path = tmp_path / "kang.h5ad"
    shutil.copy(kang_small, path)
    ok("annotate", path, "--model", served_bundle, "--inplace")
    first = ad.read_h5ad(path)
    src = ad.read_h5ad(kang_small)
    for column in src.obs.columns:
        assert first.obs[column].equals(src.obs[column])
    assert "scgpt_predicted_labels" in first.obs
    ok("annotate", path, "--model", served_bundle, "--inplace")  # again: replaced, not doubled
    again = ad.read_h5ad(path)
    assert list(again.obs.columns) == list(first.obs.columns)
    assert again.obs.equals(first.obs)
    assert [p.name for p in tmp_path.iterdir()] == ["kang.h5ad"]


@pytest.mark.parametrize("stage", ["while running", "while writing"])
def test_inplace_interrupted_leaves_the_file_whole(
    served_bundle, kang_small, tmp_path, monkeypatch, stage
):
    """Ctrl-C halfway (after the first of four blocks, or after the first column written into
    the temporary copy): FILE is byte for byte what it was, and readable."""
    import scgpt_runtime.engine as engine
    import scgpt_runtime.io.write as write

    path = tmp_path / "kang.h5ad"
    shutil.copy(kang_small, path)
    before = sha256(path)
    calls = []

    def interrupt(real):
        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return wrapped

    if stage == "while running":
        monkeypatch.setattr(engine, "tokenize", interrupt(engine.tokenize))
    else:
        monkeypatch.setattr(write, "_set_obs_column", interrupt(write._set_obs_column))
    result = run("annotate", path, "--model", served_bundle, "--inplace", "--block-size", 50)
    assert result.exit_code != 0
    assert len(calls) == 2
    assert sha256(path) == before
    assert ad.read_h5ad(path).n_obs == N_CELLS
    assert [p.name for p in tmp_path.iterdir()] == ["kang.h5ad"]  # no temporary file left behind


def test_embed_formats_agree(served_bundle, reference, liao_small, tmp_path):
    ok("embed", liao_small, "--model", served_bundle, "--out", tmp_path / "e.npy", *FP32)
    ok("embed", liao_small, "--model", served_bundle, "--out", tmp_path / "e.csv", *FP32)
    ok("embed", liao_small, "--model", served_bundle, "--out", tmp_path / "e.tsv", *FP32)
    ok("embed", liao_small, "--model", served_bundle, "--out", tmp_path / "e.h5ad", *FP32)
    ok("embed", liao_small, "--model", served_bundle, "--out", tmp_path / "r.npy", "--raw", *FP32)
    emb = np.load(tmp_path / "e.npy")
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, reference["liao"]["cell_emb_normalized"], atol=1e-5)
    np.testing.assert_allclose(
        np.load(tmp_path / "r.npy"), reference["liao"]["cell_emb"], atol=1e-4
    )
    for name, delimiter in (("e.csv", ","), ("e.tsv", "\t")):
        rows = read_table(tmp_path / name, delimiter)
        table = np.array([[float(r[str(j)]) for j in range(64)] for r in rows], dtype=np.float32)
        np.testing.assert_array_equal(table, emb)  # 9 significant digits: exact float32
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_scGPT"], emb)


def test_json_summary(served_bundle, kang_small, tmp_path):
    out = tmp_path / "e.npy"
    result = ok("embed", kang_small, "--model", served_bundle, "--out", out, "--json")
    summary = json.loads(result.stdout)
    assert summary["command"] == "embed"
    assert summary["output"] == str(out)
    assert summary["n_cells"] == N_CELLS
    assert summary["precision"] == "int8"
    assert summary["execution_provider"] == "CPUExecutionProvider"
    assert sum(summary["graphs"].values()) == N_CELLS
    assert summary["gene_match"]["n_matched"] == 2000  # the fixture's vocabulary
    result = ok(
        "annotate", kang_small, "--model", served_bundle, "--out", tmp_path / "a.csv", "--json"
    )
    assert sum(json.loads(result.stdout)["label_counts"].values()) == N_CELLS


def test_annotate_without_out_prints_csv(served_bundle, kang_small):
    result = ok("annotate", kang_small, "--model", served_bundle)
    lines = result.stdout.splitlines()
    assert lines[0] == "cell,predicted_labels,conf_score,n_genes"
    assert len(lines) == N_CELLS + 1


# Shards and merge


def test_shards_merged_equal_the_unsharded_run(served_bundle, kang_small, tmp_path):
    """Three shards, each with its own batch and block size and thread count: the merged CSV
    and .npy are byte for byte the unsharded ones, the .h5ad the same content."""
    settings = [
        ("--batch-size", 1, "--block-size", 7, "--threads", 1),
        ("--batch-size", 16, "--block-size", 2048, "--threads", 2),
        ("--batch-size", 5, "--block-size", 30, "--threads", 3),
    ]
    for command, suffixes in (("annotate", (".csv", ".h5ad")), ("embed", (".npy",))):
        extra = ("--top-k", 2) if command == "annotate" else ()
        parts = []
        for i, options in enumerate(settings, start=1):
            part = tmp_path / f"{command}.{i}.part"
            ok(
                command,
                kang_small,
                "--model",
                served_bundle,
                "--shard",
                f"{i}/3",
                "--out",
                part,
                *options,
                *extra,
            )
            parts.append(part)
        for suffix in suffixes:
            whole, merged = tmp_path / f"{command}{suffix}", tmp_path / f"{command}.m{suffix}"
            ok(command, kang_small, "--model", served_bundle, "--out", whole, *extra)
            ok("merge", parts[2], parts[0], parts[1], "--out", merged)
            if suffix == ".h5ad":
                a, b = ad.read_h5ad(whole), ad.read_h5ad(merged)
                assert a.obs.equals(b.obs)
                np.testing.assert_array_equal(a.obsm["X_scGPT"], b.obsm["X_scGPT"])
                assert json.dumps(a.uns["scGPT"], default=str) == json.dumps(
                    b.uns["scGPT"], default=str
                )
            else:
                assert merged.read_bytes() == whole.read_bytes()


def test_shard_ranges_cover_the_file_once():
    from scgpt_runtime.pipeline import Shard

    for n in (0, 1, 7, 200, 2879):
        for count in (1, 2, 3, 8):
            ranges = [Shard(i, count).range(n) for i in range(1, count + 1)]
            assert ranges[0][0] == 0
            assert ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in pairwise(ranges))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


@pytest.fixture(scope="module")
def parts(served_bundle, kang_small, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("parts")
    out = []
    for i in (1, 2):
        part = folder / f"k.{i}.part"
        ok("annotate", kang_small, "--model", served_bundle, "--shard", f"{i}/2", "--out", part)
        out.append(part)
    other = folder / "other.1.part"
    ok(
        "annotate",
        kang_small,
        "--model",
        served_bundle,
        "--shard",
        "1/2",
        "--out",
        other,
        "--top-k",
        1,
    )
    return [*out, other]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "shards 2/2 are missing"),
        ("repeated", "shard 1/2 is also"),
        ("other run", "is not from the same run"),
        ("not a part", "not a part file"),
    ],
)
def test_merge_refuses_parts_that_do_not_make_a_run(parts, kang_small, tmp_path, case, message):
    one, two, other = parts
    given = {
        "missing": [one],
        "repeated": [one, one, two],
        "other run": [other, two],
        "not a part": [one, two, kang_small],
    }[case]
    result = run("merge", *given, "--out", tmp_path / "m.csv")
    assert result.exit_code == 3, result.output
    assert message in result.stderr
    assert not (tmp_path / "m.csv").exists()


# Bad input: exit codes and one-line messages


def _damage(bundle: Path, tmp_path: Path, case: str) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    if case == "damaged bundle":
        graph = copy / "embed-int8.onnx"
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    elif case == "version mismatch":
        config = json.loads((copy / "config.json").read_text())
        config["format_version"] = 4
        (copy / "config.json").write_text(json.dumps(config))
    return copy


def _unwritable(tmp_path: Path) -> Path:
    """A folder no file can be created in: a read-only one, or for root (whom permissions do
    not stop) /sys, where even root cannot create files."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, Path("/sys")):
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        Path(name).unlink()
    pytest.skip("no folder here refuses new files (root without /sys)")


BAD = {
    # case: (exit code, message)
    "missing file": (3, "no such file"),
    "not hdf5": (3, "is not an HDF5 file"),
    "no matched gene": (4, "match the model vocabulary"),
    "missing bundle": (5, "no such directory"),
    "damaged bundle": (5, "checksum mismatch"),
    "version mismatch": (
        5,
        "bundle format version 4 is not supported (this runtime reads 1, 2, 3)",
    ),
    "output exists": (6, "exists; pass --overwrite"),
    "unwritable folder": (6, "cannot write in"),
    "missing folder": (6, "does not exist"),
    "inplace on 10x": (6, "--inplace needs an .h5ad file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_its_exit_code(
    served_bundle, kang_small, liao_small, tmp_path, case
):
    code, message = BAD[case]
    file, bundle, out = kang_small, served_bundle, tmp_path / "out.csv"
    extra = []
    if case == "missing file":
        file = tmp_path / "nope.h5ad"
    elif case == "not hdf5":
        file = tmp_path / "cells.h5ad"
        file.write_text("cell,CD3E\nc1,4\n")
    elif case == "no matched gene":
        file = tmp_path / "x.h5ad"
        adata = ad.AnnData(np.ones((3, 4), dtype=np.float32))
        adata.var_names = [f"not-a-gene-{i}" for i in range(4)]
        adata.write_h5ad(file)
    elif case == "missing bundle":
        bundle = tmp_path / "no-bundle"
    elif case in ("damaged bundle", "version mismatch"):
        bundle = _damage(served_bundle, tmp_path, case)
    elif case == "output exists":
        out.write_text("keep me")
    elif case == "unwritable folder":
        out = _unwritable(tmp_path) / "out.csv"
    elif case == "missing folder":
        out = tmp_path / "no" / "out.csv"
    elif case == "inplace on 10x":
        file, out, extra = liao_small, None, ["--inplace"]
    args = ["annotate", file, "--model", bundle, *extra] + ([] if out is None else ["--out", out])
    result = run(*args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[-1].startswith("Error: ")
    assert message in lines[-1]
    assert "Traceback" not in result.output
    if case == "output exists":
        assert out.read_text() == "keep me"
        ok("annotate", file, "--model", bundle, "--out", out, "--overwrite")
        assert out.read_text().startswith("cell,")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["annotate", "{file}", "--model", "{bundle}", "--shard", "3/2"], "need 1 <= I <= N"),
        (["annotate", "{file}", "--model", "{bundle}", "--shard", "x"], "shard must look like I/N"),
        (
            ["annotate", "{file}", "--model", "{bundle}", "--shard", "1/2", "--out", "a.csv"],
            "ending in .part",
        ),
        (["annotate", "{file}", "--model", "{bundle}", "--out", "a.npy"], "not .npy"),
        (["annotate", "{file}", "--model", "{bundle}", "--json"], "pass --out"),
        (
            ["annotate", "{file}", "--model", "{bundle}", "--inplace", "--out", "a.csv"],
            "drop --out",
        ),
        (["embed", "{file}", "--model", "{bundle}"], "embed needs --out"),
        (["annotate", "{file}", "--model", "{bundle}", "--device", "tpu"], "'tpu' is not one of"),
    ],
)
def test_usage_errors_exit_2(served_bundle, kang_small, args, message):
    result = run(*(a.format(file=kang_small, bundle=served_bundle) for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_device_cuda_without_gpu_is_an_error(served_bundle, kang_small, tmp_path):
    result = run(
        "annotate",
        kang_small,
        "--model",
        served_bundle,
        "--device",
        "cuda",
        "--out",
        tmp_path / "a.csv",
    )
    if result.exit_code == 0:
        pytest.skip("this machine has a working CUDA provider")
    assert result.exit_code == 2, result.output
    assert "Error: --device cuda: onnxruntime could not start the CUDAExecutionProvider" in (
        result.stderr
    )


# info and inspect --model


def test_info(served_bundle, v1_bundle):
    report = json.loads(ok("info", served_bundle, "--json").stdout)
    config = json.loads((served_bundle / "config.json").read_text())
    assert report["format_version"] == 2
    assert report["parameters"] == config["parameters"] > 0  # counted at export (tests/export)
    assert report["bundle_sha256"] == sha256(served_bundle / "config.json")
    assert report["vocab_size"] == config["model"]["vocab_size"]
    assert report["labels"] == Model.load(served_bundle, device="cpu").labels
    assert [(v["precision"], v["max_seq_len"]) for v in report["variants"]] == [
        ("fp32", 64),
        ("fp32", 256),
        ("int8", 64),
        ("int8", 256),
    ]
    assert report["variants"][0]["errors"]["cell_emb_max_abs"] < 1e-4
    assert report["validation"]["cells"] == "real"
    assert "export" in report["provenance"]
    text = ok("info", served_bundle).stdout
    assert f"{report['parameters']:,} parameters" in text
    assert "int8   256" in text
    old = json.loads(ok("info", v1_bundle, "--json").stdout)
    assert (old["format_version"], old["parameters"]) == (1, None)  # format 1 did not record it
    assert [v["file"] for v in old["variants"]][:2] == ["model-fp32-64.onnx", "model-fp32-256.onnx"]
    assert "parameters not recorded" in ok("info", v1_bundle).stdout
    missing = run("info", served_bundle.parent / "nope")
    assert missing.exit_code == 5


def test_evaluate_bundle_records_what_annotate_predicts(served_bundle, kang_small, tmp_path):
    pytest.importorskip("torch")  # scgpt-train evaluate is a command of the training package
    from scgpt_train.cli import cli as train_cli
    from scgpt_train.metrics import annotation_metrics

    bundle = tmp_path / "bundle"
    shutil.copytree(served_bundle, bundle)
    graphs = {p.name: sha256(p) for p in bundle.glob("*.onnx")}
    identity = sha256(bundle / "config.json")
    args = [
        "evaluate",
        "--bundle",
        str(bundle),
        "--data",
        str(kang_small),
        "--label-key",
        "cell_type",
        "--precision",
        "int8",
        "--json",
    ]
    for _ in range(2):  # recording twice replaces the entry
        result = CliRunner().invoke(train_cli, [*args, "--record"])
        assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)["classifier"]
    ok(
        "annotate",
        kang_small,
        "--model",
        bundle,
        "--precision",
        "int8",
        "--out",
        tmp_path / "labels.csv",
    )
    predicted = [r["predicted_labels"] for r in read_table(tmp_path / "labels.csv")]
    truth = ad.read_h5ad(kang_small).obs["cell_type"].astype(str).to_numpy()
    expected = annotation_metrics(truth, np.array(predicted))
    assert reported["macro_f1"] == expected["macro_f1"]
    assert sha256(bundle / "config.json") == identity  # the record never changes the identity
    (entry,) = json.loads((bundle / "evaluation.json").read_text())
    assert entry["precision"] == "int8"
    assert (entry["macro_f1"], entry["accuracy"]) == (expected["macro_f1"], expected["accuracy"])
    assert entry["data"] == [kang_small.name]
    assert {p.name: sha256(p) for p in bundle.glob("*.onnx")} == graphs
    assert f"evaluated:      macro-F1 {entry['macro_f1']}" in ok("info", bundle).stdout
    misuse = CliRunner().invoke(
        train_cli,
        [
            "evaluate",
            "--from",
            str(bundle),
            "--data",
            str(kang_small),
            "--label-key",
            "cell_type",
            "--record",
        ],
    )
    assert misuse.exit_code == 2
    assert "--record stores metrics in a bundle" in misuse.stderr


def test_a_held_out_build_records_into_its_sibling(served_bundle, kang_small, tmp_path):
    """--record-into writes the held-out build's figures into the other bundle only, naming
    the build they were measured on; a sibling with another head is refused."""
    pytest.importorskip("torch")
    from scgpt_runtime.bundle import load_bundle
    from scgpt_runtime.errors import InputError
    from scgpt_train.cli import cli as train_cli
    from scgpt_train.evaluate import _held_out_build

    held_out, shipped = tmp_path / "held-out", tmp_path / "shipped"
    shutil.copytree(served_bundle, held_out)
    shutil.copytree(served_bundle, shipped)
    args = ["evaluate", "--bundle", str(held_out), "--data", str(kang_small)]
    args += ["--label-key", "cell_type", "--json", "--record-into", str(shipped)]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    assert not (held_out / "evaluation.json").exists()
    (entry,) = json.loads((shipped / "evaluation.json").read_text())
    measured = load_bundle(held_out)
    assert entry["measured_on"] == {
        "bundle_sha256": measured.sha256,
        "training_command": measured.config["provenance"]["training"]["command"],
    }
    assert entry["macro_f1"] == json.loads(result.stdout)["classifier"]["macro_f1"]
    assert "held-out build " + measured.sha256[:12] in ok("info", shipped).stdout
    CliRunner().invoke(train_cli, [*args[:-2], "--record"])  # the bundle's own record
    records = json.loads((held_out / "evaluation.json").read_text())
    assert ["measured_on" in e for e in records] == [False]  # kept apart from the sibling's
    other = dataclasses.replace(measured, labels=["B", "T"])
    with pytest.raises(InputError, match="differ from"):
        _held_out_build(other, str(shipped))
    both = CliRunner().invoke(train_cli, [*args, "--record"])
    assert both.exit_code == 2
    assert "either --record or --record-into" in both.stderr


def test_inspect_with_model_reports_the_gene_match(served_bundle, liao_small, tmp_path):
    report = json.loads(ok("inspect", liao_small, "--model", served_bundle, "--json").stdout)
    match = report["gene_match"]
    assert match["gene_column"] == "name"
    assert match["n_genes"] == report["n_genes"]
    assert 0.99 < match["fraction_matched"] <= 1
    assert "gene_match:" in ok("inspect", liao_small, "--model", served_bundle).stdout
    file = tmp_path / "x.h5ad"
    adata = ad.AnnData(np.ones((2, 3), dtype=np.float32))
    adata.var_names = ["a", "b", "CD3E"]
    adata.write_h5ad(file)
    result = run("inspect", file, "--model", served_bundle)
    assert result.exit_code == 4
    assert "1 of 3 possible genes (33%)" in result.stderr
    assert result.stderr.strip().endswith("; --min-gene-fraction accepts fewer")  # 33% is near
    assert ok("inspect", file, "--model", served_bundle, "--min-gene-fraction", 0.3).stdout


# The runtime never needs torch


NO_TORCH = """
import sys
for name in ("torch", "scipy", "pandas", "anndata"):
    sys.modules[name] = None  # importing any of them now fails
import numpy as np
from click.testing import CliRunner
from scgpt_runtime import Model
from scgpt_runtime.cli import cli
file, bundle, out = sys.argv[1:4]
for args in (["annotate", file, "--model", bundle, "--out", out + ".h5ad", "--top-k", "2"],
             ["embed", file, "--model", bundle, "--out", out + ".npy"],
             ["info", bundle], ["inspect", file, "--model", bundle]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
emb = Model.load(bundle).embed(np.eye(3, dtype=np.float32) * 5, genes=["CD3E", "LYZ", "MS4A1"],
                               min_gene_fraction=0)
assert emb.shape[0] == 3
print("ok")
"""


def test_annotate_and_embed_run_without_torch(served_bundle, kang_small, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(kang_small), str(served_bundle), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
