"""Cells of several modalities for multi-omics fine-tuning: the model's modalities, its
vocabulary grown by the new features, and the cells tokenized by the runtime (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scgpt_runtime.errors import InputError
from scgpt_runtime.genes import MIN_GENE_FRACTION
from scgpt_runtime.io import open_counts
from scgpt_runtime.io.multimodal import MultiModalMatrix
from scgpt_runtime.modalities import (
    Modality,
    feature_names,
    match_modalities,
    namespace_of,
)
from scgpt_runtime.obs import obs_strings, parse_where, selected
from scgpt_runtime.tokens import TokenBlock, TokenConfig, tokenize
from scgpt_runtime.vocab import GENE, Vocab

from .cells import Cells


def open_modalities(path: str | Path, names: list[str]) -> MultiModalMatrix:
    """The modalities `names` of a .h5mu or 10x file (open_counts refuses other files)."""
    return open_counts(path, modalities=names)


def plan_modalities(path: str | Path, names: list[str], gene_tokens: int) -> list[Modality]:
    """The model's modalities, in the order given: a gene modality of `gene_tokens` tokens per
    cell, every other of all its features (at most `gene_tokens`). Exactly one must hold genes
    (the part the pretrained model knows), and each must say what it holds."""
    with open_modalities(path, names) as counts:
        out = []
        for part in counts.parts:
            namespace = namespace_of(part)
            if namespace is None:
                raise InputError(
                    f"{path}: cannot tell whether modality {part.name} holds genes, proteins or "
                    "peaks (no feature_types; its name is not rna, adt, prot, atac, ...)"
                )
            budget = gene_tokens if namespace == GENE else min(part.counts.n_genes, gene_tokens)
            out.append(Modality(part.name, namespace, budget))
    genes = [m.name for m in out if m.namespace == GENE]
    if len(genes) != 1:
        raise InputError(
            f"{path}: --modalities must name one modality of genes, not {len(genes)} "
            f"({', '.join(f'{m.name}: {m.namespace}' for m in out)})"
        )
    return out


def extend_vocab(vocab: Vocab, paths: list[str], modalities: list[Modality]) -> Vocab:
    """`vocab` with every feature of the files' non-gene modalities appended (in namespace and
    file order) to the namespace the modality holds; genes keep their ids."""
    names, namespaces = list(vocab.names), list(vocab.namespaces)
    for modality in [m for m in modalities if m.namespace != GENE]:
        have = set(vocab.lookup(vocab.names, modality.namespace).tolist())
        seen: dict[str, None] = {}
        for path in paths:
            with open_modalities(path, [m.name for m in modalities]) as counts:
                part = counts.part(modality.name)
                seen.update(
                    dict.fromkeys(map(str, feature_names(part, modality.namespace)["index"]))
                )
        new = [n for n in seen if n not in have]
        names += new
        namespaces += [modality.namespace] * len(new)
    return Vocab(names, namespaces)


def load_multiomic_cells(
    paths: list[str],
    vocab: Vocab,
    tokens: TokenConfig,
    modalities: list[Modality],
    *,
    batch_key: str | None = None,
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
) -> tuple[Cells, dict[str, np.ndarray]]:
    """The cells of `paths` passing every `where` filter, tokenized modality by modality, and
    per modality which cells it measured."""
    filters = parse_where(where)
    parts, names, batches = [], [], []
    present: dict[str, list[np.ndarray]] = {m.name: [] for m in modalities}
    for path in paths:
        with open_modalities(path, [m.name for m in modalities]) as counts:
            keep = selected(counts, filters)
            if not keep.any():
                raise InputError(f"{path}: no cell passes --where {' '.join(where)}")
            match = match_modalities(
                counts, vocab, modalities, gene_column=gene_column, min_fraction=MIN_GENE_FRACTION
            )
            blocks = [
                tokenize(b, match.column_ids, tokens, vocab.cls_id, vocab.pad_id, match.columns)
                for b in counts.iter_blocks()
            ]
            rows = np.flatnonzero(keep)
            parts.append(TokenBlock.concat(blocks).take(rows))
            names.append(np.asarray(counts.obs_names).astype(str)[keep])
            if batch_key:
                batches.append(obs_strings(counts.read_obs(batch_key))[keep])
            for name, mask in counts.presence().items():
                present[name].append(mask[keep])
    cells = Cells(
        tokens=TokenBlock.concat(parts),
        obs_names=np.concatenate(names),
        batches=np.concatenate(batches) if batch_key else None,
    )
    return cells, {k: np.concatenate(v) for k, v in present.items()}
