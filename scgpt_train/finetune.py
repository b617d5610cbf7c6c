"""Cell-type annotation (`scgpt-train finetune annotate`), and what every fine-tuning shares: a
model started from a run or from scratch, prediction, embeddings (labelled cells: cells.py).

Annotation trains the classifier head on the cell embedding with cross-entropy (optionally
class-weighted), Adam with the official per-epoch decay (x0.9), and early stopping on the
macro-F1 of a stratified validation split; the best epoch's weights are saved. Cells whose label
is missing stay out of the loss. Fine-tuning from a run keeps its vocabulary and TokenConfig and
loads every tensor that fits (new heads start fresh; the load report says which). Cells are
tokenized by the runtime's own `tokenize`, so a saved model sees exactly what it trained on.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scgpt_runtime.errors import InputError
from scgpt_runtime.tokens import TokenBlock, TokenConfig
from scgpt_runtime.vocab import Vocab

from .cells import (
    MISSING,
    class_names,
    codes_of,
    load_cells,
    minibatches,
    parse_where,
    stratified_split,
)
from .checkpoint import RunInfo, load_run, save_run, write_json
from .data import build_vocab, take
from .distributed import resolve_device
from .metrics import Prediction, accuracy, decide, macro_f1
from .model import ModelConfig, ScGPT
from .pretrain import provenance, step_seed

log = logging.getLogger(__name__)

FREEZE = ("none", "embeddings", "encoder")  # what stays fixed: nothing, gene+value encoders, all
CLASS_WEIGHTS = ("none", "balanced")  # "balanced": n / (C * n_c), as scikit-learn


# ---------------------------------------------------------------------------- models


@dataclass
class Start:
    """Where a fine-tuning starts: a run's model and vocabulary, or a fresh preset."""

    vocab: Vocab
    tokens: TokenConfig
    model: dict[str, Any]  # ModelConfig fields before the task's heads
    source: str | None = None  # the run directory, None from scratch
    info: RunInfo | None = None
    state: dict[str, torch.Tensor] | None = None


@dataclass
class LoadReport:
    """What fine-tuning took from the run it started from."""

    source: str | None
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # parameters that start at their initial values
    dropped: dict[str, str] = field(default_factory=dict)  # run tensor -> why it was not used

    def summary(self) -> str:
        if self.source is None:
            return f"trained from scratch: {len(self.new)} tensors initialised"
        heads = sorted({k.split(".")[0] for k in self.new})
        return (
            f"loaded {len(self.loaded)} tensors from {self.source}; new: {len(self.new)} "
            f"({', '.join(heads) or 'none'}); dropped: {len(self.dropped)}"
        )


def check_start(cfg: Any) -> None:
    """The checks every fine-tuning config shares: where it starts, its token settings and its
    `where` filters (made a tuple). ValueError on the first problem."""
    cfg.where = tuple(cfg.where)
    if (cfg.from_run is None) == (not cfg.from_scratch):
        raise ValueError("give either --from RUN or --from-scratch (with --preset)")
    if cfg.from_run is not None and cfg.tokens:
        raise ValueError("token settings apply to --from-scratch: a run keeps its TokenConfig")
    parse_where(cfg.where)


def start_from(
    run: str | None, preset: str, model: dict[str, Any], tokens: dict[str, Any],
    paths: list[str], gene_column: str | None, seed: int,
) -> Start:  # fmt: skip
    """A run's vocabulary, TokenConfig and weights (`run`), or a preset with a vocabulary of
    every gene of `paths` (run None). `model` overrides config fields; `tokens` apply only
    from scratch."""
    if run is not None:
        if tokens:
            raise ValueError("token settings apply to --from-scratch: a run keeps its TokenConfig")
        net, info = load_run(run)
        base = {**info.model.to_dict(), **model}
        return Start(info.vocab, info.tokens, base, str(run), info, net.state_dict())
    vocab = build_vocab([Path(p) for p in paths], gene_column)
    cfg = ModelConfig.from_name(preset, vocab_size=len(vocab), pad_id=vocab.pad_id, **model)
    defaults = {"max_seq_len": cfg.max_seq_len, "n_bins": cfg.n_bins, "seed": seed}
    return Start(vocab, TokenConfig(**{**defaults, **tokens}), cfg.to_dict())


def run_provenance(data: list[str], start: Start, report: LoadReport) -> dict[str, Any]:
    """A fine-tuned run's record: its data and command, and the start run's own record (so a
    bundle names the pretraining data too) with what was loaded from it."""
    return {
        **provenance([Path(p) for p in data]),
        "from_run": start.source,
        "from_run_provenance": None if start.info is None else start.info.provenance,
        "load_report": asdict(report),
    }


