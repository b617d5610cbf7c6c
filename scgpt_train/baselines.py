"""The simple baselines an evaluation stands beside, fit on the labelled cells the model learnt
from (a run's own fine-tuning data, or the kNN reference) and scored on the same query cells:
logistic regression on log1p(CP10k) (CellTypist's approach) and PCA(50) + 10-NN.

Both read the genes the model sees (those of the run's vocabulary in every file), normalised
over them, and keep the N_HVG most variable genes of the training cells, so that memory is
cells x N_HVG whatever the panel. tools/evaluate.py, for docs/results.md, fits scikit-learn's
versions on all genes; these are torch and numpy, for `scgpt-train evaluate`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.io import open_counts
from scgpt_runtime.obs import obs_strings, parse_where, selected
from scgpt_runtime.preprocess import highly_variable_genes, log1p, normalize_total
from scgpt_runtime.vocab import Vocab

from .data import open_sources

log = logging.getLogger(__name__)

N_HVG, N_PCS, K = 2000, 50, 10
LR_L2 = 1.0  # scikit-learn's default C = 1: 0.5 |W|^2 + sum of the cross-entropies
LR_STEPS = 200
NAMES = ("logistic regression", "PCA(50) + 10-NN")


def baseline_predictions(
    train: tuple[list[str], tuple[str, ...]],
    query: tuple[list[str], tuple[str, ...]],
    label_key: str,
    vocab: Vocab,
    gene_column: str | None = None,
) -> dict[str, np.ndarray]:
    """{baseline name: (n_query,) predicted labels} for the query cells (files, where) of an
    evaluation, fit on the labelled training cells (files, where)."""
    train_sources = open_sources([Path(p) for p in train[0]], vocab, gene_column)
    query_sources = open_sources([Path(p) for p in query[0]], vocab, gene_column)
    common = set.intersection(*(set(s.column_ids[s.column_ids >= 0]) for s in train_sources))
    common &= set.intersection(*(set(s.column_ids[s.column_ids >= 0]) for s in query_sources))
    genes = np.array(sorted(common), dtype=np.int64)  # vocabulary ids
    tr_blocks, tr_labels = _read(train_sources, train[1], label_key, genes)
    keep = highly_variable_genes(tr_blocks, min(N_HVG, len(genes)), len(genes))
    q_blocks, _ = _read(query_sources, query[1], None, genes)
    x_train, x_query = _features(tr_blocks, keep), _features(q_blocks, keep)
    classes, y = np.unique(tr_labels.astype(str), return_inverse=True)
    log.info("baselines: %d training cells, %d genes", len(y), len(keep))
    return {
        NAMES[0]: classes[_logistic_regression(x_train, y, len(classes), x_query)],
        NAMES[1]: classes[_pca_knn(x_train, y, len(classes), x_query)],
    }


def _read(sources, where, label_key, genes) -> tuple[list[CsrBlock], np.ndarray]:
    """The selected cells of every file (with a label, where `label_key` is given) as blocks
    over `genes` (vocabulary ids), and their labels."""
    position = {g: i for i, g in enumerate(genes.tolist())}
    blocks, labels = [], []
    for source in sources:
        cols = np.array([position.get(int(g), -1) for g in source.column_ids], dtype=np.int64)
        with open_counts(source.path) as counts:
            keep = selected(counts, parse_where(where))
            if label_key is not None:
                found = obs_strings(counts.read_obs(label_key))
                keep &= np.array([v is not None for v in found.tolist()])
                labels.append(found[keep])
            for block in counts.iter_blocks():
                rows = np.flatnonzero(keep[block.start : block.start + block.n_rows])
                blocks.append(_restrict(block, rows, cols, len(genes)))
    return blocks, np.concatenate(labels) if labels else np.array([])


def _restrict(block: CsrBlock, rows: np.ndarray, cols: np.ndarray, n_cols: int) -> CsrBlock:
    """Rows `rows` of `block`, its columns renumbered by `cols` (-1: dropped)."""
    dense = np.zeros((len(rows), n_cols), dtype=np.float32)
    sub = np.isin(block.row_ids, rows)
    where = np.searchsorted(rows, block.row_ids[sub])
    new = cols[block.indices[sub]]
    ok = new >= 0
    dense[where[ok], new[ok]] = block.data[sub][ok]
    return CsrBlock.from_dense(dense)


def _features(blocks: list[CsrBlock], genes: np.ndarray) -> np.ndarray:
    """log1p(CP10k) of the cells, columns `genes`, dense float32."""
    parts = [log1p(normalize_total(b)).to_dense()[:, genes] for b in blocks]
    return np.concatenate(parts) if parts else np.zeros((0, len(genes)), dtype=np.float32)


def _logistic_regression(x: np.ndarray, y: np.ndarray, n_cls: int, query: np.ndarray):
    """Multinomial logistic regression, L2 penalty as scikit-learn's default, full-batch L-BFGS
    in float64 (deterministic)."""
    xt, yt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], n_cls, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_cls, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=LR_STEPS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt, reduction="sum")
        loss = loss + 0.5 * (w * w).sum() / LR_L2
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (torch.from_numpy(query.astype(np.float64)) @ w + b).argmax(1).numpy()


def _pca_knn(x: np.ndarray, y: np.ndarray, n_cls: int, query: np.ndarray) -> np.ndarray:
    """PCA(N_PCS) of the training cells, K nearest (euclidean) by majority, ties to the class
    first in order."""
    mean = x.mean(0)
    _, _, vt = np.linalg.svd((x - mean).astype(np.float64), full_matrices=False)
    axes = vt[:N_PCS].T
    a = torch.from_numpy((x - mean) @ axes)
    q = torch.from_numpy((query - mean) @ axes)
    k = min(K, len(x))
    votes = np.zeros((len(query), n_cls))
    for lo in range(0, len(query), 4096):
        near = torch.cdist(q[lo : lo + 4096], a).topk(k, largest=False).indices.numpy()
        np.add.at(votes, (np.arange(len(near))[:, None] + lo, y[near]), 1.0)
    return votes.argmax(1)
