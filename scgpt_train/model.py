"""The scGPT network in one file: config, parts (smallest first), and the model.

Parameter names equal those of the official checkpoints (`encoder.embedding.weight`,
`transformer_encoder.layers.0.self_attn.Wqkv.weight`, ...), so `official.py` maps a released
state dict with a short rename table. Conventions used throughout:

- `padding_mask` (B, L) bool: True marks a pad token. Pads are never attended to.
- Attention masks are built as bool (True = may attend) and given to
  `F.scaled_dot_product_attention` as an additive float bias (`attn_bias`): its fast CPU
  kernels take float masks, and a finite bias exports cleanly.
- Position 0 holds `<cls>` and is never a pad; its output is the cell embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_VALUE = 512.0  # the official continuous value encoder clamps values at 512 (no lower clamp)
MASK_BIAS = -1e4  # score bias of keys a query may not see: exp(-1e4) is 0, and fp16 can hold it
BN_EPS = 6.1e-5  # eps of the official BatchNorm1d on embeddings (old `bn`, and DSBN)
INPUT_EMBS = ("continuous", "category")


@dataclass
class ModelConfig:
    vocab_size: int  # rows of the gene embedding: genes + <pad>, <cls>, <eoc>
    pad_id: int  # id of <pad>: its embedding row gets no gradient (official padding_idx)
    d_model: int = 512
    n_head: int = 8
    d_hid: int = 512  # hidden width of each block's feed-forward layer
    n_layer: int = 12
    dropout: float = 0.2  # embeddings, attention weights, residual branches; training only
    n_bins: int = 51  # value bins incl. bin 0 (zero expression)
    max_seq_len: int = 1200  # tokens per cell incl. <cls>, for the data pipeline: no positions
    input_emb: str = "continuous"  # "continuous": MLP on the value; "category": one row per bin
    n_cls: int = 0  # classes of the cell-type head (0 = no head)
    n_layers_cls: int = 3  # linear layers of the cell-type head
    n_batch: int = 0  # batch labels known to batch tokens / DSBN / DAB (0 = none)
    use_batch_tokens: bool = False  # batch embedding concatenated to the decoders' inputs
    dsbn: bool = False  # domain-specific BatchNorm on the input embeddings
    dab: bool = False  # batch discriminator behind gradient reversal
    explicit_zero: bool = False  # extra heads predicting P(value > 0)
    pre_norm_bn: bool = False  # older checkpoints: BatchNorm1d on the summed input embedding

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_head", "d_hid", "n_layer", "n_layers_cls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"pad_id {self.pad_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.input_emb not in INPUT_EMBS:
            raise ValueError(f"input_emb must be one of {INPUT_EMBS}, got {self.input_emb!r}")
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {self.n_bins}")
        if self.n_cls == 1 or self.n_cls < 0:
            raise ValueError(f"n_cls must be 0 (no head) or at least 2, got {self.n_cls}")
        if self.n_batch < 0:
            raise ValueError(f"n_batch must be >= 0, got {self.n_batch}")
        if (self.use_batch_tokens or self.dsbn or self.dab) and self.n_batch < 1:
            raise ValueError("use_batch_tokens, dsbn and dab need n_batch >= 1")
        if self.dsbn and self.pre_norm_bn:
            raise ValueError("dsbn and pre_norm_bn exclude each other (one BatchNorm on the input)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset (see PRESETS) with `overrides`; vocab_size and pad_id must be among them."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    # fast on CPU: tests and demos
    "small": {"d_model": 64, "n_head": 4, "d_hid": 128, "n_layer": 2, "max_seq_len": 256},
    "base": {"d_model": 256, "n_head": 8, "d_hid": 512, "n_layer": 4},
    # the released whole-human model (scGPT_human): 51,330,049 parameters with vocab 60,697
    "whole-human": {
        "d_model": 512,
        "n_head": 8,
        "d_hid": 512,
        "n_layer": 12,
        "n_bins": 51,
        "max_seq_len": 1200,
        "dropout": 0.2,
    },
}


# ---------------------------------------------------------------------------- input encoders


class GeneEncoder(nn.Module):
    """Gene id -> LayerNorm(embedding). Its output also feeds the MVC decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.enc_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, gene_ids: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(gene_ids))  # (B, L, d)


