"""The scGPT network: input encoders, the transformer and the model, smallest parts first; its
hyper-parameters are `ModelConfig` (config.py), its output heads decoders.py.

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PRESETS, ModelConfig
from .decoders import AdversarialDiscriminator, ClsDecoder, ExprDecoder, MVCDecoder

__all__ = ["PRESETS", "ModelConfig", "ScGPT"]

MAX_VALUE = 512.0  # the official continuous value encoder clamps values at 512 (no lower clamp)
MASK_BIAS = -1e4  # score bias of keys a query may not see: exp(-1e4) is 0, and fp16 can hold it
BN_EPS = 6.1e-5  # eps of the official BatchNorm1d on embeddings (old `bn`, and DSBN)


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


class LabelEncoder(nn.Module):
    """Label -> LayerNorm(embedding): the batch token of a cell, the modality of a token."""

    def __init__(self, n: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(n, d_model)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, labels: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(labels))  # (B, d) or (B, L, d)


class DSBN(nn.Module):
    """Domain-specific BatchNorm: one BatchNorm1d(d, affine=False) per batch label.

    Training follows the official scheme: a minibatch comes from one batch (checked) and that
    batch's BatchNorm normalises it with minibatch statistics. In eval each cell is normalised
    with the running statistics of its own label, by gathering: no data-dependent branch.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bns = nn.ModuleList(
            nn.BatchNorm1d(cfg.d_model, eps=BN_EPS, affine=False) for _ in range(cfg.n_dsbn)
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
        self.pert_encoder = nn.Embedding(cfg.n_pert, cfg.d_model) if cfg.n_pert else None
        self.bn = nn.BatchNorm1d(cfg.d_model, eps=BN_EPS) if cfg.pre_norm_bn else None
        self.batch_encoder = (
            LabelEncoder(cfg.n_batch_tokens, cfg.d_model) if cfg.n_batch_tokens else None
        )
        self.mod_encoder = LabelEncoder(cfg.n_mod, cfg.d_model) if cfg.n_mod else None
        self.dsbn = DSBN(cfg) if cfg.n_dsbn else None
        self.transformer_encoder = TransformerEncoder(cfg)
        self.decoder = ExprDecoder(cfg)
        self.mvc_decoder = MVCDecoder(cfg)
        self.cls_decoder = ClsDecoder(cfg) if cfg.n_cls else None
        self.grad_reverse_discriminator = AdversarialDiscriminator(cfg) if cfg.n_dab else None
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)  # official init

    def embed_inputs(
        self,
        gene_ids: Tensor,
        values: Tensor,
        batch_labels: Tensor | None = None,
        pert_flags: Tensor | None = None,
        mod_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The input embedding of every token (B, L, d) and the gene embeddings (B, L, d).

        A token is gene + value. `values` (B, Lv) may be shorter than `gene_ids` (B, L): the
        last L - Lv tokens are gen tokens (generative pretraining), gene + the gen flag, their
        values unseen. `pert_flags` (B, L) add the perturbation flag embedding, and with
        mod_input the modality embedding of `mod_ids` (B, L) is added. Then the input
        BatchNorm (old checkpoints) or DSBN (by `batch_labels`)."""
        gene_embs = self.encoder(gene_ids)  # (B, L, d)
        value_embs = self.value_encoder(values)  # (B, Lv, d)
        B, L, d = gene_embs.shape
        if values.shape[1] < L:
            flags = self.flag_encoder.weight[1].expand(B, L - values.shape[1], d)
            value_embs = torch.cat([value_embs, flags.to(value_embs.dtype)], dim=1)
        x = gene_embs + value_embs
        if pert_flags is not None:
            x = x + self.pert_encoder(_required(self.pert_encoder, pert_flags, "n_pert"))
        if self.cfg.mod_input:
            x = x + self.mod_encoder(_required(self.mod_encoder, mod_ids, "n_mod"))
        if self.bn is not None:
            x = self.bn(x.transpose(1, 2)).transpose(1, 2)  # BatchNorm over d: (B, d, L)
        if self.dsbn is not None:
            x = self.dsbn(x, _required(self.dsbn, batch_labels, "n_dsbn"))
        return x, gene_embs

    def encode(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        batch_labels: Tensor | None = None,
        pert_flags: Tensor | None = None,
        mod_ids: Tensor | None = None,
    ) -> Tensor:
        """Token outputs (B, L, d) for gene_ids (B, L) int64, values (B, L) float,
        padding_mask (B, L) bool (True = pad); batch_labels (B,) only for DSBN; mod_ids (B, L)
        only with mod_input."""
        x, _ = self.embed_inputs(gene_ids, values, batch_labels, pert_flags, mod_ids)
        return self.transformer_encoder(x, attn_bias(padding_attn_mask(padding_mask), x.dtype))

    def cell_embedding(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        batch_labels: Tensor | None = None,
        mod_ids: Tensor | None = None,
    ) -> Tensor:
        """The raw <cls> output (B, d); the official zero-shot API L2-normalises it afterwards."""
        return self.encode(gene_ids, values, padding_mask, batch_labels, mod_ids=mod_ids)[:, 0]

    def _heads(
        self,
        out: Tensor,
        gene_embs: Tensor,
        batch_labels: Tensor | None,
        mod_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Decoders on token outputs `out` (B, L, d); the cell embedding is out[:, 0]. The batch
        embedding (per cell) and the modality embedding (per token, `mod_ids` (B, L)) are
        concatenated to the decoders' inputs, as official."""
        cell_emb = out[:, 0]  # (B, d)
        dec_in, mvc_in = [out], [cell_emb]
        if self.batch_encoder is not None:
            batch_emb = self.batch_encoder(
                _required(self.batch_encoder, batch_labels, "n_batch_tokens")
            )  # (B, d)
            dec_in.append(batch_emb[:, None].expand_as(out))
            mvc_in.append(batch_emb)
        if self.mod_encoder is not None:
            dec_in.append(self.mod_encoder(_required(self.mod_encoder, mod_ids, "n_mod")))
        res = {"cell_emb": cell_emb}
        res["mlm_output"], mlm_nonzero = self.decoder(torch.cat(dec_in, dim=-1))  # (B, L)
        res["mvc_output"], mvc_nonzero = self.mvc_decoder(torch.cat(mvc_in, dim=-1), gene_embs)
        if mlm_nonzero is not None:
            res["mlm_nonzero_logits"], res["mvc_nonzero_logits"] = mlm_nonzero, mvc_nonzero
        if self.cls_decoder is not None:
            res["cls_output"] = self.cls_decoder(cell_emb)  # (B, n_cls)
        if self.grad_reverse_discriminator is not None:
            res["dab_output"] = self.grad_reverse_discriminator(cell_emb)  # (B, n_dab)
        return res

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        batch_labels: Tensor | None = None,
        mod_ids: Tensor | None = None,
        pert_flags: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Encoder pass and every head the config enables (inputs as in `encode`; mod_ids
        (B, L) with n_mod, pert_flags (B, L) with n_pert).

        Returns "cell_emb" (B, d); "mlm_output" (B, L): per-token expression (GEP);
        "mvc_output" (B, L): expression from the cell embedding (GEPC); with explicit_zero,
        "mlm_nonzero_logits" / "mvc_nonzero_logits" (B, L): logits of P(value > 0) (the
        official "zero_probs" are their sigmoid); with n_cls, "cls_output" (B, n_cls) logits;
        with n_dab, "dab_output" (B, n_dab) logits.
        """
        x, gene_embs = self.embed_inputs(gene_ids, values, batch_labels, pert_flags, mod_ids)
        out = self.transformer_encoder(x, attn_bias(padding_attn_mask(padding_mask), x.dtype))
        return self._heads(out, gene_embs, batch_labels, mod_ids)

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
        gene_ids = torch.cat([pcpt_gene, gen_gene], dim=1)  # (B, Lp + Lg): gen tokens last
        x, gene_embs = self.embed_inputs(gene_ids, pcpt_values, batch_labels)
        if input_cell_emb is not None:
            x = torch.cat([input_cell_emb[:, None].to(x.dtype), x[:, 1:]], dim=1)
        bias = attn_bias(generative_mask(pcpt_pad, gen_pad), x.dtype)  # (B, 1, L, L)
        out = self.transformer_encoder(x, bias)  # (B, L, d)
        res = self._heads(out, gene_embs, batch_labels)
        res["pcpt_out"], res["gen_out"] = out[:, :Lp], out[:, Lp:]
        res["pcpt_pred"], res["gen_pred"] = res["mlm_output"][:, :Lp], res["mlm_output"][:, Lp:]
        res["mvc_pcpt_pred"] = res["mvc_output"][:, :Lp]
        res["mvc_gen_pred"] = res["mvc_output"][:, Lp:]
        return res


def _required(part: nn.Module | None, given: Tensor | None, field: str) -> Tensor:
    """`given`, the input a part of the model needs; a clear error where it is missing or the
    model lacks the part."""
    if part is None:
        raise ValueError(f"this model has no {field} part for that input")
    if given is None:
        raise ValueError(f"this model uses {field}: pass its input")
    return given
