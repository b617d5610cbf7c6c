"""The 10x HDF5 reader: synthetic v3 and v2 files, then every real 10x file of shared/data."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from scgpt_runtime.errors import InputError
from scgpt_runtime.io import open_counts
from scgpt_runtime.io.tenx import TenxMatrix

RNG = np.random.default_rng(0)


def _counts(n_cells: int, n_genes: int, density: float = 0.3) -> np.ndarray:
    x = RNG.poisson(3, size=(n_cells, n_genes)) * (RNG.random((n_cells, n_genes)) < density)
    x[1] = 0  # an empty cell
    return x.astype(np.int32)


def _csc_parts(x: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSC parts of genes x cells = CSR parts of cells x genes, genes descending like CellRanger."""
    m = sp.csr_matrix(x)
    indices, data = m.indices.copy(), m.data.copy()
    if descending:
        for r in range(m.shape[0]):
            lo, hi = m.indptr[r], m.indptr[r + 1]
            indices[lo:hi], data[lo:hi] = indices[lo:hi][::-1], data[lo:hi][::-1]
    return data, indices.astype(np.int64), m.indptr.astype(np.int64)


def _write_parts(group: h5py.Group, x: np.ndarray, descending: bool = True) -> None:
    data, indices, indptr = _csc_parts(x, descending)
    group["data"], group["indices"], group["indptr"] = data, indices, indptr
    group["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
    group["barcodes"] = np.array([f"CELL{i}-1".encode() for i in range(x.shape[0])])


def write_v3(path: Path, x: np.ndarray, types: list[str], genomes: list[str] | None = None) -> Path:
    """A CellRanger 3 file of cells x genes counts `x` with the given feature types."""
    n = x.shape[1]
    with h5py.File(path, "w") as h5:
        g = h5.create_group("matrix")
        _write_parts(g, x)
        f = g.create_group("features")
        f["id"] = np.array([f"ENSG{i:011d}".encode() for i in range(n)])
        f["name"] = np.array([f"GENE{i}".encode() for i in range(n)])
        f["feature_type"] = np.array([t.encode() for t in types])
        f["genome"] = np.array([g.encode() for g in (genomes or ["GRCh38"] * n)])
        f["_all_tag_keys"] = np.array([b"genome"])
    return path


def write_v2(path: Path, genomes: dict[str, np.ndarray]) -> Path:
    """A CellRanger 2 file with one group per genome."""
    with h5py.File(path, "w") as h5:
        for genome, x in genomes.items():
            g = h5.create_group(genome)
            _write_parts(g, x)
            g["genes"] = np.array([f"{genome}_ID{i}".encode() for i in range(x.shape[1])])
            g["gene_names"] = np.array([f"{genome}_G{i}".encode() for i in range(x.shape[1])])
    return path


def read_all(m: TenxMatrix, block_size: int = 2048) -> sp.csr_matrix:
    """Stack the blocks into one CSR matrix, checking each block's invariants."""
    datas, indices, indptrs, offset = [], [], [np.zeros(1, np.int64)], 0
    for block in m.iter_blocks(block_size):
        assert block.start == offset
        assert block.n_rows <= block_size
        assert block.n_cols == m.n_genes
        assert block.data.dtype == np.float32
        assert block.indices.dtype == np.int64
        assert block.indptr.dtype == np.int64
        assert block.indptr[0] == 0
        _assert_sorted_rows(block.indices, block.indptr)
        datas.append(block.data)
        indices.append(block.indices)
        indptrs.append(block.indptr[1:] + indptrs[-1][-1])
        offset += block.n_rows
    assert offset == m.n_cells
    return sp.csr_matrix(
        (np.concatenate(datas), np.concatenate(indices), np.concatenate(indptrs)),
        shape=(m.n_cells, m.n_genes),
    )


def _assert_sorted_rows(indices: np.ndarray, indptr: np.ndarray) -> None:
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    same_row = rows[1:] == rows[:-1]
    assert (np.diff(indices)[same_row] > 0).all(), "columns not strictly ascending within a row"


def assert_same(ours: sp.csr_matrix, ref: sp.spmatrix) -> None:
    assert ours.shape == ref.shape
    ref = sp.csr_matrix(ref, dtype=np.float32, copy=True)  # sum_duplicates sorts in place
    ref.sum_duplicates()
    assert ours.nnz == ref.nnz
    assert (ours != ref).nnz == 0


# Synthetic v3


@pytest.mark.parametrize("block_size", [1, 2, 7, 1000])
def test_v3_reads_cells_by_genes(tmp_path: Path, block_size: int):
    x = _counts(9, 13)
    with open_counts(write_v3(tmp_path / "a.h5", x, ["Gene Expression"] * 13)) as m:
        assert isinstance(m, TenxMatrix)
        assert (m.format, m.matrix, m.n_cells, m.n_genes) == ("10x-v3", "matrix", 9, 13)
        assert list(m.var) == ["id", "name", "feature_type", "genome"]
        assert m.var["name"][2] == "GENE2"
        assert m.var["id"].dtype.kind == "U"
        assert m.obs_names.tolist() == [f"CELL{i}-1" for i in range(9)]
        np.testing.assert_array_equal(read_all(m, block_size).toarray(), x)


def test_v3_row_range(tmp_path: Path):
    x = _counts(10, 6)
    with open_counts(write_v3(tmp_path / "a.h5", x, ["Gene Expression"] * 6)) as m:
        blocks = list(m.iter_blocks(3, start=2, stop=9))
    assert [b.start for b in blocks] == [2, 5, 8]
    np.testing.assert_array_equal(np.vstack([b.to_dense() for b in blocks]), x[2:9])


def test_v3_keeps_gene_expression_only(tmp_path: Path):
    types = ["Gene Expression", "Antibody Capture"] * 4 + ["Gene Expression"]
    x = _counts(8, 9, density=0.6)
    path = write_v3(tmp_path / "mixed.h5", x, types)
    genes = np.array([t == "Gene Expression" for t in types])
    with open_counts(path) as m:
        assert m.n_genes == 5
        assert m.var["name"].tolist() == ["GENE0", "GENE2", "GENE4", "GENE6", "GENE8"]
        for block_size in (1, 3, 100):
            np.testing.assert_array_equal(read_all(m, block_size).toarray(), x[:, genes])
    with h5py.File(path) as h5:
        everything = TenxMatrix(path, h5, feature_type=None)
        np.testing.assert_array_equal(read_all(everything).toarray(), x)
        antibodies = TenxMatrix(path, h5, feature_type="Antibody Capture")
        assert antibodies.var["feature_type"].tolist() == ["Antibody Capture"] * 4
        np.testing.assert_array_equal(read_all(antibodies, 2).toarray(), x[:, ~genes])
        with pytest.raises(InputError, match=r"has no 'Peaks' features \(types: Antibody Capture"):
            TenxMatrix(path, h5, feature_type="Peaks")


def test_v3_genome_picks_features(tmp_path: Path):
    genomes = ["GRCh38"] * 3 + ["mm10"] * 4
    x = _counts(5, 7, density=0.7)
    path = write_v3(tmp_path / "barnyard.h5", x, ["Gene Expression"] * 7, genomes)
    with open_counts(path) as m:
        assert m.n_genes == 7  # no genome given: every gene, as CellRanger reports them
    with open_counts(path, genome="mm10") as m:
        assert m.var["genome"].tolist() == ["mm10"] * 4
        np.testing.assert_array_equal(read_all(m, 2).toarray(), x[:, 3:])
    with pytest.raises(InputError, match=r"has no genome 'hg19' \(genomes: GRCh38, mm10\)"):
        open_counts(path, genome="hg19")


def test_unsorted_and_duplicate_columns(tmp_path: Path):
    """Writers other than CellRanger may leave rows unsorted or repeat a column: sorted, summed."""
    path = tmp_path / "messy.h5"
    with h5py.File(path, "w") as h5:
        g = h5.create_group("matrix")
        g["data"] = np.array([1, 2, 3, 4, 5, 6], dtype=np.int32)
        g["indices"] = np.array([2, 0, 3, 0, 1, 1], dtype=np.int32)
        g["indptr"] = np.array([0, 3, 3, 6], dtype=np.int32)
        g["shape"] = np.array([4, 3])
        g["barcodes"] = np.array([b"a", b"b", b"c"])
        f = g.create_group("features")
        for key in ("id", "name"):
            f[key] = np.array([b"w", b"x", b"y", b"z"])
        f["feature_type"] = np.array([b"Gene Expression"] * 4)
    with open_counts(path) as m:
        block = next(m.iter_blocks())
    assert block.indices.tolist() == [0, 2, 3, 0, 1]
    assert block.indptr.tolist() == [0, 3, 3, 5]
    np.testing.assert_array_equal(block.data, [2, 1, 3, 4, 11])


# Synthetic v2


def test_v2_single_genome(tmp_path: Path):
    x = _counts(6, 5)
    with open_counts(write_v2(tmp_path / "v2.h5", {"hg19": x})) as m:
        assert (m.format, m.matrix, m.n_cells, m.n_genes) == ("10x-v2", "hg19", 6, 5)
        assert m.var["id"].tolist() == [f"hg19_ID{i}" for i in range(5)]
        assert m.var["name"].tolist() == [f"hg19_G{i}" for i in range(5)]
        np.testing.assert_array_equal(read_all(m, 4).toarray(), x)


def test_v2_two_genomes_need_a_choice(tmp_path: Path):
    xs = {"hg19": _counts(4, 5), "mm10": _counts(4, 3)}
    path = write_v2(tmp_path / "two.h5", xs)
    with pytest.raises(InputError, match=r"holds genomes hg19, mm10; pick one with --genome"):
        open_counts(path)
    with pytest.raises(InputError, match=r"has no genome 'GRCh38' \(genomes: hg19, mm10\)"):
        open_counts(path, genome="GRCh38")
    for genome, x in xs.items():
        with open_counts(path, genome=genome) as m:
            assert m.matrix == genome
            assert m.var["name"][0] == f"{genome}_G0"
            np.testing.assert_array_equal(read_all(m, 3).toarray(), x)


# Malformed files


def _damage(path: Path, name: str, value: np.ndarray | None) -> Path:
    with h5py.File(path, "a") as h5:
        del h5[name]
        if value is not None:
            h5[name] = value
    return path


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("matrix/barcodes", None, r"10x group matrix has no barcodes$"),
        ("matrix/features/id", None, r"matrix/features has no id \(CellRanger writes"),
        ("matrix/shape", np.array([5, 4, 1]), r"matrix/shape is not two integers"),
        ("matrix/indptr", np.zeros(3, np.int64), r"indptr has 3 entries but shape says 4 cells"),
        ("matrix/data", np.ones(2, np.int32), r"data has 2 values but indices \d+$"),
        ("matrix/barcodes", np.array([b"a"]), r"matrix/barcodes should hold 4 strings"),
        ("matrix/features/name", np.array([b"a"]), r"features/name should hold 5 strings"),
        ("matrix/data", np.array([b"x"] * 5), r"data, indices and indptr must be numbers"),
    ],
)
def test_malformed_v3(tmp_path: Path, name: str, value: np.ndarray | None, message: str):
    x = np.eye(4, 5, dtype=np.int32)
    path = _damage(write_v3(tmp_path / "bad.h5", x, ["Gene Expression"] * 5), name, value)
    with pytest.raises(InputError, match=rf"^{tmp_path}/bad.h5: .*{message}"):
        open_counts(path)


