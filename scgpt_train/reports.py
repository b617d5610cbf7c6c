"""The HTML reports of training (`scgpt-train report RUN`) and evaluation (`evaluate
--report`), drawn with the runtime's report module (extra [report]). Their numbers are those
of metrics.jsonl and of evaluate --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from scgpt_runtime.report import figures
from scgpt_runtime.report.document import Report
from scgpt_runtime.report.embedding_map import map_cells

from .checkpoint import checkpoints, read_json, read_metrics
from .metrics import EvaluatedCells

AXES = ("step", "epoch")
OTHER_KEYS = ("lr", "grad_norm")  # drawn apart from the objectives
MAX_CONFUSION = 40  # classes drawn as a confusion matrix; more are listed in the table only


# ---------------------------------------------------------------------------- training runs


def run_report(run_dir: str | Path) -> Report:
    """Loss curves (every objective apart, train beside validation), learning rate,
    throughput, validation metrics, the run's config and provenance. A run still training
    shows what it has logged so far."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json", what="run directory")
    rows = read_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    done = summary_path.exists()
    last = rows[-1] if rows else {}
    state = "complete" if done else f"in progress: {len(rows)} rows logged"
    report = Report(f"scgpt-train run: {run_dir.name}", f"{state}, {len(rows)} metrics rows")
    report.section("Run", "run")
    report.facts(
        {
            "run directory": str(run_dir),
            "state": state,
            "last step": last.get("step"),
            "last epoch": last.get("epoch"),
            "checkpoints": len(checkpoints(run_dir)),
            **{f"provenance {k}": _text(v) for k, v in config.get("provenance", {}).items()},
        },
        id="run-facts",
    )
    if rows:
        report.section("Last logged values", "last")
        report.table(["metric", "value"], list(last.items()), id="last")
        for title, anchor, panels in _curve_panels(rows):
            report.section(title, anchor)
            for name, series in panels.items():
                report.figure(figures.curves(series, "step", name, log_y=name.endswith("loss")))
    if done:
        report.section("Summary", "summary")
        report.facts(read_json(summary_path, what="run summary"), id="summary")
    report.section("Configuration", "config")
    for part in ("model", "tokens", "train"):
        if config.get(part):
            report.text(part, note=True)
            report.facts({k: _text(v) for k, v in config[part].items()}, id=f"config-{part}")
    return report


