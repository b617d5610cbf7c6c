from __future__ import annotations

import numpy as np
import pytest

from scgpt_runtime.errors import GeneMatchError
from scgpt_runtime.genes import default_gene_column, match_genes, name_kind, strip_versions
from scgpt_runtime.vocab import Vocab


def _var(**cols):
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


VOCAB = Vocab.from_genes(["CD3E", "CD19", "MS4A1", "ENSG00000111640", "LYZ"])


def test_strip_versions_only_touches_ensembl_ids():
    names = np.array(["ENSG00000141510.17", "ENSMUSG00000059552.3", "HLA-A.1", "CD3E"])
    assert list(strip_versions(names)) == [
        "ENSG00000141510",
        "ENSMUSG00000059552",
        "HLA-A.1",
        "CD3E",
    ]


def test_best_column_wins_and_ids_follow_vocab():
    var = _var(
        index=["a", "b", "c", "d"],
        gene_ids=["ENSG1", "ENSG2", "ENSG00000111640.5", "ENSG4"],
        gene_symbols=["CD3E", "LYZ", "GAPDH", "XIST"],
    )
    m = match_genes(var, VOCAB, min_fraction=0.2)
    assert m.column == "gene_symbols"
    assert m.column_ids.tolist() == [VOCAB["CD3E"], VOCAB["LYZ"], -1, -1]
    assert (m.n_matched, m.n_total) == (2, 4)
    assert m.unmatched_examples == ["GAPDH", "XIST"]


def test_ensembl_versions_are_stripped_when_that_column_is_asked_for():
    var = _var(index=["x", "y"], gene_ids=["ENSG00000111640.15", "ENSG9"])
    m = match_genes(var, VOCAB, gene_column="gene_ids", min_fraction=0.5)
    assert m.column_ids.tolist() == [VOCAB["ENSG00000111640"], -1]


def test_duplicates_keep_the_first_gene():
    var = _var(index=["CD3E", "LYZ", "CD3E", "LYZ", "CD19"])
    m = match_genes(var, VOCAB)
    assert m.column_ids.tolist() == [VOCAB["CD3E"], VOCAB["LYZ"], -1, -1, VOCAB["CD19"]]
    assert m.n_duplicates == 2
    assert m.n_matched == 3


def test_matching_is_case_sensitive_and_specials_never_match():
    var = _var(index=["cd3e", "<pad>", "<cls>", "CD19"])
    m = match_genes(var, VOCAB, min_fraction=0.1)
    assert m.column_ids.tolist() == [-1, -1, -1, VOCAB["CD19"]]


def test_too_few_matches_is_an_error_naming_column_and_examples():
    var = _var(index=["Cd3e", "Lyz2", "Ms4a1", "CD19"])
    with pytest.raises(
        GeneMatchError,
        match=r"mouse.h5ad: only 1 of 4 possible genes \(25%\).*column index.*Cd3e, Lyz2",
    ):
        match_genes(var, VOCAB, source="mouse.h5ad")


def test_fraction_is_of_the_smaller_gene_set():
    # a whole-transcriptome file against a small vocabulary: 5 of 5 possible, not 5 of 25
    names = [*VOCAB.names[:5], *(f"G{i}" for i in range(20))]
    m = match_genes(_var(index=names), VOCAB, min_fraction=0.9)
    assert (m.n_matched, m.n_total, m.fraction) == (5, 25, 1.0)
    # a small panel against the same vocabulary: 2 of 3 possible
    m = match_genes(_var(index=["CD3E", "LYZ", "XIST"]), VOCAB)
    assert m.fraction == pytest.approx(2 / 3)


def test_unknown_gene_column_lists_the_available_ones():
    with pytest.raises(
        GeneMatchError, match=r"no gene column 'symbol' \(available: index, gene_ids"
    ):
        match_genes(_var(index=["CD3E"], gene_ids=["E1"]), VOCAB, gene_column="symbol")


def test_no_genes_at_all_is_an_error():
    with pytest.raises(GeneMatchError, match="only 0 of 0 possible genes"):
        match_genes(_var(index=[]), VOCAB)


def test_default_gene_column_prefers_feature_name_then_symbols():
    assert default_gene_column(_var(index=[1], feature_name=[1], gene_ids=[1])) == "feature_name"
    assert default_gene_column(_var(gene_ids=[1], index=[1])) == "index"
    assert default_gene_column(_var(id=[1], name=[1])) == "name"


@pytest.mark.parametrize(
    ("names", "kind"),
    [
        (["ENSG00000141510", "ENSG00000000003"], "human Ensembl ids"),
        (["ENSMUSG00000051951", "ENSMUSG00000025900"], "mouse Ensembl ids"),
        (["Cd3e", "Lyz2", "Ms4a1"], "capitalised symbols (mouse style)"),
        (["CD3E", "LYZ", "HLA-DRA"], "upper-case symbols (human style)"),
        (["1", "2", "3"], "numbers"),
    ],
)
def test_the_kind_of_gene_names_is_told(names, kind):
    assert name_kind(names) == kind


def test_a_mouse_file_is_told_what_it_and_the_vocabulary_hold_without_cli_advice():
    """The API's message: facts about both sides, no command-line option to pass."""
    var = _var(index=["Cd3e", "Lyz2", "Ms4a1", "Cd19"], gene_ids=["ENSMUSG1", "E2", "E3", "E4"])
    with pytest.raises(GeneMatchError) as e:
        match_genes(var, VOCAB, source="mouse.h5ad")
    text = str(e.value)
    assert "holds capitalised symbols (mouse style), e.g. Cd3e" in text
    assert "the vocabulary upper-case symbols (human style)" in text
    assert "map its genes to human orthologs first" in text
    assert "--" not in text
    assert e.value.columns == ["index", "gene_ids"]
