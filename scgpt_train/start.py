"""Where every fine-tuning starts: a run's model, vocabulary and tokenization, or a fresh preset,
with the report of what was taken from the run."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from scgpt_runtime.errors import InputError
from scgpt_runtime.obs import parse_where
from scgpt_runtime.tokens import TokenConfig
from scgpt_runtime.vocab import Vocab

from .checkpoint import RunInfo, load_run
from .data import build_vocab
from .model import ModelConfig, ScGPT
from .pretrain import provenance

log = logging.getLogger(__name__)


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
    if cfg.from_run is not None and Path(cfg.out).resolve() == Path(cfg.from_run).resolve():
        raise ValueError("--out is the --from run: a fine-tuning writes a new run directory")


def start_from(
    run: str | None,
    preset: str,
    model: dict[str, Any],
    tokens: dict[str, Any],
    paths: list[str],
    gene_column: str | None,
    seed: int,
    extra_genes: list[str] | None = None,
) -> Start:
    """A run's vocabulary, TokenConfig and weights (`run`), or a preset with a vocabulary of
    every gene of `paths` and `extra_genes` (run None). `model` overrides config fields;
    `tokens` apply only from scratch."""
    if run is not None:
        if tokens:
            raise ValueError("token settings apply to --from-scratch: a run keeps its TokenConfig")
        net, info = load_run(run)
        base = {**info.model.to_dict(), **model}
        return Start(info.vocab, info.tokens, base, str(run), info, net.state_dict())
    vocab = build_vocab([Path(p) for p in paths], gene_column)
    if extra_genes:
        vocab = Vocab.from_genes([*vocab.names, *extra_genes])
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
    start: Start,
    heads: dict[str, Any],
    labels: list[str] | None,
    batches: list[str] | None,
    seed: int,
) -> tuple[ScGPT, LoadReport]:
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