class ContinuousValueEncoder(nn.Module):
    """Value -> LN(Linear2(ReLU(Linear1(min(value, 512))))), then dropout (official order)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear1 = nn.Linear(1, cfg.d_model)
        self.linear2 = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, values: Tensor) -> Tensor:
        x = values.unsqueeze(-1).clamp(max=MAX_VALUE)  # (B, L, 1)
        x = self.linear2(F.relu(self.linear1(x)))  # (B, L, d)
        return self.dropout(self.norm(x))


class CategoryValueEncoder(nn.Module):
    """Bin -> LayerNorm(embedding), with n_bins + 2 rows: bins 0..n_bins-1, pad, mask.

    Negative values index from the end, so the project's pad_value -2 and mask_value -1 land on
    rows n_bins and n_bins + 1: the layout of official category-style models, whose tutorials
    use pad_value = n_bins and mask_value = n_bins + 1 (those values map to the same rows).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_rows = cfg.n_bins + 2
        self.embedding = nn.Embedding(self.n_rows, cfg.d_model, padding_idx=cfg.n_bins)
        self.enc_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, values: Tensor) -> Tensor:
        idx = values.long()  # (B, L)
        idx = torch.where(idx < 0, idx + self.n_rows, idx)
        return self.enc_norm(self.embedding(idx))  # (B, L, d)


class BatchEncoder(nn.Module):
    """Batch label -> LayerNorm(embedding): the "batch token" given to the decoders."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.n_batch, cfg.d_model)
        self.enc_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, batch_labels: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(batch_labels))  # (B, d)


class DSBN(nn.Module):
    """Domain-specific BatchNorm: one BatchNorm1d(d, affine=False) per batch label.

    Training follows the official scheme: a minibatch comes from one batch (checked) and that
    batch's BatchNorm normalises it with minibatch statistics. In eval each cell is normalised
    with the running statistics of its own label, by gathering: no data-dependent branch.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bns = nn.ModuleList(
            nn.BatchNorm1d(cfg.d_model, eps=BN_EPS, affine=False) for _ in range(cfg.n_batch)
        )

    def forward(self, x: Tensor, batch_labels: Tensor) -> Tensor:
        if self.training:
            label = int(batch_labels[0])
            if not bool((batch_labels == label).all()):
                raise ValueError("DSBN trains on minibatches drawn from a single batch label")
            return self.bns[label](x.transpose(1, 2)).transpose(1, 2)  # (B, L, d)
        mean = torch.stack([bn.running_mean for bn in self.bns])[batch_labels]  # (B, d)
        var = torch.stack([bn.running_var for bn in self.bns])[batch_labels]  # (B, d)
        return (x - mean[:, None]) * torch.rsqrt(var[:, None] + BN_EPS)  # (B, L, d)


# ---------------------------------------------------------------------------- transformer


class SelfAttention(nn.Module):
    """Multi-head attention with a fused Wqkv (rows: Q, K, V; heads are contiguous blocks)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.Wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        B, L, d = x.shape
        q, k, v = self.Wqkv(x).split(d, dim=-1)  # 3 x (B, L, d)
        q, k, v = (t.view(B, L, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B,h,L,dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, L, dh); scale 1/sqrt(dh)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, d))  # (B, L, d)


class Block(nn.Module):
    """Post-LayerNorm encoder layer: x = LN1(x + attn(x)); x = LN2(x + FFN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_hid)
        self.linear2 = nn.Linear(cfg.d_hid, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, attn_mask)))  # (B, L, d)
        h = self.linear2(self.dropout(F.relu(self.linear1(x))))  # (B, L, d)
        return self.norm2(x + self.dropout2(h))


