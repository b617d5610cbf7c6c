"""What a bundle is: its files, its parts as loaded, and the encodings of its safetensors files.

Specified in docs/bundle-format.md; read.py reads it (versions 1 to 3), write.py writes it
(version 3 for a multi-omics model, which older runtimes must refuse; else version 2). No
other code of the project knows the layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError
from ..modalities import Modality
from ..tokens import InputSpec, TokenConfig
from ..vocab import Vocab

FORMAT = "scgpt-bundle"
FORMAT_VERSION = 2  # what write_bundle writes for a model of one modality (genes)
MODALITIES_VERSION = 3  # and for a model of several (section 12 of the spec)
READ_VERSIONS = (1, 2, 3)  # what load_bundle reads
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.safetensors"
GENES_FILE = "genes.safetensors"  # the gene embeddings; optional, older bundles lack it
GENE_EMBEDDINGS = "gene_embeddings"  # its tensor: (n_tokens, d_model) float32, row i = id i
GENE_EMBEDDING_DESCRIPTION = "gene encoder output (LayerNorm of the embedding row)"
EVALUATION_FILE = "evaluation.json"  # metrics recorded after export (not checksummed)
PRECISIONS = ("fp32", "fp16", "int8")
EMBED = "embed"  # the graph kind of cell embeddings and the cell-type head
CELL_EMB, CELL_EMB_NORMALIZED, CLASS_PROBS = "cell_emb", "cell_emb_normalized", "class_probs"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Variant:
    """One ONNX graph of a bundle: a graph kind at a precision and a fixed sequence length."""

    precision: str  # "fp32" (reference), "fp16" (GPU) or "int8" (dynamic quantization, CPU)
    max_seq_len: int  # tokens per cell the graph is run at, <cls> included
    path: Path  # the ONNX file (for write_bundle: the file to move into the bundle); the
    # variants of one precision share it when its length axis is symbolic (format 2)
    errors: dict[str, float] = field(default_factory=dict)  # measured against PyTorch
    tolerance: dict[str, float] = field(default_factory=dict)  # the limits they were held to
    kind: str = EMBED


@dataclass(frozen=True)
class Graphs:
    """Every graph of one kind: the outputs they share and the variants."""

    outputs: dict[str, int]  # output name -> width (each output is (batch, width) float32)
    variants: list[Variant]


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: what a server needs besides onnxruntime."""

    path: Path
    config: dict[str, Any]
    tokens: TokenConfig
    vocab: Vocab
    labels: list[str] | None  # class names in class_probs order; None without a classifier
    gene_panel: list[str] | None  # genes the model was trained on, if restricted to a panel
    inputs: tuple[InputSpec, ...]  # the graph inputs, in order, as declared
    graphs: dict[str, Graphs]  # graph kind -> its graphs
    parameters: int | None  # parameters of the served model, counted at export (v2)
    gene_embeddings_file: Path | None  # None: exported before bundles carried them
    modalities: list[Modality] | None = None  # a multi-omics model's, in token order (v3)

    @property
    def sha256(self) -> str:
        """sha256 of config.json, which holds the sha256 of every other file and is never
        rewritten after export: the bundle's identity, stamped on every result."""
        return sha256_bytes((self.path / CONFIG_FILE).read_bytes())

    @property
    def temperature(self) -> float:
        """The head's temperature (1: uncalibrated): class_probs are served temperature-scaled."""
        return float(self.config.get("calibration", {}).get("temperature", 1.0))

    @property
    def variants(self) -> list[Variant]:
        """The cell-embedding graphs."""
        return self.graphs[EMBED].variants

    @property
    def precisions(self) -> list[str]:
        """The precisions present, in PRECISIONS order."""
        return [p for p in PRECISIONS if any(v.precision == p for v in self.variants)]

    @property
    def evaluation(self) -> list[dict[str, Any]]:
        """Held-out metrics measured on this bundle (`scgpt-train evaluate --record`)."""
        return read_evaluation(self.path, self.config)

    def variant(self, precision: str, max_seq_len: int | None = None) -> Variant:
        """The graph of `precision` with the smallest max_seq_len >= `max_seq_len` (tokens of
        the longest cell to serve, <cls> included); None: the longest graph."""
        have = sorted(
            (v for v in self.variants if v.precision == precision), key=lambda v: v.max_seq_len
        )
        if not have:
            raise BundleError(
                f"{self.path}: has no {precision} graph (available: {', '.join(self.precisions)}); "
                f"export it with scgpt-train export --precision {precision}"
            )
        need = have[-1].max_seq_len if max_seq_len is None else max_seq_len
        fitting = [v for v in have if v.max_seq_len >= need]
        if not fitting:
            longest = have[-1].max_seq_len
            raise ValueError(f"no {precision} graph takes {need} tokens (longest: {longest})")
        return fitting[0]


def graph_file(kind: str, precision: str) -> str:
    """The name this writer gives the graph of a kind and precision (readers take names from
    config.json)."""
    return f"{kind}-{precision}.onnx"


def read_evaluation(path: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Evaluation records: version 1 kept them in config.json, version 2 in evaluation.json."""
    entries = list(config.get("evaluation", []))
    file = path / EVALUATION_FILE
    if file.is_file():
        try:
            recorded = json.loads(file.read_text())
        except (OSError, ValueError):
            recorded = []  # a record for people, never trusted for serving
        entries += (
            [e for e in recorded if isinstance(e, dict)] if isinstance(recorded, list) else []
        )
    return entries


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# Strings in safetensors: (UTF-8 bytes concatenated, uint8) and (offsets, int64, len + 1)


def encode_strings(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [str(n).encode("utf-8") for n in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode_strings(tensors: Mapping[str, np.ndarray], name: str) -> list[str]:
    """Strings stored by `encode_strings` under `name`.bytes and `name`.offsets."""
    data, offsets = tensors[f"{name}.bytes"], tensors[f"{name}.offsets"]
    if data.dtype != np.uint8 or offsets.dtype != np.int64 or data.ndim != 1 or offsets.ndim != 1:
        raise ValueError(f"{name}.bytes must be 1-D uint8 and {name}.offsets 1-D int64")
    ends = offsets.tolist()
    if not ends or ends[0] != 0 or ends[-1] != len(data) or (np.diff(offsets) < 0).any():
        raise ValueError(f"{name}.offsets must rise from 0 to the length of {name}.bytes")
    raw = data.tobytes()
    return [raw[a:b].decode("utf-8") for a, b in pairwise(ends)]
