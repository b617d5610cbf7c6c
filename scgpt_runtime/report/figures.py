"""Figures as functions of data: each takes arrays and names and returns a matplotlib Figure
(`Report.figure` embeds it). No command, file or model is known here, so every report, and the
downstream tasks to come, draw with the same few functions."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display, the same pixels on every machine

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

MAX_CATEGORIES = 20  # colours a reader can tell apart; the rest are drawn grey as "other"
OTHER = "other"


def bars(names: Sequence[str], values: Sequence[float], xlabel: str, title: str = "") -> Figure:
    """Horizontal bars, the first name on top."""
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    y = np.arange(len(names))
    ax.barh(y, values, color="#4878a8")
    ax.set_yticks(y, [str(n) for n in names])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for yi, v in zip(y, values, strict=True):
        ax.text(v, yi, f" {v:g}", va="center", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def histograms(
    groups: dict[str, np.ndarray],
    xlabel: str,
    bins: int | np.ndarray = 20,
    threshold: float | None = None,
    columns: int = 4,
) -> Figure:
    """One small histogram per group on shared bins; `threshold` drawn as a dashed line."""
    n = max(len(groups), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    values = [np.asarray(v, dtype=float) for v in groups.values()]
    if isinstance(bins, int):
        every = np.concatenate(values) if values else np.zeros(1)
        bins = np.histogram_bin_edges(every, bins=bins)
    for ax, (name, v) in zip(axes.flat, zip(groups, values, strict=True), strict=False):
        ax.hist(v, bins=bins, color="#4878a8")
        if threshold is not None:
            ax.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1)
        ax.set_title(f"{name} ({len(v)})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.supxlabel(xlabel, fontsize=9)
    fig.tight_layout()
    return fig


def embedding_map(
    xy: np.ndarray,
    values: np.ndarray,
    title: str,
    method: str,
    order: Sequence[str] | None = None,
) -> Figure:
    """Cells in 2-D coloured by `values`: categories (str) with a legend, the most frequent
    MAX_CATEGORIES in colour and the rest grey, or numbers with a colour bar. A category's
    colour is its place in `order` (default: by frequency), so that maps given the same order
    colour a name alike."""
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    size = float(np.clip(12000 / max(len(xy), 1), 1.0, 24.0))
    numeric = values.dtype.kind in "fiu"
    if numeric:
        art = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis", linewidths=0)
        fig.colorbar(art, ax=ax, shrink=0.7)
    else:
        present = set(np.unique(values.astype(str)).tolist())
        order = category_order(values) if order is None else list(order)[:MAX_CATEGORIES]
        palette = plt.get_cmap("tab20" if len(order) > 10 else "tab10")
        shown = [name for name in order if name in present]
        grey = ~np.isin(values, shown)
        if grey.any():
            ax.scatter(*xy[grey].T, s=size, color="#cccccc", linewidths=0, label=OTHER)
        for name in shown:
            i, at = order.index(name), values == name
            ax.scatter(*xy[at].T, s=size, color=palette(i % palette.N), linewidths=0, label=name)
        ax.legend(
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
            fontsize=8,
            markerscale=max(1.0, 6 / np.sqrt(size)),
        )
    ax.set_title(title)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def category_order(values: np.ndarray, first: Sequence[str] = ()) -> list[str]:
    """The names of `first` (present or not: their colours stay in place), then the other
    values by frequency (ties by name): the MAX_CATEGORIES that get a colour."""
    names, counts = np.unique(values.astype(str), return_counts=True)
    order = list(first)
    order += [str(names[i]) for i in np.lexsort((names, -counts)) if names[i] not in order]
    return order[:MAX_CATEGORIES]


def heatmap(
    matrix: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    fmt: str,
    axes: tuple[str, str] = ("", ""),
) -> Figure:
    """A matrix with its values written in the cells (`fmt`, e.g. "d" or ".2f") where it is
    small enough to read: a confusion matrix, counts or shares. `axes`: (x, y) labels."""
    n_r, n_c = matrix.shape
    fig, ax = plt.subplots(figsize=(0.45 * n_c + 3, 0.4 * n_r + 2.2))
    art = ax.imshow(matrix, cmap="Blues", aspect="auto")
    fig.colorbar(art, ax=ax, shrink=0.7)
    ax.set_xticks(range(n_c), [str(c) for c in columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_r), [str(r) for r in rows], fontsize=8)
    if n_r * n_c <= 900:
        top = np.nanmax(matrix) if matrix.size else 0
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                color = "white" if v > 0.6 * top else "black"
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6, color=color)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    return fig


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> Figure:
    """Reliability diagram: accuracy against mean confidence per equal-width bin, beside the
    diagonal of perfect calibration, with the cells per bin below."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    hit = np.bincount(which, weights=correct.astype(float), minlength=bins)
    conf = np.bincount(which, weights=confidence.astype(float), minlength=bins)
    has = counts > 0
    fig, (ax, low) = plt.subplots(
        2, 1, figsize=(5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="calibrated")
    ax.plot(conf[has] / counts[has], hit[has] / counts[has], "o-", color="#4878a8", label="model")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, loc="upper left")
    low.bar(edges[:-1], counts, width=1 / bins, align="edge", color="#4878a8")
    low.set_xlabel("confidence")
    low.set_ylabel("cells")
    low.set_xlim(0, 1)
    return fig


def curves(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_y: bool = False,
) -> Figure:
    """Lines y(x) on one axis, one per named series (train and validation, say)."""
    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=name)
    if log_y and all(np.all(np.asarray(y) > 0) for _, y in series.values()):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig
