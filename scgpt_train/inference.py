"""PyTorch inference on tokenized cells in memory: minibatch tensors, cell embeddings and
classifier predictions (fine-tuning validation and `scgpt-train evaluate`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scgpt_runtime.errors import InputError
from scgpt_runtime.tokens import MODALITY, TokenBlock

from .checkpoint import RunInfo, load_run
from .distributed import resolve_device
from .metrics import Prediction, decide
from .model import ScGPT


def load_for_inference(run: str, device: str = "auto") -> tuple[ScGPT, RunInfo]:
    """A run's model in eval mode on `device`; InputError (one line) for a model that needs
    batch labels (DSBN or batch tokens), which the gene and generation commands do not take."""
    model, info = load_run(run)
    if info.model.n_dsbn or info.model.n_batch_tokens:
        raise InputError(f"{run}: the model needs batch labels (DSBN or batch tokens)")
    return model.to(resolve_device(device)).eval(), info


def _batches_in_order(tokens: TokenBlock, batch_size: int) -> list[np.ndarray]:
    """All cells cut into minibatches of similar length (less padding)."""
    order = np.argsort(tokens.n_genes, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_inputs(tokens: TokenBlock, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    """gene_ids, values, padding_mask of the cells `rows`, without all-padding columns."""
    t = tokens.take(rows, trim=True)
    return [torch.from_numpy(a).to(device) for a in (t.gene_ids, t.values, t.padding_mask)]


def batch_modalities(
    tokens: TokenBlock, rows: np.ndarray, device: torch.device
) -> torch.Tensor | None:
    """The modality ids of the cells `rows` (as `batch_inputs` trims them); None for cells of
    genes only."""
    if MODALITY not in tokens.inputs:
        return None
    return torch.from_numpy(tokens.take(rows, trim=True).inputs[MODALITY]).to(device)


def codes_tensor(
    codes: np.ndarray | None, rows: np.ndarray, device: torch.device
) -> torch.Tensor | None:
    """Labels or batch codes of the cells `rows` as an int64 tensor (None stays None)."""
    return None if codes is None else torch.from_numpy(codes[rows]).to(device)


@torch.no_grad()
def run_model(
    model: ScGPT,
    tokens: TokenBlock,
    batch_codes: np.ndarray | None = None,
    batch_size: int = 64,
    head: str = "cell_emb",
) -> np.ndarray:
    """The cell embeddings (head "cell_emb") or classifier logits ("cls_output") of every cell,
    in eval mode, float32. Batch codes are needed only by a model with DSBN."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = model.cfg.d_model if head == "cell_emb" else model.cfg.n_cls
    out = np.empty((tokens.n_cells, width), dtype=np.float32)
    for rows in _batches_in_order(tokens, batch_size):
        emb = model.cell_embedding(  # only the encoder: no decoder needs batch tokens here
            *batch_inputs(tokens, rows, device),
            codes_tensor(batch_codes, rows, device),
            mod_ids=batch_modalities(tokens, rows, device),
        )  # (B, d)
        res = emb if head == "cell_emb" else model.cls_decoder(emb)
        out[rows] = res.float().cpu().numpy()
    model.train(was_training)
    return out


def embed(model: ScGPT, tokens: TokenBlock, batch_codes: np.ndarray | None = None) -> np.ndarray:
    """Raw cell embeddings (n, d); the official zero-shot API L2-normalises them afterwards."""
    return run_model(model, tokens, batch_codes)


def predict(
    model: ScGPT,
    labels: list[str],
    tokens: TokenBlock,
    batch_codes: np.ndarray | None = None,
    unknown_threshold: float | None = None,
) -> Prediction:
    """Softmax probabilities over all classes `labels` (the run's order); confidence = the
    largest; "unknown" below `unknown_threshold` (None: off)."""
    if model.cls_decoder is None:
        raise InputError("the model has no classifier head: fine-tune it with `finetune annotate`")
    logits = torch.from_numpy(run_model(model, tokens, batch_codes, head="cls_output"))
    return decide(list(labels), F.softmax(logits.double(), 1).numpy(), unknown_threshold)
