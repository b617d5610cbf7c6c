"""The 10x Matrix Market folder reader: the shared CITE-seq folder against scipy, synthetic
folders (CellRanger 2, unsorted entries, the spill path), a corpus of damaged folders, the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from click.testing import CliRunner

from scgpt_runtime.cli import cli
from scgpt_runtime.errors import InputError
from scgpt_runtime.io import h5ad, mtx, mtx_text, open_counts
from scgpt_runtime.io.mtx import MtxMatrix

SHARED = "wave2/multiomics/scvi_pbmc_10k_protein_v3_subset_mtx"
HEADER = "%%MatrixMarket matrix coordinate integer general"
RNG = np.random.default_rng(0)


@pytest.fixture
def folder(shared_data) -> Path:
    return shared_data / SHARED


def _tsv(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _csr(counts, block_size: int = 4096, start: int = 0, stop: int | None = None) -> sp.csr_matrix:
    """The blocks as one matrix, checking that they tile the rows and that columns rise."""
    blocks = list(counts.iter_blocks(block_size, start, stop))
    stop = counts.n_cells if stop is None else stop
    assert [b.start for b in blocks] == list(range(start, stop, block_size))
    for b in blocks:
        assert (b.data.dtype, b.indices.dtype) == (np.float32, np.int64)
        rising = np.diff(b.indices) > 0
        ends = b.indptr[1:-1] - 1
        rising[ends[(ends >= 0) & (ends < len(rising))]] = True
        assert rising.all()
    return sp.vstack(
        [sp.csr_matrix((b.data, b.indices, b.indptr), (b.n_rows, b.n_cols)) for b in blocks]
    ).tocsr()


def _same(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    """`a` (read) stores what `b` (expected, duplicates summed) does: indptr, indices, values."""
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    b.sum_duplicates()
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data.astype(np.float32))


# The shared folder (CellRanger 3 layout: 100 genes and 17 antibodies, entries by feature).


@pytest.mark.parametrize(
    ("feature_type", "n"), [(None, 117), ("Gene Expression", 100), ("Antibody Capture", 17)]
)
def test_shared_folder_equals_scipy(folder, feature_type, n):
    features = _tsv(folder / "features.tsv.gz")
    keep = np.array([feature_type in (None, f[2]) for f in features])
    expected = scipy.io.mmread(folder / "matrix.mtx.gz").T.tocsr()[:, np.flatnonzero(keep)]
    with MtxMatrix(folder, feature_type=feature_type) as counts:
        assert (counts.format, counts.matrix) == ("10x-mtx", "matrix.mtx.gz")
        assert (counts.n_cells, counts.n_genes) == (1024, n)
        np.testing.assert_array_equal(_csr(counts).toarray(), expected.toarray())
        _same(_csr(counts), expected)
        assert list(counts.var) == ["id", "name", "feature_type"]
        assert counts.var["id"].tolist() == [f[0] for f, k in zip(features, keep, strict=True) if k]
        assert counts.var["name"].tolist() == [
            f[1] for f, k in zip(features, keep, strict=True) if k
        ]
        assert counts.var["feature_type"].tolist() == [
            f[2] for f, k in zip(features, keep, strict=True) if k
        ]
        assert counts.obs_names.tolist() == [b[0] for b in _tsv(folder / "barcodes.tsv.gz")]


def test_shared_folder_golden_values(folder):
    with open_counts(folder) as counts:  # gene expression by default
        assert isinstance(counts, MtxMatrix)
        assert counts.n_genes == 100
        assert counts.var["name"][:3].tolist() == ["AL359815.1", "MACO1", "SZT2"]
        assert counts.obs_names[:2].tolist() == ["GGAGGTACATTAAAGG-1", "CAATACGAGTATAGAC-1"]
        x = _csr(counts)
    # "2 460 1" is the first entry of the file: feature 2 of cell 460 (1-based).
    assert x[459, 1] == 1.0
    assert x.nnz == 5_728
    assert x.sum() == 10_694


def test_block_size_does_not_change_the_blocks(folder):
    with MtxMatrix(folder, feature_type=None) as counts:
        small, large = list(counts.iter_blocks(7)), list(counts.iter_blocks(4096))
    assert (len(small), len(large)) == (147, 1)
    for part in ("data", "indices"):
        joined = np.concatenate([getattr(b, part) for b in small])
        np.testing.assert_array_equal(joined, getattr(large[0], part))
    lengths = np.concatenate([np.diff(b.indptr) for b in small])
    np.testing.assert_array_equal(lengths, np.diff(large[0].indptr))


def test_a_range_of_cells(folder):
    with MtxMatrix(folder) as counts:
        whole = _csr(counts)
        _same(_csr(counts, 5, 100, 131), whole[100:131])


def test_a_missing_feature_type_lists_those_present(folder):
    with pytest.raises(
        InputError,
        match=r"features.tsv.gz: has no 'Peaks' features \(types: "
        r"Gene Expression, Antibody Capture\)",
    ):
        MtxMatrix(folder, feature_type="Peaks")


# Synthetic folders.


def write_folder(
    folder: Path,
    entries: list[tuple[int, int, float]] | np.ndarray,
    n_features: int,
    n_cells: int,
    *,
    types: list[str] | None = None,
    v2: bool = False,
    header: str = HEADER,
) -> Path:
    """A 10x folder of 1-based (feature, cell, value) entries, written in the order given:
    CellRanger 3 (gzip, features.tsv.gz) or, with `v2`, CellRanger 2 (plain text, genes.tsv)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header, "% written by test_mtx", f"{n_features} {n_cells} {len(entries)}"]
    lines += [f"{int(r)} {int(c)} {v:g}" for r, c, v in entries]
    types = types or ["Gene Expression"] * n_features
    features = [
        f"ENSG{i:011d}\tGENE{i}" + ("" if v2 else f"\t{types[i]}") for i in range(n_features)
    ]
    barcodes = [f"CELL{i}-1" for i in range(n_cells)]
    files = {"matrix.mtx": lines, "genes.tsv" if v2 else "features.tsv": features}
    files["barcodes.tsv"] = barcodes
    for name, text in files.items():
        data = "".join(f"{line}\n" for line in text).encode()
        if v2:
            (folder / name).write_bytes(data)
        else:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    return folder


