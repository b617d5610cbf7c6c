"""The h5ad writers: what they add must read back through anndata, and nothing else may change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_runtime.errors import OutputError
from scgpt_runtime.io import atomic, open_counts, write
from scgpt_runtime.io.arrays import ArrayCounts
from scgpt_runtime.io.write import add_to_h5ad, write_new_h5ad

# Reading the anndata 0.6-0.7 files warns about their own old elements, as expected.
pytestmark = pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning", "ignore::FutureWarning")

LABELS = ["B", "T", "NK"]


def results(n: int) -> tuple[dict, dict, dict]:
    """obs, obsm and uns as annotate and embed would pass them, with missing labels."""
    labels = np.array([LABELS[i % 3] for i in range(n)], dtype=object)
    labels[1] = None
    if n > 4:
        labels[4] = np.nan
    obs = {
        "predicted_labels": labels,
        "conf_score": np.linspace(0, 1, n, dtype=np.float32),
        "entropy": np.linspace(1, 2, n),  # float64 stays float64
    }
    obsm = {"X_scgpt": np.arange(n * 4, dtype=np.float32).reshape(n, 4)}
    uns = {
        "scgpt": {
            "model": "scgpt-human",
            "n_genes_matched": 1200,
            "min_gene_fraction": 0.5,
            "use_raw": True,
            "labels": ["B", "NK", "T"],
            "params": {"batch_size": 64, "device": "cpu"},
        }
    }
    return obs, obsm, uns


def assert_results(adata: ad.AnnData, n: int) -> None:
    obs, obsm, uns = results(n)
    labels = adata.obs["predicted_labels"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == sorted(
        {v for v in obs["predicted_labels"] if v in LABELS}
    )
    assert not labels.cat.ordered
    expected = pd.Series(obs["predicted_labels"]).where(lambda s: s.notna(), None)
    assert labels.isna().tolist() == expected.isna().tolist()
    assert labels[labels.notna()].astype(str).tolist() == expected.dropna().tolist()
    assert adata.obs["conf_score"].dtype == np.float32
    np.testing.assert_array_equal(adata.obs["conf_score"], obs["conf_score"])
    assert adata.obs["entropy"].dtype == np.float64
    np.testing.assert_array_equal(adata.obs["entropy"], obs["entropy"])
    np.testing.assert_array_equal(adata.obsm["X_scgpt"], obsm["X_scgpt"])
    assert adata.obsm["X_scgpt"].dtype == np.float32
    got = adata.uns["scgpt"]
    assert got["labels"].tolist() == uns["scgpt"]["labels"]
    assert {k: v for k, v in got.items() if k != "labels"} == {
        k: v for k, v in uns["scgpt"].items() if k != "labels"
    }


def assert_untouched(after: ad.AnnData, before: ad.AnnData) -> None:
    """X, var, raw, layers, the original obs columns and existing obsm/uns keys are unchanged."""
    assert after.shape == before.shape
    assert list(after.obs.columns[: before.obs.shape[1]]) == list(before.obs.columns)
    pd.testing.assert_frame_equal(after.obs[before.obs.columns], before.obs)
    pd.testing.assert_frame_equal(after.var, before.var)
    _assert_same_matrix(after.X, before.X)
    for key in before.layers:
        _assert_same_matrix(after.layers[key], before.layers[key])
    for key in before.obsm:
        np.testing.assert_array_equal(np.asarray(after.obsm[key]), np.asarray(before.obsm[key]))
    assert set(before.uns) <= set(after.uns)
    if before.raw is not None:
        _assert_same_matrix(after.raw.X, before.raw.X)
        pd.testing.assert_frame_equal(after.raw.var, before.raw.var)


def _assert_same_matrix(a, b) -> None:
    if b is None:
        assert a is None
        return
    assert type(a) is type(b)
    assert a.dtype == b.dtype
    if sp.issparse(b):
        assert (a != b).nnz == 0
    else:
        np.testing.assert_array_equal(a, b)


def column_order(path: Path) -> list[str]:
    with h5py.File(path) as h5:
        return [str(c) for c in h5["obs"].attrs["column-order"]]


def write_anndata(folder: Path, kind: str) -> Path:
    """A small file written by anndata itself, with obs columns, obsm and uns already there."""
    rng = np.random.default_rng(0)
    x = rng.poisson(1, size=(30, 12)).astype(np.float32)
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[kind]
    adata = ad.AnnData(
        matrix(x),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(["a", "b", "c"] * 10), "n_counts": x.sum(1)},
            index=[f"cell{i}" for i in range(30)],
        ),
        var=pd.DataFrame({"gene_ids": [f"ENSG{i}" for i in range(12)]}, index=list("ABCDEFGHIJKL")),
    )
    adata.obsm["X_pca"] = rng.normal(size=(30, 3))
    adata.uns["note"] = "kept"
    path = folder / f"{kind}.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(params=["csr", "csc", "dense"])
def anndata_file(request, tmp_path: Path) -> Path:
    return write_anndata(tmp_path, request.param)


@pytest.fixture
def csr_file(tmp_path: Path) -> Path:
    return write_anndata(tmp_path, "csr")


def test_add_to_anndata_files(anndata_file: Path, tmp_path: Path):
    before_bytes = anndata_file.read_bytes()
    before = ad.read_h5ad(anndata_file)
    obs, obsm, uns = results(30)
    dst = add_to_h5ad(anndata_file, tmp_path / "out.h5ad", obs=obs, obsm=obsm, uns=uns)
    assert dst == tmp_path / "out.h5ad"
    after = ad.read_h5ad(dst)
    assert_results(after, 30)
    assert_untouched(after, before)
    assert after.uns["note"] == "kept"
    assert column_order(dst) == ["cell_type", "n_counts", *obs]
    assert anndata_file.read_bytes() == before_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([anndata_file.name, "out.h5ad"])


def test_in_place(anndata_file: Path):
    before = ad.read_h5ad(anndata_file)
    obs, obsm, uns = results(30)
    assert add_to_h5ad(anndata_file, obs=obs, obsm=obsm, uns=uns) == anndata_file
    after = ad.read_h5ad(anndata_file)
    assert_results(after, 30)
    assert_untouched(after, before)
    assert [p.name for p in anndata_file.parent.iterdir()] == [anndata_file.name]


def test_replacing_keeps_position(anndata_file: Path):
    add_to_h5ad(anndata_file, obs={"conf_score": np.zeros(30)}, obsm={"X_pca": np.ones((30, 2))})
    labels = np.array(["x"] * 30)
    add_to_h5ad(anndata_file, obs={"cell_type": labels, "conf_score": np.ones(30)}, uns={"note": 2})
    assert column_order(anndata_file) == ["cell_type", "n_counts", "conf_score"]
    after = ad.read_h5ad(anndata_file)
    assert after.obs["cell_type"].tolist() == ["x"] * 30
    assert after.obs["conf_score"].tolist() == [1.0] * 30
    np.testing.assert_array_equal(after.obsm["X_pca"], np.ones((30, 2)))
    assert after.uns["note"] == 2


def test_categorical_codes_widen(csr_file: Path):
    many = np.array([f"type{i}" for i in range(300)] * 2)[:30]
    few = np.array(["a", None] * 15, dtype=object)
    add_to_h5ad(csr_file, obs={"few": few})
    with h5py.File(csr_file) as h5:
        assert h5["obs/few/codes"].dtype == np.int8
        assert h5["obs/few/codes"][:4].tolist() == [0, -1, 0, -1]
        assert h5["obs/few"].attrs["encoding-type"] == "categorical"
        assert h5["obs/few"].attrs["encoding-version"] == "0.2.0"
    codes, categories = write._categorize(np.array([f"t{i:03d}" for i in range(300)]))
    assert codes.dtype == np.int16
    assert len(categories) == 300
    add_to_h5ad(csr_file, obs={"many": many})
    assert ad.read_h5ad(csr_file).obs["many"].astype(str).tolist() == many.tolist()


# Real files, copied: never written in shared/data

REAL = [
    "labelled/kang2018_pbmc_counts.h5ad",  # dataframe 0.2.0, index named "index"
    "labelled/baron_pancreas_human_mouse_350.h5ad",  # nullable integer column
    "formats/h5ad/cellxgene_schema_example_invalid_CL.h5ad",  # raw with its own var
    "formats/h5ad/zellkonverter_example_anndata.h5ad",  # anndata 0.7: __categories, layers
    "formats/h5ad/tiledbsoma_pbmc-small_anndata07.h5ad",  # anndata 0.7, raw
    "unlabelled/scvi_pbmc_10k_protein_v3_200.h5ad",  # dataframe 0.1.0, no categories
    "formats/h5ad/scvelo_pancreas_50obs_layers.h5ad",  # no obsm and no uns groups
    "formats/h5ad/tiledbsoma_x-none.h5ad",  # no X
]


@pytest.mark.parametrize("name", REAL, ids=[n.split("/")[-1] for n in REAL])
def test_real_files(shared_data: Path, tmp_path: Path, name: str):
    src = tmp_path / Path(name).name
    shutil.copyfile(shared_data / name, src)
    before = ad.read_h5ad(src)
    obs, obsm, uns = results(before.n_obs)
    dst = add_to_h5ad(src, tmp_path / "out.h5ad", obs=obs, obsm=obsm, uns=uns)
    after = ad.read_h5ad(dst)
    assert_results(after, before.n_obs)
    assert_untouched(after, before)
    assert column_order(dst) == [*column_order(src), *obs]
    # Once more in place over the result: replaced, not duplicated.
    add_to_h5ad(dst, obs={"predicted_labels": np.array(["z"] * before.n_obs)})
    again = ad.read_h5ad(dst)
    assert list(again.obs.columns) == list(after.obs.columns)
    assert set(again.obs["predicted_labels"]) == {"z"}


def test_legacy_06_file_is_refused(shared_data: Path, tmp_path: Path):
    src = tmp_path / "legacy.h5ad"
    shutil.copyfile(shared_data / "formats/h5ad/kang2018_scgen_valid_legacy06.h5ad", src)
    before = src.read_bytes()
    with pytest.raises(
        OutputError, match=r"legacy anndata 0\.6 file .* new \.h5ad or \.csv output"
    ):
        add_to_h5ad(src, obs={"x": np.zeros(1975)})
    assert src.read_bytes() == before


# Failures leave the original intact


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(("module", "step"), [(write, "_write_entries"), (atomic, "_fsync")])
def test_interrupted_write_keeps_original(csr_file: Path, monkeypatch, module, step: str):
    before_bytes = csr_file.read_bytes()
    monkeypatch.setattr(module, step, _interrupt)
    obs, obsm, uns = results(30)
    with pytest.raises(KeyboardInterrupt):
        add_to_h5ad(csr_file, obs=obs, obsm=obsm, uns=uns)
    assert csr_file.read_bytes() == before_bytes
    assert "predicted_labels" not in ad.read_h5ad(csr_file).obs
    assert [p.name for p in csr_file.parent.iterdir()] == [csr_file.name]


def test_failed_replace_keeps_original(csr_file: Path, monkeypatch):
    before_bytes = csr_file.read_bytes()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match=r"csr.h5ad: cannot write \(\[Errno 28\] No space left"):
        add_to_h5ad(csr_file, obs={"conf_score": np.ones(30)})
    assert csr_file.read_bytes() == before_bytes
    assert [p.name for p in csr_file.parent.iterdir()] == [csr_file.name]


def test_existing_destination_needs_overwrite(csr_file: Path, tmp_path: Path):
    dst = tmp_path / "out.h5ad"
    dst.write_text("old")
    with pytest.raises(OutputError, match=rf"^{dst}: exists; pass --overwrite$"):
        add_to_h5ad(csr_file, dst, obs={"conf_score": np.ones(30)})
    assert dst.read_text() == "old"
    add_to_h5ad(csr_file, dst, obs={"conf_score": np.ones(30)}, overwrite=True)
    assert ad.read_h5ad(dst).obs["conf_score"].sum() == 30


def test_read_only_file_is_not_replaced(csr_file: Path, monkeypatch):
    monkeypatch.setattr(write.os, "access", lambda path, mode: False)  # root ignores modes
    with pytest.raises(OutputError, match=r"is read-only; write the results to another file$"):
        add_to_h5ad(csr_file, obs={"c": np.ones(30)})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder(csr_file: Path, tmp_path: Path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=r"cannot write in .*locked \(Permission denied\)"):
            add_to_h5ad(csr_file, folder / "out.h5ad", obs={"c": np.ones(30)})
    finally:
        folder.chmod(0o700)


def test_unwritable_folder_reported(csr_file: Path, tmp_path: Path, monkeypatch):
    """The same path as above where tests run as root: mkstemp refused."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=r"out.h5ad: cannot write in .* \(Permission denied\)$"):
        add_to_h5ad(csr_file, tmp_path / "out.h5ad", obs={"c": np.ones(30)})