def _curve_panels(rows: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, dict]]]:
    """(section title, anchor, {panel name: {series name: (x, y)}}) of the logged keys."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in AXES]
    keys = [k for k in keys if all(_number(r.get(k, 0)) for r in rows)]
    val = {k for k in keys if k.startswith(("val_", "probe_"))}  # scores on held-out cells
    rates = [k for k in keys if k.endswith("_per_s")]
    objectives = [k for k in keys if k not in val and k not in rates and k not in OTHER_KEYS]
    panels = {k: {"train": _xy(rows, k)} for k in objectives}
    for k in objectives:
        if f"val_{k}" in val:
            panels[k]["validation"] = _xy(rows, f"val_{k}")
    paired = {f"val_{k}" for k in objectives}
    scores = {
        k: {"probe" if k.startswith("probe_") else "validation": _xy(rows, k)}
        for k in sorted(val - paired)
    }
    other = {k: {k: _xy(rows, k)} for k in OTHER_KEYS if k in keys}
    other |= {k: {k: _xy(rows, k)} for k in rates}
    sections = [
        ("Objectives", "objectives", panels),
        ("Validation and probe scores", "validation", scores),
        ("Optimisation and throughput", "optimisation", other),
    ]
    return [s for s in sections if s[2]]


def _xy(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    have = [r for r in rows if key in r]
    x = np.array([r.get("step", i + 1) for i, r in enumerate(have)], dtype=float)
    return x, np.array([r[key] for r in have], dtype=float)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _text(v: Any, limit: int = 300) -> Any:
    """A config or provenance value for a table cell; long lists and dicts cut short."""
    if not isinstance(v, dict | list):
        return v
    text = json.dumps(v)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# ---------------------------------------------------------------------------- evaluations


def evaluate_report(result: dict[str, Any], cells: EvaluatedCells, seed: int = 0) -> Report:
    """Per prediction (head, kNN transfer): scores, per-class precision/recall/F1, confusion
    matrices, calibration; integration metrics; embedding maps by truth, prediction, batch."""
    source = result.get("run") or result.get("bundle")
    report = Report(
        f"scgpt-train evaluate: {Path(str(source)).name}",
        f"{result['n_cells']} cells ({result['n_unlabelled']} unlabelled)",
    )
    report.section("Evaluation", "evaluation")
    facts = {"model": source, "cells": result["n_cells"], "unlabelled": result["n_unlabelled"]}
    report.facts(facts | {k: result[k] for k in ("precision", "execution_provider") if k in result})
    labelled = np.array([t is not None for t in cells.truth.tolist()])
    for name, title in (("classifier", "Classifier head"), ("knn", "kNN transfer")):
        if name in result:
            _predictions(report, name, title, result[name], cells, labelled)
    if "integration" in result:
        report.section("Integration", "integration")
        report.facts(result["integration"], id="integration")
    if cells.embedding is not None and len(cells.embedding) >= 3:
        _maps(report, cells, seed)
    return report


def _predictions(report, name, title, m, cells: EvaluatedCells, labelled) -> None:
    report.section(title, name)
    report.facts(
        {"cells": m["n_cells"], "accuracy": m["accuracy"], "macro-F1": m["macro_f1"]}
        | ({"ECE": m["ece"]} if "ece" in m else {}),
        id=f"{name}-scores",
    )
    labels, baselines = m["labels"], m.get("baselines", {})
    if baselines:
        fit = next(iter(baselines.values()))
        report.text(
            "Beside the simple baselines, fit on the cells the model learnt from "
            f"({', '.join(fit['fit_on'] + fit['where'])}) and scored on the same cells:"
        )
        report.table(
            ["method", "accuracy", "macro-F1"],
            [("scGPT", m["accuracy"], m["macro_f1"])]
            + [(b, v["accuracy"], v["macro_f1"]) for b, v in baselines.items()],
            id=f"{name}-baselines",
        )
    report.table(
        ["class", "true cells", "precision", "recall", "F1", *(f"F1 {b}" for b in baselines)],
        [
            (
                c,
                m["support"][c],
                m["per_class_precision"][c],
                m["per_class_recall"][c],
                m["per_class_f1"][c],
                *(v["per_class_f1"].get(c) for v in baselines.values()),
            )
            for c in labels
        ],
        id=f"{name}-per-class",
    )
    if len(labels) <= MAX_CONFUSION:
        cm = np.asarray(m["confusion"], dtype=float)
        shares = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        axes = ("predicted", "truth")
        report.figure(figures.heatmap(cm.astype(int), labels, labels, "cells", "d", axes))
        report.figure(
            figures.heatmap(shares, labels, labels, "share of each true class", ".2f", axes)
        )
    else:
        report.text(f"{len(labels)} classes: the confusion matrix is in --json only.", note=True)
    conf = cells.confidence.get(name)
    if name == "classifier" and conf is not None:
        truth = cells.truth[labelled].astype(str)
        correct = cells.predictions[name][labelled] == truth
        report.figure(
            figures.reliability(conf[labelled], correct),
            "Reliability: accuracy against confidence of the predicted class (labelled cells).",
        )


def _maps(report: Report, cells: EvaluatedCells, seed: int) -> None:
    shown = map_cells(cells.embedding, seed)
    report.section("Embedding map", "map")
    report.text(
        f"{shown.method} of the L2-normalised cell embeddings, {len(shown.rows)} of "
        f"{shown.n_cells} cells.",
        note=True,
    )
    truth = np.array(["unlabelled" if t is None else t for t in cells.truth.tolist()], dtype=str)
    panels = {"truth": truth} | {f"{k} prediction": v for k, v in cells.predictions.items()}
    if cells.batches is not None:
        panels["batch"] = cells.batches.astype(str)
    first = figures.category_order(truth[shown.rows])
    for name, values in panels.items():
        v = np.asarray(values).astype(str)[shown.rows]
        order = figures.category_order(v, first) if name != "batch" else None
        title = f"coloured by {name}"
        report.figure(figures.embedding_map(shown.xy, v, title, shown.method, order))
