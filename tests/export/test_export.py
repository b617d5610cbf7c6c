"""Export of a small trained run: the bundle, served by onnxruntime alone, against PyTorch on
real cells; tolerances per precision; failures that write nothing; the CLI command."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from scgpt_export import TOLERANCE, ToleranceError, export_run
from scgpt_export.cli import cli
from scgpt_runtime import Model
from scgpt_runtime.bundle import load_bundle
from scgpt_runtime.genes import match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.tokens import TokenConfig, tokenize
from scgpt_runtime.vocab import SPECIALS
from scgpt_train.checkpoint import RunInfo, load_run, save_run
from scgpt_train.data import build_vocab
from scgpt_train.gene_embeddings import encoder_embeddings
from scgpt_train.model import ModelConfig, ScGPT

KANG = "labelled/kang2018_pbmc_counts.h5ad"
MAX_LEN = 64
N_TRAIN = 256  # cells 0..N_TRAIN-1 train the head; export validates on the first of them


def kang_cells(path: Path, vocab, tokens: TokenConfig, start: int, stop: int):
    """Tokens and cell-type names of cells [start, stop) of the Kang PBMC file."""
    with open_counts(path) as counts:
        match = match_genes(counts.var, vocab)
        block = next(counts.iter_blocks(block_size=stop - start, start=start, stop=stop))
        labels = counts.read_obs("cell_type")[start:stop]
    return tokenize(block, match.column_ids, tokens, vocab.cls_id, vocab.pad_id), labels


@pytest.fixture(scope="session")
def kang(shared_data: Path) -> Path:
    return shared_data / KANG


@pytest.fixture(scope="session")
def small_run(kang: Path, tmp_path_factory) -> Path:
    """The "small" preset with a cell-type head, a few Adam steps on real Kang cells."""
    vocab = build_vocab([kang])
    tokens = TokenConfig(max_seq_len=MAX_LEN, selection="top")
    block, labels = kang_cells(kang, vocab, tokens, 0, N_TRAIN)
    names = sorted(set(labels))
    y = torch.tensor([names.index(x) for x in labels])
    cfg = ModelConfig.from_name(
        "small", vocab_size=len(vocab), pad_id=vocab.pad_id, n_cls=len(names), max_seq_len=MAX_LEN
    )
    torch.manual_seed(0)
    model = ScGPT(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    inputs = [torch.from_numpy(a) for a in (block.gene_ids, block.values, block.padding_mask)]
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        rows = torch.randint(0, N_TRAIN, (32,), generator=g)
        logits = model(*(a[rows] for a in inputs))["cls_output"]
        loss = F.cross_entropy(logits, y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    data = [{"file": str(kang), "bytes": kang.stat().st_size}]
    info = RunInfo(cfg, tokens, vocab, labels=names, provenance={"data": data, "command": "test"})
    return save_run(tmp_path_factory.mktemp("runs") / "small", model.eval(), info)


def assert_close_cosine(a: np.ndarray, b: np.ndarray, at_least: float) -> None:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= at_least, cos.min()


SHORT = 32


@pytest.fixture(scope="module")
def bundle(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "small"
    summary = export_run(
        small_run, out, max_lens=[MAX_LEN, SHORT], precisions=("fp32", "fp16", "int8")
    )
    return out, summary


def session(path, optimized=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def pytorch(model, block) -> dict[str, np.ndarray]:
    cell_emb = model.cell_embedding(*(torch.from_numpy(a) for a in block.inputs.values()))
    return {
        "cell_emb": cell_emb.numpy(),
        "cell_emb_normalized": F.normalize(cell_emb, dim=-1).numpy(),
        "class_probs": torch.softmax(model.cls_decoder(cell_emb), dim=-1).numpy(),
    }


def test_bundle_serves_unseen_real_cells_like_pytorch(bundle, small_run, kang):
    """Cells the export never saw, tokenized with the bundle's own config, as a server would."""
    b = load_bundle(bundle[0])
    model, _ = load_run(small_run)
    assert b.precisions == ["fp32", "fp16", "int8"]
    for length in (MAX_LEN, SHORT):
        block, _ = kang_cells(
            kang, b.vocab, replace(b.tokens, max_seq_len=length), N_TRAIN, N_TRAIN + 100
        )
        expected = pytorch(model, block)
        for precision in b.precisions:
            v = b.variant(precision, length)
            assert v.max_seq_len == length
            names = ["cell_emb", "cell_emb_normalized", "class_probs"]
            got = dict(zip(names, session(v.path).run(names, block.inputs), strict=True))
            top1 = (got["class_probs"].argmax(1) == expected["class_probs"].argmax(1)).mean()
            if precision == "fp32":
                for name in names:
                    np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-4)
            elif precision == "fp16":
                assert_close_cosine(got["cell_emb"], expected["cell_emb"], 0.999)
            else:
                assert_close_cosine(got["cell_emb"], expected["cell_emb"], 0.99)
                assert top1 >= 0.99
            norms = np.linalg.norm(got["cell_emb_normalized"], axis=1)
            np.testing.assert_allclose(norms, 1.0, atol=1e-3)
            np.testing.assert_allclose(got["class_probs"].sum(1), 1.0, atol=1e-3)


