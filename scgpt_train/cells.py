"""Labelled cells in memory for fine-tuning and evaluation: obs filters (`--where`), label and
batch codes, stratified validation splits, minibatches. numpy and the runtime only (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scgpt_runtime.errors import InputError
from scgpt_runtime.io import open_counts
from scgpt_runtime.obs import obs_strings, parse_where, selected
from scgpt_runtime.tokens import TokenBlock, TokenConfig
from scgpt_runtime.vocab import Vocab

from .data import open_sources, read_tokens

MISSING = -1  # label / batch code of a cell without one; cross-entropy ignores it


@dataclass
class Cells:
    """Tokenized cells of one or more files with the obs columns asked for (None = missing)."""

    tokens: TokenBlock
    obs_names: np.ndarray  # (n,) str
    labels: np.ndarray | None = None  # (n,) object: str or None
    batches: np.ndarray | None = None  # (n,) object: str or None


def load_cells(
    paths: list[str] | list[Path],
    vocab: Vocab,
    tokens: TokenConfig,
    *,
    label_key: str | None = None,
    batch_key: str | None = None,
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
) -> Cells:
    """Cells of `paths` that pass every `where` filter ("COL=VALUE"), tokenized in memory, with
    the obs columns `label_key` and `batch_key`. A missing column is an InputError naming the
    file and the columns it has."""
    sources = open_sources([Path(p) for p in paths], vocab, gene_column)
    filters = parse_where(where)
    parts, names, labels, batches = [], [], [], []
    for source in sources:
        with open_counts(source.path) as counts:
            keep = selected(counts, filters)
            if label_key:
                labels.append(obs_strings(counts.read_obs(label_key))[keep])
            if batch_key:
                batches.append(obs_strings(counts.read_obs(batch_key))[keep])
            names.append(np.asarray(counts.obs_names).astype(str)[keep])
        if not keep.any():
            raise InputError(f"{source.path}: no cell passes --where {' '.join(where)}")
        parts.append(
            read_tokens(source, 0, source.n_cells, vocab, tokens).take(np.flatnonzero(keep))
        )
    return Cells(
        tokens=TokenBlock.concat(parts),
        obs_names=np.concatenate(names),
        labels=np.concatenate(labels) if label_key else None,
        batches=np.concatenate(batches) if batch_key else None,
    )


def codes_of(values: np.ndarray, names: list[str]) -> np.ndarray:
    """(n,) int64 index of each value in `names`; MISSING for None or a value not in names."""
    index = {n: i for i, n in enumerate(names)}
    return np.array([index.get(v, MISSING) for v in values.tolist()], dtype=np.int64)


def class_names(labels: np.ndarray, path: str, key: str) -> list[str]:
    """Sorted classes of the labelled cells; an InputError unless there are at least two."""
    classes = sorted({v for v in labels.tolist() if v is not None})
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "no label at all"
        raise InputError(
            f"{path}: obs column {key!r} has {found} among the selected cells; annotation "
            "needs at least two classes"
        )
    return classes


def stratified_split(
    codes: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of the cells with a code >= 0: `fraction` of each class
    (rounded; at least one, and one left to train, where the class has two or more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(codes[codes >= 0]):
        members = rng.permutation(np.flatnonzero(codes == c))
        n_val = round(fraction * len(members))
        if fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def minibatches(
    rows: np.ndarray, batch_size: int, rng: np.random.Generator, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """`rows` shuffled and cut into minibatches; with `groups` (a code per row) every minibatch
    holds one group only (DSBN trains on batch-pure minibatches), in shuffled order."""
    if groups is None:
        perm = rng.permutation(rows)
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    out = []
    for g in np.unique(groups):
        out += minibatches(rows[groups == g], batch_size, rng)
    return [out[i] for i in rng.permutation(len(out))]
