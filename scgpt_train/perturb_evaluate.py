"""`scgpt-train perturb evaluate`: a perturbation run on held-out conditions, beside the
baselines, all computed here on the same cells (metrics and baselines: perturb_metrics.py).

The held-out conditions must be unseen by the run (neither trained on nor used for its early
stopping). The baselines are fitted on the run's training conditions. Predictions are means
over the same control cells for every method; the noise ceiling compares two random halves of
each held-out condition's cells. With `reverse`, every condition of the screen is a candidate
for each held-out population, ranked by the pearson of its predicted change to the observed one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from scgpt_runtime.errors import InputError

from .distributed import resolve_device
from .gene_embeddings import encoder_embeddings
from .perturb import load_perturbation_run, predict_cells
from .perturb_data import Screen, condition_targets, flagged_columns, load_screen
from .perturb_metrics import (
    centroid_hits,
    condition_metrics,
    de_genes,
    embedding_ridge,
    halves,
    linear_model,
    reverse_hits,
    summarise,
)
from .pretrain import step_seed

METHODS = ("scgpt", "control_mean", "train_mean", "linear", "embedding_ridge", "noise_ceiling")
CONTROLS = 512  # control cells behind every predicted mean (all when fewer)
SHOW_GENES = 10  # top DE genes listed per held-out condition


@dataclass
class PerturbEvalConfig:
    run: str
    data: str
    perturbation_key: str
    control: str = "ctrl"
    targets: tuple[str, ...] = ()  # held-out conditions; default: every one the run never saw
    exclude_target: tuple[str, ...] = ()
    where: tuple[str, ...] = ()
    gene_column: str | None = None
    reverse: bool = False
    n_controls: int = CONTROLS
    seed: int = 0
    device: str = "auto"


def resolve_conditions(screen: Screen, names: tuple[str, ...], seen: set[str]) -> list[str]:
    """The screen's condition labels for `names` (a label, or the genes of one: `STAT1` finds
    `STAT1+ctrl`); default: every condition not in `seen`. Seen ones are refused."""
    if not names:
        return [c for c in screen.perturbations() if c not in seen]
    by_genes = {screen.targets[c]: c for c in screen.perturbations()}
    out = []
    for name in names:
        label = name if name in screen.targets else by_genes.get(condition_targets(name, "ctrl"))
        if label is None or label == screen.control:
            raise InputError(f"{screen.path}: no perturbed condition {name!r} in the screen")
        if label in seen:
            raise InputError(
                f"{name}: the run saw this condition in training; evaluation needs unseen ones"
            )
        out.append(label)
    return out


def evaluate_perturbation(cfg: PerturbEvalConfig) -> dict[str, Any]:
    """Every metric for every method on the held-out conditions; see the module doc."""
    t0 = time.perf_counter()
    model, info = load_perturbation_run(cfg.run)
    model.to(resolve_device(cfg.device))
    screen = load_screen(
        cfg.data,
        info.vocab,
        info.tokens,
        cfg.perturbation_key,
        cfg.control,
        exclude=cfg.exclude_target,
        where=cfg.where,
        gene_column=cfg.gene_column,
        panel=info.train["panel"],
    )
    trained = [c for c in info.train["train_conditions"] if c in screen.targets]
    seen = set(info.train["train_conditions"]) | set(info.train["val_conditions"])
    test = resolve_conditions(screen, tuple(cfg.targets), seen)
    if not test or not trained:
        raise InputError(f"{cfg.data}: no held-out condition to evaluate, or none trained on")
    rng = np.random.default_rng(step_seed(cfg.seed, 1))
    controls = np.flatnonzero(screen.is_control)
    inputs = np.sort(rng.permutation(controls)[: cfg.n_controls])
    ctrl = screen.control_mean()
    centroids = {c: screen.centroid(c) for c in screen.perturbations()}
    pert = np.mean([centroids[c] for c in trained], axis=0)
    max_len = int(info.train.get("max_len", 1536))

    def scgpt(c: str) -> np.ndarray:
        return predict_cells(model, info, screen, inputs, screen.targets[c], max_len).mean(0)

    candidates = screen.perturbations() if cfg.reverse else test
    preds = {"scgpt": {c: scgpt(c) for c in candidates}}
    preds.update(baseline_predictions(screen, model, info, candidates, trained, centroids, ctrl))
    per: dict[str, dict[str, dict[str, float]]] = {m: {} for m in METHODS}
    centroid_acc: dict[str, dict[str, float]] = {}
    ceiling_rng = np.random.default_rng(step_seed(cfg.seed, 2))
    for c in test:
        cells = screen.cells_of(c)
        skip = flagged_columns(screen, [screen.targets[c]])
        de = de_genes(screen.expression[cells], screen.expression[controls], skip)
        for method in METHODS[:-1]:
            per[method][c] = condition_metrics(preds[method][c], centroids[c], ctrl, pert, de)
        a, b = halves(cells, ceiling_rng)
        half_a, half_b = screen.expression[a].mean(0), screen.expression[b].mean(0)
        per["noise_ceiling"][c] = condition_metrics(half_a, half_b, ctrl, pert, de)
    for method in METHODS[:-1]:
        centroid_acc[method] = centroid_hits({c: preds[method][c] for c in test}, centroids)
    for method in METHODS[:-1]:
        for c in test:
            per[method][c]["centroid_accuracy"] = centroid_acc[method][c]
    in_panel = [c for c in test if not screen.outside(screen.targets[c])]
    groups = {
        "all": test,
        "in_panel": in_panel,
        "out_of_panel": [c for c in test if c not in in_panel],
    }
    result: dict[str, Any] = {
        "run": cfg.run,
        "data": cfg.data,
        "held_out": test,
        "trained_on": trained,
        "panel_genes": len(screen.genes),
        "control_cells": len(controls),
        "input_controls": len(inputs),
        "summary": {m: summarise(per[m], groups) for m in METHODS},
        "per_condition": per,
        "changes": top_changes(screen, test, preds, centroids, ctrl, controls),
    }
    if cfg.reverse:
        result["reverse"] = reverse_table(screen, test, preds, centroids, ctrl)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return finite(result)


def finite(obj: Any) -> Any:
    """`obj` with NaN floats as None (JSON has no NaN) and numbers rounded to 4 places."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    if isinstance(obj, float):
        return None if np.isnan(obj) else round(obj, 4)
    return obj


