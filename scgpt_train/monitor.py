"""What a pretraining measures besides its loss: throughput, and the labelled cells of the
embedding probe (`metrics.knn_probe` scores them at every evaluation)."""

from __future__ import annotations

import time

import numpy as np

from scgpt_runtime.errors import InputError
from scgpt_runtime.tokens import TokenBlock, TokenConfig
from scgpt_runtime.vocab import Vocab

from .cells import load_cells


def probe_cells(
    data: list[str],
    label_key: str,
    where: tuple[str, ...],
    vocab: Vocab,
    tokens: TokenConfig,
    gene_column: str | None = None,
) -> tuple[TokenBlock, np.ndarray]:
    """The tokens and labels of the probe's labelled cells."""
    cells = load_cells(
        data, vocab, tokens, label_key=label_key, where=where, gene_column=gene_column
    )
    labelled = np.flatnonzero([v is not None for v in cells.labels.tolist()])
    if len(labelled) < 2:
        raise InputError(f"{data[0]}: the probe needs at least 2 labelled cells")
    return cells.tokens.take(labelled), cells.labels[labelled].astype(str)


class Meter:
    """Cells/s and tokens/s since the start of this process."""

    def __init__(self) -> None:
        self.t0, self.cells, self.tokens = time.perf_counter(), 0, 0

    def add(self, cells: int, tokens: int) -> None:
        self.cells += cells
        self.tokens += tokens

    def rates(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        return {
            "cells_per_s": round(self.cells / elapsed, 1),
            "tokens_per_s": round(self.tokens / elapsed, 1),
        }
