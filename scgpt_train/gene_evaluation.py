"""Scoring gene-pair predictions against known gene relations (tools/eval_genes.py).

Ground truths: co-membership of gene sets (GO complexes, Hallmark) scored against the same
number of degree-matched random pairs (the positives' endpoints shuffled: every gene keeps
its degree, so a score that only knows how connected a gene is gets 0.5), and TF -> target
edges (CollecTRI) scored per TF over every other gene. AUROC is the Mann-Whitney statistic
(ties count half), AUPRC the average precision of scikit-learn, both tested against it.
numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; ties between a positive and a negative count half."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average rank of each run of ties (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Sum over score thresholds of (recall step) x precision, as scikit-learn's."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if not labels.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last item of each run of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (np.flatnonzero(last) + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def co_member_pairs(gene_sets: Iterable[set[str]], genes: list[str]) -> np.ndarray:
    """(P, 2) int64 index pairs i < j of `genes` sharing at least one set."""
    index = {g: i for i, g in enumerate(genes)}
    pairs = set()
    for members in gene_sets:
        ids = sorted(index[g] for g in members if g in index)
        pairs.update((a, b) for k, a in enumerate(ids) for b in ids[k + 1 :])
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def degree_matched_negatives(positives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """As many pairs as `positives`, none of them a positive or a self pair, drawn by shuffling
    the positives' endpoints (every gene as often as among the positives)."""
    known = {(int(a), int(b)) for a, b in positives}
    ends = positives.ravel().copy()
    found: set[tuple[int, int]] = set()
    for _ in range(100):  # a few rounds fill every slot in practice
        rng.shuffle(ends)
        for a, b in ends.reshape(-1, 2):
            pair = (int(min(a, b)), int(max(a, b)))
            if a != b and pair not in known and len(found) < len(positives):
                found.add(pair)
        if len(found) == len(positives):
            break
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


def pair_scores(similarity: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Scores of index pairs from a symmetric (G, G) matrix (NaN: no information, scored 0)."""
    return np.nan_to_num(similarity[pairs[:, 0], pairs[:, 1]], nan=0.0)


def pair_task(similarity: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> dict:
    """AUROC and AUPRC of a similarity on positives against negatives."""
    scores = np.concatenate(
        [pair_scores(similarity, positives), pair_scores(similarity, negatives)]
    )
    labels = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    return {
        "auroc": auroc(scores, labels),
        "auprc": average_precision(scores, labels),
        "positive_rate": float(labels.mean()),
        "n_pairs": len(labels),
    }


def tf_task(directed: np.ndarray, edges: dict[int, set[int]], min_targets: int = 10) -> dict:
    """Median over TFs with at least `min_targets` targets of the AUROC and AUPRC of their
    column of `directed` (score of TF j -> gene i at [i, j]) over every other gene."""
    results = []
    n = len(directed)
    for tf, targets in sorted(edges.items()):
        targets = targets - {tf}
        if len(targets) < min_targets:
            continue
        others = np.array([i for i in range(n) if i != tf])
        labels = np.isin(others, list(targets))
        scores = np.nan_to_num(directed[others, tf], nan=0.0)
        results.append((auroc(scores, labels), average_precision(scores, labels), labels.mean()))
    if not results:
        return {
            "auroc": float("nan"),
            "auprc": float("nan"),
            "positive_rate": float("nan"),
            "n_tfs": 0,
        }
    a = np.array(results)
    return {
        "auroc": float(np.median(a[:, 0])),
        "auprc": float(np.median(a[:, 1])),
        "positive_rate": float(np.median(a[:, 2])),
        "n_tfs": len(results),
    }


def leave_one_out_degree(n: int, positives: np.ndarray) -> np.ndarray:
    """(n, n) degree-only control for pairs: deg(i) + deg(j), less 2 on a positive pair so that
    the pair scored never counts itself."""
    degree = np.bincount(positives.ravel(), minlength=n).astype(np.float64)
    score = degree[:, None] + degree[None, :]
    score[positives[:, 0], positives[:, 1]] -= 2
    score[positives[:, 1], positives[:, 0]] -= 2
    return score


def in_degree_control(n: int, edges: dict[int, set[int]]) -> np.ndarray:
    """(n, n) degree-only control for TF -> target: the number of other TFs naming the target."""
    in_degree = np.zeros(n)
    for targets in edges.values():
        in_degree[list(targets)] += 1
    score = np.repeat(in_degree[:, None], n, axis=1)
    for tf, targets in edges.items():
        score[list(targets), tf] -= 1
    return score