def build_model(
    start: Start, heads: dict[str, Any], labels: list[str] | None, batches: list[str] | None,
    seed: int,
) -> tuple[ScGPT, LoadReport]:  # fmt: skip
    """The model with the task's heads, holding every tensor of the start run whose name and
    shape fit; the classifier's last layer is not reused when the class names differ, nor the
    per-batch parts when the batch names differ."""
    try:
        cfg = ModelConfig.from_dict({**start.model, **heads})
    except ValueError as e:  # e.g. DSBN on an old model with an input BatchNorm
        raise InputError(
            f"{start.source or 'preset'}: cannot build the fine-tuned model ({e})"
        ) from e
    torch.manual_seed(seed)
    model = ScGPT(cfg)
    target = model.state_dict()
    report = LoadReport(start.source)
    stale: list[str] = []
    if start.info is not None and start.info.labels != labels:
        stale.append("cls_decoder.out_layer.")
    if start.info is not None and start.info.batches != batches:
        stale += ["dsbn.", "batch_encoder.", "grad_reverse_discriminator.out_layer."]
    keep = {}
    for name, tensor in (start.state or {}).items():
        if name not in target:
            report.dropped[name] = "not part of the fine-tuned model"
        elif tuple(tensor.shape) != tuple(target[name].shape):
            report.dropped[name] = f"shape {tuple(tensor.shape)} != {tuple(target[name].shape)}"
        elif any(name.startswith(s) for s in stale):
            report.dropped[name] = "class or batch names differ from the run's"
        else:
            keep[name] = tensor
    model.load_state_dict(keep, strict=False)
    report.loaded = list(keep)
    report.new = [k for k in target if k not in keep]
    log.info("%s", report.summary())
    return model, report


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


