"""MuData (.h5mu) reading, modality matching and per-modality tokens (torch-free)."""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from scgpt_runtime.cli import cli
from scgpt_runtime.errors import InputError
from scgpt_runtime.io import open_counts
from scgpt_runtime.io.multimodal import MultiModalMatrix
from scgpt_runtime.modalities import Modality, match_modalities, namespace_of
from scgpt_runtime.tokens import MODALITY, ModalityColumns, TokenConfig, tokenize
from scgpt_runtime.vocab import GENE, Vocab

mudata = pytest.importorskip("mudata")  # part of [test]; the reader itself needs only h5py

FILES = (
    "citefuse_eccite_pbmc_500cells.h5mu",
    "scvi_pbmc_10k_protein_v3_200cells.h5mu",
    "muon_pbmc_multiome_1000cells_test_rna_atac.h5mu",  # older layout: no obsmap, no attributes
)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def _read_mudata(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mudata.read_h5mu(path)


def _joint(counts: MultiModalMatrix, block_size: int) -> np.ndarray:
    return np.concatenate([b.to_dense() for b in counts.iter_blocks(block_size)])


@pytest.mark.parametrize("name", FILES)
def test_every_modality_equals_mudata(shared_data, name):
    path = shared_data / "wave2" / "multiomics" / name
    mdata = _read_mudata(path)
    with open_counts(path) as counts:
        assert counts.format == "h5mu"
        assert counts.modalities == list(mdata.mod)
        joint = _joint(counts, 97)
        assert np.array_equal(joint, _joint(counts, 4096))  # blocks never change a value
        assert list(counts.obs_names) == list(mdata.obs_names)
        for part in counts.parts:
            adata = mdata.mod[part.name]
            assert list(part.counts.var["index"]) == list(adata.var_names)
            # every cell's row of this modality, placed by the reader's map, is mudata's own
            expected = _dense(adata.X)[part.rows]
            assert np.array_equal(joint[:, part.columns], expected)  # exact values


def _write(tmp_path, missing_adt: int = 0, name="toy.h5mu"):
    """A MuData file of 6 cells: rna (genes A..E, one gene CD4) and adt (proteins CD4, CD8);
    the last `missing_adt` cells have no adt measurement."""
    rng = np.random.default_rng(0)
    cells = [f"c{i}" for i in range(6)]
    rna = ad.AnnData(rng.poisson(2.0, (6, 5)).astype(np.float32))
    rna.obs_names, rna.var_names = cells, ["A", "B", "C", "CD4", "E"]
    adt = ad.AnnData(rng.poisson(20.0, (6 - missing_adt, 2)).astype(np.float32) + 1)
    adt.obs_names, adt.var_names = cells[: 6 - missing_adt], ["CD4", "CD8_TotalSeqB"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mudata.MuData({"rna": rna, "adt": adt})
        m.write_h5mu(tmp_path / name)
    return tmp_path / name, rna, adt


def test_cells_missing_a_modality_have_no_values_there(tmp_path):
    path, _rna, adt = _write(tmp_path, missing_adt=2)
    with open_counts(path) as counts:
        joint = _joint(counts, 4)
        adt_part = counts.part("adt")
        assert adt_part.n_present == 4
        assert counts.presence()["adt"].tolist() == [True] * 4 + [False] * 2
        order = [list(counts.obs_names).index(c) for c in adt.obs_names]
        assert np.array_equal(joint[order][:, adt_part.columns], adt.X)
        missing = [list(counts.obs_names).index(c) for c in ("c4", "c5")]
        assert not joint[missing][:, adt_part.columns].any()


def _vocab() -> Vocab:
    genes = ["A", "B", "C", "CD4", "E", "<pad>", "<cls>", "<eoc>"]
    return Vocab([*genes, "CD4", "CD8"], [GENE] * len(genes) + ["protein", "protein"])


def test_proteins_match_their_own_namespace_and_tokens_carry_the_modality(tmp_path):
    path, _rna, _adt = _write(tmp_path)
    vocab = _vocab()
    modalities = [Modality("rna", GENE, 5), Modality("adt", "protein", 2)]
    cfg = TokenConfig(max_seq_len=8, n_bins=5)
    with open_counts(path) as counts:
        assert [namespace_of(p) for p in counts.parts] == [GENE, "protein"]
        match = match_modalities(counts, vocab, modalities, min_fraction=0.5)
        # the gene CD4 is id 3, the protein CD4 id 8: never confused; the suffix is dropped
        assert match.column_ids.tolist() == [0, 1, 2, 3, 4, 8, 9]
        assert match.columns.column.tolist() == [0] * 5 + [1, 1]
        block = next(counts.iter_blocks())
    tokens = tokenize(block, match.column_ids, cfg, vocab.cls_id, vocab.pad_id, match.columns)
    for row in range(6):
        n = tokens.n_genes[row]
        ids, mods = tokens.gene_ids[row, 1 : n + 1], tokens.inputs[MODALITY][row, 1 : n + 1]
        genes = ids[mods == 0]
        assert set(genes) <= {0, 1, 2, 3, 4}
        assert set(ids[mods == 1]) <= {8, 9}
        assert list(mods) == sorted(mods)  # <cls>, the genes, then the proteins
        assert tokens.padding_mask[row, n + 1 :].all()
        assert not tokens.padding_mask[row, : n + 1].any()
    # each modality is binned alone: its bins equal those of a tokenization of it alone
    alone = tokenize(
        block,
        np.where(match.columns.column == 1, match.column_ids, -1),
        TokenConfig(max_seq_len=3, n_bins=5),
        vocab.cls_id,
        vocab.pad_id,
    )
    proteins = tokens.inputs[MODALITY] == 1
    got = tokens.values[proteins].reshape(6, 2)
    assert np.array_equal(got, alone.values[:, 1:3])


def test_a_modality_over_its_budget_keeps_its_most_expressed_features():
    from scgpt_runtime.csr import CsrBlock

    x = np.array([[5, 1, 3, 0, 7, 2]], dtype=np.float32)  # genes 0-3, proteins 4-5
    block = CsrBlock.from_dense(x)
    vocab = Vocab(
        ["g0", "g1", "g2", "g3", "<pad>", "<cls>", "p0", "p1"], [GENE] * 6 + ["protein"] * 2
    )
    columns = ModalityColumns(np.array([0, 0, 0, 0, 1, 1]), (2, 2))
    cfg = TokenConfig(max_seq_len=5, n_bins=3)
    t = tokenize(block, np.array([0, 1, 2, 3, 6, 7]), cfg, vocab.cls_id, vocab.pad_id, columns)
    assert t.gene_ids[0].tolist() == [vocab.cls_id, 0, 2, 6, 7]  # g0 and g2 are the top genes
    assert t.inputs[MODALITY][0].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        tokenize(block, np.zeros(6, np.int64), TokenConfig(max_seq_len=4), 5, 4, columns)


def test_inspect_describes_each_modality(tmp_path):
    path, _, _ = _write(tmp_path, missing_adt=1)
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.output)
    mods = {m["name"]: m for m in report["modalities"]}
    assert mods["rna"]["holds"] == "gene"
    assert mods["adt"]["holds"] == "protein"
    assert (mods["rna"]["n_cells"], mods["adt"]["n_cells"]) == (6, 5)
    assert mods["adt"]["n_features"] == 2
    assert report["n_genes"] == 7


def _damage(path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    with h5py.File(path, "r+") as h5:
        if how == "obsmap out of range":
            h5["obsmap/adt"][0] = 99
        elif how == "axis 1":
            h5.attrs["axis"] = 1
        elif how == "no modalities":
            del h5["mod/rna"], h5["mod/adt"]


@pytest.mark.parametrize("how", ["truncated", "obsmap out of range", "axis 1", "no modalities"])
def test_damaged_h5mu_is_one_line_exit_3_and_never_modified(tmp_path, how):
    path, _, _ = _write(tmp_path)
    _damage(path, how)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.strip().splitlines() if "INFO" not in line]
    assert len(lines) == 1
    assert str(path) in lines[0]
    assert "Traceback" not in result.output
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_unknown_modality_names_the_file_and_its_modalities(tmp_path):
    path, _, _ = _write(tmp_path)
    with pytest.raises(
        InputError, match=r"toy.h5mu: has no modality 'prot' \(modalities: rna, adt\)"
    ):
        open_counts(path, modalities=["prot"])
