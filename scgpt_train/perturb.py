"""Genetic perturbation prediction (`scgpt-train finetune perturb`, `perturb predict`).

The official generator's recipe: the input is a control cell with the perturbed genes marked
by a flag embedding (0 not perturbed, 1 perturbed, 2 pad) added to the token embedding; the
expression decoder predicts, for every panel gene, the log1p(CP10k) value of a perturbed cell
of that condition; MSE over the panel genes. Each epoch pairs every training cell with a
control cell drawn at random (seeded by seed and epoch); control cells are examples too (no
flag). Targets outside the panel enter as extra flagged tokens (perturb_data.py). Validation
is on held-out conditions: the predicted mean profile against the observed one (pearson of
the change from the control mean); the best epoch is kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scgpt_runtime.errors import InputError
from scgpt_runtime.io import open_counts
from scgpt_runtime.io.arrays import ArrayCounts
from scgpt_runtime.io.write import write_new_h5ad
from scgpt_runtime.obs import obs_strings
from scgpt_runtime.outputs import check_output

from .checkpoint import MetricsLog, RunInfo, load_run, new_run_dir, save_run, write_json
from .distributed import resolve_device
from .epochs import BestEpoch, epoch_row, optimizer_step, set_epoch_lr
from .model import ScGPT
from .objectives import masked_mse
from .perturb_data import (
    MAX_LEN,
    N_FLAGS,
    PertInputs,
    Screen,
    condition_targets,
    flagged_columns,
    load_screen,
    make_inputs,
    pair_controls,
    panel_chunks,
    sampled_columns,
)
from .perturb_metrics import pearson
from .pretrain import step_seed
from .start import build_model, check_start, run_provenance, start_from

log = logging.getLogger(__name__)

VAL_CONTROLS = 256  # control cells behind each validation prediction


@dataclass
class PerturbConfig:
    data: list[str]
    perturbation_key: str
    out: str
    control: str = "ctrl"
    from_run: str | None = None
    from_scratch: bool = False
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)  # from scratch only
    exclude_target: tuple[str, ...] = ()  # conditions (or genes) left out of training
    where: tuple[str, ...] = ()
    gene_column: str | None = None
    epochs: int = 15  # the official tutorial's
    batch_size: int = 64
    lr: float = 1e-4
    lr_decay: float = 0.9
    grad_clip: float = 1.0
    val_fraction: float = 0.15  # of the training conditions, held out for early stopping
    patience: int = 3
    max_len: int = MAX_LEN  # tokens per input; the panel is cut into chunks beyond it
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_start(self)
        self.exclude_target = tuple(self.exclude_target)
        if len(self.data) != 1:
            raise ValueError("finetune perturb takes one screen file (--data)")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch size and patience must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_len < 8:
            raise ValueError(f"max len must be at least 8 tokens, got {self.max_len}")


def split_conditions(
    conditions: list[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, validation) conditions: `fraction` of them (at least one when there are three or
    more) held out, chosen by the seed."""
    n_val = round(fraction * len(conditions))
    if fraction > 0 and len(conditions) >= 3:
        n_val = max(n_val, 1)
    order = np.random.default_rng(seed).permutation(len(conditions))
    val = sorted(conditions[i] for i in order[:n_val])
    return [c for c in conditions if c not in val], val


def forward(model: ScGPT, inputs: PertInputs, device: torch.device) -> torch.Tensor:
    """Predicted log1p(CP10k) (B, len(columns)) at the panel columns of `inputs`."""
    tensors = [
        torch.from_numpy(a).to(device)
        for a in (inputs.gene_ids, inputs.values, inputs.padding_mask, inputs.flags)
    ]
    out = model(*tensors[:3], pert_flags=tensors[3])["mlm_output"]  # (B, L)
    return out[:, inputs.offset :]


