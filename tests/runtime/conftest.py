"""A served model for the runtime tests: a small scGPT with a cell-type head, trained a few
steps on real Kang PBMC cells, exported (fp32 and int8, graphs of 64 and 256 tokens) with the
exporter, plus the PyTorch reference computed on the same tokenized cells.

Building it needs torch (the test environment has it; the runtime never imports it): tests
that use these fixtures skip where torch is absent.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from scgpt_runtime.bundle import load_bundle
from scgpt_runtime.genes import match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.tokens import TokenConfig, tokenize

KANG = "labelled/kang2018_pbmc_counts.h5ad"
LIAO = "unlabelled/liao2020_balf_GSM4475052_C149_filtered_feature_bc_matrix.h5"
MAX_LEN, SHORT = 256, 64  # the bundle's two graph lengths: short cells run on the 64 one
N_TRAIN = 512  # Kang cells the head is trained on
N_CELLS = 200  # cells per file the runtime tests compare on (fast on two cores)


@pytest.fixture(scope="session")
def kang(shared_data: Path) -> Path:
    return shared_data / KANG


@pytest.fixture(scope="session")
def liao(shared_data: Path) -> Path:
    return shared_data / LIAO


@pytest.fixture(scope="session")
def served_run(kang: Path, liao: Path, tmp_path_factory) -> Path:
    """The "small" preset with a 7-class head, 80 Adam steps on Kang cells (their 63 most
    expressed genes: fast, and the model has no positions to mind the length); vocabulary of
    both files, so the 10x file's genes match too."""
    torch = pytest.importorskip("torch")
    from scgpt_train.checkpoint import RunInfo, save_run
    from scgpt_train.data import build_vocab
    from scgpt_train.model import ModelConfig, ScGPT

    vocab = build_vocab([kang, liao])
    tokens = TokenConfig(max_seq_len=MAX_LEN)
    with open_counts(kang) as counts:
        match = match_genes(counts.var, vocab)
        block = next(counts.iter_blocks(N_TRAIN, 0, N_TRAIN))
        labels = counts.read_obs("cell_type")[:N_TRAIN]
    train = replace(tokens, max_seq_len=SHORT)
    cells = tokenize(block, match.column_ids, train, vocab.cls_id, vocab.pad_id)
    names = sorted(set(labels))
    y = torch.tensor([names.index(x) for x in labels])
    cfg = ModelConfig.from_name(
        "small",
        vocab_size=len(vocab),
        pad_id=vocab.pad_id,
        n_cls=len(names),
        max_seq_len=MAX_LEN,
        dropout=0.0,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: a second thread only waits, for long on a busy machine
    try:
        torch.manual_seed(0)
        model = ScGPT(cfg).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        inputs = [torch.from_numpy(a) for a in (cells.gene_ids, cells.values, cells.padding_mask)]
        g = torch.Generator().manual_seed(0)
        for _ in range(80):
            rows = torch.randint(0, N_TRAIN, (32,), generator=g)
            logits = model(*(a[rows] for a in inputs))["cls_output"]
            loss = torch.nn.functional.cross_entropy(logits, y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    data = [{"file": str(kang), "bytes": kang.stat().st_size}]
    info = RunInfo(cfg, tokens, vocab, labels=names, provenance={"data": data, "command": "test"})
    return save_run(tmp_path_factory.mktemp("runs") / "small", model.eval(), info)


@pytest.fixture(scope="session")
def served_bundle(served_run: Path, tmp_path_factory) -> Path:
    """The run exported by scgpt_export: fp32 and int8 graphs of 64 and 256 tokens."""
    pytest.importorskip("torch")
    from scgpt_export import export_run

    out = tmp_path_factory.mktemp("bundles") / "small"
    export_run(
        served_run,
        out,
        max_lens=[SHORT, MAX_LEN],
        precisions=("fp32", "int8"),
        validation_cells=32,
    )
    return out


@pytest.fixture(scope="session")
def reference(served_run: Path, served_bundle: Path, kang: Path, liao: Path):
    """PyTorch outputs on the first N_CELLS cells of each file: {"kang"|"liao": {cell_emb,
    cell_emb_normalized, class_probs, n_genes}}, computed on the same tokens (padding trimmed)."""
    torch = pytest.importorskip("torch")
    from scgpt_train.checkpoint import load_run

    model, _ = load_run(served_run)
    bundle = load_bundle(served_bundle)
    out = {}
    for name, path in (("kang", kang), ("liao", liao)):
        with open_counts(path) as counts:
            match = match_genes(counts.var, bundle.vocab, min_fraction=0.1)
            block = next(counts.iter_blocks(N_CELLS, 0, N_CELLS))
        cells = tokenize(
            block, match.column_ids, bundle.tokens, bundle.vocab.cls_id, bundle.vocab.pad_id
        )
        width = 1 + int(cells.n_genes.max())
        with torch.no_grad():
            ids, values, pad = (
                torch.from_numpy(a[:, :width])
                for a in (cells.gene_ids, cells.values, cells.padding_mask)
            )
            emb = model.cell_embedding(ids, values, pad)
            out[name] = {
                "cell_emb": emb.numpy(),
                "cell_emb_normalized": torch.nn.functional.normalize(emb, dim=-1).numpy(),
                "class_probs": torch.softmax(model.cls_decoder(emb), dim=-1).numpy(),
                "n_genes": cells.n_genes,
            }
    return out


@pytest.fixture(scope="session")
def kang_small(kang, tmp_path_factory) -> Path:
    """The first N_CELLS Kang cells as an .h5ad written by anndata (obs columns kept)."""
    path = tmp_path_factory.mktemp("data") / "kang.h5ad"
    ad.read_h5ad(kang)[:N_CELLS].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def liao_small(liao, tmp_path_factory) -> Path:
    """The first N_CELLS cells of a Liao 10x file, as a 10x v3 .h5 (all features kept)."""
    path = tmp_path_factory.mktemp("data") / "liao.h5"
    with h5py.File(liao) as src, h5py.File(path, "w") as dst:
        m = src["matrix"]
        end = int(m["indptr"][N_CELLS])
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        g = dst.create_group("matrix")
        src.copy(m["features"], g, "features")
        g["barcodes"] = m["barcodes"][:N_CELLS]
        g["data"], g["indices"] = m["data"][:end], m["indices"][:end]
        g["indptr"] = m["indptr"][: N_CELLS + 1]
        g["shape"] = np.array([m["shape"][0], N_CELLS], dtype=m["shape"].dtype)
    return path
