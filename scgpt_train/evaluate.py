"""Score a run on labelled cells: its classifier, kNN transfer and integration metrics."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scgpt_runtime.bundle import Bundle, load_bundle
from scgpt_runtime.errors import InputError
from scgpt_runtime.io.atomic import atomic_path
from scgpt_runtime.knn import VOTES
from scgpt_runtime.report import report_path, require

from .calibration import expected_calibration_error
from .checkpoint import created, sha256_file
from .metrics import (
    EvaluatedCells,
    annotation_metrics,
    decide,
    integration_metrics,
    knn_transfer,
    l2_normalize,
)

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    data: list[str]
    label_key: str
    run: str | None = None  # a run directory (PyTorch) ...
    bundle: str | None = None  # ... or a model bundle, served by the runtime
    precision: str = "auto"  # of the bundle's graphs
    record: bool = False  # store the bundle's metrics in its evaluation.json
    record_into: str | None = None  # ... or in another bundle's: the held-out build of a model
    where: tuple[str, ...] = ()
    batch_key: str | None = None  # integration metrics; needed to embed with a DSBN model
    reference: list[str] = field(default_factory=list)  # labelled files for kNN transfer
    reference_where: tuple[str, ...] = ()
    k: int = 10
    vote: str = "majority"
    unknown_threshold: float | None = None
    gene_column: str | None = None
    predictions: str | None = None  # CSV of per-cell predictions
    baselines: bool = True  # logistic regression and PCA + kNN on the same cells (baselines.py)
    report: str | None = None  # an HTML report (extra [report])
    seed: int = 0  # of k-means

    def __post_init__(self) -> None:
        if self.vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}, not {self.vote!r}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if (self.run is None) == (self.bundle is None):
            raise ValueError("give either --from RUN or --bundle BUNDLE")
        if self.bundle is None and (self.record or self.record_into):
            raise ValueError("--record stores metrics in a bundle: it needs --bundle")
        if self.record and self.record_into:
            raise ValueError("give either --record or --record-into BUNDLE, not both")
        if self.bundle is not None and (self.reference or self.batch_key):
            raise ValueError(
                "--bundle scores the cell-type head; --reference and --batch-key need --from RUN"
            )
        if self.report is not None:
            report_path(self.report)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a run or a bundle (see evaluate_bundle) on labelled cells; with cfg.report the
    HTML report too (its path in the result)."""
    if cfg.report is not None:
        require()  # before any work
    res, cells = evaluate_bundle(cfg) if cfg.bundle else evaluate_run(cfg)
    if cfg.report is not None:
        from .reports import evaluate_report

        res["report"] = str(evaluate_report(res, cells, cfg.seed).write(cfg.report))
    return res


def evaluate_bundle(cfg: EvaluateConfig) -> tuple[dict[str, Any], EvaluatedCells]:
    """Score a bundle's cell-type head as `scgpt-run annotate` serves it (onnxruntime, CPU,
    temperature-scaled where the bundle is calibrated), with its expected calibration error
    as served and without the temperature; with cfg.record the metrics go into the bundle's
    evaluation.json. Returns the metrics and the per-cell data of a report."""
    from scgpt_runtime import Model
    from scgpt_runtime.bundle import record_evaluation
    from scgpt_runtime.io import open_counts
    from scgpt_runtime.obs import obs_strings, parse_where, selected

    model = Model.load(cfg.bundle, device="cpu", precision=cfg.precision)
    truth, pred, names, conf, probs, emb = [], [], [], [], [], []
    for path in cfg.data:
        with open_counts(path) as counts:
            keep = selected(counts, parse_where(cfg.where))
            labels = obs_strings(counts.read_obs(cfg.label_key))
        ann = model.annotate(path, gene_column=cfg.gene_column)
        out = decide(ann.labels, ann.class_probs[keep], cfg.unknown_threshold)
        truth.append(labels[keep])
        pred.append(out.predicted_labels)
        names.append(ann.obs_names[keep])
        conf.append(out.conf_score)
        probs.append(ann.class_probs[keep])
        emb.append(ann.embedding[keep])
    truth_all, pred_all = np.concatenate(truth), np.concatenate(pred)
    labelled = np.array([v is not None for v in truth_all.tolist()])
    metrics = annotation_metrics(truth_all[labelled].astype(str), pred_all[labelled])
    metrics |= _calibration(np.concatenate(probs)[labelled], truth_all[labelled], model)
    res = {
        "bundle": cfg.bundle,
        "precision": model.precision,
        "execution_provider": model.provider,
        "n_cells": len(truth_all),
        "n_unlabelled": int((~labelled).sum()),
        "classifier": metrics,
    }
    if cfg.predictions:
        per_cell = {"predicted_labels": pred_all, "conf_score": np.concatenate(conf)}
        _write_predictions(Path(cfg.predictions), np.concatenate(names), truth_all, per_cell)
    if cfg.record or cfg.record_into:
        entry = {
            "data": [Path(p).name for p in cfg.data],
            "data_sha256": [sha256_file(Path(p)) for p in cfg.data],
            "where": list(cfg.where),
            "label_key": cfg.label_key,
            "precision": model.precision,
            "execution_provider": model.provider,
            "n_cells": metrics["n_cells"],
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "per_class_f1": metrics["per_class_f1"],
            "ece": metrics["ece"],
            "ece_uncalibrated": metrics["ece_uncalibrated"],
            "created": created(),
        }
        if cfg.record_into:
            entry["measured_on"] = _held_out_build(model.bundle, cfg.record_into)
        record_evaluation(cfg.record_into or cfg.bundle, entry)
    cells = EvaluatedCells(
        truth_all,
        {"classifier": pred_all},
        {"classifier": np.concatenate(conf)},
        np.concatenate(emb),
    )
    return res, cells