def _batches_in_order(tokens: TokenBlock, batch_size: int) -> list[np.ndarray]:
    """All cells cut into minibatches of similar length (less padding)."""
    order = np.argsort(tokens.n_genes, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_inputs(tokens: TokenBlock, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    """gene_ids, values, padding_mask of the cells `rows`, without all-padding columns."""
    t = take(tokens, rows, trim=True)
    return [torch.from_numpy(a).to(device) for a in (t.gene_ids, t.values, t.padding_mask)]


def codes_tensor(
    codes: np.ndarray | None, rows: np.ndarray, device: torch.device
) -> torch.Tensor | None:
    """Labels or batch codes of the cells `rows` as an int64 tensor (None stays None)."""
    return None if codes is None else torch.from_numpy(codes[rows]).to(device)


@torch.no_grad()
def run_model(
    model: ScGPT, tokens: TokenBlock, batch_codes: np.ndarray | None = None,
    batch_size: int = 64, head: str = "cell_emb",
) -> np.ndarray:  # fmt: skip
    """The cell embeddings (head "cell_emb") or classifier logits ("cls_output") of every cell,
    in eval mode, float32. Batch codes are needed only by a model with DSBN."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = model.cfg.d_model if head == "cell_emb" else model.cfg.n_cls
    out = np.empty((tokens.n_cells, width), dtype=np.float32)
    for rows in _batches_in_order(tokens, batch_size):
        emb = model.cell_embedding(  # only the encoder: no decoder needs batch tokens here
            *batch_inputs(tokens, rows, device), codes_tensor(batch_codes, rows, device)
        )  # (B, d)
        res = emb if head == "cell_emb" else model.cls_decoder(emb)
        out[rows] = res.float().cpu().numpy()
    model.train(was_training)
    return out


def embed(model: ScGPT, tokens: TokenBlock, batch_codes: np.ndarray | None = None) -> np.ndarray:
    """Raw cell embeddings (n, d); the official zero-shot API L2-normalises them afterwards."""
    return run_model(model, tokens, batch_codes)


def predict(
    model: ScGPT, labels: list[str], tokens: TokenBlock, batch_codes: np.ndarray | None = None,
    unknown_threshold: float | None = None,
) -> Prediction:  # fmt: skip
    """Softmax probabilities over all classes `labels` (the run's order); confidence = the
    largest; "unknown" below `unknown_threshold` (None: off)."""
    if model.cls_decoder is None:
        raise InputError("the model has no classifier head: fine-tune it with `finetune annotate`")
    logits = torch.from_numpy(run_model(model, tokens, batch_codes, head="cls_output"))
    return decide(list(labels), F.softmax(logits.double(), 1).numpy(), unknown_threshold)


# ---------------------------------------------------------------------------- annotation


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
    epochs: int = 10  # the official tutorial's
    batch_size: int = 32
    lr: float = 1e-4
    lr_decay: float = 0.9  # per epoch (official schedule_ratio)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    freeze: str = "none"
    class_weight: str = "none"
    val_fraction: float = 0.1  # stratified; early stopping on its macro-F1
    patience: int = 3  # epochs without a better validation macro-F1 before stopping
    seed: int = 0
    device: str = "auto"

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


def annotate(cfg: AnnotateConfig) -> dict[str, Any]:
    """Fine-tune a classifier head (and the encoder, unless frozen); returns the summary that is
    also written to RUN/summary.json."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    start = start_from(cfg.from_run, cfg.preset, cfg.model, cfg.tokens, cfg.data,
                       cfg.gene_column, cfg.seed)  # fmt: skip
    cells = load_cells(cfg.data, start.vocab, start.tokens, label_key=cfg.label_key,
                       batch_key=cfg.batch_key, where=cfg.where,
                       gene_column=cfg.gene_column)  # fmt: skip
    assert cells.labels is not None
    classes = class_names(cells.labels, ", ".join(cfg.data), cfg.label_key)
    codes = codes_of(cells.labels, classes)
    batch_names = batch_codes = None
    heads: dict[str, Any] = {"n_cls": len(classes), "n_batch": 0, "use_batch_tokens": False,
                             "dsbn": False, "dab": False}  # fmt: skip
    if cells.batches is not None:
        batch_names = sorted({b for b in cells.batches.tolist() if b is not None})
        batch_codes = codes_of(cells.batches, batch_names)
        if (batch_codes == MISSING).any():
            raise InputError(f"{cfg.data[0]}: obs column {cfg.batch_key!r} has missing values")
        heads.update(n_batch=len(batch_names), dsbn=True)
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
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = (out / "metrics.jsonl").open("w")
    best: dict[str, Any] = {"val_macro_f1": -1.0, "epoch": 0}
    best_state = copy.deepcopy(model.state_dict())
    step, stale = 0, 0
    for epoch in range(1, cfg.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * cfg.lr_decay ** (epoch - 1)
        model.train()
        rng = np.random.default_rng(step_seed(cfg.seed, epoch))
        groups = None if batch_codes is None else batch_codes[train]
        losses = []
        for rows in minibatches(train, cfg.batch_size, rng, groups):
            torch.manual_seed(step_seed(cfg.seed, epoch, step))  # dropout
            logits = model(*batch_inputs(cells.tokens, rows, device),
                           codes_tensor(batch_codes, rows, device))["cls_output"]  # fmt: skip
            loss = annotation_loss(logits, codes_tensor(codes, rows, device), weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        row = {"epoch": epoch, "step": step, "loss": round(float(np.mean(losses)), 6),
               "lr": round(optimizer.param_groups[0]["lr"], 8)}  # fmt: skip
        if len(val):
            vt = take(cells.tokens, val)
            vb = None if batch_codes is None else batch_codes[val]
            pred = predict(model, classes, vt, vb).predicted_labels
            truth = np.array(classes)[codes[val]]
            row["val_macro_f1"] = round(macro_f1(truth, pred), 4)
            row["val_accuracy"] = round(accuracy(truth, pred), 4)
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        log.info("epoch %d/%d %s", epoch, cfg.epochs, row)
        if not len(val) or row["val_macro_f1"] > best["val_macro_f1"]:
            best = {**row}
            best_state = copy.deepcopy(model.state_dict())
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("no better validation macro-F1 for %d epochs: stopping", stale)
                break
    metrics.close()
    model.load_state_dict(best_state)
    info = RunInfo(
        model.cfg, start.tokens, start.vocab, labels=classes, batches=batch_names,
        train=asdict(cfg),
        provenance=run_provenance(cfg.data, start, report),
    )  # fmt: skip
    save_run(out, model.cpu(), info)
    summary = {
        "out": str(out), "epochs_run": epoch, "best_epoch": best["epoch"],
        "val_macro_f1": best.get("val_macro_f1"), "val_accuracy": best.get("val_accuracy"),
        "n_train": len(train), "n_val": len(val),
        "n_unlabelled": int((codes == MISSING).sum()), "classes": classes,
        "train_counts": dict(zip(classes, counts.tolist(), strict=True)),
        "load_report": report.summary(), "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    write_json(out / "summary.json", summary)
    return summary
