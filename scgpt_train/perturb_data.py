"""A perturbation screen in memory, and the model inputs of perturbation prediction.

A screen is cells with a condition label: the control (`ctrl`, or `--control`), a single
perturbation (`STAT1+ctrl`, GEARS style, or a plain `STAT1`) or a combination (`STAT1+JAK2`).
The panel is the file's genes that are in the run's vocabulary. Each cell is kept as two dense
panel rows: its bins (the model input, zeros included as bin 0) and its log1p(CP10k) values
(the training target and the unit of every metric; CP10k over all the file's genes).

A model input is one control cell with the condition's genes flagged: <cls>, then one extra
token per target outside the panel (its gene, the mask value, flag 1), then the panel genes
with the control cell's bins (flag 1 on a target that is a panel gene). Where that is longer
than `max_len`, the panel is cut into chunks; the flagged genes are in every chunk.
numpy and the runtime only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scgpt_runtime.errors import InputError
from scgpt_runtime.genes import match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.obs import obs_strings, parse_where, selected
from scgpt_runtime.preprocess import CP10K, log1p, normalize_total
from scgpt_runtime.tokens import TokenConfig, bin_dense
from scgpt_runtime.vocab import Vocab

FLAG_NONE, FLAG_PERTURBED, FLAG_PAD = 0, 1, 2  # the official perturbation flag values
N_FLAGS = 3
MASK_VALUE = -1.0  # value of a flagged gene that was not measured: "unknown", as in GEP
MAX_LEN = 1536  # tokens per input: the official perturbation max_seq_len


def condition_targets(label: str, control: str) -> tuple[str, ...]:
    """The perturbed genes of a condition label: () for the control; `STAT1+ctrl` and `STAT1`
    -> ("STAT1",); `STAT1+JAK2` -> ("STAT1", "JAK2"), sorted (a combination has no order)."""
    if label == control:
        return ()
    return tuple(sorted({g for g in label.split("+") if g and g != "ctrl"}))


@dataclass
class Screen:
    """The cells of a screen as dense panel rows, with their conditions."""

    path: str
    genes: list[str]  # panel genes (in the vocabulary), file order
    gene_ids: np.ndarray  # (G,) their vocabulary ids
    bins: np.ndarray  # (n, G) float32 model input values
    expression: np.ndarray  # (n, G) float32 log1p(CP10k)
    conditions: np.ndarray  # (n,) object: the label of each cell, as given
    targets: dict[str, tuple[str, ...]]  # condition label -> its genes; the control -> ()
    control: str

    @property
    def is_control(self) -> np.ndarray:
        return self.conditions == self.control

    def perturbations(self) -> list[str]:
        """The non-control condition labels, sorted."""
        return sorted(c for c in self.targets if c != self.control)

    def cells_of(self, condition: str) -> np.ndarray:
        return np.flatnonzero(self.conditions == condition)

    def centroid(self, condition: str) -> np.ndarray:
        """(G,) mean log1p(CP10k) of a condition's cells: its pseudobulk."""
        return self.expression[self.cells_of(condition)].mean(axis=0)

    def column(self, gene: str) -> int:
        """The panel column of a gene; -1 when it is not in the panel."""
        return self.genes.index(gene) if gene in self.genes else -1

    def outside(self, targets: tuple[str, ...]) -> list[str]:
        """The targets that are not panel genes: each an extra flagged token."""
        return [g for g in targets if self.column(g) < 0]

    def control_mean(self) -> np.ndarray:
        """(G,) mean log1p(CP10k) of the control cells."""
        return self.expression[self.is_control].mean(axis=0)


def load_screen(
    path: str | Path,
    vocab: Vocab,
    tokens: TokenConfig,
    key: str | None,
    control: str,
    *,
    exclude: tuple[str, ...] = (),
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
    panel: list[str] | None = None,
) -> Screen:
    """Read a screen: the cells passing `where`, without those whose condition is or contains
    an `exclude` entry; `key` None reads every cell as a control. The panel is the file's genes
    in the vocabulary, or the given `panel` (a run's; each must be in the file). InputError (one
    line) for a missing column, a missing control or a target outside the vocabulary."""
    with open_counts(path) as counts:
        match = match_genes(counts.var, vocab, gene_column=gene_column, source=str(path))
        if key is None:
            conditions = np.full(counts.n_cells, control, dtype=object)
        else:
            conditions = obs_strings(counts.read_obs(key))
        keep = selected(counts, parse_where(where))
        blocks = list(counts.iter_blocks(4096))
    keep &= np.array([c is not None for c in conditions])
    for item in exclude:
        keep &= np.array([c != item and item not in str(c).split("+") for c in conditions])
    if not (keep & (conditions == control)).any():
        seen = ", ".join(sorted({str(c) for c in conditions[keep]})[:8])
        raise InputError(f"{path}: no cell has {key} == {control!r} (the control; seen: {seen})")
    targets = {c: condition_targets(c, control) for c in sorted(set(conditions[keep].tolist()))}
    for label, genes in targets.items():
        missing = [g for g in genes if g not in vocab]
        if missing or (label != control and not genes):
            n = int((conditions[keep] == label).sum())
            name = missing[0] if missing else label
            raise InputError(
                f"{path}: condition {label!r} ({n} cells): {name!r} is not a gene of the "
                f"vocabulary; leave it out with --exclude-target {name}"
            )
    columns = panel_columns(path, match.column_ids, vocab, panel)
    gene_ids = match.column_ids[columns]
    bins, expression = [], []
    for block in blocks:
        bins.append(bin_dense(block, columns, gene_ids, tokens))
        expression.append(log1p(normalize_total(block, CP10K)).dense_columns(columns))
    rows = np.flatnonzero(keep)
    return Screen(
        path=str(path),
        genes=[vocab.names[i] for i in gene_ids],
        gene_ids=gene_ids,
        bins=np.concatenate(bins)[rows],
        expression=np.concatenate(expression)[rows].astype(np.float32),
        conditions=conditions[rows],
        targets=targets,
        control=control,
    )