def _held_out_build(measured: Bundle, target: str) -> dict[str, Any]:
    """What a record of `target` says about the bundle it was measured on: a build of the
    same head that kept the scored cells out (section 9 of docs/bundle-format.md)."""
    other = load_bundle(target, verify=False)  # record_evaluation checks its sha256s next
    if other.labels != measured.labels:
        raise InputError(
            f"{target}: its labels {other.labels} differ from {measured.path}'s "
            f"{measured.labels}; a held-out figure is recorded only into a build of the same head"
        )
    training = measured.config.get("provenance", {}).get("training", {})
    return {"bundle_sha256": measured.sha256, "training_command": training.get("command")}


def _calibration(probs: np.ndarray, truth: np.ndarray, model: Any) -> dict[str, Any]:
    """Expected calibration error as served and with the bundle's temperature undone (cells
    of classes the head does not know count as wrong)."""
    from scgpt_runtime.results import temperature_scaled

    index = {c: i for i, c in enumerate(model.labels)}
    codes = np.array([index.get(str(t), -1) for t in truth])
    raw = temperature_scaled(probs, 1 / model.bundle.temperature)
    return {
        "ece": round(expected_calibration_error(probs, codes), 6),
        "ece_uncalibrated": round(expected_calibration_error(raw, codes), 6),
        "temperature": model.bundle.temperature,
    }


