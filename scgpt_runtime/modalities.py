"""Multi-omics: the modalities a model reads, and matching a file's modalities to them.

A model's modality is a name (the training file's: "rna", "adt"), a vocabulary namespace
("gene", "protein", "peak") and the tokens a cell may have of it. A file's modality is
matched to the model's of the same name, else to the only one of the same namespace; its
features are matched to the tokens of that namespace only, so the protein CD4 never feeds the
gene CD4. A file's modality holds genes, proteins or peaks by its features' type (10x
`feature_types`) or, failing that, by its name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError
from .genes import GeneMatch, match_genes
from .io.multimodal import ModalityPart, MultiModalMatrix, feature_index
from .tokens import ModalityColumns
from .vocab import GENE, Vocab

log = logging.getLogger(__name__)

PROTEIN, PEAK = "protein", "peak"
BY_FEATURE_TYPE = {"Gene Expression": GENE, "Antibody Capture": PROTEIN, "Peaks": PEAK}
BY_NAME = {
    **dict.fromkeys(("rna", "gex", "gene", "genes"), GENE),
    **dict.fromkeys(("adt", "prot", "protein", "proteins", "cite"), PROTEIN),
    **dict.fromkeys(("atac", "peak", "peaks", "chromatin"), PEAK),
}
# Antibody names carry the panel's product suffix in some files (CD3_TotalSeqB): not a protein.
_ANTIBODY_SUFFIX = re.compile(r"_TotalSeq[ABC]$")


@dataclass(frozen=True)
class Modality:
    """A modality a model reads: saved with the run and in the bundle (docs/bundle-format.md)."""

    name: str  # as in the training file: "rna", "adt", "atac"
    namespace: str  # of its tokens in the vocabulary
    max_tokens: int  # per cell; beyond that its most expressed features are kept

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Modality:
        name, namespace, n = d["name"], d["namespace"], d["max_tokens"]
        if not (isinstance(name, str) and isinstance(namespace, str) and isinstance(n, int)):
            raise ValueError(f"a modality is a name, a namespace and max_tokens, not {d!r}")
        if n < 1:
            raise ValueError(f"modality {name}: max_tokens must be at least 1, not {n}")
        return cls(name, namespace, n)


def namespace_of(part: ModalityPart) -> str | None:
    """What a file's modality holds: by its features' single type, else by its name."""
    for column in ("feature_types", "feature_type"):
        types = part.counts.var.get(column)
        if types is not None and len(set(types.tolist())) == 1:
            found = BY_FEATURE_TYPE.get(str(types[0]))
            if found is not None:
                return found
    return BY_NAME.get(part.name.lower())


def feature_names(part: ModalityPart, namespace: str) -> dict[str, np.ndarray]:
    """The identifier columns matched: a gene modality's var; other features by their name
    (proteins without a TotalSeq product suffix)."""
    if namespace == GENE:
        return part.counts.var
    names = feature_index(part.counts.var)
    if namespace == PROTEIN:
        names = np.array([_ANTIBODY_SUFFIX.sub("", str(n)) for n in names], dtype=object)
    return {"index": names}


@dataclass(frozen=True)
class ModalityMatch:
    """A file's features matched to a model's modalities (one GeneMatch per modality)."""

    matches: dict[str, GeneMatch]  # model modality -> its match; absent: not in the file
    columns: ModalityColumns  # which columns feed which model modality
    column_ids: np.ndarray  # (n_cols,) int64 vocabulary id per column, -1 = not used
    parts: dict[str, str]  # model modality -> the file's modality that feeds it

    @property
    def column(self) -> str:
        """The gene column of the gene modality (what a single-modality match reports)."""
        return next(iter(self.matches.values())).column

    @property
    def n_matched(self) -> int:
        return int((self.column_ids >= 0).sum())

    def missing(self, counts: MultiModalMatrix, start: int, stop: int) -> dict[str, int]:
        """Model modality -> cells of [start, stop) that lack it (embedded from the others),
        each count above 0 also logged as a warning."""
        present, n = counts.presence(start, stop), stop - start
        missing = {m: n - int(present[f].sum()) for m, f in self.parts.items()}
        for model, lacking in missing.items():
            if lacking:
                log.warning(
                    "%s: %d of %d cells lack modality %s; they are embedded from what they have",
                    counts.path,
                    lacking,
                    n,
                    self.parts[model],
                )
        return missing

    def to_dict(self) -> dict:
        return {
            model: {"file_modality": self.parts[model], **match.to_dict()}
            for model, match in self.matches.items()
        }


def match_modalities(
    counts: MultiModalMatrix,
    vocab: Vocab,
    modalities: Sequence[Modality],
    *,
    gene_column: str | None = None,
    min_fraction: float,
    panel: list[str] | None = None,
) -> ModalityMatch:
    """Match the file's modalities to the model's; a model modality the file lacks is left
    out (its cells have none of its tokens); none matched at all is an InputError."""
    column_ids = np.full(counts.n_genes, -1, dtype=np.int64)
    which = np.full(counts.n_genes, -1, dtype=np.int64)
    matches, parts = {}, {}
    for k, modality in enumerate(modalities):
        part = _file_part(counts, modality)
        if part is None:
            continue
        match = match_genes(
            feature_names(part, modality.namespace),
            vocab,
            gene_column=gene_column if modality.namespace == GENE else None,
            min_fraction=min_fraction,
            source=f"{counts.path} (modality {part.name})",
            panel=panel if modality.namespace == GENE else None,
            namespace=modality.namespace,
        )
        column_ids[part.columns] = match.column_ids
        which[part.columns] = np.where(match.column_ids >= 0, k, -1)
        matches[modality.name], parts[modality.name] = match, part.name
    if not matches:
        wanted = ", ".join(f"{m.name} ({m.namespace})" for m in modalities)
        found = ", ".join(f"{p.name} ({namespace_of(p) or 'unknown'})" for p in counts.parts)
        raise InputError(f"{counts.path}: none of its modalities {found} is one of {wanted}")
    budgets = tuple(m.max_tokens for m in modalities)
    return ModalityMatch(matches, ModalityColumns(which, budgets), column_ids, parts)


def _file_part(counts: MultiModalMatrix, modality: Modality) -> ModalityPart | None:
    """The file's modality of the model's: same name and namespace, else the only one of the
    namespace; two of the namespace and none of the name is an InputError."""
    same = [p for p in counts.parts if namespace_of(p) == modality.namespace]
    named = [p for p in same if p.name == modality.name]
    if named or len(same) == 1:
        return (named or same)[0]
    if len(same) > 1:
        raise InputError(
            f"{counts.path}: modalities {', '.join(p.name for p in same)} all hold "
            f"{modality.namespace} features; name the one for {modality.name} with --modalities"
        )
    return None
