"""The Python API (`Model`) against PyTorch on real cells, and the determinism of the engine:
the same bits whatever the batch size, block size, thread count, range split or graph length."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scgpt_runtime.served as served_module
from scgpt_runtime import Model
from scgpt_runtime.bundle import load_bundle, write_bundle
from scgpt_runtime.errors import BundleError, DeviceError, GeneMatchError, InputError
from scgpt_runtime.genes import match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.results import temperature_scaled
from scgpt_runtime.served import choose_precision
from scgpt_runtime.session import Runner, open_session
from scgpt_runtime.tokens import tokenize

ROOT = Path(__file__).resolve().parents[2]
FILES = ["kang", "liao"]
N_CELLS = 200  # cells per file in the `reference` fixture (conftest.py)
MAX_LEN, SHORT = 256, 64  # the graph lengths of `served_bundle`


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def fp32(served_bundle):
    with Model.load(served_bundle, device="cpu", precision="fp32") as model:
        yield model


@pytest.fixture(scope="module")
def int8(served_bundle):
    with Model.load(served_bundle, device="cpu", precision="int8") as model:
        yield model


def runner_for(bundle, length: int) -> Runner:
    """The fp32 graph serving `length`, in a session of its own."""
    return Runner(bundle.variant("fp32", length).path, "cpu", bundle.inputs)


def path_of(name, kang, liao) -> Path:
    return {"kang": kang, "liao": liao}[name]


@pytest.mark.parametrize("name", FILES)
def test_fp32_equals_pytorch_on_real_cells(fp32, reference, kang, liao, name):
    ref = reference[name]
    path = path_of(name, kang, liao)
    ann = fp32.annotate(path, stop=N_CELLS, min_gene_fraction=0.1)
    raw = fp32.embed(path, stop=N_CELLS, normalize=False, min_gene_fraction=0.1)
    np.testing.assert_allclose(raw, ref["cell_emb"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ann.embedding, ref["cell_emb_normalized"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ann.class_probs, ref["class_probs"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ann.n_genes, ref["n_genes"])
    expected = np.asarray(fp32.labels)[ref["class_probs"].argmax(1)]
    assert (ann.predicted_labels == expected).all()
    np.testing.assert_allclose(ann.conf_score, ref["class_probs"].max(1), atol=1e-5)
    assert len(set(ann.predicted_labels)) > 1  # a trained head, not a constant


@pytest.mark.parametrize("name", FILES)
def test_int8_agrees_with_pytorch(int8, reference, kang, liao, name):
    """int8 moves class probabilities by a few hundredths: it may flip only near-ties (the 10x
    lung cells are far from the PBMC training cells, with many), and agrees on >= 99% of the
    PBMC cells, the tolerance export holds it to."""
    ref = reference[name]
    ann = int8.annotate(path_of(name, kang, liao), stop=N_CELLS, min_gene_fraction=0.1)
    assert cosine(ann.embedding, ref["cell_emb_normalized"]).min() > 0.99
    agree = ann.class_probs.argmax(1) == ref["class_probs"].argmax(1)
    top2 = np.sort(ref["class_probs"], axis=1)[:, -2:]
    assert agree[top2[:, 1] - top2[:, 0] > 0.05].all()
    if name == "kang":
        assert agree.mean() >= 0.99


def test_auto_precision_on_cpu_is_int8_and_says_so(served_bundle, caplog):
    caplog.set_level("INFO", logger="scgpt_runtime")
    model = Model.load(served_bundle, device="auto")
    assert (model.device, model.precision) in {("cpu", "int8"), ("cuda", "fp32")}
    assert model.provider in caplog.text
    bundle = load_bundle(served_bundle)
    assert choose_precision(bundle, "cpu") == "int8"
    assert choose_precision(bundle, "cuda") == "fp32"  # no fp16 graph in this bundle
    with pytest.raises(BundleError, match="has no fp16 graph"):
        choose_precision(bundle, "cpu", "fp16")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("name", FILES)
def test_same_bits_whatever_batch_block_threads_and_range(
    served_bundle, kang, liao, name, precision
):
    """onnxruntime's CPU kernels give each cell the same bits in any batch, and int8 runs one
    cell per call (its activation scale spans the batch), so nothing here may change a bit."""
    path = path_of(name, kang, liao)
    runs = []
    for threads, batch_size, block_size in ((1, 1, 7), (2, 16, 2048), (3, 5, 64)):
        model = Model.load(
            served_bundle, device="cpu", precision=precision, threads=threads, batch_size=batch_size
        )
        ann = model.annotate(path, stop=N_CELLS, block_size=block_size, min_gene_fraction=0.1)
        runs.append((ann.embedding, ann.class_probs))
        model.close()
    for emb, probs in runs[1:]:
        np.testing.assert_array_equal(emb, runs[0][0])
        np.testing.assert_array_equal(probs, runs[0][1])
    model = Model.load(served_bundle, device="cpu", precision=precision)
    parts = [
        model.embed(path, start=a, stop=b, min_gene_fraction=0.1)
        for a, b in ((0, 61), (61, 150), (150, N_CELLS))
    ]
    np.testing.assert_array_equal(np.concatenate(parts), runs[0][0])


def test_short_cells_run_on_the_short_graph_with_the_same_result(fp32, served_bundle, liao):
    bundle = load_bundle(served_bundle)
    with open_counts(liao) as counts:
        match = match_genes(counts.var, bundle.vocab)
        block = next(counts.iter_blocks(N_CELLS, 0, N_CELLS))
    cells = tokenize(
        block, match.column_ids, bundle.tokens, bundle.vocab.cls_id, bundle.vocab.pad_id
    )
    n_tokens = 1 + cells.n_genes
    used = fp32.lengths_for(n_tokens)
    assert used[SHORT] == (n_tokens <= SHORT).sum() > 0
    assert used[MAX_LEN] == (n_tokens > SHORT).sum() > 0
    bucketed = fp32.embed_tokens(cells)
    short = n_tokens <= SHORT
    long_graph = runner_for(bundle, MAX_LEN).run(
        cells.take(np.flatnonzero(short)).inputs, ["cell_emb"]
    )[0]
    # Padding carries zero attention weight: the 64-token graph gives these cells what the
    # 256-token graph gives them, to float rounding (equal bits on this machine).
    np.testing.assert_allclose(bucketed[short], long_graph, rtol=0, atol=1e-6)


def test_embed_tokens_is_the_raw_embedding(fp32, reference, served_bundle, kang):
    bundle = load_bundle(served_bundle)
    with open_counts(kang) as counts:
        match = match_genes(counts.var, bundle.vocab)
        block = next(counts.iter_blocks(20, 0, 20))
    cells = tokenize(
        block, match.column_ids, bundle.tokens, bundle.vocab.cls_id, bundle.vocab.pad_id
    )
    got = fp32.embed_tokens(cells)
    np.testing.assert_allclose(got, reference["kang"]["cell_emb"][:20], rtol=0, atol=1e-4)
    trimmed = fp32.embed_tokens(cells.trim().inputs)  # any width up to max_seq_len, pads cut
    np.testing.assert_array_equal(trimmed, got)
    flipped = {**cells.inputs, "padding_mask": ~cells.padding_mask}
    with pytest.raises(ValueError, match="padding only at its end"):
        fp32.embed_tokens(flipped)
    wide = np.zeros((1, MAX_LEN + 1))
    with pytest.raises(ValueError, match="at most 256"):
        fp32.embed_tokens({"gene_ids": wide, "values": wide, "padding_mask": wide.astype(bool)})
    with pytest.raises(ValueError, match="must hold the inputs gene_ids, values, padding_mask"):
        fp32.embed_tokens({"gene_ids": wide})


def test_in_memory_dense_and_csr_equal_the_file(fp32, kang):
    adata = ad.read_h5ad(kang)[:60]
    x = sp.csr_matrix(adata.X)
    genes = list(adata.var_names)
    from_file = fp32.embed(kang, stop=60)
    dense = fp32.embed(x.toarray(), genes=genes)
    triple = fp32.embed((x.data, x.indices, x.indptr), genes=genes)
    scipy_csr = fp32.embed(x, genes=genes)
    for got in (dense, triple, scipy_csr):
        np.testing.assert_array_equal(got, from_file)
    # Columns in another order: the same cells, the same tokens, the same embeddings.
    order = np.random.default_rng(0).permutation(len(genes))
    shuffled = fp32.embed(x.toarray()[:, order], genes=[genes[i] for i in order])
    np.testing.assert_array_equal(shuffled, from_file)
    ann = fp32.annotate(x, genes=genes, cells=list(adata.obs_names))
    assert list(ann.obs_names) == list(adata.obs_names)
    labels, probs = ann.top_k(3)
    assert labels.shape == probs.shape == (60, 3)
    assert (labels[:, 0] == ann.predicted_labels).all()
    assert (np.diff(probs, axis=1) <= 0).all()


def test_in_memory_input_errors(fp32):
    genes = ["CD3E", "CD19", "LYZ"]
    with pytest.raises(InputError, match="NaN"):
        fp32.embed(np.array([[np.nan, 1, 2]]), genes=genes)
    with pytest.raises(InputError, match="expected \\(cells, 3\\)"):
        fp32.embed(np.ones((2, 4)), genes=genes)
    with pytest.raises(InputError, match="column indices"):
        fp32.embed((np.ones(1), np.array([5]), np.array([0, 1])), genes=genes)
    with pytest.raises(GeneMatchError, match="match the model vocabulary"):
        fp32.embed(np.ones((2, 3)), genes=["x1", "x2", "x3"])
    with pytest.raises(ValueError, match="needs `genes`"):
        fp32.embed(np.ones((2, 3)))


def test_cells_without_a_known_gene_get_no_label(fp32):
    """A cell none of whose genes is in the vocabulary is Unknown with confidence 0 (its model
    input would be <cls> alone, the same for every such cell); a matrix of only such cells is
    a gene match error."""
    genes = ["CD3E", "not-a-gene", "LYZ"]
    x = np.array([[0, 5, 0], [3, 0, 1]], dtype=np.float32)  # cell 0: only an unknown gene
    ann = fp32.annotate(x, genes=genes, min_gene_fraction=0)
    assert ann.n_genes.tolist() == [0, 2]
    assert np.isfinite(ann.embedding).all()
    assert ann.predicted_labels[0] == "Unknown"
    assert ann.conf_score[0] == 0
    assert ann.predicted_labels[1] != "Unknown"
    with pytest.raises(GeneMatchError, match="none of its 2 cells has a non-zero count"):
        fp32.annotate(np.array([[5.0], [1.0]]), genes=["not-a-gene"], min_gene_fraction=0)


def test_gene_panel_restricts_the_genes_used(served_bundle, fp32, kang, tmp_path):
    """A bundle with a gene panel (same graphs) sees only the panel's genes of a file."""
    b = load_bundle(served_bundle)
    copies = []
    for v in b.variants:
        copy = tmp_path / v.path.name
        shutil.copy(v.path, copy)
        copies.append(type(v)(v.precision, v.max_seq_len, copy, v.errors, v.tolerance))
    kang_genes = ad.read_h5ad(kang, backed="r").var_names
    panel = [g for g in kang_genes if g in b.vocab][:500]
    paneled = write_bundle(
        tmp_path / "panel",
        model=b.config["model"],
        tokens=b.tokens,
        vocab=b.vocab,
        variants=copies,
        labels=b.labels,
        gene_panel=panel,
    )
    model = Model.load(paneled, device="cpu", precision="fp32")
    ann = model.annotate(kang, stop=30)
    adata = ad.read_h5ad(kang)[:30]
    x = sp.csr_matrix(adata.X)
    keep = np.isin(adata.var_names, panel)
    assert keep.sum() == 500
    expected = (x[:, keep] > 0).sum(1).A1.clip(max=MAX_LEN - 1)
    np.testing.assert_array_equal(ann.n_genes, expected)
    restricted = fp32.embed(x[:, keep].toarray(), genes=list(adata.var_names[keep]))
    np.testing.assert_array_equal(ann.embedding, restricted)


