"""Run directories: the trained model with everything needed to use it, and resumable state.

RUN/
  config.json          model, tokenization, labels, training config, provenance (format_version;
                       format 1 is read too: its batch flags become the counts of ModelConfig)
  vocab.json           {gene: id}, the official layout
  model.safetensors    weights (never pickle)
  metrics.jsonl        one JSON object per logged step
  checkpoints/step-NNNNNNNN/{model,optimizer,rng}.safetensors + state.json, and `latest`

Every file is written to a temporary name and renamed into place; a checkpoint directory is
complete before `latest` points at it, so an interrupted run resumes from the last whole one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scgpt_runtime.errors import InputError, OutputError
from scgpt_runtime.io.atomic import atomic_path, output_errors, writing
from scgpt_runtime.modalities import Modality
from scgpt_runtime.tokens import TokenConfig
from scgpt_runtime.vocab import GENE, Vocab

from .model import ModelConfig, ScGPT

log = logging.getLogger("scgpt_train")

RUN_FORMAT_VERSION = 2  # 2: ModelConfig sizes its optional parts by counts
READ_FORMAT_VERSIONS = (1, 2)
KEEP_CHECKPOINTS = 2  # older step directories are deleted once a newer one is complete


@dataclass
class RunInfo:
    """What a run directory says about its model, besides the weights."""

    model: ModelConfig
    tokens: TokenConfig
    vocab: Vocab
    labels: list[str] | None = None  # cell-type names, in classifier output order
    batches: list[str] | None = None  # batch names, in batch-label order
    train: dict[str, Any] = field(default_factory=dict)  # the resolved training config
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # temperature of the head, fitted on validation
    modalities: list[Modality] | None = None  # a multi-omics model's, in token order

    def to_dict(self) -> dict[str, Any]:
        extra = (
            {}
            if self.modalities is None
            else {"modalities": [m.to_dict() for m in self.modalities]}
        )
        return {
            **extra,
            "format_version": RUN_FORMAT_VERSION,
            "model": self.model.to_dict(),
            "tokens": self.tokens.to_dict(),
            "labels": self.labels,
            "batches": self.batches,
            "train": self.train,
            "provenance": self.provenance,
            "calibration": self.calibration,
        }


def new_run_dir(run_dir: str | Path, overwrite: bool = False) -> Path:
    """`run_dir`, made for a new run: an existing non-empty folder is refused (OutputError)
    unless `overwrite`, and then only a run directory is emptied, never another folder."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not overwrite:
            raise OutputError(
                f"{run_dir}: exists; pass --overwrite to replace that run (or --resume to "
                "continue a pretraining)"
            )
        if not (run_dir / "config.json").is_file():
            raise OutputError(f"{run_dir}: is not a run directory; refusing to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


NAMESPACES_FILE = "vocab.namespaces.json"  # tokens beyond the genes: {namespace: [names]}


def save_run(run_dir: str | Path, model: ScGPT, info: RunInfo) -> Path:
    """Write config.json, vocab.json and model.safetensors into `run_dir`; the tokens of other
    namespaces (proteins, peaks), which follow the genes, go to vocab.namespaces.json so
    that vocab.json keeps the official layout."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", info.to_dict())
    vocab = info.vocab
    n_genes = vocab.namespaces.count(GENE)
    if vocab.namespaces[:n_genes] != [GENE] * n_genes:
        raise ValueError("a run's vocabulary holds its genes first, then other namespaces")
    with atomic_path(run_dir / "vocab.json") as tmp:
        Vocab(vocab.names[:n_genes]).to_json(tmp)
    if n_genes < len(vocab):
        others: dict[str, list[str]] = {}
        for ns, name in zip(vocab.namespaces[n_genes:], vocab.names[n_genes:], strict=True):
            others.setdefault(ns, []).append(name)
        if [ns for ns, names in others.items() for _ in names] != vocab.namespaces[n_genes:]:
            raise ValueError("a run's vocabulary holds each namespace's tokens together")
        write_json(run_dir / NAMESPACES_FILE, others)
    _save_tensors(run_dir / "model.safetensors", model.state_dict())
    return run_dir


def load_run(run_dir: str | Path, map_location: str = "cpu") -> tuple[ScGPT, RunInfo]:
    """The model (in eval mode) and its RunInfo; a clear InputError for anything missing."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json", what="run directory")
    version = config.get("format_version")
    if version not in READ_FORMAT_VERSIONS:
        raise InputError(
            f"{run_dir}: run format version {version} is not supported "
            f"(this version reads {', '.join(map(str, READ_FORMAT_VERSIONS))})"
        )
    try:
        info = RunInfo(
            model=ModelConfig.from_dict(config["model"]),
            tokens=TokenConfig.from_dict(config["tokens"]),
            vocab=_read_vocab(run_dir),
            labels=config.get("labels"),
            batches=config.get("batches"),
            train=config.get("train", {}),
            provenance=config.get("provenance", {}),
            calibration=config.get("calibration"),
            modalities=_modalities(config),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{run_dir / 'config.json'}: invalid run config ({e})") from e
    if len(info.vocab) != info.model.vocab_size:
        raise InputError(
            f"{run_dir}: vocab.json has {len(info.vocab)} tokens but the model "
            f"{info.model.vocab_size}"
        )
    model = ScGPT(info.model)
    model.load_state_dict(_load_tensors(_weights(run_dir, info), map_location))
    return model.eval(), info


def _read_vocab(run_dir: Path) -> Vocab:
    """vocab.json, then the tokens of vocab.namespaces.json (a multi-omics run) after it."""
    genes = Vocab.from_json(run_dir / "vocab.json")
    if not (run_dir / NAMESPACES_FILE).is_file():
        return genes
    others = read_json(run_dir / NAMESPACES_FILE, what="run directory")
    names = [n for names in others.values() for n in names]
    namespaces = [ns for ns, names in others.items() for _ in names]
    return Vocab(genes.names + names, genes.namespaces + namespaces)


def _modalities(config: dict[str, Any]) -> list[Modality] | None:
    records = config.get("modalities")
    return None if records is None else [Modality.from_dict(m) for m in records]


def _weights(run_dir: Path, info: RunInfo) -> Path:
    """The weights file of a run. An unfinished pretraining's model.safetensors holds its
    initial weights, so its latest checkpoint is taken instead, with a warning."""
    if "checkpoint_every" not in info.train or (run_dir / "summary.json").exists():
        return run_dir / "model.safetensors"  # finished, or not a pretraining
    ckpt = latest_checkpoint(run_dir)
    resume = f"scgpt-train pretrain --out {run_dir} --resume finishes it"
    if ckpt is None:
        raise InputError(f"{run_dir}: an unfinished pretraining with no checkpoint yet ({resume})")
    step = read_json(ckpt / "state.json", what="checkpoint")["step"]
    log.warning(
        "%s: an unfinished pretraining: using its latest checkpoint, step %d of %s (%s)",
        run_dir,
        step,
        info.train.get("max_steps"),
        resume,
    )
    info.provenance = {**info.provenance, "checkpoint_step": step}
    return ckpt / "model.safetensors"


def save_checkpoint(
    run_dir: Path, step: int, model: ScGPT, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """A complete resumable checkpoint at `step`; `state` is JSON (data position, metrics)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    for stale in root.glob(".step-*.tmp"):  # a killed write's (one trainer writes a run)
        shutil.rmtree(stale, ignore_errors=True)
    with writing(), output_errors(final):
        _write_checkpoint(tmp, final, step, model, optimizer, state)
    with atomic_path(root / "latest") as t:
        t.write_text(final.name)
    for old in checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a write in progress is hidden)."""
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"))


def _write_checkpoint(
    tmp: Path, final: Path, step: int, model: ScGPT, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    tmp.mkdir(parents=True)
    try:
        save_file(_contiguous(model.state_dict()), tmp / "model.safetensors")
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        write_json(tmp / "state.json", {"step": step, "optimizer": meta, **state})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:  # interrupted or a full disk: the latest complete one stays latest
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `--resume` continues from, None before the first."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    return latest.parent / latest.read_text().strip() if latest.is_file() else None


def load_checkpoint(
    run_dir: Path, model: ScGPT, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore the latest checkpoint into `model` and `optimizer`; its state, or None if none."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    state = read_json(ckpt / "state.json", what="checkpoint")
    model.load_state_dict(_load_tensors(ckpt / "model.safetensors"))
    tensors = _load_tensors(ckpt / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer")))
    torch.set_rng_state(_load_tensors(ckpt / "rng.safetensors")["torch"])
    return state


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of RUN/metrics.jsonl; a last line cut short by a killed process is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise InputError(f"{path}: line {i + 1} is not JSON") from None
    return rows


class MetricsLog:
    """RUN/metrics.jsonl, the one writer of every trainer: one JSON object per line, flushed as
    it is written. `resume_step` keeps the rows up to that step (a resumed run repeats the
    steps after its checkpoint) and appends; None starts the file afresh."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = []
        if resume_step is not None:
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def created() -> str:
    """Now in UTC (ISO 8601), or SOURCE_DATE_EPOCH's time when set (reproducible builds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch) if epoch else None))


def command_line() -> str:
    """This process's command line, the program by name only (no machine-specific path)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise InputError(f"{path.parent}: not a {what} ({path.name} is missing)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file(_contiguous(tensors), tmp)


def _load_tensors(path: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=map_location)
    except (OSError, SafetensorError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from e


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors plus JSON, so no pickle is needed."""
    tensors, scalars = {}, {}
    for idx, param_state in sd["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
