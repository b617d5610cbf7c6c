"""What the epoch-based fine-tunings (annotate, integrate, perturb, multiomic) share: the
official per-epoch learning-rate decay, one optimizer step, the epoch's metrics row, the loop
of the label-free objectives, and the best epoch kept with early stopping."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from .model import ScGPT

log = logging.getLogger(__name__)


def set_epoch_lr(optimizer: torch.optim.Optimizer, lr: float, decay: float, epoch: int) -> None:
    """lr * decay^(epoch - 1) for epoch 1, 2, ... (the official StepLR, step 1, per epoch)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * decay ** (epoch - 1)


def optimizer_step(
    loss: torch.Tensor,
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
) -> float:
    """Backward, clip the gradient norm of `params`, step, clear; returns the loss value."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def epoch_row(
    epoch: int, step: int, losses: list[float], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The metrics.jsonl row of an epoch: its mean loss and learning rate."""
    return {
        "epoch": epoch,
        "step": step,
        "loss": round(float(np.mean(losses)), 6),
        "lr": round(optimizer.param_groups[0]["lr"], 8),
    }


def objective_epochs(
    model: ScGPT,
    optimizer: torch.optim.Optimizer,
    cfg: Any,
    metrics: Any,
    batches: Callable[[np.random.Generator], list[np.ndarray]],
    losses: Callable[[np.ndarray, torch.Generator], dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """`cfg.epochs` epochs of minimising `losses(rows, gen)["loss"]` over the minibatches
    `batches(rng)` of each epoch (seeded by cfg.seed and the epoch; each step's masking
    generator and dropout by the step); every epoch's mean of each loss part goes to `metrics`.
    Returns the last epoch's row."""
    from .pretrain import step_seed  # pretrain imports this module

    step, last = 0, {}
    for epoch in range(1, cfg.epochs + 1):
        set_epoch_lr(optimizer, cfg.lr, cfg.lr_decay, epoch)
        model.train()
        sums: dict[str, float] = {}
        n = 0
        for rows in batches(np.random.default_rng(step_seed(cfg.seed, epoch))):
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, epoch, step))
            torch.manual_seed(step_seed(cfg.seed, epoch, step, 1))  # dropout
            parts = losses(rows, gen)
            optimizer_step(parts["loss"], model.parameters(), optimizer, cfg.grad_clip)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n, step = n + 1, step + 1
        last = {
            "epoch": epoch,
            "step": step,
            "lr": round(optimizer.param_groups[0]["lr"], 8),
            **{k: round(v / max(n, 1), 6) for k, v in sums.items()},
        }
        metrics.write(last)
        log.info("epoch %d/%d %s", epoch, cfg.epochs, last)
    return last


class BestEpoch:
    """The epoch with the highest validation `key` so far and its weights; every epoch counts
    as better when rows carry no `key` (no validation cells)."""

    def __init__(self, model: ScGPT, key: str, patience: int):
        self.key, self.patience, self.stale = key, patience, 0
        self.row: dict[str, Any] = {"epoch": 0}
        self.state = copy.deepcopy(model.state_dict())

    def update(self, model: ScGPT, row: dict[str, Any]) -> bool:
        """Keep `row` and the weights if they are the best; True when training should stop
        (`patience` epochs in a row without a better score)."""
        if self.key not in row or row[self.key] > self.row.get(self.key, -np.inf):
            self.row, self.state, self.stale = dict(row), copy.deepcopy(model.state_dict()), 0
            return False
        self.stale += 1
        if self.stale >= self.patience:
            log.info("no better validation %s for %d epochs: stopping", self.key, self.stale)
            return True
        return False
