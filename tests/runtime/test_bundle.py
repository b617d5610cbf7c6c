"""Model bundle layout: writing, reading, checksums, versions, the variant chooser, the
identity and evaluation records, format 1 bundles (no torch).

The graphs here are stand-in bytes: the layout code never parses ONNX, it moves, hashes and
lists files. tests/export/ covers real graphs; test_model.py serves a format 1 bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from scgpt_runtime.bundle import (
    EMBED,
    Variant,
    load_bundle,
    record_evaluation,
    write_bundle,
)
from scgpt_runtime.errors import BundleError, OutputError
from scgpt_runtime.tokens import TokenConfig
from scgpt_runtime.vocab import Vocab

GENES = ["CD3E", "HLA-A", "MT-CO1", "Ångström-1", "基因", "SYMBOL_ENSG00000123"]
LABELS = ["B cell", "CD4 T", "Mono ✓", ""]
MODEL = {"vocab_size": len(GENES) + 3, "pad_id": len(GENES), "d_model": 8, "n_cls": 4}
TOKENS = TokenConfig(max_seq_len=32, cls_value=-2.0)


def graphs(folder: Path, spec=(("fp32", 32), ("fp32", 8), ("int8", 32))) -> list[Variant]:
    """One stand-in graph file per precision, serving the lengths of `spec`."""
    folder.mkdir(exist_ok=True)
    out = []
    for precision, length in spec:
        path = folder / f"{precision}.bin"
        path.write_bytes(f"graph {precision}".encode())
        errors = {"cell_emb_max_abs": 1e-6, "min_cosine": 0.9999, "length": length}
        out.append(Variant(precision, length, path, errors, {"min_cosine": 0.99}))
    return out


def make(tmp_path: Path, name: str = "bundle", **kw) -> Path:
    args = {
        "model": MODEL,
        "tokens": TOKENS,
        "vocab": Vocab.from_genes(GENES),
        "variants": graphs(tmp_path / f"src-{name}"),
        "labels": LABELS,
        "gene_panel": ["HLA-A", "基因"],
        "parameters": 1234,
        "validation": {"cells": "real"},
        "provenance": {"training": {"command": "test"}},
        **kw,
    }
    return write_bundle(tmp_path / name, **args)


def edit_config(bundle: Path, change) -> None:
    config = json.loads((bundle / "config.json").read_text())
    change(config)
    (bundle / "config.json").write_text(json.dumps(config))


def test_round_trip_of_strings_config_and_graphs(tmp_path):
    out = make(tmp_path)
    b = load_bundle(out)
    assert b.vocab.names == [*GENES, "<pad>", "<cls>", "<eoc>"]
    assert b.labels == LABELS
    assert b.gene_panel == ["HLA-A", "基因"]
    assert b.tokens == TOKENS
    assert b.config["model"] == MODEL
    assert b.config["validation"] == {"cells": "real"}
    assert [(v.precision, v.max_seq_len) for v in b.variants] == [
        ("fp32", 32),
        ("fp32", 8),
        ("int8", 32),
    ]
    assert b.variants[0].path == b.variants[1].path, "one fp32 graph serves both lengths"
    assert b.variants[0].path.read_bytes() == b"graph fp32"
    assert b.variants[1].errors == {"cell_emb_max_abs": 1e-6, "min_cosine": 0.9999, "length": 8}
    assert b.parameters == 1234
    assert [s.to_dict() for s in b.inputs] == [
        {"name": "gene_ids", "dtype": "int64", "pad": 6, "cls": 7},
        {"name": "values", "dtype": "float32", "pad": -2.0, "cls": -2.0},
        {"name": "padding_mask", "dtype": "bool", "pad": True, "cls": False},
    ]
    assert b.graphs[EMBED].outputs == {"cell_emb": 8, "cell_emb_normalized": 8, "class_probs": 4}
    assert not list((tmp_path / "src-bundle").iterdir()), "graphs are moved into the bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "src-bundle"], "no temp left"


def test_golden_layout(tmp_path):
    """File names, config header and the exact string tensors of vocab.safetensors."""
    out = make(tmp_path, labels=None, model={**MODEL, "n_cls": 0}, gene_panel=None)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "embed-fp32.onnx",
        "embed-int8.onnx",
        "vocab.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert list(config) == [
        "format",
        "format_version",
        "model",
        "parameters",
        "preprocessing",
        "vocab",
        "inputs",
        "graphs",
        "validation",
        "provenance",
        "files",
    ]
    assert (config["format"], config["format_version"]) == ("scgpt-bundle", 2)
    assert config["preprocessing"]["pad_id"] == 6
    assert config["preprocessing"]["cls_id"] == 7
    assert config["vocab"]["namespaces"] == ["gene"]
    assert config["inputs"][0] == {
        "name": "gene_ids",
        "dtype": "int64",
        "pad": 6,
        "cls": 7,
        "shape": ["batch", "max_seq_len"],
    }
    embed = config["graphs"]["embed"]
    assert [o["name"] for o in embed["outputs"]] == ["cell_emb", "cell_emb_normalized"]
    assert embed["outputs"][0] == {"name": "cell_emb", "dtype": "float32", "shape": ["batch", 8]}
    assert [(v["precision"], v["max_seq_len"], v["file"]) for v in embed["variants"]] == [
        ("fp32", 32, "embed-fp32.onnx"),
        ("fp32", 8, "embed-fp32.onnx"),
        ("int8", 32, "embed-int8.onnx"),
    ]
    assert sorted(config["files"]) == sorted(p.name for p in out.iterdir() if p.suffix != ".json")
    tensors = load_file(out / "vocab.safetensors")
    assert sorted(tensors) == ["vocab.bytes", "vocab.offsets"]
    assert tensors["vocab.bytes"].dtype == np.uint8
    assert tensors["vocab.offsets"].tolist() == [0, 4, 9, 15, 27, 33, 52, 57, 62, 67]
    assert tensors["vocab.bytes"][:9].tobytes() == b"CD3EHLA-A"


def test_tampered_file_fails_the_checksum(tmp_path):
    out = make(tmp_path)
    graph = out / "embed-int8.onnx"
    graph.write_bytes(b"graph int9")  # same size, other bytes
    with pytest.raises(BundleError, match=r"embed-int8\.onnx: checksum mismatch") as e:
        load_bundle(out)
    assert e.value.exit_code == 5
    load_bundle(out, verify=False)  # the size still matches: only verify=True reads the bytes


def test_tampered_vocabulary_fails_the_checksum(tmp_path):
    out = make(tmp_path)
    data = bytearray((out / "vocab.safetensors").read_bytes())
    data[-3] ^= 1
    (out / "vocab.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vocab\.safetensors: checksum mismatch"):
        load_bundle(out)


def test_unknown_format_version_is_refused(tmp_path):
    out = make(tmp_path)
    edit_config(out, lambda c: c.update(format_version=4))
    with pytest.raises(BundleError) as e:
        load_bundle(out)
    assert (
        str(e.value)
        == f"{out}: bundle format version 4 is not supported (this runtime reads 1, 2, 3)"
    )


def test_missing_files_are_named(tmp_path):
    out = make(tmp_path)
    (out / "embed-fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"embed-fp32.onnx: is missing \(listed in config"):
        load_bundle(out)
    (out / "config.json").unlink()
    with pytest.raises(BundleError, match=r"not a model bundle \(config.json is missing\)"):
        load_bundle(out)
    with pytest.raises(BundleError, match="no such directory"):
        load_bundle(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("format"), "not an scGPT model bundle"),
        (lambda c: c.pop("graphs"), "invalid bundle config"),
        (lambda c: c["files"].update({"../x": c["files"]["vocab.safetensors"]}), "plain file"),
        (lambda c: c["graphs"]["embed"]["variants"].pop(0), "no fp32 graph of the full length 32"),
        (lambda c: c["model"].update(n_cls=3), "labels but model n_cls differs"),
        (lambda c: c["preprocessing"]["tokens"].update(n_bins=1), "n_bins"),
        (
            lambda c: c["graphs"]["embed"]["variants"][1].update(precision="fp8"),
            "unknown precision",
        ),
        (lambda c: c["inputs"][1].update(pad=0.0), "disagrees with the preprocessing"),
        (lambda c: c["inputs"].append({**c["inputs"][0], "name": "mod_ids"}), "does not make"),
    ],
)
def test_invalid_configs_are_bundle_errors(tmp_path, change, message):
    out = make(tmp_path)
    edit_config(out, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(out)


def test_run_directory_is_not_a_bundle(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 1, "model": {}}))
    with pytest.raises(BundleError, match=r"not an scGPT model bundle .*scgpt-train export"):
        load_bundle(tmp_path)


def test_variant_chooser(tmp_path):
    b = load_bundle(make(tmp_path))
    assert b.precisions == ["fp32", "int8"]
    assert b.variant("fp32", 5).max_seq_len == 8
    assert b.variant("fp32", 8).max_seq_len == 8
    assert b.variant("fp32", 9).max_seq_len == 32
    assert b.variant("fp32").max_seq_len == 32
    assert b.variant("int8", 2).max_seq_len == 32
    with pytest.raises(ValueError, match="no fp32 graph takes 33 tokens"):
        b.variant("fp32", 33)
    with pytest.raises(BundleError, match=r"no fp16 graph \(available: fp32, int8\)"):
        b.variant("fp16")


def test_existing_target_needs_overwrite_and_must_be_a_bundle(tmp_path):
    out = make(tmp_path)
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        make(tmp_path)
    make(tmp_path, labels=None, model={**MODEL, "n_cls": 0}, overwrite=True)
    assert load_bundle(out).labels is None
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "bundle", "no temp or old dir left"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not a model bundle; refusing"):
        make(tmp_path, name="other", overwrite=True)
    assert (other / "notes.txt").exists()


def test_recording_an_evaluation_keeps_the_bundle_identity(tmp_path):
    """Held-out metrics go to evaluation.json; config.json, and so the sha256 results are
    stamped with, never change; an entry on the same data and precision replaces the old."""
    out = make(tmp_path)
    before, config = load_bundle(out).sha256, (out / "config.json").read_bytes()
    entry = {"data": ["kang.h5ad"], "where": [], "label_key": "cell_type", "precision": "fp32"}
    record_evaluation(out, {**entry, "macro_f1": 0.5})
    record_evaluation(out, {**entry, "precision": "int8", "macro_f1": 0.4})
    record_evaluation(out, {**entry, "macro_f1": 0.6})
    b = load_bundle(out)
    assert b.sha256 == before
    assert (out / "config.json").read_bytes() == config
    assert [(e["precision"], e["macro_f1"]) for e in b.evaluation] == [("int8", 0.4), ("fp32", 0.6)]


def test_namespaces_keep_a_gene_and_a_protein_of_one_name_apart(tmp_path):
    vocab = Vocab(
        ["CD4", "CD8A", "<pad>", "<cls>", "CD4"], ["gene", "gene", "gene", "gene", "protein"]
    )
    out = make(
        tmp_path, vocab=vocab, model={**MODEL, "vocab_size": 5, "pad_id": 2}, gene_panel=None
    )
    b = load_bundle(out)
    assert b.vocab.namespaces == vocab.namespaces
    assert b.vocab["CD4"] == 0
    assert b.vocab.lookup(["CD4", "CD8A"], namespace="protein").tolist() == [4, -1]
    assert b.config["vocab"]["namespaces"] == ["gene", "protein"]


def test_inconsistent_inputs_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="4 classes but labels"):
        make(tmp_path, labels=["a"])
    with pytest.raises(ValueError, match="no int8 graph of the full length"):
        make(tmp_path, variants=graphs(tmp_path / "g", (("fp32", 32), ("int8", 8))))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        make(tmp_path, gene_panel=["NOPE"])
    apart = graphs(tmp_path / "i")
    other = tmp_path / "i" / "another.bin"
    other.write_bytes(b"x")
    apart[1] = Variant("fp32", 8, other)
    with pytest.raises(ValueError, match="fp32 variants must share one graph file"):
        make(tmp_path, variants=apart)
    missing = graphs(tmp_path / "h")
    missing[-1].path.unlink()
    with pytest.raises(OutputError, match=r"bundle: cannot write .*No such file.*int8.bin"):
        make(tmp_path, variants=missing)
    assert not (tmp_path / "bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_layout_module_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import scgpt_runtime.bundle; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr
