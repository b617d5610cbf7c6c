"""Batch integration (`scgpt-train finetune integrate`): the official scGPT recipe.

Per minibatch (drawn from one batch label at a time when DSBN is on): a share `mask_ratio` of
each cell's gene values is replaced by the mask value -1, and the model is trained on
  gep_weight  * GEP   masked MSE of the expression decoder on the masked genes
+ gepc_weight * GEPC  masked MSE of the cell-embedding decoder (MVC) on the same genes
+ ecs_weight  * ECS   elastic cell similarity of the cell embeddings (threshold 0.8)
+ dab_weight  * DAB   cross-entropy of a batch discriminator behind gradient reversal,
with DSBN (per-batch BatchNorm of the input embeddings) and batch tokens (the batch embedding
concatenated to the decoders' inputs). Defaults are the official tutorial's (weights 1, 1, 10, 1;
mask ratio 0.4; lr 1e-4 decayed x0.9 per epoch). No labels are used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from scgpt_runtime.errors import InputError

from .cells import MISSING, codes_of, load_cells, minibatches
from .checkpoint import MetricsLog, RunInfo, new_run_dir, save_run, write_json
from .distributed import resolve_device
from .epochs import objective_epochs
from .generative import MASK_VALUE
from .inference import batch_inputs, codes_tensor
from .model import ScGPT
from .objectives import cross_entropy, ecs_loss, masked_mse
from .start import build_model, check_start, run_provenance, start_from

log = logging.getLogger(__name__)


@dataclass
class IntegrateConfig:
    data: list[str]
    batch_key: str
    out: str
    from_run: str | None = None
    from_scratch: bool = False
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)  # from scratch only
    where: tuple[str, ...] = ()
    gene_column: str | None = None
    epochs: int = 15  # the official tutorial's
    batch_size: int = 32
    lr: float = 1e-4
    lr_decay: float = 0.9
    grad_clip: float = 1.0
    mask_ratio: float = 0.4
    gep_weight: float = 1.0
    gepc_weight: float = 1.0
    ecs_weight: float = 10.0
    ecs_threshold: float = 0.8
    dab_weight: float = 1.0
    dsbn: bool = True  # per-batch BatchNorm; minibatches from one batch label at a time
    batch_tokens: bool = True
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False  # replace an existing run at `out`

    def __post_init__(self) -> None:
        check_start(self)
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be at least 1 and batch size at least 2 (ECS)")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask ratio must be in (0, 1), got {self.mask_ratio}")
        weights = (self.gep_weight, self.gepc_weight, self.ecs_weight, self.dab_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError("loss weights must be >= 0 and at least one > 0")


def mask_values(
    values: torch.Tensor, padding_mask: torch.Tensor, ratio: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values with MASK_VALUE at the masked genes, masked (B, L) bool): each gene (never <cls>
    or a pad) is masked with probability `ratio`."""
    masked = (torch.rand(values.shape, generator=gen) < ratio).to(values.device) & ~padding_mask
    masked[:, 0] = False
    return values.masked_fill(masked, MASK_VALUE), masked


def integration_losses(
    model: ScGPT,
    gene_ids: torch.Tensor,
    values: torch.Tensor,
    padding_mask: torch.Tensor,
    batch_labels: torch.Tensor,
    cfg: IntegrateConfig,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Every objective of one minibatch, unweighted, and "loss", their weighted sum."""
    masked_values, masked = mask_values(values, padding_mask, cfg.mask_ratio, gen)
    out = model(gene_ids, masked_values, padding_mask, batch_labels)
    parts = {
        "gep": masked_mse(out["mlm_output"], values, masked),
        "gepc": masked_mse(out["mvc_output"], values, masked),
        "ecs": ecs_loss(out["cell_emb"], cfg.ecs_threshold),
    }
    if "dab_output" in out:
        parts["dab"] = cross_entropy(out["dab_output"], batch_labels)
    weights = {
        "gep": cfg.gep_weight,
        "gepc": cfg.gepc_weight,
        "ecs": cfg.ecs_weight,
        "dab": cfg.dab_weight,
    }
    parts["loss"] = sum(weights[k] * v for k, v in parts.items())
    return parts


def finetune_integrate(cfg: IntegrateConfig) -> dict[str, Any]:
    """Fine-tune for batch integration; returns the summary also written to RUN/summary.json."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = new_run_dir(cfg.out, cfg.overwrite)  # refused before any work where it exists
    start = start_from(
        cfg.from_run, cfg.preset, cfg.model, cfg.tokens, cfg.data, cfg.gene_column, cfg.seed
    )
    cells = load_cells(
        cfg.data,
        start.vocab,
        start.tokens,
        batch_key=cfg.batch_key,
        where=cfg.where,
        gene_column=cfg.gene_column,
    )
    assert cells.batches is not None
    batch_names = sorted({b for b in cells.batches.tolist() if b is not None})
    if len(batch_names) < 2:
        raise InputError(
            f"{', '.join(cfg.data)}: obs column {cfg.batch_key!r} has "
            f"{len(batch_names)} batch value(s) among the selected cells; integration needs two"
        )
    batch_codes = codes_of(cells.batches, batch_names)
    rows = np.flatnonzero(batch_codes != MISSING)
    if len(rows) < len(batch_codes):
        log.warning("%d cells without a batch label are left out", len(batch_codes) - len(rows))
    labels = start.info.labels if start.info is not None else None
    n = len(batch_names)
    heads = {
        "n_batch_tokens": n if cfg.batch_tokens else 0,
        "n_dsbn": n if cfg.dsbn else 0,
        "n_dab": n if cfg.dab_weight > 0 else 0,
    }
    model, report = build_model(start, heads, labels, batch_names, cfg.seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    groups = batch_codes[rows] if cfg.dsbn else None

    def batches(rng: np.random.Generator) -> list[np.ndarray]:
        # ECS needs pairs; BatchNorm statistics need more than one cell
        return [b for b in minibatches(rows, cfg.batch_size, rng, groups) if len(b) >= 2]

    def losses(batch: np.ndarray, gen: torch.Generator) -> dict[str, torch.Tensor]:
        inputs = batch_inputs(cells.tokens, batch, device)
        codes = codes_tensor(batch_codes, batch, device)
        return integration_losses(model, *inputs, codes, cfg, gen)

    with MetricsLog(out) as metrics:
        last = objective_epochs(model, optimizer, cfg, metrics, batches, losses)
    info = RunInfo(
        model.cfg,
        start.tokens,
        start.vocab,
        labels=labels,
        batches=batch_names,
        train=asdict(cfg),
        provenance=run_provenance(cfg.data, start, report),
    )
    save_run(out, model.cpu(), info)
    summary = {
        "out": str(out),
        "n_cells": len(rows),
        "batches": batch_names,
        "cells_per_batch": np.bincount(batch_codes[rows]).tolist(),
        **last,
        "load_report": report.summary(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    return summary