def evaluate_run(cfg: EvaluateConfig) -> tuple[dict[str, Any], EvaluatedCells]:
    """Score a run on labelled cells: its classifier (if it has one), kNN transfer from
    `reference` (if given) and integration metrics on L2-normalised embeddings (with a batch
    key). Returns a JSON-ready dict and the per-cell data of a report."""
    from .cells import load_cells
    from .checkpoint import load_run  # torch is needed here only: the metrics above stay numpy
    from .inference import embed, predict

    model, info = load_run(cfg.run)
    if info.model.n_cls == 0 and not cfg.reference and cfg.batch_key is None:
        raise InputError(
            f"{cfg.run}: has no classifier head; give --reference FILE (kNN transfer) or "
            "--batch-key COL (integration metrics)"
        )
    query = load_cells(
        cfg.data,
        info.vocab,
        info.tokens,
        label_key=cfg.label_key,
        batch_key=cfg.batch_key,
        where=cfg.where,
        gene_column=cfg.gene_column,
    )
    codes = _batch_codes(cfg, info.batches, query.batches, bool(info.model.n_dsbn))
    labelled = np.array([v is not None for v in query.labels.tolist()])
    truth = query.labels[labelled].astype(str)
    res: dict[str, Any] = {
        "run": cfg.run,
        "n_cells": query.tokens.n_cells,
        "n_unlabelled": int((~labelled).sum()),
    }
    per_cell: dict[str, np.ndarray] = {}
    if info.model.n_cls:
        pred = predict(model, info.labels or [], query.tokens, codes, cfg.unknown_threshold)
        res["classifier"] = annotation_metrics(truth, pred.predicted_labels[labelled])
        trained_on = (info.train.get("data") or [], tuple(info.train.get("where") or ()))
        _baselines(cfg, res["classifier"], trained_on, info, truth, labelled)
        per_cell = {"predicted_labels": pred.predicted_labels, "conf_score": pred.conf_score}
    emb = None
    if cfg.reference:
        ref = load_cells(
            cfg.reference,
            info.vocab,
            info.tokens,
            label_key=cfg.label_key,
            batch_key=cfg.batch_key,
            where=cfg.reference_where,
            gene_column=cfg.gene_column,
        )
        ref_codes = _batch_codes(cfg, info.batches, ref.batches, bool(info.model.n_dsbn))
        has = np.array([v is not None for v in ref.labels.tolist()])
        ref_emb = embed(model, ref.tokens, ref_codes)[has]
        emb = embed(model, query.tokens, codes)
        knn = knn_transfer(
            ref_emb, ref.labels[has].astype(str), emb, cfg.k, cfg.vote, cfg.unknown_threshold
        )
        res["knn"] = {
            "k": cfg.k,
            "vote": cfg.vote,
            "n_reference": int(has.sum()),
            **annotation_metrics(truth, knn.predicted_labels[labelled]),
        }
        reference = (cfg.reference, cfg.reference_where)
        _baselines(cfg, res["knn"], reference, info, truth, labelled, cfg.label_key)
        per_cell.setdefault("predicted_labels", knn.predicted_labels)
        per_cell.setdefault("conf_score", knn.conf_score)
        per_cell["knn_labels"] = knn.predicted_labels
    if cfg.batch_key is not None:
        emb = embed(model, query.tokens, codes) if emb is None else emb
        batches = query.batches[labelled].astype(str)
        res["integration"] = integration_metrics(
            l2_normalize(emb)[labelled], truth, batches, cfg.seed
        )
    if cfg.predictions:
        _write_predictions(Path(cfg.predictions), query.obs_names, query.labels, per_cell)
    cells = EvaluatedCells(query.labels, batches=query.batches)
    if cfg.report is not None:
        emb = embed(model, query.tokens, codes) if emb is None else emb
        cells.embedding = l2_normalize(emb)
        if "classifier" in res:
            cells.predictions["classifier"] = pred.predicted_labels
            cells.confidence["classifier"] = pred.conf_score
        if "knn" in res:
            cells.predictions["knn"] = knn.predicted_labels
            cells.confidence["knn"] = knn.conf_score
    return res, cells


def _baselines(cfg, metrics, train, info, truth, labelled, label_key=None) -> None:
    """metrics["baselines"]: the baselines fit on the `train` (files, where) cells and scored on
    the evaluated ones; left out, with a warning, where those files are gone."""
    if not cfg.baselines:
        return
    missing = [p for p in train[0] if not Path(p).exists()]
    if not train[0] or missing:
        log.warning("baselines left out: the training cells (%s) are not here", missing or "?")
        return
    from .baselines import baseline_predictions

    key = label_key or info.train.get("label_key") or cfg.label_key
    preds = baseline_predictions(train, (cfg.data, cfg.where), key, info.vocab, cfg.gene_column)
    metrics["baselines"] = {
        name: {"fit_on": [Path(p).name for p in train[0]], "where": list(train[1])}
        | annotation_metrics(truth, p[labelled])
        for name, p in preds.items()
    }


def _batch_codes(
    cfg: EvaluateConfig, run_batches: list[str] | None, batches: np.ndarray | None, dsbn: bool
) -> np.ndarray | None:
    """Batch codes of the run's batch names for a DSBN model (None otherwise)."""
    if not dsbn:
        return None
    known = run_batches or []
    if batches is None:
        raise InputError(
            f"{cfg.run}: the model normalises per batch (DSBN); pass --batch-key "
            f"(its batches: {', '.join(known)})"
        )
    unknown = sorted({str(b) for b in batches.tolist()} - set(known))
    if unknown:
        raise InputError(
            f"{cfg.data[0]}: batches {', '.join(unknown)} of obs column {cfg.batch_key!r} are "
            f"not among the run's ({', '.join(known)})"
        )
    index = {b: i for i, b in enumerate(known)}
    return np.array([index[b] for b in batches.tolist()], dtype=np.int64)


def _write_predictions(
    path: Path, names: np.ndarray, truth: np.ndarray, columns: dict[str, np.ndarray]
) -> None:
    """A CSV: cell, true label, then the prediction columns (confidences to 4 decimals)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "label", *columns])
        for i, name in enumerate(names.tolist()):
            values = [columns[c][i] for c in columns]
            writer.writerow(
                [
                    name,
                    truth[i] or "",
                    *(f"{v:.4f}" if isinstance(v, float | np.floating) else v for v in values),
                ]
            )
