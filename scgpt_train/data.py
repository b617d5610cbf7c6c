"""Training data: tokenized cells streamed from many files in shuffled windows.

The corpus is a list of files; each is cut into chunks of consecutive cells. Every epoch the
chunks are permuted (seeded by seed and epoch) and read about `window_cells` at a time; a window's
training cells are tokenized with the runtime's own functions, permuted, and cut into global
batches. Global batches depend only on the seed, never on the world size: under DDP each rank
reads the same windows and keeps its own slice of every global batch, so 1 process with batch
B and 2 processes with B/2 each see the same cells. A held-out validation split is chosen per
cell by a hash of (seed, file index, cell index): fixed for a given seed and file list.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scgpt_runtime.binning import hash_uniform
from scgpt_runtime.errors import InputError
from scgpt_runtime.genes import MIN_GENE_FRACTION, default_gene_column, match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.io.base import CountMatrix
from scgpt_runtime.io.multimodal import MultiModalMatrix
from scgpt_runtime.modalities import namespace_of
from scgpt_runtime.tokens import TokenBlock, TokenConfig, tokenize
from scgpt_runtime.vocab import GENE, Vocab

STREAM_VALIDATION = 11  # hash stream of the validation split (the runtime uses 1 and 2)
STREAM_CHUNKS = 12  # hash stream of the chunk and cell permutations


@dataclass(frozen=True)
class Source:
    """One data file and the vocabulary id of each of its genes."""

    path: Path
    column_ids: np.ndarray
    n_cells: int


@dataclass(frozen=True)
class Position:
    """Where a stream stands: enough to resume exactly."""

    epoch: int = 0
    window: int = 0
    batch: int = 0  # global batches already taken from the window


def build_vocab(paths: list[Path], gene_column: str | None = None) -> Vocab:
    """A vocabulary of every gene name in `paths`, in order of first appearance."""
    names: dict[str, None] = {}
    for path in paths:
        with open_counts(path) as counts:
            var = gene_var(counts)
            column = gene_column or default_gene_column(var)
            if column not in var:
                raise InputError(
                    f"{path}: has no gene column {column!r} (available: {', '.join(var)})"
                )
            names.update(dict.fromkeys(str(n) for n in var[column]))
    return Vocab.from_genes(names)


def gene_var(counts: CountMatrix) -> dict[str, np.ndarray]:
    """The gene columns of a file: of its gene modality where it has several."""
    return counts.var if not isinstance(counts, MultiModalMatrix) else _gene_part(counts).counts.var


def _gene_columns(counts: CountMatrix) -> slice:
    """The columns of a file's genes: all, or its gene modality's."""
    return slice(None) if not isinstance(counts, MultiModalMatrix) else _gene_part(counts).columns


def _gene_part(counts: MultiModalMatrix):
    genes = [p for p in counts.parts if namespace_of(p) == GENE]
    if not genes:
        raise InputError(f"{counts.path}: none of its modalities holds genes")
    return genes[0]


def open_sources(
    paths: list[Path],
    vocab: Vocab,
    gene_column: str | None = None,
    min_fraction: float = MIN_GENE_FRACTION,
) -> list[Source]:
    """Match every file's genes to `vocab` (a file with too few matches is an error)."""
    sources = []
    for path in paths:
        with open_counts(path) as counts:
            match = match_genes(
                gene_var(counts),
                vocab,
                gene_column=gene_column,
                min_fraction=min_fraction,
                source=str(path),
            )
            column_ids = np.full(counts.n_genes, -1, dtype=np.int64)
            column_ids[_gene_columns(counts)] = match.column_ids  # other modalities unused
            sources.append(Source(Path(path), column_ids, counts.n_cells))
    return sources


def is_validation(seed: int, file_index: int, cells: np.ndarray, fraction: float) -> np.ndarray:
    """Which cells of a file are held out for validation."""
    if fraction <= 0:
        return np.zeros(len(cells), dtype=bool)
    return hash_uniform(seed, STREAM_VALIDATION, np.full(len(cells), file_index), cells) < fraction


def read_tokens(
    source: Source, start: int, stop: int, vocab: Vocab, cfg: TokenConfig
) -> TokenBlock:
    """Tokens of cells [start, stop) of one file."""
    with open_counts(source.path) as counts:
        blocks = [
            tokenize(b, source.column_ids, cfg, vocab.cls_id, vocab.pad_id)
            for b in counts.iter_blocks(stop - start, start, stop)
        ]
    return TokenBlock.concat(blocks)


