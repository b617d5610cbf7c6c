"""scGPT training in PyTorch: the model, pretraining, fine-tuning, official checkpoints."""

from __future__ import annotations

from .checkpoint import RunInfo, load_run, save_run
from .model import PRESETS, ModelConfig, ScGPT

__all__ = ["PRESETS", "ModelConfig", "RunInfo", "ScGPT", "load_run", "save_run"]
