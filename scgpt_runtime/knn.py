"""Exact nearest neighbours on L2-normalised embeddings, and the label vote of reference mapping.

The search is exact and deterministic: float32 matrix products over blocks of references keep
each query's best k + MARGIN candidates; those are ranked again by scores computed in float64
pair by pair (`exact_scores`), ties to the lower reference index. A float32 score of unit
vectors is within d * 2^-24 of the exact one, so a query whose last candidate could hide a
closer reference (only near-duplicates do) is searched again over all references in float64.
The result equals a brute-force float64 search whatever the block sizes, batch or thread count,
and memory is bounded by the blocks: (queries, references) scores of one block at a time.

With faiss-cpu installed (the optional extra `[faiss]`), references of FAISS_FROM cells or more
take their candidates from faiss's exact inner-product search, about twice as fast as numpy's
(docs/benchmarks.md); the ranking after it is the same, so the neighbours are too.
"""

from __future__ import annotations

import importlib.util

import numpy as np

VOTES = ("majority", "distance")
MARGIN = 16  # candidates kept beyond k before the float64 ranking
QUERY_BLOCK, REFERENCE_BLOCK, RERANK_BLOCK = 1024, 16384, 64
FAISS_FROM = 100_000  # reference cells from which faiss, where installed, finds candidates
BACKENDS = ("auto", "numpy", "faiss")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (a zero row stays zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def exact_scores(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarities (q, r) in float64: the one definition the search ranks by."""
    q = np.asarray(query, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    return _cosine(q[:, None, :], r[None, :, :])


def _cosine(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Cosine of broadcast float64 rows, every sum numpy's pairwise sum over the last axis, so
    a pair scores the same whatever the shapes around it (and a row with itself exactly 1)."""
    dot = (q * r).sum(-1)
    norms = np.sqrt((q * q).sum(-1) * (r * r).sum(-1))
    return dot / np.maximum(norms, 1e-300)


def search(
    query: np.ndarray, reference: np.ndarray, k: int, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest reference rows of every query row (both L2-normalised float32 arrays):
    (indices (m, k) int64, euclidean distances (m, k) float64), nearest first. `backend`
    finds the candidates ("auto": faiss from FAISS_FROM references where it is installed);
    the neighbours do not depend on it."""
    n = len(reference)
    k = min(k, n)
    if k < 1:
        raise ValueError("the reference holds no cells")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    has_faiss = importlib.util.find_spec("faiss") is not None
    if backend == "faiss" and not has_faiss:
        raise ValueError("faiss is not installed: pip install 'scgpt-deploy[faiss]'")
    faiss = backend == "faiss" or (backend == "auto" and has_faiss and n >= FAISS_FROM)
    candidates = _candidates_faiss if faiss else _candidates
    idx = np.empty((len(query), k), dtype=np.int64)
    dist = np.empty((len(query), k), dtype=np.float64)
    for lo in range(0, len(query), QUERY_BLOCK):
        q = query[lo : lo + QUERY_BLOCK]
        cand, cand_f32 = candidates(q, reference, min(n, k + MARGIN))
        for a in range(0, len(q), RERANK_BLOCK):
            b = slice(a, a + RERANK_BLOCK)
            rows = slice(lo + a, lo + a + len(q[b]))
            idx[rows], dist[rows] = _rank(q[b], reference, cand[b], cand_f32[b], k)
    return idx, dist


def _candidates(q: np.ndarray, reference: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, c) indices and float32 scores of the c best float32 scores of each query."""
    best_s = np.empty((len(q), 0), dtype=np.float32)
    best_i = np.empty((len(q), 0), dtype=np.int64)
    for lo in range(0, len(reference), REFERENCE_BLOCK):
        block = reference[lo : lo + REFERENCE_BLOCK]
        s = np.concatenate([best_s, q @ block.T], axis=1)  # (b, c + r)
        i = np.concatenate([best_i, np.tile(np.arange(lo, lo + len(block)), (len(q), 1))], 1)
        if s.shape[1] > c:
            keep = np.argpartition(-s, c - 1, axis=1)[:, :c]
            s, i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
        best_s, best_i = s, i
    return best_i, best_s


def _candidates_faiss(
    q: np.ndarray, reference: np.ndarray, c: int
) -> tuple[np.ndarray, np.ndarray]:
    """As `_candidates`, from faiss's exact (flat) inner-product search."""
    import faiss

    scores, idx = faiss.knn(
        np.ascontiguousarray(q),
        np.ascontiguousarray(reference),
        c,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return idx.astype(np.int64), scores.astype(np.float32)


def _rank(
    q: np.ndarray, reference: np.ndarray, cand: np.ndarray, cand_f32: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates by exact score, ties to the lower index. A query whose candidates
    do not all score above every other reference's float32 bound is searched exactly again."""
    exact = _cosine(q.astype(np.float64)[:, None, :], reference[cand].astype(np.float64))
    order = np.lexsort((cand, -exact), axis=1)
    cand, exact = np.take_along_axis(cand, order, 1), np.take_along_axis(exact, order, 1)
    if cand.shape[1] < len(reference):
        # An unseen reference scored at most the lowest candidate's float32 score, and its
        # exact cosine lies within 4 d 2^-24 of that (float32 products and norms of unit
        # vectors): then it cannot beat the k-th.
        bound = 4 * q.shape[1] * 2.0**-24 + 1e-12
        for row in np.flatnonzero(cand_f32.min(1) + bound >= exact[:, k - 1]):
            cand[row, :k], exact[row, :k] = _exhaustive(q[row], reference, k)
    return cand[:, :k], np.sqrt(np.maximum(0.0, 2.0 - 2.0 * exact[:, :k]))


def _exhaustive(q: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of all references for one query, every score exact."""
    blocks = range(0, len(reference), REFERENCE_BLOCK)
    scores = np.concatenate(
        [exact_scores(q[None], reference[lo : lo + REFERENCE_BLOCK])[0] for lo in blocks]
    )
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return order, scores[order]


def vote(
    neighbours: np.ndarray,
    distances: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    how: str = "majority",
) -> np.ndarray:
    """(m, n_classes) vote shares from the labels (`codes`, -1: none) of each query's
    neighbours: "majority" counts them, "distance" weighs each by 1 / distance
    (scikit-learn's weights="distance"; an exact match takes the whole vote). Neighbours
    without a label do not vote; a query none of whose neighbours votes gets all zeros."""
    if how not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, not {how!r}")
    labels = codes[neighbours]  # (m, k)
    if how == "majority":
        w = np.ones_like(distances)
    else:
        exact = distances == 0
        w = np.where(exact.any(1, keepdims=True), exact * 1.0, 1 / np.where(exact, 1, distances))
    w = np.where(labels >= 0, w, 0.0)
    shares = np.zeros((len(labels), n_classes))
    rows = np.repeat(np.arange(len(labels)), labels.shape[1])
    np.add.at(shares, (rows, np.maximum(labels, 0).reshape(-1)), w.reshape(-1))
    total = shares.sum(1, keepdims=True)
    return np.divide(shares, total, out=np.zeros_like(shares), where=total > 0)
