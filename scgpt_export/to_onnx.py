"""ScGPT to ONNX: the inference module a graph is traced from, and the export call.

A graph takes (gene_ids, values, padding_mask) with a symbolic batch and length axis (and
modality_ids, for a multi-omics model that adds the modality embedding to its input) and
returns the raw <cls> embedding, its L2-normalised form and, where the model has a cell-type
head, class probabilities (names from scgpt_runtime.bundle). The runtime feeds it only the
lengths of the bundle's ladder, each validated at export, padded and masked: the padding mask
becomes an additive attention bias inside the graph. One graph serving every length holds the
weights once: whole-human fp32, five lengths loaded, peaked at 449 MB against 1,376 MB for
five fixed-length graphs, with bit-identical outputs and the same speed (docs/benchmarks.md).
Attention is fused into onnxruntime's MultiHeadAttention by onnxscript's ORT fusions: the
whole-human model at 1200 tokens ran 1.3x faster on two CPU cores (batch 4) fused than unfused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from onnxscript import ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort
from torch import Tensor, nn

from scgpt_runtime.bundle import CELL_EMB, CELL_EMB_NORMALIZED, CLASS_PROBS
from scgpt_runtime.tokens import INPUT_NAMES, MODALITY
from scgpt_train.model import ScGPT

OPSETS = (18, 19, 20)  # onnxruntime runs these on CPU and CUDA


class CellEncoder(nn.Module):
    """Tokens -> (cell_emb, cell_emb_normalized[, class_probs]): what a bundle graph computes."""

    def __init__(self, model: ScGPT):
        super().__init__()
        self.model = model

    def forward(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor) -> tuple[Tensor, ...]:
        return self.outputs(gene_ids, values, padding_mask)

    def outputs(
        self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor, mod_ids: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        m = self.model
        # The model's own path; its padding mask becomes the finite additive bias MASK_BIAS
        # (model.py), so no softmax row can become NaN and fp16 can hold it.
        cell_emb = m.cell_embedding(gene_ids, values, padding_mask, mod_ids=mod_ids)  # (B, d)
        outputs = (cell_emb, F.normalize(cell_emb, dim=-1))  # x / max(||x||, 1e-12)
        if m.cls_decoder is not None:  # fixed by the model, not by the data
            outputs += (torch.softmax(m.cls_decoder(cell_emb), dim=-1),)  # (B, n_cls)
        return outputs


class ModalityCellEncoder(CellEncoder):
    """The graph of a multi-omics model that adds the modality embedding to its input: it
    also takes the modality of every token."""

    def forward(
        self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor, modality_ids: Tensor
    ) -> tuple[Tensor, ...]:
        return self.outputs(gene_ids, values, padding_mask, modality_ids)


SERVED_PARTS = (
    "encoder.",
    "value_encoder.",
    "bn.",
    "transformer_encoder.",
    "cls_decoder.",
)


def served_parameters(model: ScGPT) -> int:
    """Parameters of what a graph computes (CellEncoder): the input encoders, the transformer
    and the cell-type head (and the modality embedding where the input adds it); the
    training-only decoders are left out."""
    parts = SERVED_PARTS + ("mod_encoder.",) * model.cfg.mod_input
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(parts))


def input_names(model: ScGPT) -> list[str]:
    """Names of the graph inputs, in order."""
    return [*INPUT_NAMES, MODALITY] if model.cfg.mod_input else list(INPUT_NAMES)


def output_names(model: ScGPT) -> list[str]:
    """Names of the graph outputs, in order."""
    head = [CLASS_PROBS] if model.cls_decoder is not None else []
    return [CELL_EMB, CELL_EMB_NORMALIZED, *head]


def export_onnx(
    model: ScGPT,
    path: str | Path,
    max_seq_len: int,
    *,
    opset: int = 18,
    fuse_attention: bool = True,
) -> Path:
    """Write the fp32 graph of `model` (in eval mode) for up to `max_seq_len` tokens per cell.

    torch.onnx.export(dynamo=True) traces CellEncoder with dynamic batch and length axes; with
    fuse_attention, onnxscript rewrites attention into com.microsoft MultiHeadAttention (and
    residual + LayerNorm into SkipLayerNormalization). Returns `path`.
    """
    if opset not in OPSETS:
        raise ValueError(f"opset must be one of {OPSETS}, not {opset}")
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    example = (
        torch.randint(0, cfg.vocab_size, (2, max_seq_len), generator=g),  # batch 2: not 0 or 1,
        torch.randint(0, cfg.n_bins, (2, max_seq_len), generator=g).float(),  # which torch
        torch.zeros(2, max_seq_len, dtype=torch.bool),  # would specialise
    )
    if cfg.mod_input:
        example += (torch.randint(0, cfg.n_mod, (2, max_seq_len), generator=g),)
    names = input_names(model)
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length", min=2, max=max_seq_len)}
    with warnings.catch_warnings():
        # Notes of torch itself, not about this model: a deprecation inside torch.export, and
        # that the three inputs share their axes (as intended).
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        warnings.filterwarnings("ignore", message=r".*The axis name: \w+ will not be used")
        encoder = ModalityCellEncoder if cfg.mod_input else CellEncoder
        program = torch.onnx.export(
            encoder(model).eval(),
            example,
            input_names=names,
            output_names=output_names(model),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dict.fromkeys(names, axes),
            external_data=False,
            verbose=False,
        )
    onnx_model = program.model
    if fuse_attention:
        onnx_model, _ = optimize_for_ort(onnx_model)
    # Stack traces and source paths of the tracing machine stay out of the bundle.
    ir.passes.common.ClearMetadataAndDocStringPass()(onnx_model)
    path = Path(path)
    ir.save(onnx_model, path)
    return path