def baseline_predictions(
    screen: Screen,
    model,
    info,
    conditions: list[str],
    trained: list[str],
    centroids: dict[str, np.ndarray],
    ctrl: np.ndarray,
) -> dict[str, dict[str, np.ndarray]]:
    """The profiles each baseline predicts for `conditions`, fitted on `trained`."""
    deltas = np.stack([centroids[c] - ctrl for c in trained])  # (P, G)

    def columns(c: str) -> np.ndarray:
        return flagged_columns(screen, [screen.targets[c]])

    linear = linear_model(deltas, [columns(c) for c in trained])

    def embedding(c: str) -> np.ndarray:
        return encoder_embeddings(model, info.vocab.lookup(screen.targets[c])).sum(0)

    ridge = embedding_ridge(np.stack([embedding(c) for c in trained]), deltas)
    return {
        "control_mean": {c: ctrl.copy() for c in conditions},
        "train_mean": {c: ctrl + deltas.mean(0) for c in conditions},
        "linear": {c: ctrl + linear(columns(c)) for c in conditions},
        "embedding_ridge": {c: ctrl + ridge(embedding(c)) for c in conditions},
    }


def top_changes(screen, test, preds, centroids, ctrl, controls) -> dict[str, list[dict]]:
    """Per held-out condition, its top DE genes: the observed change and each method's."""
    out = {}
    for c in test:
        de = de_genes(
            screen.expression[screen.cells_of(c)],
            screen.expression[controls],
            np.zeros(0, dtype=np.int64),
            SHOW_GENES,
        )
        de = de[np.argsort(-np.abs(centroids[c][de] - ctrl[de]), kind="stable")]
        out[c] = [
            {
                "gene": screen.genes[j],
                "observed": round(float(centroids[c][j] - ctrl[j]), 4),
                **{
                    m: round(float(preds[m][c][j] - ctrl[j]), 4)
                    for m in ("scgpt", "train_mean", "linear")
                },
            }
            for j in de
        ]
    return out


def reverse_table(screen, test, preds, centroids, ctrl) -> dict[str, Any]:
    """Top-1 / top-3 accuracy of recovering each held-out condition among all candidates."""
    names = screen.perturbations()
    out: dict[str, Any] = {
        "candidates": len(names),
        "chance_top1": round(1 / len(names), 4),
        "chance_top3": round(min(3, len(names)) / len(names), 4),
    }
    for method in ("scgpt", "train_mean", "linear", "embedding_ridge"):
        hits = [
            reverse_hits({n: preds[method][n] - ctrl for n in names}, centroids[c] - ctrl, c)
            for c in test
        ]
        out[method] = {
            "top1": round(float(np.mean([h[0] for h in hits])), 4),
            "top3": round(float(np.mean([h[1] for h in hits])), 4),
            "top1_per_condition": dict(zip(test, (h[0] for h in hits), strict=True)),
        }
    return out


def format_table(result: dict[str, Any]) -> str:
    """The summary as a plain text table: one row per method and group of conditions."""
    keys = (
        "pearson",
        "pearson_delta",
        "pearson_de_delta",
        "systema_delta",
        "centroid_accuracy",
        "l2",
    )
    lines = [f"{'method':16} {'group':13} {'n':>3} " + " ".join(f"{k:>17}" for k in keys)]
    for method, groups in result["summary"].items():
        for group, row in groups.items():
            cells = " ".join(
                f"{'-' if row.get(k) is None else format(row[k], '.3f'):>17}" for k in keys
            )
            lines.append(f"{method:16} {group:13} {row['n']:>3} {cells}")
    if "reverse" in result:
        rev = result["reverse"]
        lines.append(
            f"reverse perturbation over {rev['candidates']} candidates (chance top-1 "
            f"{rev['chance_top1']:.3f}, top-3 {rev['chance_top3']:.3f}):"
        )
        for method in ("scgpt", "train_mean", "linear", "embedding_ridge"):
            lines.append(
                f"  {method:16} top-1 {rev[method]['top1']:.3f}  top-3 {rev[method]['top3']:.3f}"
            )
    return "\n".join(lines)