def test_one_graph_per_precision_serves_every_length(bundle, kang):
    """A cell padded to 32 or to 64 tokens gets the same embedding from the one graph of its
    precision, whose length axis is symbolic: pads carry no weight."""
    b = load_bundle(bundle[0])
    assert {v.path for v in b.variants if v.precision == "fp32"} == {b.variant("fp32").path}
    short, _ = kang_cells(kang, b.vocab, replace(b.tokens, max_seq_len=SHORT), 300, 340)
    pads = {s.name: s.pad for s in b.inputs}
    padded = {
        k: np.pad(a, ((0, 0), (0, MAX_LEN - SHORT)), constant_values=pads[k])
        for k, a in short.inputs.items()
    }
    s = session(b.variant("fp32").path)
    a = s.run(["cell_emb"], short.inputs)[0]
    c = s.run(["cell_emb"], padded)[0]
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)


def test_parameters_are_counted_at_export(bundle, small_run):
    """The served model: everything but the training-only decoders and the gen flag."""
    model, _ = load_run(small_run)
    training_only = ("decoder", "mvc_decoder", "flag_encoder")
    served = sum(
        p.numel() for n, p in model.named_parameters() if n.split(".")[0] not in training_only
    )
    assert load_bundle(bundle[0]).parameters == served


def test_cls_only_cell_and_batch_sizes(bundle):
    """<cls> alone (every other key a pad) is finite, alone and in a batch; fp32 and fp16 give
    a cell the same embedding whatever its batch. Dynamic int8 does not: it quantizes the
    activations with one scale per batch (docs/bundle-format.md), here within cosine 0.999."""
    b = load_bundle(bundle[0])
    n = 5
    ids = np.full((n, MAX_LEN), b.vocab.pad_id, dtype=np.int64)
    values = np.full((n, MAX_LEN), b.tokens.pad_value, dtype=np.float32)
    pad = np.ones((n, MAX_LEN), dtype=bool)
    ids[:, 0], values[:, 0], pad[:, 0] = b.vocab.cls_id, b.tokens.cls_value, False
    ids[1:, 1:10], values[1:, 1:10], pad[1:, 1:10] = np.arange(9) + 5, 7.0, False
    values[4, 1:10] = 50.0
    for v in b.variants:
        s = session(v.path)
        x = {
            "gene_ids": ids[:, : v.max_seq_len],
            "values": values[:, : v.max_seq_len],
            "padding_mask": pad[:, : v.max_seq_len],
        }
        together = s.run(None, x)
        alone = s.run(None, {k: a[:1] for k, a in x.items()})
        assert all(np.isfinite(o).all() for o in [*together, *alone])
        if v.precision == "int8":
            assert_close_cosine(alone[0], together[0][:1], 0.999)
        else:
            np.testing.assert_allclose(alone[0], together[0][:1], rtol=0, atol=1e-5)


def test_gene_embeddings_are_the_models(bundle, small_run):
    """Every vocabulary row as the gene encoder gives it, float32 stored as it is, served
    torch-free by name."""
    out, summary = bundle
    model, info = load_run(small_run)
    expected = encoder_embeddings(model, np.arange(len(info.vocab)))
    assert summary["gene_embeddings"] == [len(info.vocab), 64]
    with Model.load(out, device="cpu") as served:
        names, x = served.gene_embeddings()
        assert names == [n for n in info.vocab.names if n not in SPECIALS]
        assert np.array_equal(x, expected[[info.vocab[n] for n in names]])
        names, x = served.gene_embeddings(["LYZ", "CD3E"])
    assert names == ["LYZ", "CD3E"]
    assert np.array_equal(x, expected[[info.vocab["LYZ"], info.vocab["CD3E"]]])
    assert np.array_equal(x[1], encoder_embeddings(model, [info.vocab["CD3E"]])[0])


