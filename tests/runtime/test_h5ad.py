"""The .h5ad reader against anndata itself: synthetic files of every layout, and the real corpus."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_runtime.errors import InputError
from scgpt_runtime.io import h5ad, open_counts
from scgpt_runtime.io.h5ad import H5adMatrix

N_CELLS, N_GENES, N_RAW_GENES = 61, 23, 37

REAL_FILES = (
    "formats/h5ad/cellxgene_schema_example_invalid_CL.h5ad",
    "formats/h5ad/kang2018_scgen_valid_legacy06.h5ad",
    "formats/h5ad/scvelo_pancreas_50obs_layers.h5ad",
    "formats/h5ad/scvi_brainlarge_dataset_test.h5ad",
    "formats/h5ad/scvi_model_adata_int64_dense.h5ad",
    "formats/h5ad/tiledbsoma_categorical_int_nan.h5ad",
    "formats/h5ad/tiledbsoma_multiome_subset_100_100.h5ad",
    "formats/h5ad/tiledbsoma_pbmc-small-x-csc.h5ad",
    "formats/h5ad/tiledbsoma_pbmc-small-x-csr.h5ad",
    "formats/h5ad/tiledbsoma_pbmc-small-x-dense.h5ad",
    "formats/h5ad/tiledbsoma_pbmc-small.h5ad",
    "formats/h5ad/tiledbsoma_pbmc-small_anndata07.h5ad",
    "formats/h5ad/tiledbsoma_x-empty.h5ad",
    "formats/h5ad/zellkonverter_example_anndata.h5ad",
    "formats/h5ad/zellkonverter_krumsiek11_augmented_v0-8.h5ad",
    "labelled/baron_pancreas_human_mouse_350.h5ad",
    "labelled/kang2018_pbmc_counts.h5ad",
    "labelled/tabula_muris_actinn_1000.h5ad",
    "unlabelled/harmony_kang2018_ctrl_stim_2000.h5ad",
    "unlabelled/scvi_pbmc_10k_protein_v3_200.h5ad",
    "unlabelled/scvi_pbmc_5k_protein_v3_200.h5ad",
    "unlabelled/smnn_mouse_2batch_900.h5ad",
)
NO_X_FILE = "formats/h5ad/tiledbsoma_x-none.h5ad"


# Helpers: our stream as one scipy matrix, and anndata's values in our conventions.


def _stream(m: H5adMatrix, block_size: int, start: int = 0, stop: int | None = None):
    """All blocks of rows [start, stop) as one CSR matrix, checking every block's invariants.

    Reads through `_blocks`, not `iter_blocks`: several real files hold scaled values in X, which
    iter_blocks rightly rejects as counts, and their layout must still read exactly.
    """
    stop = m.n_cells if stop is None else stop
    rows, expected_start = [], start
    for block in m._blocks(block_size, start, stop):
        assert block.start == expected_start
        assert 1 <= block.n_rows <= block_size
        assert block.n_cols == m.n_genes
        assert block.data.dtype == np.float32
        assert block.indices.dtype == block.indptr.dtype == np.int64
        assert block.indptr[0] == 0
        assert len(block.data) == len(block.indices) == block.nnz
        for r in range(block.n_rows):
            assert np.all(np.diff(block.indices[block.indptr[r] : block.indptr[r + 1]]) > 0)
        rows.append(
            sp.csr_matrix((block.data, block.indices, block.indptr), (block.n_rows, m.n_genes))
        )
        expected_start += block.n_rows
    assert expected_start == stop
    return (
        sp.vstack(rows, format="csr") if rows else sp.csr_matrix((0, m.n_genes), dtype=np.float32)
    )


def _assert_matrix_equal(ours: sp.csr_matrix, x) -> None:
    expected = sp.csr_matrix(x if sp.issparse(x) else np.asarray(x), dtype=np.float32)
    assert ours.shape == expected.shape
    assert ours.nnz == (expected.nnz if sp.issparse(x) else np.count_nonzero(x))
    assert (ours != expected).nnz == 0
    assert ours.sum(dtype=np.float64) == expected.sum(dtype=np.float64)


def _expected_column(series: pd.Series) -> np.ndarray:
    """anndata's column in our conventions: text as str or None, nullable ints as float NaN."""
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype):
        return np.array([None if pd.isna(v) else str(v) for v in series], dtype=object)
    if isinstance(dtype, pd.BooleanDtype):
        return np.array([None if pd.isna(v) else bool(v) for v in series], dtype=object)
    if pd.api.types.is_extension_array_dtype(dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    return series.to_numpy()


def _assert_column_equal(ours: np.ndarray, series: pd.Series) -> None:
    expected = _expected_column(series)
    assert ours.shape == expected.shape
    if expected.dtype == object:
        assert ours.dtype == object
        assert ours.tolist() == expected.tolist()
    else:
        assert ours.dtype.kind == expected.dtype.kind
        np.testing.assert_array_equal(ours, expected)


def _is_text(series: pd.Series) -> bool:
    return isinstance(series.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(
        series.dtype
    )


def _assert_tables_equal(m: H5adMatrix, adata: ad.AnnData) -> None:
    var = adata.raw.var if adata.raw is not None and m.matrix.startswith("raw") else adata.var
    assert m.var["index"].tolist() == [str(v) for v in var.index]
    assert list(m.var) == ["index", *[c for c in var.columns if _is_text(var[c])]]
    for name in list(m.var)[1:]:
        expected = _expected_column(var[name])
        expected[np.equal(expected, None)] = ""
        assert m.var[name].tolist() == expected.tolist()
    assert m.obs_names.tolist() == [str(v) for v in adata.obs_names]
    assert m.obs_columns == list(adata.obs.columns)
    for name in m.obs_columns:
        _assert_column_equal(m.read_obs(name), adata.obs[name])


def _read_h5ad(path: Path) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's OldFormatWarning on the legacy files
        return ad.read_h5ad(path)


# Synthetic files written by anndata.


def _synthetic(x_format: str, dtype, *, raw: bool, rng: np.random.Generator) -> ad.AnnData:
    counts = rng.poisson(0.7, (N_CELLS, N_RAW_GENES)).astype(dtype)
    counts[5] = 0  # an empty row, and an empty column below
    counts[:, 3] = 0
    genes = pd.DataFrame(
        {
            "gene_symbol": [f"GENE{i}" for i in range(N_RAW_GENES)],
            "feature_type": pd.Categorical(["Gene Expression"] * N_RAW_GENES),
            "highly_variable": np.arange(N_RAW_GENES) % 2 == 0,
            "means": np.linspace(0, 1, N_RAW_GENES),
        },
        index=[f"ENSG{i:011d}" for i in range(N_RAW_GENES)],
    )
    labels = rng.choice(["T", "B", "NK"], N_CELLS).astype(object)
    labels[[2, 9]] = np.nan
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(labels, categories=["B", "NK", "T", "unused"]),
            "barcode": [f"BC{i:04d}" for i in range(N_CELLS)],  # unique: stays a string-array
            "n_counts": counts.sum(1).astype(np.float64),
            "n_genes": (counts > 0).sum(1).astype(np.int64),
            "batch": pd.array([i % 3 if i % 7 else None for i in range(N_CELLS)], dtype="Int64"),
            "is_doublet": pd.array(
                [i % 2 == 0 if i % 5 else None for i in range(N_CELLS)], "boolean"
            ),
            "passed_qc": np.arange(N_CELLS) % 4 != 0,
        },
        index=[f"cell-{i}" for i in range(N_CELLS)],
    )
    full = ad.AnnData(_as_format(counts, x_format), obs=obs, var=genes)
    adata = full[:, 3 : 3 + N_GENES].copy()
    adata.X = _as_format(np.log1p(counts[:, 3 : 3 + N_GENES].astype(np.float64)), x_format)
    adata.layers["counts"] = _as_format(counts[:, 3 : 3 + N_GENES], x_format)
    # Subsetting drops unused categories; put the full column back so the file keeps one.
    adata.obs["cell_type"] = obs["cell_type"]
    if raw:
        adata.raw = full
    return adata


