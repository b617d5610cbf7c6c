"""Evaluation metrics on numpy alone (no torch): annotation and integration metrics, k-means,
kNN label transfer.

Every metric equals its scikit-learn counterpart on the same inputs (tests/train/test_evaluate.py
checks): accuracy, F1 (labels = sorted union of truth and prediction, zero where undefined),
confusion matrix, silhouette (euclidean), NMI (arithmetic normalisation), ARI. Integration
metrics follow scib's definitions with two documented substitutions, because leiden and scanpy
are not dependencies:

- NMI and ARI compare the labels with k-means clusters (k = number of labels, k-means++ with 10
  seeded restarts) instead of leiden clusters at the best resolution;
- graph connectivity uses a plain symmetric 15-nearest-neighbour graph instead of scanpy's UMAP
  connectivities (the same edges, only the weights differ, and the metric ignores weights).

ASW_label = (silhouette on labels + 1) / 2; ASW_batch = mean over labels of the mean of
1 - |silhouette on batches| within the label (scib's silhouette_batch); AvgBIO = mean(NMI, ARI,
ASW_label) (the scGPT paper's score); AvgBATCH = mean(ASW_batch, graph connectivity).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scgpt_runtime.knn import l2_normalize, search
from scgpt_runtime.knn import vote as knn_vote

UNKNOWN = "unknown"  # the label of a cell whose confidence is below the threshold
CHUNK = 1024  # rows of a distance matrix held at once


def _codes(*arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted classes of all arrays together and each array as codes into them."""
    arrays = [np.asarray(a) for a in arrays]
    classes, inverse = np.unique(np.concatenate(arrays), return_inverse=True)
    bounds = np.cumsum([0, *[len(a) for a in arrays]])
    return classes, [inverse[a:b] for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------------------- annotation


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of cells whose prediction equals the truth."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: list | None = None) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class, classes in `labels` order
    (default: sorted union of both). Cells whose truth or prediction is not in `labels` are left
    out, as in scikit-learn."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(np.unique(np.concatenate([y_true, y_pred]))) if labels is None else labels
    index = {label: i for i, label in enumerate(labels)}
    t = np.array([index.get(v, -1) for v in y_true.tolist()], dtype=np.int64)
    p = np.array([index.get(v, -1) for v in y_pred.tolist()], dtype=np.int64)
    keep = (t >= 0) & (p >= 0)
    n = len(labels)
    return np.bincount(t[keep] * n + p[keep], minlength=n * n).reshape(n, n)


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray, labels: list | None = None) -> np.ndarray:
    """F1 of each class of `labels` (default: sorted union); 0 where precision and recall are 0."""
    cm = confusion(y_true, y_pred, labels)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2 tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: list | None = None) -> float:
    """Unweighted mean of the per-class F1 (scikit-learn's average="macro")."""
    return float(f1_per_class(y_true, y_pred, labels).mean())