def test_graph_interface_and_attention_fusion(bundle, tmp_path):
    b = load_bundle(bundle[0])
    graph = onnx.load(b.variant("fp32").path)
    dims = [
        (
            i.name,
            i.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim],
        )
        for i in [*graph.graph.input, *graph.graph.output]
    ]
    F32, I64, B = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
    length = dims[0][2][1]
    assert isinstance(length, str), "the length axis is symbolic"
    assert dims == [
        ("gene_ids", I64, ["batch", length]),
        ("values", F32, ["batch", length]),
        ("padding_mask", B, ["batch", length]),
        ("cell_emb", F32, ["batch", 64]),
        ("cell_emb_normalized", F32, ["batch", 64]),
        ("class_probs", F32, ["batch", 7]),
    ]
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    assert not any(
        p.key.startswith("pkg.torch") for n in graph.graph.node for p in n.metadata_props
    )
    session(b.variant("fp32").path, optimized=tmp_path / "optimized.onnx")
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops["MultiHeadAttention"] == 2  # one per layer, kept by onnxruntime's optimizer
    assert ops["Softmax"] == 1  # only the class probabilities: attention is fused
    for precision in ("fp16", "int8"):
        graph = onnx.load(b.variant(precision).path)
        assert [i.type.tensor_type.elem_type for i in graph.graph.input] == [I64, F32, B]
        assert {o.type.tensor_type.elem_type for o in graph.graph.output} == {F32}


def test_measured_errors_are_in_the_bundle(bundle):
    out, summary = bundle
    config = load_bundle(out).config
    assert config["validation"]["cells"] == "real"
    assert config["validation"]["file"].endswith("kang2018_pbmc_counts.h5ad")
    assert config["validation"]["n_cells"] == 64
    assert config["validation"]["full_length_cell"] == {"32": "real", "64": "real"}
    variants = config["graphs"]["embed"]["variants"]
    assert len(variants) == 6
    assert {v["file"] for v in variants} == {
        "embed-fp32.onnx",
        "embed-fp16.onnx",
        "embed-int8.onnx",
    }
    for record in variants:
        errors, tolerance = record["errors"], record["tolerance"]
        assert tolerance == TOLERANCE[record["precision"]]
        assert set(errors) == {
            "cell_emb_max_abs",
            "cell_emb_normalized_max_abs",
            "class_probs_max_abs",
            "min_cosine",
            "top1_agreement",
        }
        for key, limit in tolerance.items():
            assert (
                errors[key] >= limit
                if key in ("min_cosine", "top1_agreement")
                else (errors[key] <= limit)
            )
    fp32 = variants[0]
    assert fp32["precision"] == "fp32"
    assert fp32["errors"]["cell_emb_max_abs"] < 1e-5
    assert [v["errors"] for v in summary["variants"]] == [v["errors"] for v in variants]
    assert config["provenance"]["training"]["command"] == "test"
    assert config["provenance"]["export"]["opset"] == 18


def test_spec_example_matches_what_export_writes(bundle):
    """docs/bundle-format.md's example config.json has the keys of a real one."""
    text = (Path(__file__).parents[2] / "docs" / "bundle-format.md").read_text()
    example = json.loads(text.split("```json\n")[1].split("```")[0])
    config = load_bundle(bundle[0]).config
    assert list(example) == list(config)
    for key in ("model", "preprocessing", "vocab", "validation"):
        assert list(example[key]) == list(config[key]), key
    assert list(example["preprocessing"]["tokens"]) == list(config["preprocessing"]["tokens"])
    assert list(example["provenance"]["export"]) == list(config["provenance"]["export"])
    assert [list(i) for i in example["inputs"]] == [list(i) for i in config["inputs"]]
    assert [i["name"] for i in example["inputs"]] == [i["name"] for i in config["inputs"]]
    ex, real = example["graphs"]["embed"], config["graphs"]["embed"]
    assert ex["outputs"] == real["outputs"]
    assert {tuple(v) for v in ex["variants"]} == {tuple(v) for v in real["variants"]}
    assert {tuple(v["errors"]) for v in ex["variants"]} == {
        tuple(v["errors"]) for v in real["variants"]
    }


