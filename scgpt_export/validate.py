"""Validation of exported graphs: onnxruntime against PyTorch on tokenized cells.

Each graph runs at every length of the bundle's ladder, on the cells one by one for a few of
them (batch 1) and in batches (batch N): real cells read from a data file, plus a cell with
<cls> alone and a full-length cell (a real one where a cell fills the length, else a synthetic
one). Its outputs are compared with the PyTorch
model's, computed on the same cells with the padding trimmed away, and export fails where a
graph misses the tolerance of its precision.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scgpt_runtime.bundle import CELL_EMB, CELL_EMB_NORMALIZED, CLASS_PROBS
from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.errors import BundleError
from scgpt_runtime.genes import MIN_GENE_FRACTION, match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.io.base import CountMatrix
from scgpt_runtime.modalities import Modality, match_modalities
from scgpt_runtime.session import open_session
from scgpt_runtime.tokens import (
    MODALITY,
    PAD_MASK,
    ModalityColumns,
    TokenBlock,
    TokenConfig,
    empty_block,
    input_specs,
    tokenize,
)
from scgpt_runtime.vocab import SPECIALS, Vocab
from scgpt_train.model import ScGPT

# Limits per precision: *_max_abs are upper bounds, min_cosine and top1_agreement lower bounds.
TOLERANCE: dict[str, dict[str, float]] = {
    "fp32": {"cell_emb_max_abs": 1e-4, "cell_emb_normalized_max_abs": 1e-4},
    "fp16": {"min_cosine": 0.999},
    "int8": {"min_cosine": 0.99, "top1_agreement": 0.99},
}
_LOWER_BOUNDS = ("min_cosine", "top1_agreement")


class ToleranceError(BundleError):
    """An exported graph differs from PyTorch by more than its precision allows."""


Cells = tuple[CsrBlock, np.ndarray, ModalityColumns | None]  # counts, vocab ids, modalities


def read_cells(
    path: str | Path,
    vocab: Vocab,
    n_cells: int,
    gene_column: str | None = None,
    modalities: list[Modality] | None = None,
) -> Cells:
    """The first `n_cells` cells of a count file, the vocabulary id of each of its columns and,
    for a multi-omics model, the modality of each."""
    with _open(path, modalities) as counts:
        column_ids, columns = _match(counts, vocab, gene_column, modalities)
        block = next(counts.iter_blocks(block_size=n_cells, stop=n_cells))
    return block, column_ids, columns


def _open(path: str | Path, modalities: list[Modality] | None) -> CountMatrix:
    return open_counts(
        path, modalities=None if modalities is None else [m.name for m in modalities]
    )


def _match(
    counts: CountMatrix, vocab: Vocab, gene_column: str | None, modalities: list[Modality] | None
) -> tuple[np.ndarray, ModalityColumns | None]:
    if modalities is None:
        return match_genes(
            counts.var, vocab, gene_column=gene_column, source=str(counts.path)
        ).column_ids, None
    match = match_modalities(
        counts, vocab, modalities, gene_column=gene_column, min_fraction=MIN_GENE_FRACTION
    )
    return match.column_ids, match.columns


LADDER_CELLS = 2000  # cells whose token counts choose the ladder (ladder.py)


def token_counts(
    path: str | Path,
    vocab: Vocab,
    tokens: TokenConfig,
    gene_column: str | None = None,
    n_cells: int = LADDER_CELLS,
    modalities: list[Modality] | None = None,
) -> np.ndarray:
    """Tokens (<cls> included) of up to `n_cells` cells spread evenly over a count file, in
    40 runs of consecutive cells (a file sorted by cell type is sampled across its types)."""
    with _open(path, modalities) as counts:
        column_ids, columns = _match(counts, vocab, gene_column, modalities)
        run = max(1, n_cells // 40) if counts.n_cells > n_cells else counts.n_cells
        starts = np.unique(np.linspace(0, counts.n_cells - run, 40).astype(int))
        out = []
        for start in starts:
            for block in counts.iter_blocks(run, int(start), int(start) + run):
                cells = tokenize(block, column_ids, tokens, vocab.cls_id, vocab.pad_id, columns)
                out.append(1 + cells.n_genes)
    return np.concatenate(out)


def make_cells(
    tokens: TokenConfig,
    vocab: Vocab,
    real: Cells | None,
    n_synthetic: int = 0,
    seed: int = 0,
) -> tuple[TokenBlock, str]:
    """Validation inputs at tokens.max_seq_len: `real` cells tokenized (or `n_synthetic` random
    ones), then <cls> alone and a full-length cell; and whether that one is "real" or
    "synthetic". A full-length cell of a multi-omics model fills each modality's tokens."""
    rng = np.random.default_rng(seed)
    L = tokens.max_seq_len
    columns = None if real is None else real[2]
    if real is not None:
        block, column_ids, _ = real
        if columns is not None:
            columns = replace(columns, max_tokens=_scaled(columns.max_tokens, L - 1))
        cells = tokenize(block, column_ids, tokens, vocab.cls_id, vocab.pad_id, columns)
    else:
        cells = _synthetic(tokens, vocab, rng.integers(1, L, n_synthetic), rng)
    modality = columns is not None

    def synthetic(n: int) -> TokenBlock:
        return _synthetic(tokens, vocab, np.array([n]), rng, modality)

    full = np.flatnonzero(cells.n_genes == L - 1)
    extra = cells.take(full[:1]) if full.size else synthetic(L - 1)
    cls_only = synthetic(0)
    return TokenBlock.concat([cells, cls_only, extra]), "real" if full.size else "synthetic"