def test_load_errors(served_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(served_module, "default_bundle", lambda: None)  # a package without it
    with pytest.raises(BundleError, match="no model bundle given and no default model"):
        Model.load()
    with pytest.raises(BundleError, match="no such directory"):
        Model.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="device must be one of"):
        Model.load(served_bundle, device="tpu")


def test_cuda_without_a_usable_gpu_is_an_error(served_bundle):
    """Here onnxruntime-gpu cannot start CUDA: an error, never a silent CPU run."""
    try:
        session = open_session(load_bundle(served_bundle).variant("fp32", SHORT).path, "cuda")
    except DeviceError:
        session = None
    if session is not None:
        pytest.skip("this machine has a working CUDA provider")
    with pytest.raises(DeviceError, match="--device cuda") as e:
        Model.load(served_bundle, device="cuda")
    assert e.value.exit_code == 2


def test_the_readme_python_example_runs(shared_data, monkeypatch, capsys):
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)  # the example reads ../shared/data beside the checkout
    exec(code, {})  # as written: the default model
    out = capsys.readouterr().out
    assert "CPUExecutionProvider" in out
    assert "CD14+Mono" in out  # the default model's labels, printed by the example


def test_io_binding_path_gives_the_session_outputs(served_bundle, kang):
    """The CUDA path binds inputs and outputs to buffers kept per shape; bound on the CPU here
    (no GPU), it must give what session.run gives, call after call."""
    bundle = load_bundle(served_bundle)
    with open_counts(kang) as counts:
        match = match_genes(counts.var, bundle.vocab)
        block = next(counts.iter_blocks(8, 0, 8))
    cells = tokenize(
        block, match.column_ids, bundle.tokens, bundle.vocab.cls_id, bundle.vocab.pad_id
    )
    runner = runner_for(bundle, MAX_LEN)
    runner.bind_device = "cpu"
    names = ["cell_emb", "class_probs"]
    for rows in (slice(0, 4), slice(4, 8), slice(0, 8)):
        feed = {name: a[rows] for name, a in cells.inputs.items()}
        bound = dict(zip(runner.outputs, runner._run_bound(feed), strict=True))
        for name, expected in zip(names, runner.run(feed, names), strict=True):
            np.testing.assert_array_equal(bound[name], expected)
    assert len(runner._buffers) == 2  # one set of buffers per batch shape


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_format_1_bundle_serves_bit_for_bit_as_its_format_2_export(
    served_bundle, v1_bundle, liao, precision
):
    """The previous release's bundle of the same run (one graph per length) loads, and gives
    the bits the format 2 bundle (one graph per precision) gives, on both lengths."""
    got = []
    for bundle in (v1_bundle, served_bundle):
        with Model.load(bundle, device="cpu", precision=precision) as model:
            got.append(model.annotate(liao, stop=N_CELLS, min_gene_fraction=0.1))
    old, new = got
    assert load_bundle(v1_bundle).config["format_version"] == 1
    assert old.graphs == new.graphs
    assert set(new.graphs) == {SHORT, MAX_LEN}
    np.testing.assert_array_equal(old.embedding, new.embedding)
    np.testing.assert_array_equal(old.class_probs, new.class_probs)