def test_indptr_must_end_at_nnz(tmp_path: Path):
    x = np.eye(4, 5, dtype=np.int32)
    path = write_v3(tmp_path / "bad.h5", x, ["Gene Expression"] * 5)
    _damage(path, "matrix/indptr", np.array([0, 1, 2, 3, 3]))
    with pytest.raises(InputError, match=r"indptr runs from 0 to 3 but data holds 4 values"):
        open_counts(path)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("matrix/indptr", np.array([0, 3, 1, 3, 4]), r"indptr of cells 0-4 decreases"),
        ("matrix/indices", np.array([0, 1, 9, 3]), r"indices holds a feature outside 0..4"),
    ],
)
def test_malformed_values_fail_while_streaming(tmp_path: Path, name, value, message):
    x = np.eye(4, 5, dtype=np.int32)
    path = _damage(write_v3(tmp_path / "bad.h5", x, ["Gene Expression"] * 5), name, value)
    with open_counts(path) as m, pytest.raises(InputError, match=message):
        list(m.iter_blocks())


def test_v2_group_without_genes(tmp_path: Path):
    path = _damage(write_v2(tmp_path / "v2.h5", {"mm10": _counts(3, 3)}), "mm10/genes", None)
    with pytest.raises(InputError, match=r"10x genome group mm10 has no genes$"):
        open_counts(path)