def _as_format(x: np.ndarray, x_format: str):
    return {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[x_format](x)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.mark.parametrize(
    ("x_format", "dtype"),
    [
        ("csr", np.float32),
        ("csr", np.int64),
        ("csc", np.float64),
        ("dense", np.int64),
        ("dense", bool),
    ],
)
@pytest.mark.parametrize("raw", [True, False])
def test_synthetic_matches_anndata(tmp_path, rng, x_format, dtype, raw):
    path = tmp_path / "cells.h5ad"
    _synthetic(x_format, dtype, raw=raw, rng=rng).write_h5ad(path)
    adata = _read_h5ad(path)
    with open_counts(path) as m:
        assert isinstance(m, H5adMatrix)
        assert m.format == "h5ad"
        assert (m.matrix, m.has_raw, m.layers) == ("raw/X" if raw else "X", raw, ["counts"])
        assert (m.n_cells, m.n_genes) == (N_CELLS, N_RAW_GENES if raw else N_GENES)
        for block_size in (1, 7, 1000):
            _assert_matrix_equal(_stream(m, block_size), adata.raw.X if raw else adata.X)
        _assert_matrix_equal(_stream(m, 5, 13, 47), (adata.raw.X if raw else adata.X)[13:47])
        _assert_tables_equal(m, adata)
        assert m.read_obs("cell_type")[[2, 9]].tolist() == [None, None]
        assert m.read_obs("batch")[[1, 2]].tolist() == [1.0, 2.0]
        assert np.isnan(m.read_obs("batch")[[0, 7]]).all()  # masked
        assert m.read_obs("is_doublet")[[0, 2, 3]].tolist() == [None, True, False]
        assert m.read_obs("passed_qc").dtype == bool
    with open_counts(path, use_raw=False) as m:
        assert (m.matrix, m.n_genes) == ("X", N_GENES)
        assert list(m.var) == ["index", "gene_symbol", "feature_type"]
        _assert_matrix_equal(_stream(m, 7), adata.X)
    with open_counts(path, layer="counts") as m:
        assert (m.matrix, m.n_genes) == ("layers/counts", N_GENES)
        _assert_matrix_equal(_stream(m, 7), adata.layers["counts"])
        assert sum(b.nnz for b in m.iter_blocks(16)) == _stream(m, 16).nnz


def test_csc_bucket_transpose(tmp_path, rng, monkeypatch):
    path = tmp_path / "csc.h5ad"
    x = sp.random(300, N_GENES, density=0.3, format="csc", dtype=np.float32, random_state=1)
    adata = ad.AnnData(x)
    adata.write_h5ad(path)
    bounds = []
    real_bounds = h5ad._bucket_bounds
    monkeypatch.setattr(h5ad, "CSC_BUCKET_NNZ", 200)
    monkeypatch.setattr(h5ad, "CSC_CHUNK", 37)
    monkeypatch.setattr(
        h5ad, "_bucket_bounds", lambda *a: bounds.append(real_bounds(*a)) or bounds[-1]
    )
    with open_counts(path) as m:
        for block_size in (1, 7, 1000):  # 1000: one bucket, spilled all the same
            _assert_matrix_equal(_stream(m, block_size), adata.X)
        _assert_matrix_equal(_stream(m, 7, 101, 250), adata.X[101:250])
        monkeypatch.setattr(h5ad, "CSC_BUCKET_ROWS", 21)
        _assert_matrix_equal(_stream(m, 7), adata.X)
    assert len(bounds[1]) > 5  # block size 7: many buckets of whole blocks
    assert np.all(np.diff(bounds[1])[:-1] % 7 == 0)  # the last one ends with the matrix
    assert (bounds[3][0], bounds[3][-1]) == (101, 250)
    assert np.diff(bounds[1]).max() > 21
    assert np.diff(bounds[4]).max() == 21


def test_stable_order_beyond_16_bits():
    keys = np.array([70_000, 3, 70_000, 3, 0])
    assert h5ad._stable_order(keys, 70_001).tolist() == [4, 1, 3, 0, 2]
    assert h5ad._stable_order(keys % 7, 7).tolist() == np.argsort(keys % 7, kind="stable").tolist()


def test_unsorted_csr_indices_are_sorted(tmp_path, rng):
    path = tmp_path / "unsorted.h5ad"
    adata = _synthetic("csr", np.float32, raw=False, rng=rng)
    adata.write_h5ad(path)
    expected = adata.X.copy()
    with h5py.File(path, "r+") as f:  # reverse the column order within every row, as some tools do
        indptr, indices, data = f["X/indptr"][()], f["X/indices"], f["X/data"]
        for lo, hi in itertools.pairwise(indptr):
            indices[lo:hi], data[lo:hi] = indices[lo:hi][::-1], data[lo:hi][::-1]
    with open_counts(path) as m:
        _assert_matrix_equal(_stream(m, 7), expected)


def test_nullable_string_and_unknown_encodings(tmp_path, rng):
    path = tmp_path / "encodings.h5ad"
    adata = _synthetic("csr", np.float32, raw=False, rng=rng)
    adata.uns["weird"] = {"a": 1}
    adata.write_h5ad(path)
    donors = pd.array([f"d{i}" if i % 4 else None for i in range(N_CELLS)], dtype="string")
    with h5py.File(path, "r+") as f, ad.settings.override(allow_write_nullable_strings=True):
        ad.io.write_elem(f["obs"], "donor", donors)
        f["obs"].attrs["column-order"] = [*f["obs"].attrs["column-order"], "donor", "ragged"]
        f["obs"].create_group("ragged").attrs.update(
            {"encoding-type": "awkward-array", "encoding-version": "0.1.0"}
        )
        f["uns/weird"].attrs["encoding-type"] = "never-seen"  # never read, so never fatal
        f["obsm"].create_group("X_new").attrs["encoding-type"] = "never-seen"
    with open_counts(path) as m:
        assert m.obs_columns[-2:] == ["donor", "ragged"]
        assert m.read_obs("donor").tolist() == [None if pd.isna(v) else v for v in donors]
        with pytest.raises(
            InputError,
            match=r"encodings\.h5ad: unsupported encoding 'awkward-array' version '0\.1\.0' "
            r"while reading obs/ragged$",
        ):
            m.read_obs("ragged")
        _assert_matrix_equal(_stream(m, 7), adata.X)


def test_legacy_06_layout_matches_anndata(tmp_path, rng):
    """anndata < 0.7: compound obs/var, h5sparse X, raw.X/raw.var, categories in uns."""
    path = tmp_path / "legacy.h5ad"
    counts = sp.random(
        N_CELLS, N_RAW_GENES, density=0.3, format="csc", dtype=np.float32, random_state=2
    )
    codes = rng.integers(-1, 3, N_CELLS).astype(np.int8)
    with h5py.File(path, "w") as f:
        _legacy_sparse(f, "X", counts[:, :N_GENES].tocsc(), "csc")
        _legacy_sparse(f, "raw.X", counts.tocsr(), "csr")
        obs = np.zeros(N_CELLS, [("index", "S12"), ("cell_type", "i1"), ("n_counts", "<f4")])
        obs["index"] = [f"cell{i}".encode() for i in range(N_CELLS)]
        obs["cell_type"], obs["n_counts"] = codes, counts.sum(1).A1
        f["obs"] = obs
        var = np.zeros(N_RAW_GENES, [("index", "S12"), ("gene_symbol", "<i2"), ("n_cells", "<i8")])
        var["index"] = [f"ENSG{i:04d}".encode() for i in range(N_RAW_GENES)]
        var["gene_symbol"] = np.arange(N_RAW_GENES)[::-1]
        f["var"], f["raw.var"] = var[:N_GENES], var
        f["uns/cell_type_categories"] = np.array([b"B", b"NK", b"T"])
        f["uns/gene_symbol_categories"] = np.array([f"SYM{i}".encode() for i in range(N_RAW_GENES)])
    adata = _read_h5ad(path)
    with open_counts(path) as m:
        assert (m.matrix, m.has_raw, m.n_genes) == ("raw.X", True, N_RAW_GENES)
        _assert_matrix_equal(_stream(m, 7), adata.raw.X)
        _assert_tables_equal(m, adata)
        # anndata leaves raw.var's codes alone: categories in uns belong to obs and var only.
        assert list(m.var) == ["index"]
        assert m.read_obs("cell_type").tolist() == [
            None if c < 0 else ["B", "NK", "T"][c] for c in codes
        ]
    with open_counts(path, use_raw=False) as m:
        _assert_matrix_equal(_stream(m, 7), adata.X)
        _assert_tables_equal(m, adata)
        assert m.var["gene_symbol"][:2].tolist() == [
            f"SYM{N_RAW_GENES - 1}",
            f"SYM{N_RAW_GENES - 2}",
        ]


def _legacy_sparse(f: h5py.File, key: str, x: sp.spmatrix, fmt: str) -> None:
    g = f.create_group(key)
    g.attrs["h5sparse_format"], g.attrs["h5sparse_shape"] = fmt, x.shape
    g["data"], g["indices"], g["indptr"] = x.data, x.indices, x.indptr


def test_errors_name_the_file_and_element(tmp_path, rng):
    path = tmp_path / "bad.h5ad"
    adata = _synthetic("csr", np.float32, raw=False, rng=rng)
    adata.write_h5ad(path)
    with pytest.raises(
        InputError, match=r"bad\.h5ad: has no layer 'spliced' \(available layers: counts\)$"
    ):
        open_counts(path, layer="spliced")
    with (
        open_counts(path) as m,
        pytest.raises(InputError, match=r"has no obs column 'label' \(available: cell_type, "),
    ):
        m.read_obs("label")
    with h5py.File(path, "r+") as f:
        f["obs/cell_type/codes"][0] = 9
        del f["X"], f["obs/n_genes"]
    with (
        open_counts(path, layer="counts") as m,
        pytest.raises(
            InputError,
            match=r"bad\.h5ad: category code 9 but only 4 categories while reading obs/cell_type$",
        ),
    ):
        m.read_obs("cell_type")
    with (
        open_counts(path, layer="counts") as m,
        pytest.raises(
            InputError,
            match=r"bad\.h5ad: column 'n_genes' is listed in column-order but absent "
            r"while reading obs$",
        ),
    ):
        m.read_obs("n_genes")
    with pytest.raises(
        InputError,
        match=r"holds no expression matrix in X or raw/X; "
        r"pass --layer \(available layers: counts\)$",
    ):
        open_counts(path)


def test_raw_without_x_suggests_raw(tmp_path, rng):
    path = tmp_path / "rawonly.h5ad"
    _synthetic("csr", np.float32, raw=True, rng=rng).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        del f["X"]
    with pytest.raises(
        InputError, match=r"rawonly\.h5ad: holds no X; its counts are in raw/X \(drop --no-raw\)$"
    ):
        open_counts(path, use_raw=False)


# The real corpus.


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_matches_anndata(shared_data, name):
    path = shared_data / name
    adata = _read_h5ad(path)  # anndata reads every file here, legacy ones included
    with open_counts(path) as m:
        assert m.matrix == ("raw/X" if adata.raw is not None else "X")
        x = adata.raw.X if adata.raw is not None else adata.X
        assert (m.n_cells, m.n_genes) == x.shape
        _assert_matrix_equal(_stream(m, 300), x)
        _assert_tables_equal(m, adata)
        assert m.layers == list(adata.layers)
        for layer in m.layers:
            with open_counts(path, layer=layer) as lm:
                _assert_matrix_equal(_stream(lm, 300), adata.layers[layer])


def test_real_corpus_is_covered(shared_data):
    found = {str(p.relative_to(shared_data)) for p in shared_data.glob("*/**/*.h5ad")}
    found -= {p for p in found if p.startswith("wave2/")}
    assert found == {*REAL_FILES, NO_X_FILE}


def test_real_no_x_and_empty_x(shared_data):
    path = shared_data / NO_X_FILE
    with pytest.raises(
        InputError,
        match=r"tiledbsoma_x-none\.h5ad: "
        r"holds no expression matrix \(no X, no raw/X and no layers\)$",
    ):
        open_counts(path)
    with open_counts(shared_data / "formats/h5ad/tiledbsoma_x-empty.h5ad") as m:
        blocks = list(m.iter_blocks(1000))
        assert (m.n_cells, m.n_genes) == (2638, 1838)
        assert [b.n_rows for b in blocks] == [1000, 1000, 638]
        assert sum(b.nnz for b in blocks) == 0


def test_real_scaled_x_is_rejected_as_counts(shared_data):
    path = shared_data / "formats/h5ad/tiledbsoma_pbmc-small-x-csr.h5ad"
    with (
        open_counts(path) as m,
        pytest.raises(InputError, match=r"X holds negative values; counts must be >= 0$"),
    ):
        list(m.iter_blocks())


def test_real_legacy_06_labels(shared_data):
    """The README's label counts, read from anndata 0.6's uns/cell_type_categories."""
    with open_counts(shared_data / "formats/h5ad/kang2018_scgen_valid_legacy06.h5ad") as m:
        labels, counts = np.unique(m.read_obs("cell_type").astype(str), return_counts=True)
        assert dict(zip(labels.tolist(), counts.tolist(), strict=True)) == {
            "CD4T": 634,
            "FCGR3A+Mono": 421,
            "CD14+Mono": 321,
            "B": 222,
            "NK": 141,
            "CD8T": 122,
            "Dendritic": 114,
        }
        assert m.var["gene_symbol"][:3].tolist() == ["AL627309.1", "RP11-206L10.9", "LINC00115"]
        assert m.read_obs("condition")[:1].tolist() == ["control"]
