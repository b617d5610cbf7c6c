"""scGPT runtime: read single-cell files, match genes, tokenize cells, serve model bundles
(`Model`: annotate and embed cells with an exported bundle).

Torch-free: numpy, h5py, click, safetensors and onnxruntime only.
"""

from __future__ import annotations

from .binning import bin_values
from .csr import CsrBlock
from .engine import Model
from .errors import (
    BundleError,
    DeviceError,
    GeneMatchError,
    InputError,
    OutputError,
    ScgptError,
)
from .genes import GeneMatch, match_genes
from .io import CountMatrix, open_counts
from .preprocess import highly_variable_genes, log1p, normalize_total
from .results import Result
from .tokens import TokenBlock, TokenConfig, tokenize
from .vocab import Vocab

__all__ = [
    "BundleError",
    "CountMatrix",
    "CsrBlock",
    "DeviceError",
    "GeneMatch",
    "GeneMatchError",
    "InputError",
    "Model",
    "OutputError",
    "Result",
    "ScgptError",
    "TokenBlock",
    "TokenConfig",
    "Vocab",
    "bin_values",
    "highly_variable_genes",
    "log1p",
    "match_genes",
    "normalize_total",
    "open_counts",
    "tokenize",
]
