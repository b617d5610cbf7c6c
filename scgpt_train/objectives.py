"""scGPT training losses as pure functions of model outputs and targets.

Which outputs feed which loss (keys of `ScGPT.forward` / `forward_generative`):
- GEP (masked values): masked_mse(out["mlm_output"], values, masked)
- GEPC / MVC: masked_mse(out["mvc_output"], values, masked)
- generative pretraining: masked_mse(out["gen_pred"], gen_values, ~gen_pad), same for
  out["mvc_gen_pred"]
- explicit zero heads: masked_bernoulli_nll(out["mlm_nonzero_logits"], values, masked)
- ECS: ecs_loss(out["cell_emb"]); two views: info_nce(out["cell_emb"], out["view_emb"]);
  annotation: cross_entropy(out["cls_output"], labels);
  DAB: cross_entropy(out["dab_output"], batch_labels)
Loss weights (ECS 10, DAB 1, ...) belong to the training config, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the positions where `mask` is True (any shape, all equal).

    Equals the official `masked_mse_loss` (sum of squared errors / number of masked
    positions); 0 when nothing is masked instead of NaN.
    """
    mask = mask.to(pred.dtype)
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def masked_bernoulli_nll(nonzero_logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Negative log-likelihood of "target > 0" under P = sigmoid(nonzero_logits), averaged over
    the positions where `mask` is True. The official loss takes the probabilities; the logits
    give the same value without log(0) when a probability rounds to 0 or 1."""
    mask = mask.to(nonzero_logits.dtype)
    is_nonzero = (target > 0).to(nonzero_logits.dtype)
    nll = F.binary_cross_entropy_with_logits(nonzero_logits, is_nonzero, reduction="none")
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def ecs_loss(cell_emb: Tensor, threshold: float = 0.8) -> Tensor:
    """Elastic cell similarity: mean over the (B, B) matrix of 1 - (relu(cos) - threshold)^2,
    cos the cosine similarity of the L2-normalised cell embeddings (B, d) with its diagonal set
    to 0 (as official, the diagonal stays in the mean and adds the constant 1 - threshold^2).

    Minimising it pushes each pair's similarity away from the threshold: similar cells closer
    together, dissimilar ones to orthogonal (negative similarities are not penalised).
    """
    emb = F.normalize(cell_emb, p=2, dim=1)  # (B, d)
    cos = emb @ emb.T  # (B, B)
    eye = torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)
    cos = F.relu(cos.masked_fill(eye, 0.0))
    return torch.mean(1.0 - (cos - threshold) ** 2)


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE of two views (B, d) of the same cells: each cell's embedding of one
    view must be nearer (cosine / temperature) to its own other view than to any other cell's.
    Unlike ECS it has a floor only where cells are told apart, so it cannot collapse."""
    a, b = F.normalize(a, p=2, dim=1), F.normalize(b, p=2, dim=1)
    logits = a @ b.T / temperature  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of class logits (B, C) against int64 labels (B,): cell types for the
    annotation head, batch labels for DAB (whose gradient reversal sits inside the model)."""
    return F.cross_entropy(logits, labels)
