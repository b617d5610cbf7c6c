"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scgpt_runtime.tokens import TokenConfig
from scgpt_runtime.vocab import Vocab
from scgpt_train.checkpoint import RunInfo, save_run
from scgpt_train.model import ModelConfig, ScGPT


def _random_run(path: Path, genes: list[str], tokens: TokenConfig) -> tuple[ScGPT, Vocab]:
    """An untrained small model over `genes` (seed 0, no dropout) saved as a run at `path`."""
    vocab = Vocab.from_genes(genes)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("small", vocab_size=len(vocab), pad_id=vocab.pad_id, dropout=0.0)
    model = ScGPT(cfg)
    save_run(path, model, RunInfo(cfg, tokens, vocab))
    return model.eval(), vocab


@pytest.fixture(scope="session")
def random_run():
    """(path, genes, tokens) -> (model in eval mode, vocab): a random run saved at path."""
    return _random_run