def annotation_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """accuracy, macro_f1, per-class F1, precision and recall {class: value} (0 where a class
    is never predicted or never true), support (true cells per class), labels, confusion
    (rows = truth); JSON-ready.

    Classes are the sorted union of truth and prediction, so a predicted "unknown" counts as a
    class with F1 0 (it never is the truth) and lowers macro-F1: rejecting is not free."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    labels = [str(c) for c in np.unique(np.concatenate([y_true, y_pred]))]
    f1 = f1_per_class(y_true, y_pred, labels)
    cm = confusion(y_true, y_pred, labels)
    hits = np.diag(cm).astype(float)

    def per_class(values: np.ndarray) -> dict[str, float]:
        return {c: round(float(v), 4) for c, v in zip(labels, values, strict=True)}

    return {
        "n_cells": len(y_true),
        "accuracy": round(accuracy(y_true, y_pred), 4),
        "macro_f1": round(float(f1.mean()), 4),
        "per_class_f1": per_class(f1),
        "per_class_precision": per_class(hits / np.maximum(cm.sum(0), 1)),
        "per_class_recall": per_class(hits / np.maximum(cm.sum(1), 1)),
        "support": {c: int(v) for c, v in zip(labels, cm.sum(1), strict=True)},
        "labels": labels,
        "confusion": cm.tolist(),
    }


# ---------------------------------------------------------------------------- clustering scores


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _, (ca,) = _codes(a)
    _, (cb,) = _codes(b)
    nb = int(cb.max(initial=-1)) + 1
    return np.bincount(ca * nb + cb, minlength=(int(ca.max(initial=-1)) + 1) * nb).reshape(-1, nb)


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information, MI / mean(H(a), H(b)); 1 when both are one cluster."""
    c = _contingency(a, b).astype(np.float64)
    n = c.sum()
    ha, hb = _entropy(c.sum(1)), _entropy(c.sum(0))
    if ha == 0 and hb == 0:
        return 1.0
    nz = c > 0
    outer = np.outer(c.sum(1), c.sum(0))
    mi = float((c[nz] / n * np.log(c[nz] * n / outer[nz])).sum())
    return max(mi, 0.0) / max((ha + hb) / 2, np.finfo(np.float64).eps)


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert and Arabie); 1 for identical partitions."""
    c = _contingency(a, b).astype(np.float64)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index, sa, sb = pairs(c), pairs(c.sum(1)), pairs(c.sum(0))
    expected = sa * sb / pairs(np.array([c.sum()])) if c.sum() > 1 else 0.0
    top = (sa + sb) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def _sq_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * x @ y.T
    return np.maximum(d, 0.0)


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300
) -> np.ndarray:
    """Cluster codes (n,) of the best of `n_init` k-means++ runs (lowest inertia), seeded."""
    x = np.asarray(x, dtype=np.float64)
    k = min(k, len(x))
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(len(x), dtype=np.int64), np.inf
    for _ in range(n_init):
        centers = x[[rng.integers(len(x))]]
        for _ in range(1, k):  # k-means++: next center with probability ~ squared distance
            d = _sq_distances(x, centers).min(1)
            p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1 / len(x))
            centers = np.vstack([centers, x[rng.choice(len(x), p=p)]])
        for _ in range(max_iter):
            assign = _sq_distances(x, centers).argmin(1)
            sums = np.zeros_like(centers)
            np.add.at(sums, assign, x)
            counts = np.bincount(assign, minlength=k)[:, None]
            moved = np.where(counts > 0, sums / np.maximum(counts, 1), centers)
            if np.allclose(moved, centers):
                break
            centers = moved
        assign = _sq_distances(x, centers).argmin(1)
        inertia = float(_sq_distances(x, centers)[np.arange(len(x)), assign].sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def silhouette_samples(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-cell silhouette (euclidean): (b - a) / max(a, b); 0 for cells alone in their label."""
    x = np.asarray(x, dtype=np.float64)
    _, (codes,) = _codes(labels)
    k = int(codes.max(initial=-1)) + 1
    onehot = np.eye(k)[codes]  # (n, k)
    sizes = onehot.sum(0)
    out = np.zeros(len(x))
    for lo in range(0, len(x), CHUNK):
        rows = slice(lo, lo + CHUNK)
        d = np.sqrt(_sq_distances(x[rows], x))  # (c, n)
        sums = d @ onehot  # (c, k) distance sums to each label
        own = codes[rows]
        n_own = sizes[own] - 1
        a = np.divide(
            sums[np.arange(len(own)), own], n_own, out=np.zeros(len(own)), where=n_own > 0
        )
        other = sums / sizes
        other[np.arange(len(own)), own] = np.inf
        b = other.min(1)
        s = np.divide(b - a, np.maximum(a, b), out=np.zeros(len(own)), where=np.maximum(a, b) > 0)
        out[rows] = np.where(n_own > 0, s, 0.0)
    return out


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (scikit-learn's silhouette_score, euclidean); needs 2..n-1 labels."""
    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        raise ValueError(f"silhouette needs 2 to n_cells - 1 labels, got {n_labels}")
    return float(silhouette_samples(x, labels).mean())


def batch_asw(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """scib's silhouette_batch: per label, mean of 1 - |silhouette on batches| among its cells
    (labels with a single batch, or one cell per batch, are skipped); the mean over labels."""
    labels, batches = np.asarray(labels), np.asarray(batches)
    scores = []
    for label in np.unique(labels):
        rows = labels == label
        n_batches = len(np.unique(batches[rows]))
        if n_batches == 1 or n_batches == rows.sum():
            continue
        scores.append(np.mean(1.0 - np.abs(silhouette_samples(x[rows], batches[rows]))))
    return float(np.mean(scores)) if scores else float("nan")


def knn_indices(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows (euclidean), nearest first."""
    x = np.asarray(x, dtype=np.float64)
    k = min(k, len(x) - 1)
    out = np.empty((len(x), k), dtype=np.int64)
    for lo in range(0, len(x), CHUNK):
        d = _sq_distances(x[lo : lo + CHUNK], x)
        d[np.arange(len(d)), np.arange(lo, lo + len(d))] = np.inf  # not itself
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(d, part, 1).argsort(1, kind="stable")
        out[lo : lo + len(d)] = np.take_along_axis(part, order, 1)
    return out


def _largest_component(n: int, edges: np.ndarray) -> int:
    """Size of the largest connected component of an undirected graph (union-find)."""
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in edges.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
    roots = np.array([find(i) for i in range(n)])
    return int(np.bincount(roots).max()) if n else 0


def graph_connectivity(x: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """scib's graph connectivity on a symmetric kNN graph: per label, the share of its cells in
    the largest connected component of the graph restricted to the label; mean over labels."""
    labels = np.asarray(labels)
    nn = knn_indices(x, k)
    edges = np.stack([np.repeat(np.arange(len(x)), nn.shape[1]), nn.reshape(-1)], 1)
    scores = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        local = np.full(len(x), -1)
        local[members] = np.arange(len(members))
        sub = local[edges]
        sub = sub[(sub >= 0).all(1)]
        scores.append(_largest_component(len(members), sub) / len(members))
    return float(np.mean(scores))


def integration_metrics(
    x: np.ndarray, labels: np.ndarray, batches: np.ndarray, seed: int = 0
) -> dict[str, float | None]:
    """Biological conservation and batch mixing of an embedding `x` (n, d), JSON-ready (see the
    module doc for the definitions and the k-means substitution); None where undefined (batch
    scores of a single batch)."""
    x = np.asarray(x, dtype=np.float64)
    labels, batches = np.asarray(labels).astype(str), np.asarray(batches).astype(str)
    clusters = kmeans(x, len(np.unique(labels)), seed=seed)
    res = {
        "nmi": nmi(labels, clusters),
        "ari": ari(labels, clusters),
        "asw_label": (silhouette(x, labels) + 1) / 2,
        "asw_batch": batch_asw(x, labels, batches),
        "graph_connectivity": graph_connectivity(x, labels),
    }
    res["avg_bio"] = (res["nmi"] + res["ari"] + res["asw_label"]) / 3
    res["avg_batch"] = (res["asw_batch"] + res["graph_connectivity"]) / 2
    return {k: None if np.isnan(v) else round(float(v), 4) for k, v in res.items()}


# ---------------------------------------------------------------------------- reference mapping


@dataclass
class Prediction:
    """Predicted labels with their probabilities (from a classifier head or a kNN vote)."""

    classes: list[str]  # column order of `probabilities`
    probabilities: np.ndarray  # (n, C) vote shares
    predicted_labels: np.ndarray  # (n,) str; "unknown" below the threshold, if one was given
    conf_score: np.ndarray  # (n,) the largest vote share


@dataclass
class EvaluatedCells:
    """Per-cell data an evaluation report draws: truths, predictions, embeddings."""

    truth: np.ndarray  # (n,) str or None (unlabelled)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) str
    confidence: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) float
    embedding: np.ndarray | None = None  # (n, d)
    batches: np.ndarray | None = None  # (n,) str


def knn_transfer(
    reference: np.ndarray,
    reference_labels: np.ndarray,
    query: np.ndarray,
    k: int = 10,
    vote: str = "majority",
    unknown_threshold: float | None = None,
) -> Prediction:
    """Zero-shot reference mapping: each query cell gets the labels of its k nearest reference
    cells on L2-normalised embeddings (the official scGPT reference mapping uses k = 10), by
    the runtime's exact search and vote (scgpt_runtime.knn; "majority" or "distance"). Ties
    go to the first class in sorted order. Returns a Prediction."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    classes, (codes,) = _codes(np.asarray(reference_labels).astype(str))
    neighbours, distances = search(l2_normalize(query), l2_normalize(reference), k)
    probs = knn_vote(neighbours, distances, codes, len(classes), vote)
    return decide([str(c) for c in classes], probs, unknown_threshold)


def knn_probe(embedding: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, float]:
    """How much cell identity an embedding carries, without training anything: each cell gets
    the majority label of its k nearest other cells (leave-one-out, L2-normalised embeddings,
    ties to the first class in sorted order); macro-F1 and accuracy of those labels, and the
    mean cosine between two different cells (near 1: the embeddings have collapsed)."""
    x = l2_normalize(np.asarray(embedding, dtype=np.float32))
    n = len(x)
    if n < 2:
        raise ValueError("the probe needs at least 2 cells")
    classes, (codes,) = _codes(np.asarray(labels).astype(str))
    idx, dist = search(x, x, min(k + 1, n))
    # Drop each cell itself (normally its own first neighbour; a duplicate may come first).
    others = np.argsort(idx == np.arange(n)[:, None], axis=1, kind="stable")[:, : idx.shape[1] - 1]
    idx, dist = np.take_along_axis(idx, others, 1), np.take_along_axis(dist, others, 1)
    pred = knn_vote(idx, dist, codes, len(classes), "majority").argmax(1)
    truth, guess = np.asarray(classes)[codes], np.asarray(classes)[pred]
    total = x.astype(np.float64).sum(0)
    return {
        "probe_knn_macro_f1": round(macro_f1(truth, guess), 4),
        "probe_knn_accuracy": round(accuracy(truth, guess), 4),
        "probe_mean_cosine": round(float((total @ total - n) / (n * (n - 1))), 4),
    }


def decide(
    classes: list[str], probs: np.ndarray, unknown_threshold: float | None = None
) -> Prediction:
    """The most probable class of each row of `probs` (n, C); confidence = its probability;
    "unknown" where the confidence is below `unknown_threshold` (None: never)."""
    conf = probs.max(1)
    labels = np.array(classes, dtype=object)[probs.argmax(1)]
    if unknown_threshold is not None:
        labels = np.where(conf < unknown_threshold, UNKNOWN, labels)
    return Prediction(classes, probs, labels.astype(str), conf)