def panel_columns(
    path: str | Path, column_ids: np.ndarray, vocab: Vocab, panel: list[str] | None
) -> np.ndarray:
    """File columns of the panel: every matched gene, or those of `panel` in its order."""
    if panel is None:
        return np.flatnonzero(column_ids >= 0)
    where = {int(i): c for c, i in enumerate(column_ids) if i >= 0}
    ids = vocab.lookup(panel)
    missing = [g for g, i in zip(panel, ids, strict=True) if int(i) not in where]
    if missing:
        raise InputError(
            f"{path}: {len(missing)} of the run's {len(panel)} panel genes are not in the file "
            f"(first: {missing[0]})"
        )
    return np.array([where[int(i)] for i in ids], dtype=np.int64)


def pair_controls(n: int, controls: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A control cell drawn at random (with replacement) for each of `n` examples."""
    return controls[rng.integers(0, len(controls), size=n)]


@dataclass
class PertInputs:
    """Model inputs (B, L) of one minibatch; `columns` are the panel columns at positions
    `offset`, `offset` + 1, ... of every row."""

    gene_ids: np.ndarray
    values: np.ndarray
    padding_mask: np.ndarray
    flags: np.ndarray
    columns: np.ndarray
    offset: int


def panel_chunks(n_genes: int, flagged: np.ndarray, room: int) -> list[np.ndarray]:
    """The panel columns cut into chunks of at most `room` columns, each holding all the
    `flagged` ones and a contiguous share of the others (all columns when they fit)."""
    if n_genes <= room:
        return [np.arange(n_genes)]
    if len(flagged) >= room:
        raise ValueError(f"{len(flagged)} flagged genes leave no room in {room} panel tokens")
    others = np.setdiff1d(np.arange(n_genes), flagged)
    n_chunks = -(-len(others) // (room - len(flagged)))
    return [np.sort(np.concatenate([flagged, c])) for c in np.array_split(others, n_chunks)]


def sampled_columns(
    n_genes: int, flagged: np.ndarray, room: int, rng: np.random.Generator
) -> np.ndarray:
    """A random training subset of `room` panel columns that keeps every flagged one."""
    if n_genes <= room:
        return np.arange(n_genes)
    others = rng.permutation(np.setdiff1d(np.arange(n_genes), flagged))
    return np.sort(np.concatenate([flagged, others[: room - len(flagged)]]))


def make_inputs(
    screen: Screen,
    control_rows: np.ndarray,
    targets: list[tuple[str, ...]],
    vocab: Vocab,
    tokens: TokenConfig,
    columns: np.ndarray,
) -> PertInputs:
    """The inputs of control cells `control_rows` with `targets[i]` flagged in row i, over
    the panel `columns` (which must hold every flagged panel gene)."""
    B = len(control_rows)
    extras = [screen.outside(t) for t in targets]
    E = max((len(e) for e in extras), default=0)
    L = 1 + E + len(columns)
    gene_ids = np.full((B, L), vocab.pad_id, dtype=np.int64)
    values = np.full((B, L), tokens.pad_value, dtype=np.float32)
    flags = np.full((B, L), FLAG_PAD, dtype=np.int64)
    gene_ids[:, 0], values[:, 0], flags[:, 0] = vocab.cls_id, tokens.cls_value, FLAG_NONE
    for i, extra in enumerate(extras):
        n = len(extra)
        gene_ids[i, 1 : 1 + n] = vocab.lookup(extra)
        values[i, 1 : 1 + n], flags[i, 1 : 1 + n] = MASK_VALUE, FLAG_PERTURBED
    gene_ids[:, 1 + E :] = screen.gene_ids[columns]
    values[:, 1 + E :] = screen.bins[np.ix_(control_rows, columns)]
    flags[:, 1 + E :] = FLAG_NONE
    position = {int(c): 1 + E + j for j, c in enumerate(columns)}
    for i, t in enumerate(targets):
        for g in t:
            col = screen.column(g)
            if col >= 0:
                if col not in position:
                    raise ValueError(f"flagged gene {g} is not among the columns")
                flags[i, position[col]] = FLAG_PERTURBED
    return PertInputs(gene_ids, values, flags == FLAG_PAD, flags, columns, 1 + E)


def flagged_columns(screen: Screen, targets: list[tuple[str, ...]]) -> np.ndarray:
    """The panel columns of every target gene of `targets` (sorted, distinct)."""
    cols = {screen.column(g) for t in targets for g in t}
    return np.array(sorted(c for c in cols if c >= 0), dtype=np.int64)
