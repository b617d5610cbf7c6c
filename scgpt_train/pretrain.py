"""Generative pretraining (`scgpt-train pretrain`): GEP + GEPC on generated tokens.

Each step splits every cell's genes at random into observed tokens (gene + value, <cls> first)
and generated tokens (gene + flag, no value) with a fraction drawn per step from
`gen_fractions`; the model predicts the generated tokens' binned values from its expression
decoder (GEP) and from the cell embedding (GEPC). Optionally a share of the observed values is
masked and predicted as well (masked-value objective, `mlm_weight`). Experimental terms, off by
default (docs/results.md, "Pretraining objectives"): genes the cell does not express queried
with the target 0 (`unexpressed_ratio`), InfoNCE between two views of each cell
(`contrast_weight`) and ECS; a model built with explicit_zero also trains its P(value > 0)
heads (`nonzero_weight`). All
randomness of a step is seeded by (seed, step, rank), so a resumed run repeats an uninterrupted
one exactly; the queried genes and the InfoNCE negatives come from the cells of one process, so
with these terms a run on several processes differs from one on a single process.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from scgpt_runtime.errors import InputError
from scgpt_runtime.tokens import TokenBlock, TokenConfig
from scgpt_runtime.vocab import Vocab

from . import distributed
from .checkpoint import (
    MetricsLog,
    RunInfo,
    command_line,
    created,
    load_checkpoint,
    new_run_dir,
    read_json,
    read_metrics,
    save_checkpoint,
    save_run,
    write_json,
)
from .config import default_lr
from .data import CellStream, Position, build_vocab, open_sources, validation_cells
from .generative import add_unexpressed, mask_observed, second_view, split_generative
from .inference import embed
from .metrics import knn_probe
from .model import ModelConfig, ScGPT
from .monitor import Meter, probe_cells
from .objectives import ecs_loss, info_nce

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    data: list[str]
    out: str
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    tokens: dict[str, Any] = field(default_factory=dict)  # overrides of the TokenConfig
    vocab: str | None = None  # a vocab.json or a data file's genes; default: all of the data
    gene_column: str | None = None
    max_steps: int = 1000
    batch_size: int = 32  # cells per step over all ranks (x grad_accum per optimizer step)
    grad_accum: int = 1
    lr: float | None = None  # None: config.default_lr of the model's width
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    gen_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # the official choices
    mlm_weight: float = 0.5  # the masked-value objective on observed tokens (0 = off; official)
    unexpressed_ratio: float = 0.0  # unexpressed genes queried per generated gene (0 = official)
    nonzero_weight: float = 1.0  # of the explicit-zero heads' loss (models with explicit_zero)
    ecs_weight: float = 0.0  # weight of elastic cell similarity on the cell embeddings (0 = off)
    contrast_weight: float = 0.0  # InfoNCE between a cell's observed and generated genes (0 = off)
    mask_ratio: float = 0.4
    val_fraction: float = 0.05
    val_cells: int = 1000
    eval_every: int = 100
    probe_data: list[str] = field(default_factory=list)  # labelled cells: kNN probe (metrics)
    probe_label_key: str | None = None
    probe_where: tuple[str, ...] = ()
    checkpoint_every: int = 200
    log_every: int = 10
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False  # replace an existing run at `out`

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("give at least one data file")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("batch size, grad accumulation and steps must be at least 1")
        if not all(0 < f < 1 for f in self.gen_fractions):
            raise ValueError("gen fractions must lie in (0, 1)")
        if self.unexpressed_ratio < 0:
            raise ValueError("the unexpressed ratio must be >= 0")
        if bool(self.probe_data) != bool(self.probe_label_key):
            raise ValueError("the embedding probe needs both --probe-data and --probe-label-key")


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 0 at max_steps (as the official pretraining)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, step, ...): each step's randomness, independent of history."""
    return int(
        np.random.SeedSequence([p & 0xFFFF_FFFF for p in parts]).generate_state(2, np.uint64)[0]
        >> np.uint64(1)
    )


def losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    masked: torch.Tensor | None,
    norm: dict[str, torch.Tensor],
    ecs: bool = False,
) -> dict[str, torch.Tensor]:
    """Sums of squared errors divided by `norm` (token counts over all ranks / world); with
    `ecs`, elastic cell similarity of this process's cell embeddings (`objectives.ecs_loss`)."""
    out = model(
        batch["pcpt_gene"],
        batch["pcpt_values"],
        batch["pcpt_pad"],
        batch["gen_gene"],
        batch["gen_pad"],
        view=tuple(batch[k] for k in VIEW) if VIEW[0] in batch else None,
    )
    gen = (~batch["gen_pad"]).to(out["gen_pred"].dtype)
    target = batch["gen_values"]
    res = {
        "gen_mse": (((out["gen_pred"] - target) ** 2) * gen).sum() / norm["gen"],
        "mvc_mse": (((out["mvc_gen_pred"] - target) ** 2) * gen).sum() / norm["gen"],
    }
    if "mvc_nonzero_logits" in out:  # explicit-zero heads: P(value > 0) of each gen token
        Lp, expressed = batch["pcpt_gene"].shape[1], (target > 0).to(gen.dtype)
        for name, key in (
            ("gen_zero_nll", "mlm_nonzero_logits"),
            ("mvc_zero_nll", "mvc_nonzero_logits"),
        ):
            nll = F.binary_cross_entropy_with_logits(out[key][:, Lp:], expressed, reduction="none")
            res[name] = (nll * gen).sum() / norm["gen"]
    if masked is not None:
        m = masked.to(out["pcpt_pred"].dtype)
        res["mlm_mse"] = (((out["pcpt_pred"] - batch["pcpt_target"]) ** 2) * m).sum() / norm["mlm"]
    if ecs:
        res["ecs"] = ecs_loss(out["cell_emb"])
    if "view_emb" in out:
        res["contrast"] = info_nce(out["cell_emb"], out["view_emb"])
    return res


VIEW = ("view_gene", "view_values", "view_pad")