def test_bad_destinations(csr_file: Path, tmp_path: Path):
    with pytest.raises(OutputError, match=r"folder .*nowhere does not exist"):
        add_to_h5ad(csr_file, tmp_path / "nowhere" / "out.h5ad", obs={"c": np.ones(30)})
    with pytest.raises(OutputError, match=r"is a directory"):
        add_to_h5ad(csr_file, tmp_path, obs={"c": np.ones(30)})


def test_caller_bugs_raise_value_error(csr_file: Path):
    with pytest.raises(ValueError, match=r"obs column 'c' has shape \(29,\), not \(30,\)"):
        add_to_h5ad(csr_file, obs={"c": np.ones(29)})
    with pytest.raises(ValueError, match=r"obsm 'e' has shape \(30,\), not \(30, k\)"):
        add_to_h5ad(csr_file, obsm={"e": np.ones(30)})
    with pytest.raises(OutputError, match=r"'_index' cannot be an obs column name"):
        add_to_h5ad(csr_file, obs={"_index": np.ones(30)})


# New files for 10x and legacy inputs


def test_write_new_h5ad_from_an_in_memory_matrix(tmp_path: Path):
    obs, obsm, uns = results(6)
    names = [f"AAAC-{i}" for i in range(6)]
    genes = ["CD3E", "MS4A1", "NKG7"]
    x = np.array([[1, 0, 2], [0, 0, 0], [3, 1, 0], [0, 4, 0], [5, 0, 0], [0, 0, 6]], np.float32)
    with ArrayCounts(x, genes, names) as counts:
        dst = write_new_h5ad(tmp_path / "new.h5ad", counts, obs=obs, obsm=obsm, uns=uns)
        adata = ad.read_h5ad(dst)
        np.testing.assert_array_equal(adata.X.toarray(), x)
        assert adata.obs_names.tolist() == names
        assert adata.var_names.tolist() == genes
        assert list(adata.obs.columns) == list(obs)
        assert_results(adata, 6)
        assert oct(dst.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's owner-only mode
        with pytest.raises(OutputError, match="exists; pass --overwrite"):
            write_new_h5ad(dst, counts)


def test_a_10x_file_becomes_an_annotated_h5ad_with_its_counts(liao_small, tmp_path: Path):
    """X, the symbols as var names and the ids as gene_ids: what scanpy reads from the .h5."""
    obs, obsm, uns = results(200)
    with open_counts(liao_small) as counts:
        dst = write_new_h5ad(tmp_path / "liao.h5ad", counts, obs=obs, obsm=obsm, uns=uns)
        want = sp.vstack(
            [
                sp.csr_matrix((b.data, b.indices, b.indptr), shape=(b.n_rows, b.n_cols))
                for b in counts.iter_blocks(64)
            ]
        )
        names, ids = counts.var["name"], counts.var["id"]
    adata = ad.read_h5ad(dst)
    assert (want != adata.X).nnz == 0
    assert adata.var_names.tolist() == names.tolist()
    assert adata.var["gene_ids"].tolist() == ids.tolist()
    assert_results(adata, 200)


def test_a_legacy_06_file_becomes_a_modern_h5ad(shared_data: Path, tmp_path: Path):
    """Its obs columns and its counts, then the results; the input stays as it was."""
    src = shared_data / "formats/h5ad/kang2018_scgen_valid_legacy06.h5ad"
    before = src.read_bytes()
    obs, obsm, uns = results(1975)
    with open_counts(src) as counts:
        dst = write_new_h5ad(tmp_path / "new.h5ad", counts, obs=obs, obsm=obsm, uns=uns)
        conditions = counts.read_obs("condition")
    adata = ad.read_h5ad(dst)
    assert adata.obs["condition"].astype(str).tolist() == list(conditions)
    assert list(adata.obs.columns)[-len(obs) :] == list(obs)
    assert adata.X.shape == (1975, adata.n_vars)
    assert src.read_bytes() == before