def test_a_missed_tolerance_fails_the_export_and_writes_nothing(small_run, tmp_path, monkeypatch):
    monkeypatch.setitem(TOLERANCE["fp32"], "min_cosine", 1.5)
    message = r"the fp32 graph at 16 tokens misses its tolerance .*min_cosine 1 \(limit 1.5\)"
    with pytest.raises(ToleranceError, match=message):
        export_run(small_run, tmp_path / "b", max_lens=[16], precisions=("fp32",))
    assert list(tmp_path.iterdir()) == []


def test_a_precision_that_misses_its_tolerance_is_left_out(
    small_run, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(TOLERANCE["int8"], "min_cosine", 1.5)
    summary = export_run(small_run, tmp_path / "b", max_lens=[16, 32], validation_cells=8)
    assert load_bundle(tmp_path / "b").precisions == ["fp32", "fp16"]
    assert list(summary["left_out"]) == ["int8"]
    assert "int8 is left out of the bundle" in caplog.text


def test_the_default_export_serves_a_ladder_chosen_from_the_cells(small_run, kang, tmp_path):
    """A run of 64 tokens whose Kang cells (top genes) mostly fill it: the ladder is what
    ladder.py makes of their token counts, and the three precisions pass."""
    from scgpt_export.ladder import choose_ladder
    from scgpt_export.validate import token_counts

    model, info = load_run(small_run)
    counts = token_counts(kang, info.vocab, info.tokens)
    expected = choose_ladder(counts, MAX_LEN, model.cfg.d_model, model.cfg.d_hid)
    summary = export_run(small_run, tmp_path / "b", validation_cells=8)
    b = load_bundle(tmp_path / "b")
    assert summary["lengths"] == expected == sorted({v.max_seq_len for v in b.variants})
    assert expected[-1] == MAX_LEN
    assert b.precisions == ["fp32", "fp16", "int8"]


def copy_run(small_run, tmp_path, data):
    run = shutil.copytree(small_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["provenance"]["data"] = data
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_the_head_calibration_goes_into_the_bundle(small_run, tmp_path):
    run = shutil.copytree(small_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["calibration"] = {
        "temperature": 1.7,
        "ece_before": 0.1,
        "ece_after": 0.04,
        "n_cells": 20,
        "bins": 15,
    }
    (run / "config.json").write_text(json.dumps(config))
    export_run(run, tmp_path / "b", max_lens=[16], validation_cells=8)
    b = load_bundle(tmp_path / "b")
    assert b.config["calibration"] == config["calibration"]
    assert b.temperature == 1.7


def test_run_without_data_is_validated_on_synthetic_cells(small_run, tmp_path):
    """Synthetic cells, said so in the bundle; here also opset 20 without contrib operators."""
    run = copy_run(small_run, tmp_path, [])
    export_run(
        run, tmp_path / "b", max_lens=[16], validation_cells=8, opset=20, fuse_attention=False
    )
    b = load_bundle(tmp_path / "b")
    assert b.config["validation"]["cells"] == "synthetic"
    assert b.config["validation"]["file"] is None
    graph = onnx.load(b.variant("fp32").path)
    assert [(o.domain, o.version) for o in graph.opset_import] == [("", 20)]
    assert {n.domain for n in graph.graph.node} == {""}


def cli_run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_export_with_validation_data_and_json(small_run, tmp_path, kang):
    run = copy_run(small_run, tmp_path, [{"file": str(tmp_path / "gone.h5ad"), "bytes": 1}])
    out = tmp_path / "b"
    result = cli_run("export", run, "--out", out, "--max-len", 16, "--precision", "int8")
    assert result.exit_code == 3, result.output
    assert "training data files are gone" in result.stderr
    assert "pass --validation-data FILE" in result.stderr
    result = cli_run(
        "export",
        run,
        "--out",
        out,
        "--max-len",
        16,
        "--precision",
        "int8",
        "--validation-data",
        kang,
        "--validation-cells",
        16,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["bundle"] == str(out)
    assert [(v["precision"], v["max_seq_len"]) for v in summary["variants"]] == [("int8", 16)]
    assert load_bundle(out).config["validation"]["n_cells"] == 16
    result = cli_run("export", run, "--out", out, "--validation-data", kang)
    assert result.exit_code == 6
    assert result.stderr.strip() == f"Error: {out}: exists; pass --overwrite to replace it"


def test_cli_help():
    result = cli_run("--help")
    assert "export" in result.stdout
    assert "pretrain" in result.stdout
    result = cli_run("export", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    assert "scgpt-train export runs/pbmc" in result.stdout