class _Generative(torch.nn.Module):
    """forward = ScGPT.forward_generative, so DistributedDataParallel wraps the right call."""

    def __init__(self, model: ScGPT):
        super().__init__()
        self.model = model

    def forward(
        self, *args: torch.Tensor, view: tuple[torch.Tensor, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        out = self.model.forward_generative(*args)
        if view is not None:  # the cell embedding of a second view, inside DDP's forward
            out["view_emb"] = self.model.cell_embedding(*view)
        return out


def pretrain(cfg: PretrainConfig, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train (or resume) a model on `cfg.data`; returns the last metrics (also in RUN).

    `progress(steps, total, status)` is called after every step on the main process; without
    it, progress goes to the log every `log_every` steps."""
    d = distributed.setup(cfg.device)
    out = Path(cfg.out)
    paths = [Path(p) for p in cfg.data]
    vocab = load_vocab(cfg.vocab, paths, cfg.gene_column)
    model_cfg = ModelConfig.from_name(
        cfg.preset, vocab_size=len(vocab), pad_id=vocab.pad_id, **cfg.model
    )
    if cfg.lr is None:  # the run records the rate it trained with (and --resume keeps it)
        cfg = replace(cfg, lr=default_lr(model_cfg.d_model))
    defaults = {"max_seq_len": model_cfg.max_seq_len, "n_bins": model_cfg.n_bins}
    tok_cfg = TokenConfig(**{**defaults, "seed": cfg.seed, **cfg.tokens})
    sources = open_sources(paths, vocab, cfg.gene_column)
    stream = CellStream(
        sources,
        vocab,
        tok_cfg,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
    )
    val = validation_cells(sources, vocab, tok_cfg, cfg.seed, cfg.val_fraction, cfg.val_cells)
    probe = None
    if cfg.probe_data and d.main:
        probe = probe_cells(
            cfg.probe_data, cfg.probe_label_key, cfg.probe_where, vocab, tok_cfg, cfg.gene_column
        )

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = ScGPT(model_cfg).to(d.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, position = 0, Position()
    info = RunInfo(model_cfg, tok_cfg, vocab, train=asdict(cfg), provenance=provenance(paths))
    if cfg.resume:
        state = load_checkpoint(out, model, optimizer)
        if state is None:
            raise InputError(f"{out}: holds no checkpoint to --resume from")
        step, position = state["step"], Position(**state["position"])
        if step >= cfg.max_steps:
            last = _finish(out, model, info, step) if d.main else {"step": step}
            distributed.teardown(d)
            return last
        log.info("resuming %s at step %d", out, step)
    elif d.main:
        new_run_dir(out, cfg.overwrite)
    if d.main:
        save_run(out, model, info)
    net = DistributedDataParallel(_Generative(model)) if d.world > 1 else _Generative(model)

    batches = stream.batches(position, d.rank, d.world)
    metrics = MetricsLog(out, step if cfg.resume else None) if d.main else None
    meter = Meter()
    last: dict[str, Any] = {}
    model.train()
    while step < cfg.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            tokens, position = next(batches)
            parts, n_tokens = _micro_step(net, tokens, cfg, tok_cfg, vocab, d, step, micro)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
            meter.add(tokens.n_cells * d.world, n_tokens * d.world)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last = {
            "step": step,
            **{k: round(v, 6) for k, v in totals.items()},
            "lr": lr_at(step - 1, cfg),
            "grad_norm": round(float(grad_norm), 4),
            **meter.rates(),
        }
        evaluating = step % cfg.eval_every == 0 or step == cfg.max_steps
        if val is not None and evaluating:
            last["val_loss"] = round(evaluate(model, val, cfg.seed, vocab, tok_cfg, d), 6)
        if probe is not None and evaluating:
            last |= knn_probe(embed(model, probe[0]), probe[1])
        if metrics and (step % cfg.log_every == 0 or "val_loss" in last or step == cfg.max_steps):
            metrics.write(last)
            if progress is None:
                log.info("step %d/%d %s", step, cfg.max_steps, _brief(last))
        if d.main and progress is not None:
            progress(1, cfg.max_steps, _brief(last))
        if d.main and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            save_checkpoint(out, step, model, optimizer, {"position": asdict(position)})
    if metrics:
        metrics.close()
        save_run(out, model, info)
        write_json(out / "summary.json", last)
        log.info("done: %d steps, %s; run in %s", step, _brief(last), out)
    distributed.teardown(d)
    return last


def _finish(out: Path, model: ScGPT, info: RunInfo, step: int) -> dict[str, Any]:
    """A run resumed at its last step: complete already, or stopped between its last
    checkpoint and its final weights, which are then written from that checkpoint."""
    summary = out / "summary.json"
    if summary.exists():
        log.info("%s is complete (step %d): nothing to resume", out, step)
        return read_json(summary, what="run")
    rows = [r for r in read_metrics(out) if r.get("step") == step and "loss" in r]
    last = rows[-1] if rows else {"step": step}
    save_run(out, model, info)
    write_json(summary, last)
    log.info("%s: finished from its last checkpoint (step %d)", out, step)
    return last


def _micro_step(
    net: torch.nn.Module,
    tokens: TokenBlock,
    cfg: PretrainConfig,
    tok_cfg: TokenConfig,
    vocab: Vocab,
    d: distributed.Dist,
    step: int,
    micro: int,
) -> tuple[dict[str, float], int]:
    """Forward and backward of one micro-batch; returns the global mean losses and token count.

    Random draws are made for the whole global batch and sliced, so every rank's cells are split
    as they would be in a single process."""
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, micro))
    torch.manual_seed(step_seed(cfg.seed, step, micro, d.rank + 1))  # dropout
    fraction = cfg.gen_fractions[int(torch.randint(len(cfg.gen_fractions), (1,), generator=gen))]
    keys = torch.rand(2, cfg.batch_size, tok_cfg.max_seq_len, generator=gen)
    lo = d.rank * (cfg.batch_size // d.world)
    batch = split_generative(tokens, fraction, keys[0, lo:], vocab.pad_id, tok_cfg.pad_value)
    if cfg.contrast_weight:
        batch |= second_view(batch)
    if cfg.unexpressed_ratio:  # drawn from this process's cells (the pool is the batch)
        pool_gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, micro, d.rank + 1, 1))
        batch = add_unexpressed(batch, cfg.unexpressed_ratio, pool_gen, vocab.pad_id)
    masked = mask_observed(batch, cfg.mask_ratio, keys[1, lo:]) if cfg.mlm_weight else None
    batch = {k: v.to(d.device) for k, v in batch.items()}
    masked = None if masked is None else masked.to(d.device)
    norm = _norms(batch, masked, d, cfg.grad_accum)
    with torch.autocast("cuda", torch.bfloat16, enabled=d.device.type == "cuda"):
        parts = losses(net, batch, masked, norm, cfg.ecs_weight > 0)
        loss = parts["gen_mse"] + parts["mvc_mse"] + cfg.mlm_weight * parts.get("mlm_mse", 0.0)
        loss = loss + cfg.ecs_weight * parts.get("ecs", 0.0)
        loss = loss + cfg.contrast_weight * parts.get("contrast", 0.0)
        loss = loss + cfg.nonzero_weight * (
            parts.get("gen_zero_nll", 0.0) + parts.get("mvc_zero_nll", 0.0)
        )
    loss.backward()
    # Each rank's parts are its share of the global mean (see _norms): sum over ranks / world.
    means = {
        k: float(d.all_sum(v.detach().float()) / d.world)
        for k, v in {"loss": loss, **parts}.items()
    }
    n_tokens = int((~batch["pcpt_pad"]).sum() + (~batch["gen_pad"]).sum())
    return means, n_tokens


def _brief(m: dict[str, Any]) -> str:
    val = f" val {m['val_loss']:.4f}" if "val_loss" in m else ""
    return f"loss {m['loss']:.4f}{val} lr {m['lr']:.2e} {m['cells_per_s']:.0f} cells/s"


def _norms(
    batch: dict[str, torch.Tensor],
    masked: torch.Tensor | None,
    d: distributed.Dist,
    grad_accum: int,
) -> dict[str, torch.Tensor]:
    """Token counts over all ranks / world x grad_accum. DDP averages gradients over ranks, so
    dividing each rank's sum by this makes the update that of the mean over every token."""
    zero = torch.zeros((), device=d.device)
    counts = torch.stack(
        [(~batch["gen_pad"]).sum().float(), masked.sum().float() if masked is not None else zero]
    )
    counts = d.all_sum(counts).clamp(min=1.0) / d.world * grad_accum
    return {"gen": counts[0], "mlm": counts[1]}


@torch.no_grad()
def evaluate(
    model: ScGPT,
    val: TokenBlock,
    seed: int,
    vocab: Vocab,
    tok_cfg: TokenConfig,
    d: distributed.Dist,
) -> float:
    """Generative loss (GEP + GEPC) on the held-out cells at gen fraction 0.5, fixed split."""
    model.eval()
    gen = torch.Generator().manual_seed(step_seed(seed, 0xFFFF_FFFF))
    keys = torch.rand(val.n_cells, tok_cfg.max_seq_len, generator=gen)
    total, count = 0.0, 0.0
    for lo in range(0, val.n_cells, 64):
        rows = np.arange(lo, min(lo + 64, val.n_cells))
        block = val.take(rows, trim=True)
        batch = split_generative(block, 0.5, keys[rows], vocab.pad_id, tok_cfg.pad_value)
        batch = {k: v.to(d.device) for k, v in batch.items()}
        n = (~batch["gen_pad"]).sum()
        parts = losses(_Generative(model), batch, None, {"gen": torch.tensor(1.0, device=d.device)})
        total += float(parts["gen_mse"] + parts["mvc_mse"])
        count += float(n)
    model.train()
    return total / max(count, 1.0)


def resumed_config(out: str | Path, given: dict[str, Any]) -> tuple[PretrainConfig, list[str]]:
    """The settings a run at `out` was started with (its data, vocabulary, schedule), to
    continue it exactly, and the options in `given` that differ from them (not used; the device
    may change)."""
    saved = read_json(Path(out) / "config.json", what="run directory").get("train")
    if not isinstance(saved, dict):
        raise InputError(f"{out}: its config.json holds no pretraining settings to --resume")
    known = {f.name for f in fields(PretrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    cfg = PretrainConfig(**{**saved, "resume": True, "device": given.get("device", "auto")})
    ignored = ("resume", "device", "out", "overwrite")

    def same(a: Any, b: Any) -> bool:
        return json.dumps(a, sort_keys=True, default=list) == json.dumps(
            b, sort_keys=True, default=list
        )

    differ = [
        f"--{k.replace('_', '-')} (given {v!r}, run {saved.get(k)!r})"
        for k, v in given.items()
        if k not in ignored and not same(v, saved.get(k))
    ]
    return cfg, differ


def load_vocab(given: str | None, paths: list[Path], gene_column: str | None) -> Vocab:
    """`given` as a vocab.json, or the genes of `given` as a data file; default: of `paths`."""
    if given is None:
        return build_vocab(paths, gene_column)
    if given.endswith(".json"):
        return Vocab.from_json(given)
    return build_vocab([Path(given)], gene_column)


def provenance(paths: list[Path]) -> dict[str, Any]:
    """What the run was trained on and with: files, command line, code version, time."""
    return {
        "data": [{"file": str(p), "bytes": p.stat().st_size} for p in paths],
        "command": command_line(),
        "code_version": version("scgpt-deploy"),
        "created": created(),
    }