def _entries(x: np.ndarray) -> list[tuple[int, int, float]]:
    """1-based (feature, cell, value) of the non-zeros of a cells x features matrix."""
    cells, features = np.nonzero(x)
    return [(f + 1, c + 1, float(x[c, f])) for c, f in zip(cells, features, strict=True)]


def test_cellranger2_layout(tmp_path):
    x = np.array([[0, 3, 0], [1, 0, 0], [0, 0, 0], [2, 5, 7]], dtype=np.float32)
    folder = write_folder(tmp_path / "v2", _entries(x), 3, 4, v2=True)
    with open_counts(folder) as counts:
        assert counts.matrix == "matrix.mtx"
        assert counts.var["name"].tolist() == ["GENE0", "GENE1", "GENE2"]
        assert counts.var["feature_type"].tolist() == ["Gene Expression"] * 3
        assert counts.obs_names.tolist() == ["CELL0-1", "CELL1-1", "CELL2-1", "CELL3-1"]
        [block] = counts.iter_blocks()
    assert block.indptr.tolist() == [0, 1, 2, 2, 5]
    assert block.indices.tolist() == [1, 0, 0, 1, 2]
    assert block.data.tolist() == [3, 1, 2, 5, 7]


def _random_entries(n_features: int, n_cells: int, n: int) -> np.ndarray:
    """Entries in random order, a tenth of them repeating an earlier (feature, cell)."""
    rows, cols = RNG.integers(1, n_features + 1, n), RNG.integers(1, n_cells + 1, n)
    again = RNG.random(n) < 0.1
    first = RNG.integers(0, n, n)
    rows[again], cols[again] = rows[first[again]], cols[first[again]]
    return np.column_stack([rows, cols, RNG.integers(1, 20, n)])


def _scipy(entries: np.ndarray, n_features: int, n_cells: int) -> sp.csr_matrix:
    coo = sp.coo_matrix(
        (entries[:, 2], (entries[:, 0] - 1, entries[:, 1] - 1)), (n_features, n_cells)
    )
    return coo.T.tocsr()


def test_unsorted_entries_with_duplicates_are_summed(tmp_path):
    entries = _random_entries(30, 50, 600)
    folder = write_folder(tmp_path / "f", entries, 30, 50)
    with open_counts(folder) as counts:
        x = _csr(counts, 8)
    expected = _scipy(entries, 30, 50)
    assert expected.nnz < len(entries)  # duplicates there are
    _same(x, expected)
    # two entries of one place: 2 + 5
    folder = write_folder(tmp_path / "g", [(2, 1, 2), (1, 1, 4), (2, 1, 5)], 2, 1)
    with open_counts(folder) as counts:
        [block] = counts.iter_blocks()
    assert (block.indices.tolist(), block.data.tolist()) == ([0, 1], [4, 7])