def _scaled(budgets: tuple[int, ...], total: int) -> tuple[int, ...]:
    """The modalities' token budgets cut to fit `total` tokens (a shorter graph of the ladder):
    the first modalities keep theirs, the last are cut, each keeps at least one."""
    out: list[int] = []
    for i, budget in enumerate(budgets):
        left = total - sum(out) - (len(budgets) - i - 1)  # one token for each modality after
        out.append(max(1, min(budget, left)))
    return tuple(out)


def _synthetic(
    tokens: TokenConfig,
    vocab: Vocab,
    n_genes: np.ndarray,
    rng: np.random.Generator,
    modality: bool = False,
) -> TokenBlock:
    """Cells of `n_genes` random tokens with random bins, laid out as `tokenize` lays them
    (with `modality`, all of modality 0)."""
    genes = np.setdiff1d(np.arange(len(vocab)), [vocab[s] for s in SPECIALS if s in vocab])
    n_genes = np.minimum(n_genes, len(genes))
    specs = input_specs(tokens, vocab.cls_id, vocab.pad_id, modality)
    block = empty_block(specs, len(n_genes), tokens.max_seq_len)
    for row, k in enumerate(n_genes):
        block.gene_ids[row, 1 : k + 1] = np.sort(rng.choice(genes, size=k, replace=False))
        block.values[row, 1 : k + 1] = rng.integers(1, tokens.n_bins, size=k)
        block.padding_mask[row, 1 : k + 1] = False
    return TokenBlock(block.inputs, n_genes.astype(np.int64), 0)


@torch.no_grad()
def reference(model: ScGPT, cells: TokenBlock, batch_size: int = 16) -> dict[str, np.ndarray]:
    """PyTorch outputs for every cell (model in eval mode), computed in batches without the
    columns that are padding in the whole batch: pads must not matter."""
    outputs: dict[str, list[np.ndarray]] = {}
    for lo in range(0, cells.n_cells, batch_size):
        batch = cells.take(np.arange(lo, min(lo + batch_size, cells.n_cells)), trim=True)
        x = {k: torch.from_numpy(a) for k, a in batch.inputs.items()}
        cell_emb = model.cell_embedding(
            x["gene_ids"], x["values"], x[PAD_MASK], mod_ids=x.get(MODALITY)
        )  # (b, d)
        got = {CELL_EMB: cell_emb, CELL_EMB_NORMALIZED: F.normalize(cell_emb, dim=-1)}
        if model.cls_decoder is not None:
            got[CLASS_PROBS] = torch.softmax(model.cls_decoder(cell_emb), dim=-1)
        for name, value in got.items():
            outputs.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def validate(
    path: str | Path,
    precision: str,
    cells: TokenBlock,
    expected: dict[str, np.ndarray],
    *,
    device: str = "cpu",
    batch_size: int = 16,
) -> dict[str, float]:
    """Errors of the graph at `path`, in a session as the runtime opens it, on `cells` (one
    length) against `expected` (see `reference`): max abs errors of each output, the lowest
    cosine of cell_emb, top-1 class agreement. Raises ToleranceError where they miss
    TOLERANCE[precision]."""
    session = open_session(path, device)
    n = cells.n_cells
    names = [o.name for o in session.get_outputs()]
    fed = [i.name for i in session.get_inputs()]  # a modality input only where the graph takes it

    def rows(lo: int, hi: int) -> dict[str, np.ndarray]:
        return {k: cells.inputs[k][lo:hi] for k in fed}

    batched = [session.run(None, rows(lo, lo + batch_size)) for lo in range(0, n, batch_size)]
    singles = [0, n - 2, n - 1]  # the first cell, <cls> alone, the full-length cell
    batched += [session.run(None, rows(r, r + 1)) for r in singles]
    got = {name: np.concatenate([b[i] for b in batched]) for i, name in enumerate(names)}
    rows = np.r_[np.arange(n), singles]
    errors = _errors(got, {name: value[rows] for name, value in expected.items()})
    check(f"the {precision} graph at {cells.inputs[PAD_MASK].shape[1]} tokens", precision, errors)
    return errors


def check(graph: str, precision: str, errors: dict[str, float]) -> None:
    """ToleranceError naming every limit of `precision` that `errors` of `graph` miss."""
    if not all(np.isfinite(list(errors.values()))):
        raise ToleranceError(f"{graph} gives NaN or infinite outputs")
    missed = [
        f"{key} {errors[key]:.3g} (limit {limit:g})"
        for key, limit in TOLERANCE[precision].items()
        if key in errors and (errors[key] < limit if key in _LOWER_BOUNDS else errors[key] > limit)
    ]
    if missed:
        raise ToleranceError(f"{graph} misses its tolerance against PyTorch: {', '.join(missed)}")


def _errors(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, float]:
    errors = {f"{name}_max_abs": float(np.abs(got[name] - expected[name]).max()) for name in got}
    a, b = got[CELL_EMB].astype(np.float64), expected[CELL_EMB].astype(np.float64)
    cosine = (a * b).sum(1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
    )
    errors["min_cosine"] = float(cosine.min())
    if CLASS_PROBS in got:
        agree = got[CLASS_PROBS].argmax(1) == expected[CLASS_PROBS].argmax(1)
        errors["top1_agreement"] = float(agree.mean())
    return errors
