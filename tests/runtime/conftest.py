"""The bundles the runtime tests serve, committed under tests/fixtures/bundles and built by
tools/build_test_bundles.py: a small scGPT with a 7-class head trained on real Kang cells, as
format 2 (`served_bundle`: fp32 and int8 graphs of 64 and 256 tokens sharing their weights) and
as the previous release exported it (`v1_bundle`, format 1), with PyTorch's outputs on the
first N_CELLS cells of a Kang and a Liao file (`reference`). No test here needs PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bundles"
KANG = "labelled/kang2018_pbmc_counts.h5ad"
LIAO = "unlabelled/liao2020_balf_GSM4475052_C149_filtered_feature_bc_matrix.h5"
MAX_LEN, SHORT = 256, 64  # the bundles' two graph lengths: short cells run on the 64 one
N_CELLS = 200  # cells per file the reference holds (fast on two cores)
OUTPUTS = ("cell_emb", "cell_emb_normalized", "class_probs", "n_genes")


@pytest.fixture(scope="session")
def kang(shared_data: Path) -> Path:
    return shared_data / KANG


@pytest.fixture(scope="session")
def liao(shared_data: Path) -> Path:
    return shared_data / LIAO


@pytest.fixture(scope="session")
def served_bundle() -> Path:
    return FIXTURES / "small"


@pytest.fixture(scope="session")
def v1_bundle() -> Path:
    return FIXTURES / "small-v1"


@pytest.fixture(scope="session")
def reference() -> dict[str, dict[str, np.ndarray]]:
    """PyTorch outputs: {"kang"|"liao": {cell_emb, cell_emb_normalized, class_probs, n_genes}}."""
    with np.load(FIXTURES / "reference.npz") as z:
        return {f: {k: z[f"{f}_{k}"] for k in OUTPUTS} for f in ("kang", "liao")}


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