def test_real_values_and_blank_lines(tmp_path):
    folder = write_folder(
        tmp_path / "r", [(1, 1, 0.5), (2, 2, 1e3)], 2, 2, header=HEADER.replace("integer", "real")
    )
    path = folder / "matrix.mtx.gz"
    path.write_bytes(
        gzip.compress(gzip.decompress(path.read_bytes()).replace(b"\n2 2", b"\n\n2 2"))
    )
    with open_counts(folder) as counts:
        [block] = counts.iter_blocks()
    assert block.data.tolist() == [0.5, 1000.0]
    assert block.indices.tolist() == [0, 1]


def _force_spill(monkeypatch) -> list[np.ndarray]:
    """The temporary-file path for every matrix over 10 entries, buckets of 50 entries or fewer
    in groups of 3 cells (blocks span buckets), and text chunks of 64 bytes (entries split
    across chunk ends); returns the bucket bounds made."""
    monkeypatch.setattr(mtx, "MEMORY_NNZ", 10)
    monkeypatch.setattr(h5ad, "CSC_BUCKET_NNZ", 50)
    monkeypatch.setattr(mtx, "BUCKET_GRAIN", 3)
    monkeypatch.setattr(mtx_text, "CHUNK_BYTES", 64)
    bounds, real = [], mtx._bucket_bounds
    monkeypatch.setattr(mtx, "_bucket_bounds", lambda *a: bounds.append(real(*a)) or bounds[-1])
    return bounds


def _count_passes(monkeypatch) -> list[int]:
    """How many times the text is read, as a list of one number."""
    passes, real = [0], mtx.read_entries

    def counted(*args):
        passes[0] += 1
        return real(*args)

    monkeypatch.setattr(mtx, "read_entries", counted)
    return passes


def _cite_folder(tmp_path: Path) -> tuple[Path, np.ndarray, sp.csr_matrix]:
    """70 cells of 40 features, alternately genes and antibodies, entries in random order."""
    entries = _random_entries(40, 70, 900)
    types = ["Gene Expression", "Antibody Capture"] * 20
    folder = write_folder(tmp_path / "f", entries, 40, 70, types=types)
    return folder, entries, _scipy(entries, 40, 70)


def test_in_memory_path_reads_the_text_once(tmp_path, monkeypatch):
    folder, _, expected = _cite_folder(tmp_path)
    passes = _count_passes(monkeypatch)
    with open_counts(folder) as counts:
        _same(_csr(counts, 6), expected[:, 0::2])
        _same(_csr(counts, 4, 13, 41), expected[13:41, 0::2])
        _same(_csr(counts, 100), expected[:, 0::2])
    assert passes == [1]


def test_spill_path_equals_the_in_memory_path(tmp_path, monkeypatch):
    folder, entries, expected = _cite_folder(tmp_path)
    with open_counts(folder) as counts:
        in_memory, in_memory_part = _csr(counts, 6), _csr(counts, 4, 13, 41)
    _same(in_memory, expected[:, 0::2])
    _same(in_memory_part, expected[13:41, 0::2])
    bounds, passes = _force_spill(monkeypatch), _count_passes(monkeypatch)
    with open_counts(folder) as counts:
        _same(_csr(counts, 4), in_memory)
        [made] = bounds  # over all cells, once; several buckets, so several files each
        assert (made[0], made[-1], len(made) > 8) == (0, 70, True)
        assert (made[:-1] % 3 == 0).all()  # whole groups of BUCKET_GRAIN cells
        assert passes == [2]  # counting, then spilling
        tmp = Path(counts._tmp.name)
        assert list(tmp.iterdir()) == []  # each bucket's files deleted once read
        _same(_csr(counts, 5, 13, 41), in_memory_part)  # a second sweep spills again
        assert passes == [3]
        genes = entries[:, 0] % 2 == 1  # one counting pass for both: the gene entries per cell
        kept = np.bincount(entries[genes, 1] - 1, minlength=70)
        np.testing.assert_array_equal(counts._cell_nnz, kept)
    assert not tmp.exists()  # close removes the temporary folder