class CellStream:
    """Global batches of training cells, the same for every world size; see the module doc."""

    def __init__(
        self,
        sources: list[Source],
        vocab: Vocab,
        cfg: TokenConfig,
        *,
        batch_size: int,
        seed: int = 0,
        val_fraction: float = 0.0,
        chunk_cells: int = 512,
        window_cells: int = 8192,
    ):
        self.sources, self.vocab, self.cfg = sources, vocab, cfg
        self.batch_size, self.seed, self.val_fraction = batch_size, seed, val_fraction
        self.window_cells = max(window_cells, 4 * batch_size)  # >= 2 batches after validation
        self.chunks = [
            (i, lo, min(lo + chunk_cells, s.n_cells))
            for i, s in enumerate(sources)
            for lo in range(0, s.n_cells, chunk_cells)
        ]
        n_train = sum(
            int((~is_validation(seed, i, np.arange(s.n_cells), val_fraction)).sum())
            for i, s in enumerate(sources)
        )
        if n_train < batch_size:
            raise InputError(
                f"only {n_train} training cells in the data, fewer than one batch of {batch_size}"
            )

    def _permutation(self, n: int, epoch: int, window: int) -> np.ndarray:
        cells = np.full(n, epoch * 1_000_003 + window)
        return np.argsort(
            hash_uniform(self.seed, STREAM_CHUNKS, cells, np.arange(n)), kind="stable"
        )

    def _windows(self, epoch: int) -> list[np.ndarray]:
        """The epoch's chunks in shuffled order, grouped into windows of >= window_cells cells."""
        order = self._permutation(len(self.chunks), epoch, -1)
        sizes = np.array([self.chunks[c][2] - self.chunks[c][1] for c in order])
        ends = np.cumsum(sizes)
        cuts = np.searchsorted(ends, np.arange(self.window_cells, ends[-1], self.window_cells))
        return [w for w in np.split(order, np.unique(cuts + 1)) if len(w)]

    def _window(self, chunks: np.ndarray, epoch: int, window: int) -> TokenBlock:
        parts = []
        for c in chunks:
            file_index, lo, hi = self.chunks[c]
            tokens = read_tokens(self.sources[file_index], lo, hi, self.vocab, self.cfg)
            held = is_validation(self.seed, file_index, np.arange(lo, hi), self.val_fraction)
            parts.append(tokens.take(np.flatnonzero(~held)))
        tokens = TokenBlock.concat(parts)
        return tokens.take(self._permutation(tokens.n_cells, epoch, window))

    def batches(
        self, position: Position, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[TokenBlock, Position]]:
        """Endless (rank's slice of each global batch, position after it), from `position`."""
        if self.batch_size % world:
            raise ValueError(f"batch size {self.batch_size} is not divisible by {world} ranks")
        per_rank = self.batch_size // world
        epoch, first, skip = position.epoch, position.window, position.batch
        while True:
            for window, chunks in enumerate(self._windows(epoch)[first:], start=first):
                tokens = self._window(chunks, epoch, window)
                n_batches = tokens.n_cells // self.batch_size  # a partial last batch is dropped
                for b in range(skip, n_batches):
                    rows = np.arange(per_rank) + b * self.batch_size + rank * per_rank
                    yield tokens.take(rows, trim=True), Position(epoch, window, b + 1)
                skip = 0
            epoch, first = epoch + 1, 0


def validation_cells(
    sources: list[Source],
    vocab: Vocab,
    cfg: TokenConfig,
    seed: int,
    fraction: float,
    max_cells: int,
    chunk_cells: int = 4096,
) -> TokenBlock | None:
    """The first `max_cells` held-out cells (in file order), tokenized; None if none is held out."""
    parts, n = [], 0
    for i, source in enumerate(sources):
        for lo in range(0, source.n_cells, chunk_cells):
            hi = min(lo + chunk_cells, source.n_cells)
            held = np.flatnonzero(is_validation(seed, i, np.arange(lo, hi), fraction))
            if not len(held):
                continue
            parts.append(read_tokens(source, lo, hi, vocab, cfg).take(held[: max_cells - n]))
            n += len(parts[-1].n_genes)
            if n >= max_cells:
                return TokenBlock.concat(parts)
    return TokenBlock.concat(parts) if parts else None