def test_a_calibrated_head_is_served_temperature_scaled(served_bundle, kang, tmp_path):
    """The bundle's temperature divides the head's logits; annotate --unknown-below then
    works on the calibrated probabilities."""
    calibrated = tmp_path / "calibrated"
    shutil.copytree(served_bundle, calibrated)
    config = json.loads((calibrated / "config.json").read_text())
    config["calibration"] = {
        "temperature": 2.0,
        "ece_before": 0.2,
        "ece_after": 0.05,
        "n_cells": 50,
        "bins": 15,
    }
    (calibrated / "config.json").write_text(json.dumps(config))
    plain = Model.load(served_bundle, device="cpu", precision="fp32").annotate(kang, stop=50)
    model = Model.load(calibrated, device="cpu", precision="fp32")
    got = model.annotate(kang, stop=50)
    np.testing.assert_allclose(
        got.class_probs, temperature_scaled(plain.class_probs, 2.0), atol=1e-6
    )
    assert (got.predicted_labels == plain.predicted_labels).all()  # the order of classes holds
    cut = float(np.median(got.conf_score))
    unsure = model.annotate(kang, stop=50, unknown_below=cut)
    assert ((unsure.predicted_labels == "Unknown") == (got.conf_score < cut)).all()
    config["calibration"]["temperature"] = -1
    (calibrated / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="positive temperature"):
        load_bundle(calibrated)


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("", None), ("0", None), ("x", None)])
def test_omp_num_threads_sets_the_default_thread_count(served_bundle, monkeypatch, value, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    cpus = len(os.sched_getaffinity(0))
    with Model.load(served_bundle, device="cpu") as model:
        assert model.threads == (expected or cpus)
    with Model.load(served_bundle, device="cpu", threads=1) as model:
        assert model.threads == 1  # --threads wins