@torch.no_grad()
def predict_cells(
    model: ScGPT,
    info: RunInfo,
    screen: Screen,
    control_rows: np.ndarray,
    targets: tuple[str, ...],
    max_len: int,
    batch_size: int = 64,
) -> np.ndarray:
    """(len(control_rows), G) predicted log1p(CP10k) of each control cell under `targets`
    (every panel gene, chunk by chunk when the panel does not fit in `max_len`), clipped at 0."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    flagged = flagged_columns(screen, [targets])
    n_extra = len(screen.outside(targets))
    out = np.empty((len(control_rows), len(screen.genes)), dtype=np.float32)
    for columns in panel_chunks(len(screen.genes), flagged, max_len - 1 - n_extra):
        for lo in range(0, len(control_rows), batch_size):
            rows = control_rows[lo : lo + batch_size]
            inputs = make_inputs(
                screen, rows, [targets] * len(rows), info.vocab, info.tokens, columns
            )
            out[lo : lo + len(rows), columns] = forward(model, inputs, device).float().cpu().numpy()
    model.train(was_training)
    return np.maximum(out, 0.0)  # log1p(CP10k) is never negative


def validation_score(
    model: ScGPT, info: RunInfo, screen: Screen, conditions: list[str], controls: np.ndarray, cfg
) -> dict[str, float]:
    """Mean pearson_delta and MSE of the predicted mean profiles of held-out conditions."""
    ctrl_mean = screen.control_mean()
    deltas, errors = [], []
    for c in conditions:
        pred = predict_cells(model, info, screen, controls, screen.targets[c], cfg.max_len)
        mean, truth = pred.mean(axis=0), screen.centroid(c)
        deltas.append(pearson(mean - ctrl_mean, truth - ctrl_mean))
        errors.append(float(np.mean((mean - truth) ** 2)))
    return {
        "val_pearson_delta": round(float(np.nanmean(deltas)), 4),
        "val_mse": round(float(np.mean(errors)), 6),
    }


def finetune_perturb(cfg: PerturbConfig) -> dict[str, Any]:
    """Fine-tune a perturbation model; returns the summary also written to RUN/summary.json."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = new_run_dir(cfg.out, cfg.overwrite)
    start = start_from(
        cfg.from_run,
        cfg.preset,
        cfg.model,
        cfg.tokens,
        cfg.data,
        cfg.gene_column,
        cfg.seed,
        extra_genes=screen_targets(cfg),
    )
    screen = load_screen(
        cfg.data[0],
        start.vocab,
        start.tokens,
        cfg.perturbation_key,
        cfg.control,
        exclude=cfg.exclude_target,
        where=cfg.where,
        gene_column=cfg.gene_column,
    )
    train, val = split_conditions(screen.perturbations(), cfg.val_fraction, cfg.seed)
    if not train:
        raise InputError(f"{cfg.data[0]}: no perturbed condition is left to train on")
    heads = {"n_cls": 0, "n_batch_tokens": 0, "n_dsbn": 0, "n_dab": 0, "n_pert": N_FLAGS}
    heads["dropout"] = cfg.model.get("dropout", 0.0)  # the official perturbation dropout
    model, report = build_model(start, heads, None, None, cfg.seed)
    model.to(device)
    info = RunInfo(
        model.cfg,
        start.tokens,
        start.vocab,
        train={
            **asdict(cfg),
            "panel": screen.genes,
            "control_label": cfg.control,
            "train_conditions": train,
            "val_conditions": val,
        },
        provenance=run_provenance(cfg.data, start, report),
    )
    controls = np.flatnonzero(screen.is_control)
    val_controls = np.sort(np.random.default_rng(cfg.seed).permutation(controls)[:VAL_CONTROLS])
    examples = np.concatenate([controls] + [screen.cells_of(c) for c in train])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    metrics = MetricsLog(out)
    best = BestEpoch(model, "val_pearson_delta", cfg.patience)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        set_epoch_lr(optimizer, cfg.lr, cfg.lr_decay, epoch)
        model.train()
        rng = np.random.default_rng(step_seed(cfg.seed, epoch))
        order = rng.permutation(examples)
        paired = pair_controls(len(order), controls, rng)
        losses = []
        for lo in range(0, len(order), cfg.batch_size):
            torch.manual_seed(step_seed(cfg.seed, epoch, step))  # dropout
            rows, pairs = order[lo : lo + cfg.batch_size], paired[lo : lo + cfg.batch_size]
            loss = train_step(model, info, screen, rows, pairs, cfg, rng, device)
            losses.append(optimizer_step(loss, model.parameters(), optimizer, cfg.grad_clip))
            step += 1
        row = epoch_row(epoch, step, losses, optimizer)
        if val:
            row.update(validation_score(model, info, screen, val, val_controls, cfg))
        metrics.write(row)
        log.info("epoch %d/%d %s", epoch, cfg.epochs, row)
        if best.update(model, row):
            break
    metrics.close()
    model.load_state_dict(best.state)
    save_run(out, model.cpu(), info)
    summary = {
        "out": str(out),
        "epochs_run": epoch,
        "best_epoch": best.row["epoch"],
        "val_pearson_delta": best.row.get("val_pearson_delta"),
        "val_mse": best.row.get("val_mse"),
        "panel_genes": len(screen.genes),
        "train_conditions": train,
        "val_conditions": val,
        "n_train_cells": len(examples),
        "load_report": report.summary(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    return summary


def train_step(
    model: ScGPT,
    info: RunInfo,
    screen: Screen,
    rows: np.ndarray,
    controls: np.ndarray,
    cfg: PerturbConfig,
    rng: np.random.Generator,
    device: torch.device,
) -> torch.Tensor:
    """The MSE of one minibatch: cells `rows` predicted from the control cells `controls`."""
    targets = [screen.targets[c] for c in screen.conditions[rows]]
    n_extra = max(len(screen.outside(t)) for t in targets)
    columns = sampled_columns(
        len(screen.genes), flagged_columns(screen, targets), cfg.max_len - 1 - n_extra, rng
    )
    inputs = make_inputs(screen, controls, targets, info.vocab, info.tokens, columns)
    pred = forward(model, inputs, device)
    truth = torch.from_numpy(screen.expression[np.ix_(rows, columns)]).to(device)
    return masked_mse(pred, truth, torch.ones_like(truth, dtype=torch.bool))


def screen_targets(cfg: PerturbConfig) -> list[str]:
    """Every gene the screen's conditions name (from scratch, they join the vocabulary), held
    out ones included so that they can be predicted; a condition excluded by its whole label
    (such as `unassigned`) names none."""
    if cfg.from_run is not None:
        return []
    with open_counts(cfg.data[0]) as counts:
        labels = {c for c in obs_strings(counts.read_obs(cfg.perturbation_key)) if c}
    labels -= set(cfg.exclude_target)
    return sorted({g for c in labels for g in condition_targets(c, cfg.control)})


def load_perturbation_run(run: str) -> tuple[ScGPT, RunInfo]:
    """A run fine-tuned by `finetune perturb`; an InputError for any other run."""
    model, info = load_run(run)
    if not model.cfg.n_pert or "panel" not in info.train:
        raise InputError(f"{run}: not a perturbation run (fine-tune one with `finetune perturb`)")
    return model, info


def cells_path(out: Path) -> Path:
    """Where `perturb predict --n-cells` writes the predicted single cells: PRED.cells.h5ad."""
    return out.with_name(out.name.removesuffix(".h5ad") + ".cells.h5ad")


def predict_perturbations(
    run: str,
    control_file: str,
    labels: list[str],
    out: Path,
    *,
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
    n_cells: int | None = None,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predicted mean profiles (and with `n_cells`, single cells) of each target label from
    the control cells of `control_file`, written as .h5ad; returns a summary."""
    model, info = load_perturbation_run(run)
    model.to(resolve_device(device))
    targets = [condition_targets(t, "ctrl") for t in labels]
    for label, genes in zip(labels, targets, strict=True):
        missing = [g for g in genes if g not in info.vocab]
        if missing:
            raise InputError(f"--target {label}: {missing[0]!r} is not in the run's vocabulary")
    for path in [out] + ([cells_path(out)] if n_cells else []):
        check_output(path, overwrite=overwrite)
    screen = load_screen(
        control_file,
        info.vocab,
        info.tokens,
        None,
        "ctrl",
        where=where,
        gene_column=gene_column,
        panel=info.train["panel"],
    )
    rows = np.arange(len(screen.conditions))
    if n_cells:
        rows = np.sort(
            np.random.default_rng(seed).choice(rows, n_cells, replace=n_cells > len(rows))
        )
    max_len = int(info.train.get("max_len", MAX_LEN))
    preds = [predict_cells(model, info, screen, rows, t, max_len) for t in targets]
    uns = {
        "scgpt_perturbation": {
            "run": str(run),
            "control_file": str(control_file),
            "control_cells": len(rows),
            "units": "log1p(CP10k)",
            "seed": seed,
        }
    }
    means = np.stack([p.mean(0) for p in preds])
    write_new_h5ad(
        out,
        ArrayCounts(means, screen.genes, cells=labels),
        obs={"n_control_cells": np.full(len(labels), len(rows))},
        uns=uns,
        overwrite=overwrite,
    )
    summary = {
        "out": str(out),
        "targets": labels,
        "genes": len(screen.genes),
        "control_cells": len(rows),
    }
    if n_cells:
        names = [f"{label}-{i}" for label in labels for i in range(len(rows))]
        write_new_h5ad(
            cells_path(out),
            ArrayCounts(np.concatenate(preds), screen.genes, cells=names),
            obs={"target": np.repeat(np.array(labels, dtype=object), len(rows))},
            uns=uns,
            overwrite=overwrite,
        )
        summary["cells_out"] = str(cells_path(out))
    return summary
