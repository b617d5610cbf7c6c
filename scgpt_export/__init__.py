"""Export of trained scGPT runs to model bundles that the torch-free runtime serves."""

from scgpt_train.model import MASK_BIAS

from .quantize import to_fp16, to_int8
from .run import export_run
from .to_onnx import CellEncoder, export_onnx
from .validate import TOLERANCE, ToleranceError, validate

__all__ = [
    "MASK_BIAS",
    "TOLERANCE",
    "CellEncoder",
    "ToleranceError",
    "export_onnx",
    "export_run",
    "to_fp16",
    "to_int8",
    "validate",
]