# Real files


def _real_reference(path: Path, group: str) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """scipy's reading of the raw parts, and the feature types (None for v2)."""
    with h5py.File(path) as h5:
        g = h5[group]
        n_features, n_cells = (int(n) for n in g["shape"][()])
        genes_by_cells = sp.csc_matrix(
            (g["data"][()], g["indices"][()], g["indptr"][()]), shape=(n_features, n_cells)
        )
        types = g["features/feature_type"][()].astype(str) if "features" in g else None
    return genes_by_cells.T.tocsr(), types


REAL = [
    ("formats/10x/tiledbsoma_visium_mm10_filtered_feature_bc_matrix.h5", None, "matrix"),
    ("formats/10x/visium_spaceranger2.1.0_raw_probe_bc_matrix.h5", None, "matrix"),
    ("formats/10x/scanpy_1.2.0_multiple_genomes.h5", "hg19_chr21", "hg19_chr21"),
    ("formats/10x/scanpy_1.2.0_multiple_genomes.h5", "another_genome", "another_genome"),
    ("unlabelled/liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5", None, "matrix"),
    ("unlabelled/liao2020_balf_GSM4339774_C146_filtered_feature_bc_matrix.h5", None, "matrix"),
    ("unlabelled/liao2020_balf_GSM4475052_C149_filtered_feature_bc_matrix.h5", None, "matrix"),
]


