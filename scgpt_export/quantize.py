"""Precision variants of an fp32 graph: fp16 for GPUs, dynamic int8 for CPUs.

Both keep float32 inputs and outputs, so a server feeds every variant the same arrays.
fp16 uses onnxruntime's own converter (`onnxruntime.transformers.float16`), which knows the
com.microsoft ops of fused graphs (MultiHeadAttention, SkipLayerNormalization); int8 uses
`onnxruntime.quantization.quantize_dynamic`: int8 weights, activations quantized per call.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and arithmetic, float32 at the inputs and outputs; returns `dst`."""
    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, dst)
    return Path(dst)


def to_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization (MatMul weights and the gene embedding); returns `dst`."""
    model = onnx.load(src)
    # The quantizer turns Gemm into MatMul with a transposed weight but keeps the exporter's
    # shape record of that weight, and its own shape inference then fails on the mismatch.
    initializers = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    quantize_dynamic(model, dst, weight_type=QuantType.QInt8)
    return Path(dst)
