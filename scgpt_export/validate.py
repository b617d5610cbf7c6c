"""Validation of exported graphs: onnxruntime against PyTorch on tokenized cells.

Each graph runs at every length of the bundle's ladder, on the cells one by one for a few of
them (batch 1) and in batches (batch N): real cells read from a data file, plus a cell with
<cls> alone and a full-length cell (a real one where a cell fills the length, else a synthetic
one). Its outputs are compared with the PyTorch
model's, computed on the same cells with the padding trimmed away, and export fails where a
graph misses the tolerance of its precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scgpt_runtime.bundle import CELL_EMB, CELL_EMB_NORMALIZED, CLASS_PROBS
from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.errors import BundleError
from scgpt_runtime.genes import match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.session import open_session
from scgpt_runtime.tokens import (
    PAD_MASK,
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


def read_cells(
    path: str | Path, vocab: Vocab, n_cells: int, gene_column: str | None = None
) -> tuple[CsrBlock, np.ndarray]:
    """The first `n_cells` cells of a count file and the vocabulary id of each of its genes."""
    with open_counts(path) as counts:
        match = match_genes(counts.var, vocab, gene_column=gene_column, source=str(path))
        block = next(counts.iter_blocks(block_size=n_cells, stop=n_cells))
    return block, match.column_ids


LADDER_CELLS = 2000  # cells whose token counts choose the ladder (ladder.py)


def token_counts(
    path: str | Path,
    vocab: Vocab,
    tokens: TokenConfig,
    gene_column: str | None = None,
    n_cells: int = LADDER_CELLS,
) -> np.ndarray:
    """Tokens (<cls> included) of up to `n_cells` cells spread evenly over a count file, in
    40 runs of consecutive cells (a file sorted by cell type is sampled across its types)."""
    with open_counts(path) as counts:
        match = match_genes(counts.var, vocab, gene_column=gene_column, source=str(path))
        run = max(1, n_cells // 40) if counts.n_cells > n_cells else counts.n_cells
        starts = np.unique(np.linspace(0, counts.n_cells - run, 40).astype(int))
        out = []
        for start in starts:
            for block in counts.iter_blocks(run, int(start), int(start) + run):
                out.append(
                    1
                    + tokenize(block, match.column_ids, tokens, vocab.cls_id, vocab.pad_id).n_genes
                )
    return np.concatenate(out)


def make_cells(
    tokens: TokenConfig,
    vocab: Vocab,
    real: tuple[CsrBlock, np.ndarray] | None,
    n_synthetic: int = 0,
    seed: int = 0,
) -> tuple[TokenBlock, str]:
    """Validation inputs at tokens.max_seq_len: `real` cells tokenized (or `n_synthetic` random
    ones), then <cls> alone and a full-length cell; and whether that one is "real" or
    "synthetic"."""
    rng = np.random.default_rng(seed)
    L = tokens.max_seq_len
    if real is not None:
        cells = tokenize(real[0], real[1], tokens, vocab.cls_id, vocab.pad_id)
    else:
        cells = _synthetic(tokens, vocab, rng.integers(1, L, n_synthetic), rng)
    full = np.flatnonzero(cells.n_genes == L - 1)
    extra = cells.take(full[:1]) if full.size else _synthetic(tokens, vocab, np.array([L - 1]), rng)
    cls_only = _synthetic(tokens, vocab, np.array([0]), rng)
    return TokenBlock.concat([cells, cls_only, extra]), "real" if full.size else "synthetic"


def _synthetic(
    tokens: TokenConfig, vocab: Vocab, n_genes: np.ndarray, rng: np.random.Generator
) -> TokenBlock:
    """Cells of `n_genes` random genes with random bins, laid out as `tokenize` lays them."""
    genes = np.setdiff1d(np.arange(len(vocab)), [vocab[s] for s in SPECIALS if s in vocab])
    n_genes = np.minimum(n_genes, len(genes))
    specs = input_specs(tokens, vocab.cls_id, vocab.pad_id)
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
        cell_emb = model.cell_embedding(
            *(torch.from_numpy(a) for a in batch.inputs.values())
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

    def rows(lo: int, hi: int) -> dict[str, np.ndarray]:
        return {k: a[lo:hi] for k, a in cells.inputs.items()}

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
