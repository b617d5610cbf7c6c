"""Perturbation metrics and baselines on pseudobulk log1p(CP10k) profiles (numpy only).

Per held-out condition, with `pred` and `true` its predicted and observed mean profiles, `ctrl`
the control mean and `pert` the mean of the training conditions' profiles:
- pearson: r(pred, true) over the panel genes
- pearson_delta: r(pred - ctrl, true - ctrl), the official headline metric
- pearson_de / pearson_de_delta: the same on the condition's top-20 DE genes (by |Welch t| of
  its cells against the control cells; the targets themselves left out)
- systema_delta: r(pred - pert, true - pert): the change beyond the shift every perturbation
  shares (Systema); the mean baseline scores no better than 0 here by construction
- l2: ||pred - true||
- centroid accuracy: the prediction is closer (L2) to its own observed profile than to that of
  any other condition of the screen.
Baselines: the control mean; the mean of the training profiles; the linear model of
Ahlmann-Eltze, Huber and Anders (2025) for targets in the panel; ridge on the targets' gene
embeddings. A pearson of a constant vector is NaN (reported as missing, never as 0).
"""

from __future__ import annotations

import numpy as np

N_DE = 20
LINEAR_PCS = 10  # Ahlmann-Eltze et al.
LINEAR_RIDGE = 0.1
EMBEDDING_RIDGE = 1.0  # fixed, not tuned (the embeddings are LayerNorm outputs of width d)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; NaN where either vector is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def de_genes(
    cells: np.ndarray, controls: np.ndarray, skip: np.ndarray, k: int = N_DE
) -> np.ndarray:
    """Columns of the `k` genes with the largest |Welch t| of `cells` against `controls`
    (rows = cells), ties to the lower column; `skip` columns are never chosen."""
    m1, m0 = cells.mean(0), controls.mean(0)
    v1, v0 = cells.var(0, ddof=1), controls.var(0, ddof=1)
    se = np.sqrt(v1 / len(cells) + v0 / len(controls))
    t = np.abs(np.divide(m1 - m0, se, out=np.zeros_like(se, dtype=np.float64), where=se > 0))
    t[skip] = -1.0
    return np.sort(np.argsort(-t, kind="stable")[:k])


def condition_metrics(
    pred: np.ndarray, true: np.ndarray, ctrl: np.ndarray, pert: np.ndarray, de: np.ndarray
) -> dict[str, float]:
    """The per-condition metrics of the module doc."""
    return {
        "pearson": pearson(pred, true),
        "pearson_delta": pearson(pred - ctrl, true - ctrl),
        "pearson_de": pearson(pred[de], true[de]),
        "pearson_de_delta": pearson(pred[de] - ctrl[de], true[de] - ctrl[de]),
        "systema_delta": pearson(pred - pert, true - pert),
        "l2": float(np.linalg.norm(pred - true)),
    }


def centroid_hits(
    preds: dict[str, np.ndarray], centroids: dict[str, np.ndarray]
) -> dict[str, float]:
    """Per predicted condition: 1 where its own observed profile is the nearest of `centroids`
    (ties shared: 1/k when k profiles are equally near)."""
    names = list(centroids)
    table = np.stack([centroids[n] for n in names])
    out = {}
    for c, p in preds.items():
        d = np.linalg.norm(table - p, axis=1)
        nearest = np.flatnonzero(np.isclose(d, d.min(), rtol=0, atol=1e-9))
        out[c] = float(names.index(c) in nearest) / len(nearest)
    return out


def linear_model(
    deltas: np.ndarray,
    target_rows: list[np.ndarray],
    pcs: int = LINEAR_PCS,
    ridge: float = LINEAR_RIDGE,
):
    """Ahlmann-Eltze et al.'s linear model fitted on training changes `deltas` (P, G) (profile
    minus control mean): G = the top PCs of the genes (rows of the centred (G, P) matrix),
    a perturbation's embedding = the rows of G of its target genes (summed for combinations),
    Y = G W P^T + b by ridge. `target_rows[i]` holds the panel columns of condition i's targets;
    a condition without one is left out of the fit. Returns predict(columns) -> (G,) change,
    the mean change b for a target outside the panel."""
    b = deltas.mean(axis=0)
    Y = (deltas - b).T  # (G, P)
    u, s, _ = np.linalg.svd(Y, full_matrices=False)
    k = min(pcs, int((s > 1e-9 * max(s[0], 1e-30)).sum())) if len(s) else 0
    G = u[:, :k] * s[:k]  # (G, k) gene embeddings
    fit = [i for i, r in enumerate(target_rows) if len(r)]
    if not fit or k == 0:
        return lambda columns: b.copy()
    P = np.stack([G[target_rows[i]].sum(0) for i in fit])  # (P', k)
    left = np.linalg.solve(G.T @ G + ridge * np.eye(k), G.T @ Y[:, fit])  # (k, P')
    W = np.linalg.solve((P.T @ P + ridge * np.eye(k)).T, (left @ P).T).T  # (k, k)

    def predict(columns: np.ndarray) -> np.ndarray:
        if not len(columns):
            return b.copy()
        return b + G @ W @ G[columns].sum(0)

    return predict


def embedding_ridge(embeddings: np.ndarray, deltas: np.ndarray, alpha: float = EMBEDDING_RIDGE):
    """Ridge from the targets' gene embeddings (P, d) to their changes (P, G), around the mean
    change. Returns predict(embedding (d,)) -> (G,) change."""
    b, e0 = deltas.mean(axis=0), embeddings.mean(axis=0)
    E = embeddings - e0
    W = np.linalg.solve(E.T @ E + alpha * np.eye(E.shape[1]), E.T @ (deltas - b))  # (d, G)
    return lambda emb: b + (emb - e0) @ W


def reverse_hits(
    candidates: dict[str, np.ndarray], observed: np.ndarray, truth: str
) -> tuple[float, float]:
    """Top-1 and top-3 accuracy of ranking `candidates` (their predicted changes) by pearson to
    an `observed` change, as expected over random tie-breaks: a constant prediction ties with
    the others and so scores chance, never better."""
    names = list(candidates)
    r = np.array([pearson(candidates[n], observed) for n in names])
    r = np.nan_to_num(r, nan=-2.0)  # below any r: a constant prediction ranks last, tied
    mine = r[names.index(truth)]
    above = int((r > mine + 1e-12).sum())
    tied = int((np.abs(r - mine) <= 1e-12).sum())  # includes the truth itself

    def within(k: int) -> float:
        return float(np.clip((k - above) / tied, 0.0, 1.0))

    return within(1), within(3)


def halves(rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random split of a condition's cells into two halves (the replicate-halves ceiling)."""
    perm = rng.permutation(rows)
    return np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])


def summarise(per_condition: dict[str, dict[str, float]], groups: dict[str, list[str]]) -> dict:
    """Mean of every metric over each group of conditions (NaN entries left out; a metric that
    is NaN for all of a group is None)."""
    out = {}
    for group, names in groups.items():
        rows = [per_condition[n] for n in names if n in per_condition]
        if not rows:
            continue
        means = {}
        for key in rows[0]:
            vals = np.array([r[key] for r in rows], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            means[key] = round(float(vals.mean()), 4) if len(vals) else None
        out[group] = {"n": len(rows), **means}
    return out