class TransformerEncoder(nn.Module):
    """The stack of blocks; no final LayerNorm (as official)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


def attn_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool "may attend" mask as the additive bias SDPA adds to the scores: 0 or MASK_BIAS."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, MASK_BIAS
    )


def padding_attn_mask(padding_mask: Tensor) -> Tensor:
    """(B, L) True = pad -> (B, 1, 1, L) True = may attend: every query sees every non-pad key."""
    return ~padding_mask[:, None, None, :]


def generative_mask(pcpt_pad: Tensor, gen_pad: Tensor) -> Tensor:
    """Attention mask for the sequence [observed tokens | gen tokens], True = may attend.

    Observed ("pcpt") tokens attend to the non-pad observed tokens only; each gen token attends
    to the non-pad observed tokens and to itself, never to another gen token.
    pcpt_pad (B, Lp), gen_pad (B, Lg): True = pad. Returns (B, 1, Lp + Lg, Lp + Lg).
    """
    seen_by_all = torch.cat([~pcpt_pad, torch.zeros_like(gen_pad)], dim=1)  # (B, L)
    seen_by_self = torch.cat([torch.zeros_like(pcpt_pad), ~gen_pad], dim=1)  # (B, L)
    L = seen_by_all.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=pcpt_pad.device)  # (L, L)
    allowed = seen_by_all[:, None, :] | (eye[None] & seen_by_self[:, None, :])  # (B, L, L)
    return allowed[:, None]


# ---------------------------------------------------------------------------- decoders


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1)
    )


class ExprDecoder(nn.Module):
    """Per-token expression (GEP): MLP d_in -> d -> d -> 1; optional logit of P(value > 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_in = 2 * cfg.d_model if cfg.use_batch_tokens else cfg.d_model
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
        d, d_in = cfg.d_model, (2 * cfg.d_model if cfg.use_batch_tokens else cfg.d_model)
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
        self.out_layer = nn.Linear(cfg.d_model, cfg.n_batch)

    def forward(self, cell_emb: Tensor) -> Tensor:
        return self.out_layer(self._decoder(grad_reverse(cell_emb)))  # (B, n_batch)


# ---------------------------------------------------------------------------- the model


class ScGPT(nn.Module):
    """scGPT: gene + value tokens -> post-LN transformer -> cell embedding and decoders."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = GeneEncoder(cfg)
        value_encoder = (
            ContinuousValueEncoder if cfg.input_emb == "continuous" else CategoryValueEncoder
        )
        self.value_encoder = value_encoder(cfg)
        self.flag_encoder = nn.Embedding(2, cfg.d_model)  # row 1 marks a gen token
        self.bn = nn.BatchNorm1d(cfg.d_model, eps=BN_EPS) if cfg.pre_norm_bn else None
        self.batch_encoder = BatchEncoder(cfg) if cfg.use_batch_tokens else None
        self.dsbn = DSBN(cfg) if cfg.dsbn else None
        self.transformer_encoder = TransformerEncoder(cfg)
        self.decoder = ExprDecoder(cfg)
        self.mvc_decoder = MVCDecoder(cfg)
        self.cls_decoder = ClsDecoder(cfg) if cfg.n_cls else None
        self.grad_reverse_discriminator = AdversarialDiscriminator(cfg) if cfg.dab else None
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)  # official init

    def _normalize_input(self, x: Tensor, batch_labels: Tensor | None) -> Tensor:
        if self.bn is not None:
            x = self.bn(x.transpose(1, 2)).transpose(1, 2)  # BatchNorm over d: (B, d, L)
        if self.dsbn is not None:
            x = self.dsbn(x, _required(batch_labels, "dsbn"))
        return x

    def _encode(
        self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor, batch_labels: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        gene_embs = self.encoder(gene_ids)  # (B, L, d)
        x = self._normalize_input(gene_embs + self.value_encoder(values), batch_labels)
        bias = attn_bias(padding_attn_mask(padding_mask), x.dtype)  # (B, 1, 1, L)
        return self.transformer_encoder(x, bias), gene_embs

    def encode(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        batch_labels: Tensor | None = None,
    ) -> Tensor:
        """Token outputs (B, L, d) for gene_ids (B, L) int64, values (B, L) float,
        padding_mask (B, L) bool (True = pad); batch_labels (B,) only for DSBN."""
        return self._encode(gene_ids, values, padding_mask, batch_labels)[0]

    def cell_embedding(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        batch_labels: Tensor | None = None,
    ) -> Tensor:
        """The raw <cls> output (B, d); the official zero-shot API L2-normalises it afterwards."""
        return self.encode(gene_ids, values, padding_mask, batch_labels)[:, 0]

    def _heads(
        self, out: Tensor, gene_embs: Tensor, batch_labels: Tensor | None
    ) -> dict[str, Tensor]:
        """Decoders on token outputs `out` (B, L, d); the cell embedding is out[:, 0]."""
        cell_emb = out[:, 0]  # (B, d)
        dec_in, mvc_in = out, cell_emb
        if self.batch_encoder is not None:
            batch_emb = self.batch_encoder(_required(batch_labels, "use_batch_tokens"))  # (B, d)
            dec_in = torch.cat([out, batch_emb[:, None].expand_as(out)], dim=-1)  # (B, L, 2d)
            mvc_in = torch.cat([cell_emb, batch_emb], dim=-1)  # (B, 2d)
        res = {"cell_emb": cell_emb}
        res["mlm_output"], mlm_nonzero = self.decoder(dec_in)  # (B, L)
        res["mvc_output"], mvc_nonzero = self.mvc_decoder(mvc_in, gene_embs)  # (B, L)
        if mlm_nonzero is not None:
            res["mlm_nonzero_logits"], res["mvc_nonzero_logits"] = mlm_nonzero, mvc_nonzero
        if self.cls_decoder is not None:
            res["cls_output"] = self.cls_decoder(cell_emb)  # (B, n_cls)
        if self.grad_reverse_discriminator is not None:
            res["dab_output"] = self.grad_reverse_discriminator(cell_emb)  # (B, n_batch)
        return res

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        batch_labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Encoder pass and every head the config enables (inputs as in `encode`).

        Returns "cell_emb" (B, d); "mlm_output" (B, L): per-token expression (GEP);
        "mvc_output" (B, L): expression from the cell embedding (GEPC); with explicit_zero,
        "mlm_nonzero_logits" / "mvc_nonzero_logits" (B, L): logits of P(value > 0) (the
        official "zero_probs" are their sigmoid); with n_cls, "cls_output" (B, n_cls) logits;
        with dab, "dab_output" (B, n_batch) logits.
        """
        out, gene_embs = self._encode(gene_ids, values, padding_mask, batch_labels)
        return self._heads(out, gene_embs, batch_labels)

    def forward_generative(
        self,
        pcpt_gene: Tensor,
        pcpt_values: Tensor,
        pcpt_pad: Tensor,
        gen_gene: Tensor,
        gen_pad: Tensor,
        batch_labels: Tensor | None = None,
        input_cell_emb: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Generative pass: observed tokens (B, Lp) with values, <cls> first, and gen tokens
        (B, Lg) without values, in one sequence [observed | gen] under `generative_mask`.

        input_cell_emb (B, d), when given, replaces the <cls> input embedding (the official
        second pass feeds the detached cell embedding back there).
        Returns the keys of `forward` computed over all Lp + Lg tokens, plus "pcpt_out"
        (B, Lp, d), "gen_out" (B, Lg, d), and the predictions split by stream: "pcpt_pred",
        "gen_pred", "mvc_pcpt_pred", "mvc_gen_pred" (B, Lp) / (B, Lg).
        """
        Lp = pcpt_gene.shape[1]
        pcpt_embs, gen_embs = self.encoder(pcpt_gene), self.encoder(gen_gene)  # (B, Lp|Lg, d)
        x_pcpt = pcpt_embs + self.value_encoder(pcpt_values)  # (B, Lp, d)
        x_gen = gen_embs + self.flag_encoder.weight[1]  # (B, Lg, d)
        x = self._normalize_input(torch.cat([x_pcpt, x_gen], dim=1), batch_labels)  # (B, L, d)
        if input_cell_emb is not None:
            x = torch.cat([input_cell_emb[:, None].to(x.dtype), x[:, 1:]], dim=1)
        bias = attn_bias(generative_mask(pcpt_pad, gen_pad), x.dtype)  # (B, 1, L, L)
        out = self.transformer_encoder(x, bias)  # (B, L, d)
        res = self._heads(out, torch.cat([pcpt_embs, gen_embs], dim=1), batch_labels)
        res["pcpt_out"], res["gen_out"] = out[:, :Lp], out[:, Lp:]
        res["pcpt_pred"], res["gen_pred"] = res["mlm_output"][:, :Lp], res["mlm_output"][:, Lp:]
        res["mvc_pcpt_pred"] = res["mvc_output"][:, :Lp]
        res["mvc_gen_pred"] = res["mvc_output"][:, Lp:]
        return res


def _required(batch_labels: Tensor | None, feature: str) -> Tensor:
    if batch_labels is None:
        raise ValueError(f"this model uses {feature}: pass batch_labels")
    return batch_labels