def test_real_list_is_complete(shared_data: Path):
    listed = {name for name, _, _ in REAL} | {f"formats/10x/{n}" for n in MALFORMED}
    found = {str(p.relative_to(shared_data)) for p in (shared_data / "formats/10x").glob("*.h5")}
    found |= {str(p.relative_to(shared_data)) for p in shared_data.glob("unlabelled/liao*.h5")}
    assert found == listed


@pytest.mark.parametrize(("name", "genome", "group"), REAL, ids=[r[0].split("/")[-1] for r in REAL])
def test_real_file_matches_scipy(shared_data: Path, name: str, genome: str | None, group: str):
    path = shared_data / name
    ref, types = _real_reference(path, group)
    genes = slice(None) if types is None else types == "Gene Expression"
    ref = ref[:, genes]
    with open_counts(path, genome=genome) as m:
        assert (m.n_cells, m.n_genes) == ref.shape
        assert len(m.obs_names) == m.n_cells
        assert all(len(v) == m.n_genes for v in m.var.values())
        for block_size in (1, 100, 10000):
            ours = read_all(m, block_size)
            assert_same(ours, ref)
            assert ours.sum() == pytest.approx(ref.sum(), rel=1e-6)


def test_real_liao_independently(shared_data: Path):
    """One Liao file against plain h5py + numpy, no scipy: dense cells x genes, ids and barcodes."""
    path = shared_data / "unlabelled/liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5"
    with h5py.File(path) as h5:
        g = h5["matrix"]
        indptr, indices, data = g["indptr"][()], g["indices"][()], g["data"][()]
        n_features, n_cells = g["shape"][()]
        ids = [s.decode() for s in g["features/id"][()]]
        barcodes = [s.decode() for s in g["barcodes"][()]]
    lo, hi = 1000, 1600
    dense = np.zeros((hi - lo, n_features), dtype=np.float32)
    rows = np.repeat(np.arange(hi - lo), np.diff(indptr[lo : hi + 1]))
    dense[rows, indices[indptr[lo] : indptr[hi]]] = data[indptr[lo] : indptr[hi]]
    with open_counts(path) as m:
        assert (m.n_cells, m.n_genes) == (n_cells, n_features) == (3716, 33539)
        assert m.var["id"].tolist() == ids
        assert m.obs_names.tolist() == barcodes
        assert m.var["name"][m.var["id"] == "ENSG00000075624"][0] == "ACTB"
        assert "nCoV" in m.var["name"]
        blocks = list(m.iter_blocks(256, start=lo, stop=hi))
        nnz, total = 0, 0.0
        for b in m.iter_blocks(2048):
            nnz, total = nnz + b.nnz, total + b.data.sum(dtype=np.float64)
    np.testing.assert_array_equal(np.vstack([b.to_dense() for b in blocks]), dense)
    assert (nnz, total) == (len(data), data.sum())


MALFORMED = {
    "scvi_brain_large_subset.h5": r"10x genome group mm10 has no barcodes, genes, gene_names$",
    "liger_kang2018_ctrl_minimal.h5": (
        r"10x matrix/features has no id, feature_type \(CellRanger writes id, name, feature_type\)$"
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_real_malformed_files_are_refused(shared_data: Path, name: str):
    path = shared_data / "formats/10x" / name
    with pytest.raises(InputError, match=rf"^{path}: {MALFORMED[name]}"):
        open_counts(path)


def test_v3_feature_types_open_as_modalities(tmp_path: Path):
    types = ["Gene Expression", "Antibody Capture"] * 4 + ["Gene Expression"]
    x = _counts(8, 9, density=0.6)
    path = write_v3(tmp_path / "mixed.h5", x, types)
    genes = np.array([t == "Gene Expression" for t in types])
    with open_counts(path, modalities=["adt", "rna"]) as m:
        assert m.modalities == ["adt", "rna"]  # in the order asked for
        assert m.part("adt").counts.var["feature_type"].tolist() == ["Antibody Capture"] * 4
        joint = np.vstack([b.to_dense() for b in m.iter_blocks(3)])
        np.testing.assert_array_equal(joint, np.hstack([x[:, ~genes], x[:, genes]]))
    with pytest.raises(InputError, match=r"has no modality 'atac' \(feature types: Gene Exp"):
        open_counts(path, modalities=["atac"])
