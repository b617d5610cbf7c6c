"""`Result`: what serving a range of cells gives; the one result type of the API and commands."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNKNOWN = "Unknown"  # the label of a cell below the confidence threshold, or too far away


@dataclass
class Result:
    """Per-cell results of a range of cells, in file order."""

    obs_names: np.ndarray  # (n,) str: cell barcodes
    n_genes: np.ndarray  # (n,) int64: genes the model saw; 0 = no matched gene (<cls> alone)
    embedding: np.ndarray  # (n, d) float32: L2-normalised or raw <cls> embedding
    labels: list[str] | None = None  # class names, in class_probs column order (annotate only)
    class_probs: np.ndarray | None = None  # (n, n_cls) float32: head or vote shares (annotate)
    codes: np.ndarray | None = None  # (n,) int64 predicted class, -1 = Unknown (see `decide`)
    knn_distance: np.ndarray | None = None  # (n,) float32 to the nearest reference cell
    graphs: dict[int, int] = field(default_factory=dict)  # graph length -> cells it served

    @property
    def n_cells(self) -> int:
        return len(self.n_genes)

    @property
    def predicted_labels(self) -> np.ndarray:
        """(n,) str: the most probable class (the first of equals), or "Unknown"."""
        codes = self.class_probs.argmax(1) if self.codes is None else self.codes
        names = np.asarray([*self._labels(), UNKNOWN], dtype=object)
        return names[codes].astype(str)  # code -1 indexes UNKNOWN, the last

    @property
    def conf_score(self) -> np.ndarray:
        """(n,) float32: the probability of the predicted class."""
        self._labels()
        return self.class_probs.max(1)

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels (n, k) str, probabilities (n, k)) of the k most probable classes."""
        labels = self._labels()
        order = np.argsort(-self.class_probs, axis=1, kind="stable")[:, :k]
        names = np.asarray(labels, dtype=object)[order].astype(str)
        return names, np.take_along_axis(self.class_probs, order, axis=1)

    def label_counts(self) -> dict[str, int]:
        """Cells per predicted label, most frequent first (ties in label order)."""
        names, counts = np.unique(self.predicted_labels, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return {str(names[i]): int(counts[i]) for i in order}

    def decide(self, unknown_below: float = 0.0, too_far: np.ndarray | None = None) -> None:
        """Set `codes`: the most probable class, -1 (Unknown) where its probability (or vote
        share) is below `unknown_below`, where `too_far` (n,) bool, or where nothing voted.
        A cell without any gene of the vocabulary (n_genes 0) is Unknown with probabilities
        0: its result would be <cls> alone, the same for every such cell."""
        self._labels()
        self.class_probs[self.n_genes == 0] = 0.0
        probs = self.class_probs
        codes = probs.argmax(1)
        unknown = (probs.max(1) < unknown_below) | (probs.sum(1) == 0)
        if too_far is not None:
            unknown |= too_far
        self.codes = np.where(unknown, -1, codes).astype(np.int64)

    def add_graphs(self, counts: dict[int, int]) -> None:
        for length, k in counts.items():
            self.graphs[length] = self.graphs.get(length, 0) + k

    def _labels(self) -> list[str]:
        if self.labels is None or self.class_probs is None:
            raise ValueError("these results have no cell-type predictions (embed, not annotate)")
        return self.labels


def temperature_scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probabilities with their logits divided by `temperature`: p^(1/T), renormalised
    (exact for softmax outputs; T > 1 softens overconfident heads). float32 in, float32 out."""
    if temperature == 1.0:
        return probs
    logp = np.log(np.maximum(probs.astype(np.float64), 1e-300)) / temperature
    scaled = np.exp(logp - logp.max(1, keepdims=True))
    return (scaled / scaled.sum(1, keepdims=True)).astype(np.float32)