def test_modalities_of_a_folder(tmp_path, folder, monkeypatch):
    expected = scipy.io.mmread(folder / "matrix.mtx.gz").T.tocsr()  # genes, then antibodies
    with open_counts(folder, modalities=["rna", "adt"]) as counts:
        assert counts.modalities == ["rna", "adt"]
        assert counts.n_genes == 117
        _same(_csr(counts, 100), expected)
    # reading cells block by block, each modality transposes each of its buckets once
    cite, _, synthetic = _cite_folder(tmp_path)
    _force_spill(monkeypatch)
    passes = _count_passes(monkeypatch)
    with open_counts(cite, modalities=["adt", "rna"]) as counts:
        _same(_csr(counts, 4), sp.hstack([synthetic[:, 1::2], synthetic[:, 0::2]]).tocsr())
        spilled = [Path(p.counts._tmp.name) for p in counts.parts]
        assert all(folder.is_dir() for folder in spilled)
    assert passes == [4]  # per modality: counting, spilling
    assert not any(folder.exists() for folder in spilled)  # closing removes every spill


def test_inputs_are_not_modified(tmp_path, folder):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in copy.iterdir()}
    with open_counts(copy) as counts:
        list(counts.iter_blocks(100))
        assert len(counts.obs_names) == 1024
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in copy.iterdir()} == before
    assert sorted(p.name for p in copy.iterdir()) == sorted(before)


# Damaged folders: each an InputError of one line naming the file and the problem.


def _gzip_text(path: Path, edit) -> None:
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes()).decode()).encode()))


def _replace_line(n: int, text: str):
    def edit(s: str) -> str:
        lines = s.split("\n")
        lines[n] = text
        return "\n".join(lines)

    return edit


def _damage(folder: Path, case: str) -> tuple[str, str]:
    """Damage a good folder; the file and the message its error must name."""
    m = folder / "matrix.mtx.gz"
    if case == "bad header":
        _gzip_text(m, _replace_line(0, "%%MatrixMarket matrix coordinate"))
        return "matrix.mtx.gz", "bad Matrix Market header"
    if case == "no header":
        _gzip_text(m, lambda s: s.split("\n", 1)[1])
        return "matrix.mtx.gz", "has no Matrix Market header"
    if case == "pattern field":
        _gzip_text(m, _replace_line(0, HEADER.replace("integer", "pattern")))
        return "matrix.mtx.gz", "holds 'pattern' values"
    if case == "symmetric":
        _gzip_text(m, _replace_line(0, HEADER.replace("general", "symmetric")))
        return "matrix.mtx.gz", "is a 'symmetric' matrix"
    if case == "array":
        _gzip_text(m, _replace_line(0, HEADER.replace("coordinate", "array")))
        return "matrix.mtx.gz", "is a dense ('array') Matrix Market matrix"
    if case == "size line mismatch with barcodes":
        _gzip_text(m, _replace_line(2, "4 6 7"))
        return "matrix.mtx.gz", "size line says 6 cells but barcodes.tsv.gz lists 5 barcodes"
    if case == "size line mismatch with features":
        _gzip_text(m, _replace_line(2, "3 5 7"))
        return "matrix.mtx.gz", "size line says 3 features but features.tsv.gz lists 4"
    if case == "bad size line":
        _gzip_text(m, _replace_line(2, "4 5"))
        return "matrix.mtx.gz", "bad size line '4 5'"
    if case == "too few entries":
        _gzip_text(m, _replace_line(2, "4 5 8"))
        return "matrix.mtx.gz", "holds 7 entries but its size line says 8"
    if case == "too many entries":
        _gzip_text(m, _replace_line(2, "4 5 6"))
        return "matrix.mtx.gz", "line 10: more entries than the 6 of its size line"
    if case == "index out of range":
        _gzip_text(m, _replace_line(5, "4 6 1"))
        return "matrix.mtx.gz", "line 6: column 6 is outside 1..5"
    if case == "index zero":
        _gzip_text(m, _replace_line(4, "0 1 1"))
        return "matrix.mtx.gz", "line 5: row 0 is outside 1..4"
    if case == "non-numeric value":
        _gzip_text(m, _replace_line(6, "2 3 x7"))
        return "matrix.mtx.gz", "line 7: 'x7' is not an integer"
    if case == "two fields":
        _gzip_text(m, _replace_line(6, "2 3"))
        return "matrix.mtx.gz", "line 7: 2 fields where an entry has 3"
    if case == "negative value":  # the check of every reader (io.base)
        _gzip_text(m, _replace_line(6, "2 3 -1"))
        return "rna", "matrix.mtx.gz holds negative values"
    if case == "truncated gzip":
        data = m.read_bytes()
        m.write_bytes(data[: len(data) - 12])
        return "matrix.mtx.gz", "truncated or corrupt gzip"
    if case == "corrupt gzip":
        data = bytearray(m.read_bytes())
        data[-6] ^= 0xFF  # the CRC
        m.write_bytes(bytes(data))
        return "matrix.mtx.gz", "truncated or corrupt gzip"
    if case == "missing barcodes file":
        (folder / "barcodes.tsv.gz").unlink()
        return "rna", "without its barcodes file (barcodes.tsv.gz or barcodes.tsv)"
    if case == "missing features file":
        (folder / "features.tsv.gz").unlink()
        return "rna", "without its features file"
    if case == "ragged features":
        _gzip_text(folder / "features.tsv.gz", _replace_line(2, "ENSG2"))
        return "features.tsv.gz", "line 3 has 1 tab-separated fields, line 1 has 3"
    raise AssertionError(case)


DAMAGE = [
    "bad header", "no header", "pattern field", "symmetric", "array",
    "size line mismatch with barcodes", "size line mismatch with features", "bad size line",
    "too few entries", "too many entries", "index out of range", "index zero",
    "non-numeric value", "two fields", "negative value", "truncated gzip", "corrupt gzip",
    "missing barcodes file", "missing features file", "ragged features",
]  # fmt: skip


def _good(tmp_path: Path) -> Path:
    entries = [(1, 1, 3), (4, 1, 1), (2, 2, 2), (2, 3, 5), (3, 4, 1), (1, 5, 2), (4, 5, 9)]
    return write_folder(tmp_path / "rna", entries, 4, 5)


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_folder_is_one_input_error(tmp_path, case):
    folder = _good(tmp_path)
    with open_counts(folder) as counts:  # the folder is good before the damage
        assert _csr(counts).sum() == 23
    name, message = _damage(folder, case)
    with pytest.raises(InputError) as e, open_counts(folder) as counts:
        list(counts.iter_blocks())
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(f"{folder / name}: " if name != "rna" else f"{folder}: ")
    assert message in text


def test_folder_options_and_folders_without_a_matrix(tmp_path, folder):
    with pytest.raises(InputError, match="which has no layers"):
        open_counts(folder, layer="counts")
    with pytest.raises(InputError, match="whose features name no genome"):
        open_counts(folder, genome="GRCh38")
    with pytest.raises(InputError, match="has no modality 'atac'"):
        open_counts(folder, modalities=["atac"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"is a directory without matrix\.mtx\.gz or matrix\.mtx,"):
        open_counts(tmp_path / "empty")
    no_cells = write_folder(tmp_path / "none", [], 3, 0)
    with pytest.raises(InputError, match=r"matrix\.mtx\.gz holds no cells"):
        open_counts(no_cells)


# The CLI.


def test_cli_inspect_folder(folder):
    result = CliRunner().invoke(cli, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "10x-mtx"
    assert report["matrix"] == "matrix.mtx.gz"
    assert (report["n_cells"], report["n_genes"]) == (1024, 100)
    assert (report["nnz"], report["total_counts"]) == (5_728, 10_694)
    assert report["integer_counts"] is True


def test_cli_inspect_damaged_folder_exits_3(tmp_path):
    folder = _good(tmp_path)
    _damage(folder, "index out of range")
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {folder / 'matrix.mtx.gz'}: line 6: column 6 is outside")
    assert "Traceback" not in result.output


def test_cli_embed_folder_to_a_new_h5ad(tmp_path, folder, served_bundle):
    import anndata as ad

    out = tmp_path / "e.h5ad"
    args = ["embed", str(folder), "--model", str(served_bundle), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--min-gene-fraction", "0", "--json"])
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(out)
    assert written.obsm["X_scGPT"].shape == (1024, 64)
    with open_counts(folder) as counts:  # its gene expression, as for a 10x .h5
        assert written.var_names.tolist() == counts.var["name"].tolist()
        expected = np.concatenate([b.to_dense() for b in counts.iter_blocks()])
    np.testing.assert_array_equal(written.X.toarray(), expected)
