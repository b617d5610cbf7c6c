"""Matching a file's genes to the model vocabulary."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GeneMatchError, InputError
from .vocab import GENE, SPECIALS, Vocab

# Identifier columns, most preferred first: CELLxGENE's feature_name is what the official
# vocabulary was built from; symbols before Ensembl ids; the var index last but one.
GENE_COLUMNS = (
    "feature_name",
    "gene_symbols",
    "gene_symbol",
    "gene_name",
    "gene_names",
    "symbol",
    "name",
    "index",
    "gene_ids",
    "gene_id",
    "feature_id",
    "ensembl_id",
    "id",
)
MIN_GENE_FRACTION = 0.5  # default share of the possible genes that must match (GeneMatch.fraction)
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GT]\d{6,})\.\d+$")


@dataclass(frozen=True)
class GeneMatch:
    """Which file gene feeds which vocabulary token."""

    column: str  # the var column whose names were matched
    column_ids: np.ndarray  # (n_genes,) int64 vocabulary id per file gene, -1 = not used
    n_total: int
    n_vocab_genes: int  # vocabulary size without the special tokens
    n_duplicates: int  # genes dropped because an earlier gene already took their token
    unmatched_examples: list[str]

    @property
    def n_matched(self) -> int:
        return int((self.column_ids >= 0).sum())

    @property
    def fraction(self) -> float:
        """Matched share of the smaller gene set: the file's genes or the vocabulary's.

        A model with a small vocabulary (a few thousand genes) then fully matches a
        whole-transcriptome file, and a panel of 500 genes fully matches a whole-human model.
        """
        possible = min(self.n_total, self.n_vocab_genes)
        return self.n_matched / possible if possible else 0.0

    def to_dict(self) -> dict:
        return {
            "gene_column": self.column,
            "n_genes": self.n_total,
            "n_matched": self.n_matched,
            "fraction_matched": round(self.fraction, 4),
            "n_duplicates": self.n_duplicates,
            "unmatched_examples": self.unmatched_examples,
        }


def read_gene_list(path: str | Path) -> list[str]:
    """Gene names of a text file, one per line: blank lines, # comments and the spaces around
    a name are ignored, repeats kept once."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable text file of gene names ({e})") from e
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise InputError(f"{path}: lists no genes; give one gene name per line")
    return list(dict.fromkeys(names))


def strip_versions(names: np.ndarray) -> np.ndarray:
    """Ensembl ids without their version suffix (ENSG00000141510.17 -> ENSG00000141510)."""
    out = np.array([str(n) for n in names], dtype=object)
    for i in [i for i, n in enumerate(out) if n.startswith("ENS") and "." in n]:
        out[i] = _ENSEMBL_VERSION.sub(r"\1", out[i])
    return out


def default_gene_column(var: dict[str, np.ndarray]) -> str:
    """The identifier column used when no vocabulary decides: the first preferred one present."""
    for name in GENE_COLUMNS:
        if name in var:
            return name
    return next(iter(var))


def match_genes(
    var: dict[str, np.ndarray],
    vocab: Vocab,
    *,
    gene_column: str | None = None,
    min_fraction: float = MIN_GENE_FRACTION,
    source: str = "input",
    panel: list[str] | None = None,
    namespace: str = GENE,
) -> GeneMatch:
    """Match genes to `vocab` on `gene_column`, or on the identifier column that matches most.

    Matching is exact and case-sensitive after stripping Ensembl version suffixes. Where two
    genes map to one token the first (lowest column index) keeps it. With a gene `panel` (the
    genes a model was restricted to), genes outside it are not used and the fraction counts
    against the panel. Raises GeneMatchError when fewer than `min_fraction` of the possible
    matches do (see `GeneMatch.fraction`). Features of another modality match the tokens of
    their `namespace` ("protein", "peak") instead of genes.
    """
    if gene_column is not None and gene_column not in var:
        raise GeneMatchError(
            f"{source}: has no gene column {gene_column!r} (available: {', '.join(var)})"
        )
    candidates = [gene_column] if gene_column else _candidates(var)
    scored = [(c, vocab.lookup(strip_versions(var[c]), namespace)) for c in candidates]
    column, ids = max(scored, key=lambda s: int((s[1] >= 0).sum()))  # first wins ties
    n_total = len(ids)
    ids = ids.copy()
    matched = np.flatnonzero(ids >= 0)
    _, first = np.unique(ids[matched], return_index=True)
    duplicate = np.ones(len(matched), dtype=bool)
    duplicate[first] = False
    ids[matched[duplicate]] = -1
    unmatched = [str(n) for n in var[column][ids < 0][:5]]
    n_vocab_genes = vocab.namespaces.count(namespace)
    if namespace == GENE:
        n_vocab_genes -= sum(s in vocab for s in SPECIALS)
    if panel is not None:
        ids[~np.isin(ids, vocab.lookup(panel))] = -1
        n_vocab_genes = len(panel)
    match = GeneMatch(column, ids, n_total, n_vocab_genes, int(duplicate.sum()), unmatched)
    if n_total == 0 or match.fraction < min_fraction:
        raise GeneMatchError(_mismatch(match, var, vocab, source, min_fraction), match, list(var))
    return match


def _mismatch(
    match: GeneMatch, var: dict[str, np.ndarray], vocab: Vocab, source: str, min_fraction: float
) -> str:
    """What matched, and what the file's and the vocabulary's names look like."""
    possible = min(match.n_total, match.n_vocab_genes)
    names = var[match.column] if match.column in var else np.array([])
    genes = [n for n in vocab.names if n not in SPECIALS]
    file_kind, vocab_kind = name_kind(names), name_kind(genes)
    text = (
        f"{source}: only {match.n_matched:,} of {possible:,} possible genes "
        f"({match.fraction:.0%}) match the model vocabulary, {min_fraction:.0%} are needed; "
        f"the file's column {match.column} holds {file_kind}, e.g. "
        f"{', '.join(match.unmatched_examples[:3])}; the vocabulary {vocab_kind}, e.g. "
        f"{', '.join(genes[:3])}"
    )
    if "mouse" in file_kind and "human" in vocab_kind:
        text += ": a mouse file for a human model (map its genes to human orthologs first)"
    return text


def name_kind(names: np.ndarray | list[str]) -> str:
    """What gene names look like: Ensembl ids (human, mouse), symbols in upper case (human
    style) or capitalised (mouse style), or other names."""
    sample = [str(n) for n in list(names)[:2000]]
    if not sample:
        return "no names"

    def share(test) -> float:
        return sum(map(test, sample)) / len(sample)

    if share(lambda n: n.startswith("ENSG")) > 0.5:
        return "human Ensembl ids"
    if share(lambda n: n.startswith("ENSMUSG")) > 0.5:
        return "mouse Ensembl ids"
    if share(lambda n: n.startswith("ENS")) > 0.5:
        return "Ensembl ids"
    if share(str.isdigit) > 0.5:
        return "numbers"
    if share(lambda n: n[:1].isupper() and n[1:] != n[1:].upper()) > 0.5:
        return "capitalised symbols (mouse style)"
    if share(lambda n: n == n.upper() and any(c.isalpha() for c in n)) > 0.5:
        return "upper-case symbols (human style)"
    return "other names"


def _candidates(var: dict[str, np.ndarray]) -> list[str]:
    """Identifier columns: the preferred names, then any column of mostly distinct values
    (which leaves out feature_type, genome and other annotations)."""
    preferred = [c for c in GENE_COLUMNS if c in var]
    return preferred + [
        c for c in var if c not in preferred and len(set(var[c])) > 0.5 * len(var[c])
    ]
