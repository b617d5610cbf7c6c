"""Cell-type annotation (`scgpt-train finetune annotate`).

Annotation trains the classifier head on the cell embedding with cross-entropy (optionally
class-weighted), Adam with the official per-epoch decay (x0.9), and early stopping on the
macro-F1 of a stratified validation split; the best epoch's weights are saved. Cells whose label
is missing stay out of the loss. Fine-tuning from a run keeps its vocabulary and TokenConfig and
loads every tensor that fits (new heads start fresh; the load report says which: start.py).
Cells are tokenized by the runtime's own `tokenize`, so a saved model sees exactly what it
trained on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scgpt_runtime.errors import InputError

from .calibration import calibrate
from .cells import MISSING, class_names, codes_of, load_cells, minibatches, stratified_split
from .checkpoint import MetricsLog, RunInfo, new_run_dir, save_run, write_json
from .config import default_lr
from .distributed import resolve_device
from .epochs import BestEpoch, epoch_row, optimizer_step, set_epoch_lr
from .inference import batch_inputs, codes_tensor, predict
from .metrics import accuracy, macro_f1
from .model import ScGPT
from .pretrain import step_seed
from .start import build_model, check_start, run_provenance, start_from

log = logging.getLogger(__name__)

FREEZE = ("none", "embeddings", "encoder")  # what stays fixed: nothing, gene+value encoders, all
CLASS_WEIGHTS = ("none", "balanced")  # "balanced": n / (C * n_c), as scikit-learn


def freeze(model: ScGPT, what: str) -> None:
    """Fix the gene and value encoders ("embeddings") or everything but the classifier
    ("encoder": a probe of the embedding); "none" trains everything."""
    if what not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, not {what!r}")
    for name, p in model.named_parameters():
        if what == "embeddings":
            p.requires_grad_(not name.startswith(("encoder.", "value_encoder.")))
        elif what == "encoder":
            p.requires_grad_(name.startswith("cls_decoder."))


@dataclass
class AnnotateConfig:
    data: list[str]
    label_key: str
    out: str
    from_run: str | None = None  # a pretrained, imported or fine-tuned run directory
    from_scratch: bool = False  # instead of from_run: a fresh `preset`
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (e.g. dropout)
    tokens: dict[str, Any] = field(default_factory=dict)  # TokenConfig overrides (from scratch)
    batch_key: str | None = None  # adds DSBN with batch-pure minibatches
    where: tuple[str, ...] = ()  # "COL=VALUE": train on these cells only
    gene_column: str | None = None
    epochs: int = 30  # with early stopping; the official tutorial's 10 stopped short on Kang
    batch_size: int = 32
    lr: float | None = None  # None: config.default_lr of the model's width
    dropout: float = 0.0  # while fine-tuning (official 0.2); a "model" override in --config wins
    lr_decay: float = 0.9  # per epoch (official schedule_ratio)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    freeze: str = "none"
    class_weight: str = "balanced"
    val_fraction: float = 0.1  # stratified; early stopping on its macro-F1
    patience: int = 8  # epochs without a better validation macro-F1 before stopping
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False  # replace an existing run at `out`

    def __post_init__(self) -> None:
        check_start(self)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val fraction must be in [0, 1), got {self.val_fraction}")
        if self.freeze not in FREEZE:
            raise ValueError(f"freeze must be one of {FREEZE}, not {self.freeze!r}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class weight must be one of {CLASS_WEIGHTS}")


def annotation_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over the cells with a label (code >= 0); cells marked MISSING add nothing.
    With class weights, the weighted mean (PyTorch's: divided by the targets' total weight)."""
    if not bool((labels != MISSING).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, weight=weight, ignore_index=MISSING)


