"""Multi-omics fine-tuning, export and serving: namespaces, modality ids, parity, old bundles."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from scgpt_export.cli import cli as train_cli
from scgpt_runtime import Model
from scgpt_runtime.bundle import load_bundle
from scgpt_runtime.cli import cli as run_cli
from scgpt_runtime.tokens import MODALITY, TokenConfig
from scgpt_train.checkpoint import load_run, save_run
from scgpt_train.inference import embed
from scgpt_train.multiomic import MultiomicConfig, finetune_multiomic
from scgpt_train.multiomic_data import load_multiomic_cells

mudata = pytest.importorskip("mudata")
ad = pytest.importorskip("anndata")


def _cite(tmp_path, n: int = 40, missing: int = 3):
    """A CITE-seq-like .h5mu: rna over genes g0..g29 (one named CD4), adt over 4 proteins
    (one named CD4 too); the last `missing` cells have no adt."""
    rng = np.random.default_rng(1)
    genes = [f"g{i}" for i in range(29)] + ["CD4"]
    cells = [f"c{i}" for i in range(n)]
    rna = ad.AnnData(rng.poisson(1.5, (n, 30)).astype(np.float32))
    rna.obs_names, rna.var_names = cells, genes
    adt = ad.AnnData(rng.poisson(30, (n - missing, 4)).astype(np.float32) + 1)
    adt.obs_names, adt.var_names = cells[: n - missing], ["CD4", "CD8", "CD14", "CD19"]
    path = tmp_path / "cite.h5mu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mudata.MuData({"rna": rna, "adt": adt}).write_h5mu(path)
    return path, genes


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, random_run):
    tmp = tmp_path_factory.mktemp("multiomic")
    path, genes = _cite(tmp)
    model, vocab = random_run(tmp / "pre", [*genes, "unseen"], TokenConfig(max_seq_len=16))
    return tmp, path, model, vocab


def _finetune(tmp, path, out: str, **options):
    cfg = MultiomicConfig(
        data=[str(path)],
        modalities=("rna", "adt"),
        out=str(tmp / out),
        from_run=str(tmp / "pre"),
        epochs=1,
        batch_size=8,
        device="cpu",
        **options,
    )
    return finetune_multiomic(cfg), load_run(tmp / out)


def test_finetune_grows_the_vocabulary_and_keeps_the_gene_rows(pretrained):
    tmp, path, start_model, start_vocab = pretrained
    summary, (model, info) = _finetune(tmp, path, "ft", lr=1e-12)  # ~no change by training
    n = len(start_vocab)
    assert info.vocab.names[:n] == start_vocab.names  # genes keep their ids
    assert info.vocab.names[n:] == ["CD4", "CD8", "CD14", "CD19"]
    assert info.vocab.namespaces[n:] == ["protein"] * 4
    assert info.vocab.lookup(["CD4"]).tolist() == [start_vocab["CD4"]]  # the gene CD4
    assert info.vocab.lookup(["CD4"], "protein").tolist() == [n]
    start = start_model.encoder.embedding.weight.detach()
    grown = model.encoder.embedding.weight.detach()
    assert torch.allclose(grown[:n], start, atol=1e-6)  # lr 1e-12: one step moves ~1e-12
    assert [m.to_dict() for m in info.modalities] == [
        {"name": "rna", "namespace": "gene", "max_tokens": 15},
        {"name": "adt", "namespace": "protein", "max_tokens": 4},
    ]
    assert info.tokens.max_seq_len == 20
    assert info.model.n_mod == 2
    assert summary["cells_measured"] == {"rna": 40, "adt": 37}
    assert "encoder.embedding.weight" not in summary["load_report"].split("dropped")[1][:3]


def test_run_with_namespaces_round_trips(pretrained, tmp_path):
    tmp, path, *_ = pretrained
    _, (model, info) = _finetune(tmp, path, "ft-roundtrip")
    save_run(tmp_path / "copy", model, info)
    _again, info2 = load_run(tmp_path / "copy")
    assert info2.vocab.names == info.vocab.names
    assert info2.vocab.namespaces == info.vocab.namespaces
    assert info2.modalities == info.modalities
    assert json.loads((tmp_path / "copy" / "vocab.json").read_text())["<cls>"] >= 0


@pytest.mark.parametrize("mod_input", [False, True])
def test_bundle_with_proteins_serves_as_pytorch(pretrained, mod_input):
    tmp, path, *_ = pretrained
    out = f"ft-{mod_input}"
    _, (model, info) = _finetune(tmp, path, out, mod_input=mod_input)
    result = CliRunner().invoke(
        train_cli, ["export", str(tmp / out), "--out", str(tmp / f"{out}.bundle"), "--json"]
    )
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp / f"{out}.bundle")
    assert bundle.config["format_version"] == 3
    assert [m.name for m in bundle.modalities] == ["rna", "adt"]
    assert (MODALITY in [s.name for s in bundle.inputs]) == mod_input
    cells, present = load_multiomic_cells([str(path)], info.vocab, info.tokens, info.modalities)
    expected = embed(model, cells.tokens)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    with Model.load(bundle, device="cpu", precision="fp32") as served:
        got = served.embed(str(path))
    # fp32 ONNX against PyTorch: kernel order differs, 1e-5 covers it (export checks 1e-4)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not present["adt"][-3:].any()  # the cells without adt were embedded from rna alone
    args = ["embed", str(path), "--model", str(tmp / f"{out}.bundle"), "--json"]
    args += ["--out", str(tmp / f"{out}.npy"), "--precision", "fp32"]
    result = CliRunner().invoke(run_cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["missing_modality"] == {"rna": 0, "adt": 3}
    assert summary["gene_match"]["adt"]["n_matched"] == 4
    np.testing.assert_array_equal(np.load(tmp / f"{out}.npy"), got)


def test_multiome_file_reads_and_embeds_end_to_end(shared_data, tmp_path, random_run):
    """The older-layout Multiome file: rna + atac, fine-tuned from scratch, exported, served."""
    path = shared_data / "wave2" / "multiomics" / "muon_pbmc_multiome_1000cells_test_rna_atac.h5mu"
    cfg = MultiomicConfig(
        data=[str(path)],
        modalities=("rna", "atac"),
        out=str(tmp_path / "run"),
        from_scratch=True,
        model={"d_model": 32, "n_head": 2, "d_hid": 32, "n_layer": 1},
        tokens={"max_seq_len": 46},
        epochs=1,
        batch_size=64,
        device="cpu",
    )
    summary = finetune_multiomic(cfg)
    assert summary["n_cells"] == 1000
    assert [m["namespace"] for m in summary["modalities"]] == ["gene", "peak"]
    result = CliRunner().invoke(
        train_cli, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--json"]
    )
    assert result.exit_code == 0, result.output
    with Model.load(tmp_path / "b", device="cpu", precision="fp32") as served:
        emb = served.embed(str(path))
    assert emb.shape == (1000, 32)
    assert np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert len(np.unique(emb.round(4), axis=0)) > 900  # cells differ, not one collapsed point
