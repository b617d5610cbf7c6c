"""The output heads of the scGPT network (model.py): expression decoders (GEP, GEPC/MVC), the
cell-type head and the batch discriminator behind gradient reversal (DAB)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import ModelConfig


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1)
    )


class ExprDecoder(nn.Module):
    """Per-token expression (GEP): MLP d_in -> d -> d -> 1; optional logit of P(value > 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_in = cfg.d_model * (1 + bool(cfg.n_batch_tokens) + bool(cfg.n_mod))
        self.fc = _mlp(d_in, cfg.d_model)
        self.zero_logit = _mlp(d_in, cfg.d_model) if cfg.explicit_zero else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        pred = self.fc(x).squeeze(-1)  # (B, L)
        nonzero = self.zero_logit(x).squeeze(-1) if self.zero_logit is not None else None
        return pred, nonzero


class MVCDecoder(nn.Module):
    """GEPC / MVC ("inner product"): pred[b, j] = < W(sigmoid(gene2query(g_j))), cell_emb[b] >."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, d_in = cfg.d_model, cfg.d_model * (1 + bool(cfg.n_batch_tokens))
        self.gene2query = nn.Linear(d, d)
        self.W = nn.Linear(d, d_in, bias=False)
        self.W_zero_logit = nn.Linear(d, d_in) if cfg.explicit_zero else None

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> tuple[Tensor, Tensor | None]:
        query = torch.sigmoid(self.gene2query(gene_embs))  # (B, L, d)
        pred = torch.einsum("bld,bd->bl", self.W(query), cell_emb)  # (B, L)
        nonzero = None
        if self.W_zero_logit is not None:
            nonzero = torch.einsum("bld,bd->bl", self.W_zero_logit(query), cell_emb)  # (B, L)
        return pred, nonzero


def _hidden_layers(d: int, n_layers: int, act: type[nn.Module]) -> nn.Sequential:
    """(Linear, act, LayerNorm) x (n_layers - 1): keys 0, 2, 3, 5, ... as official."""
    return nn.Sequential(
        *(m for _ in range(n_layers - 1) for m in (nn.Linear(d, d), act(), nn.LayerNorm(d)))
    )


class ClsDecoder(nn.Module):
    """Cell-type head on the raw cell embedding: (Linear, ReLU, LayerNorm) x (n-1), Linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._decoder = _hidden_layers(cfg.d_model, cfg.n_layers_cls, nn.ReLU)
        self.out_layer = nn.Linear(cfg.d_model, cfg.n_cls)

    def forward(self, cell_emb: Tensor) -> Tensor:
        return self.out_layer(self._decoder(cell_emb))  # (B, n_cls)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


def grad_reverse(x: Tensor) -> Tensor:
    """Identity forward; the gradient flows back with its sign flipped (lambda = 1, official)."""
    return _GradReverse.apply(x)


class AdversarialDiscriminator(nn.Module):
    """DAB: predicts the batch label from the cell embedding through gradient reversal, so the
    encoder learns to hide the batch. Three linear layers with LeakyReLU (official)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._decoder = _hidden_layers(cfg.d_model, 3, nn.LeakyReLU)
        self.out_layer = nn.Linear(cfg.d_model, cfg.n_dab)

    def forward(self, cell_emb: Tensor) -> Tensor:
        return self.out_layer(self._decoder(grad_reverse(cell_emb)))  # (B, n_batch)