def finetune_annotate(cfg: AnnotateConfig) -> dict[str, Any]:
    """Fine-tune a classifier head (and the encoder, unless frozen); returns the summary that is
    also written to RUN/summary.json."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = new_run_dir(cfg.out, cfg.overwrite)  # refused before any work where it exists
    overrides = {"dropout": cfg.dropout, **cfg.model}
    start = start_from(
        cfg.from_run, cfg.preset, overrides, cfg.tokens, cfg.data, cfg.gene_column, cfg.seed
    )
    if cfg.lr is None:  # the run records the rate it trained with
        cfg = replace(cfg, lr=default_lr(start.model["d_model"]))
    cells = load_cells(
        cfg.data,
        start.vocab,
        start.tokens,
        label_key=cfg.label_key,
        batch_key=cfg.batch_key,
        where=cfg.where,
        gene_column=cfg.gene_column,
    )
    assert cells.labels is not None
    classes = class_names(cells.labels, ", ".join(cfg.data), cfg.label_key)
    codes = codes_of(cells.labels, classes)
    batch_names = batch_codes = None
    heads: dict[str, Any] = {
        "n_cls": len(classes),
        "n_batch_tokens": 0,
        "n_dsbn": 0,
        "n_dab": 0,
    }
    if cells.batches is not None:
        batch_names = sorted({b for b in cells.batches.tolist() if b is not None})
        batch_codes = codes_of(cells.batches, batch_names)
        if (batch_codes == MISSING).any():
            raise InputError(f"{cfg.data[0]}: obs column {cfg.batch_key!r} has missing values")
        heads.update(n_dsbn=len(batch_names))
    model, report = build_model(start, heads, classes, batch_names, cfg.seed)
    model.to(device)
    freeze(model, cfg.freeze)

    train, val = stratified_split(codes, cfg.val_fraction, cfg.seed)
    counts = np.bincount(codes[train], minlength=len(classes))
    weight = None
    if cfg.class_weight == "balanced":
        w = len(train) / (len(classes) * np.maximum(counts, 1))
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    metrics = MetricsLog(out)
    best = BestEpoch(model, "val_macro_f1", cfg.patience)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        set_epoch_lr(optimizer, cfg.lr, cfg.lr_decay, epoch)
        model.train()
        rng = np.random.default_rng(step_seed(cfg.seed, epoch))
        groups = None if batch_codes is None else batch_codes[train]
        losses = []
        for rows in minibatches(train, cfg.batch_size, rng, groups):
            torch.manual_seed(step_seed(cfg.seed, epoch, step))  # dropout
            logits = model(
                *batch_inputs(cells.tokens, rows, device), codes_tensor(batch_codes, rows, device)
            )["cls_output"]
            loss = annotation_loss(logits, codes_tensor(codes, rows, device), weight)
            losses.append(optimizer_step(loss, params, optimizer, cfg.grad_clip))
            step += 1
        row = epoch_row(epoch, step, losses, optimizer)
        if len(val):
            vt = cells.tokens.take(val)
            vb = None if batch_codes is None else batch_codes[val]
            pred = predict(model, classes, vt, vb).predicted_labels
            truth = np.array(classes)[codes[val]]
            row["val_macro_f1"] = round(macro_f1(truth, pred), 4)
            row["val_accuracy"] = round(accuracy(truth, pred), 4)
        metrics.write(row)
        log.info("epoch %d/%d %s", epoch, cfg.epochs, row)
        if best.update(model, row):
            break
    metrics.close()
    model.load_state_dict(best.state)
    calibration = None
    if len(val):  # the best epoch's confidence on the validation cells, made honest
        vb = None if batch_codes is None else batch_codes[val]
        probs = predict(model, classes, cells.tokens.take(val), vb).probabilities
        calibration = calibrate(probs, codes[val])
        log.info("calibration on %d validation cells: %s", len(val), calibration)
    info = RunInfo(
        model.cfg,
        start.tokens,
        start.vocab,
        labels=classes,
        batches=batch_names,
        train=asdict(cfg),
        provenance=run_provenance(cfg.data, start, report),
        calibration=calibration,
    )
    save_run(out, model.cpu(), info)
    summary = {
        "out": str(out),
        "epochs_run": epoch,
        "best_epoch": best.row["epoch"],
        "val_macro_f1": best.row.get("val_macro_f1"),
        "val_accuracy": best.row.get("val_accuracy"),
        "calibration": calibration,
        "n_train": len(train),
        "n_val": len(val),
        "n_unlabelled": int((codes == MISSING).sum()),
        "classes": classes,
        "train_counts": dict(zip(classes, counts.tolist(), strict=True)),
        "load_report": report.summary(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    return summary
