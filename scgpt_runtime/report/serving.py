"""The report of `scgpt-run annotate` and `embed` (--report): what was read, how the genes
matched, what the model said, and where the cells lie. Its numbers are those of the command's
--json summary, read from it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..obs import obs_strings
from ..results import UNKNOWN, Result
from . import figures
from .document import Report
from .embedding_map import map_cells

UNMATCHED_SHOWN = 20


def serving_report(
    summary: dict[str, Any],
    settings: dict[str, Any],
    result: Result,
    colors: dict[str, np.ndarray],
    seed: int = 0,
) -> Report:
    """The report of one served file (or shard): `summary` as printed by --json, `settings`
    as recorded in the outputs, per-cell `result`, and obs columns to colour the map by."""
    command = summary["command"]
    report = Report(
        f"scgpt-run {command}: {settings['input'].rsplit('/', 1)[-1]}",
        f"{summary['n_cells']} cells, model {settings['bundle']}, "
        f"made {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    )
    labels = None if result.class_probs is None else result.predicted_labels  # once: (n,) str
    _run(report, summary, settings)
    _genes(report, summary, result)
    if command == "annotate" and summary["n_cells"]:
        _labels(report, summary, settings, labels, result.conf_score)
    _graphs(report, summary)
    _maps(report, result, labels, colors, seed)
    return report


def colour_values(values: np.ndarray) -> np.ndarray:
    """An obs column as the map colours it: numbers with many values as numbers, anything
    else as categories (str, missing values as "missing")."""
    if values.dtype.kind in "fiu" and len(np.unique(values)) > figures.MAX_CATEGORIES:
        return values.astype(np.float64)
    return np.array(["missing" if v is None else v for v in obs_strings(values)], dtype=str)


def _run(report: Report, summary: dict[str, Any], settings: dict[str, Any]) -> None:
    report.section("Run", "run")
    report.facts(
        {
            "command": summary["command"],
            "input": summary["input"],
            "input format": f"{settings['input_format']} ({settings['matrix']})",
            "shard": summary["shard"] or "whole file",
            "cells": summary["n_cells"],
            "output": summary["output"] or "stdout",
            "bundle": summary["bundle"],
            "bundle sha256": settings["bundle_sha256"],
            "precision": summary["precision"],
            "device": summary["device"],
            "execution provider": summary["execution_provider"],
            "seconds": summary["seconds"],
            "cells per second": summary["cells_per_s"],
            **{f"version of {k}": v for k, v in settings["versions"].items()},
        },
        id="run-facts",
    )
    options = {k: v for k, v in settings["options"].items() if not isinstance(v, dict)}
    options |= {f"reference {k}": v for k, v in settings["options"].get("reference", {}).items()}
    report.facts(options, id="options")


def _genes(report: Report, summary: dict[str, Any], result: Result) -> None:
    match = summary["gene_match"]
    report.section("Gene match", "genes")
    report.facts(
        {
            "gene column": match["gene_column"],
            "genes in the file": match["n_genes"],
            "genes matched": match["n_matched"],
            "fraction matched": match["fraction_matched"],
            "duplicate names": match["n_duplicates"],
            "cells without a matched gene": summary["n_empty"],
        },
        id="gene-match",
    )
    unmatched = match["unmatched_examples"][:UNMATCHED_SHOWN]
    if unmatched:
        report.text("Not in the vocabulary, for example: " + ", ".join(map(str, unmatched)))
    if result.n_cells:
        fig = figures.histograms({"all cells": result.n_genes}, "genes the model saw per cell")
        report.figure(fig, "Genes per cell that reached the model (after the length limit).")


def _labels(
    report: Report,
    summary: dict[str, Any],
    settings: dict[str, Any],
    labels: np.ndarray,
    conf: np.ndarray,
) -> None:
    n, counts = summary["n_cells"], summary["label_counts"]
    report.section("Predicted labels", "labels")
    report.table(
        ["label", "cells", "share"],
        [(k, v, round(v / n, 4)) for k, v in counts.items()],
        id="label-counts",
    )
    report.figure(figures.bars(list(counts), list(counts.values()), "cells"))
    options = settings["options"]
    threshold = options.get("unknown_below")
    reference = options.get("reference")
    rule = f"conf_score below {threshold}" if threshold else "no confidence threshold"
    if reference:
        rule += f"; farther than quantile {reference['distance_quantile']} of the reference"
    report.facts(
        {
            "Unknown cells": summary["n_unknown"],
            "share Unknown": round(summary["n_unknown"] / n, 4),
            "rule": rule,
        },
        id="unknown",
    )
    report.section("Confidence", "confidence")
    shown = [k for k in counts if k != UNKNOWN][: figures.MAX_CATEGORIES]
    if UNKNOWN in counts:
        shown.append(UNKNOWN)
    groups = {k: conf[labels == k] for k in shown}
    fig = figures.histograms(groups, "conf_score", np.linspace(0, 1, 21), threshold or None)
    what = "vote share of the label" if reference else "probability of the predicted label"
    report.figure(fig, f"conf_score ({what}) per predicted label.")


def _graphs(report: Report, summary: dict[str, Any]) -> None:
    graphs = summary["graphs"]
    report.section("Graph lengths", "graphs")
    report.text(
        "Each cell runs in the shortest graph of the bundle's length ladder that holds its "
        "tokens; shorter graphs are faster."
    )
    report.table(["tokens", "cells"], list(graphs.items()), id="graphs")


def _maps(
    report: Report,
    result: Result,
    labels: np.ndarray | None,
    colors: dict[str, np.ndarray],
    seed: int,
) -> None:
    if result.n_cells < 3:
        return
    shown = map_cells(result.embedding, seed)
    report.section("Embedding map", "map")
    note = f"{shown.method} of the cell embeddings, {len(shown.rows)} of {shown.n_cells} cells"
    if len(shown.rows) < shown.n_cells:
        note += f" (a random subset, seed {seed})"
    report.text(note + ".", note=True)
    panels = {}
    if labels is not None:
        panels["predicted label"] = labels
    panels |= {f"obs {k}": v for k, v in colors.items()}
    if not panels:
        panels["genes the model saw"] = result.n_genes
    first: list[str] = []  # the first panel's colours carry over to the same names
    for name, values in panels.items():
        values = np.asarray(values)[shown.rows]
        order = None
        if values.dtype.kind not in "fiu":  # names shared with the first panel keep colours
            shared = first if set(first) & set(np.unique(values).tolist()) else []
            order = figures.category_order(values, shared)
            first = first or order
        fig = figures.embedding_map(shown.xy, values, f"coloured by {name}", shown.method, order)
        report.figure(fig)
