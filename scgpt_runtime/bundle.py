"""Model bundles: the only code that knows their layout (specified in docs/bundle-format.md).

BUNDLE/
  config.json                       format, version, model, preprocessing, inputs and outputs,
                                    variants with their validation errors, provenance, sha256 of
                                    every other file
  vocab.safetensors                 token names, label names, gene panel: no pickle
  model-{precision}-{max_seq_len}.onnx   one graph per variant

A bundle is built in a temporary directory beside its target and renamed into place, so a
reader never sees half of one. Reading checks the format version and every checksum first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .errors import BundleError, OutputError
from .io.write import atomic_path
from .tokens import TokenConfig
from .vocab import CLS, PAD, Vocab

FORMAT = "scgpt-bundle"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.safetensors"
PRECISIONS = ("fp32", "fp16", "int8")
INPUTS = {"gene_ids": "int64", "values": "float32", "padding_mask": "bool"}  # each (batch, L)
CELL_EMB, CELL_EMB_NORMALIZED, CLASS_PROBS = "cell_emb", "cell_emb_normalized", "class_probs"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Variant:
    """One ONNX graph of a bundle: a precision at a fixed sequence length."""

    precision: str  # "fp32" (reference), "fp16" (GPU) or "int8" (dynamic quantization, CPU)
    max_seq_len: int  # tokens per cell the graph takes, <cls> included
    path: Path  # the ONNX file (for write_bundle: the file to move into the bundle)
    errors: dict[str, float] = field(default_factory=dict)  # measured against PyTorch
    tolerance: dict[str, float] = field(default_factory=dict)  # the limits they were held to


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: what a server needs besides onnxruntime."""

    path: Path
    config: dict[str, Any]
    tokens: TokenConfig
    vocab: Vocab
    labels: list[str] | None  # class names in class_probs order; None without a classifier
    gene_panel: list[str] | None  # genes the model was trained on, if restricted to a panel
    variants: list[Variant]

    @property
    def config_sha256(self) -> str:
        """sha256 of config.json, which holds the sha256 of every other file: the bundle's id."""
        return hashlib.sha256((self.path / CONFIG_FILE).read_bytes()).hexdigest()

    @property
    def precisions(self) -> list[str]:
        """The precisions present, in PRECISIONS order."""
        return [p for p in PRECISIONS if any(v.precision == p for v in self.variants)]

    def variant(self, precision: str, max_seq_len: int | None = None) -> Variant:
        """The graph of `precision` with the smallest max_seq_len >= `max_seq_len` (tokens of
        the longest cell to serve, <cls> included); None: the longest graph."""
        have = sorted((v for v in self.variants if v.precision == precision),
                      key=lambda v: v.max_seq_len)  # fmt: skip
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


def check_target(out: str | Path, overwrite: bool) -> Path:
    """`out` as a Path if a bundle may be written there (its folder made if needed);
    OutputError otherwise."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # as run directories are made
    except OSError as e:
        raise OutputError(f"{out}: cannot make its folder {out.parent} ({e.strerror})") from e
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite to replace it")
    if not out.is_dir() or out.is_symlink():
        raise OutputError(f"{out}: is not a directory; refusing to replace it with a bundle")
    if any(out.iterdir()) and not _is_bundle(out):
        raise OutputError(f"{out}: is not a model bundle; refusing to replace it")
    return out


def write_bundle(
    out: str | Path,
    *,
    model: Mapping[str, Any],
    tokens: TokenConfig,
    vocab: Vocab,
    variants: Sequence[Variant],
    labels: Sequence[str] | None = None,
    gene_panel: Sequence[str] | None = None,
    validation: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory at `out`; the variants' ONNX files are moved into it.

    Args:
        model: hyper-parameters (ModelConfig.to_dict()); d_model, n_cls and vocab_size used here.
        tokens: how cells become tokens; tokens.max_seq_len must equal the longest graph's.
        vocab: token names in id order. labels: class names, required when model n_cls > 0.
        gene_panel: genes the model was restricted to, all in the vocabulary (None: all).
        validation: how the variants were validated (cells, provider), stored as is.
        provenance: training data, commands, code versions, stored as is.
    Returns the bundle path. Raises OutputError where `out` exists (see check_target).
    """
    out = check_target(out, overwrite)
    config = _config(model, tokens, vocab, variants, labels, gene_panel, validation, provenance)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        umask = _umask()
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only
        _save_strings(tmp / VOCAB_FILE, vocab, labels, gene_panel)
        for v in variants:
            shutil.move(v.path, tmp / _graph_file(v))
        config["files"] = {
            p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())
        }
        (tmp / CONFIG_FILE).write_text(_config_text(config))
        for p in tmp.iterdir():
            p.chmod(0o666 & ~umask)  # safetensors and mkstemp make owner-only files
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def record_evaluation(path: str | Path, entry: Mapping[str, Any]) -> None:
    """Add `entry` (held-out metrics measured on this bundle) to its config's "evaluation"
    list, replacing an entry on the same data, filters, labels and precision. config.json is
    rewritten atomically; the graphs and their checksums are untouched."""
    bundle = load_bundle(path)
    key = ("data", "where", "label_key", "precision")
    kept = [e for e in bundle.config.get("evaluation", [])
            if any(e.get(k) != entry.get(k) for k in key)]  # fmt: skip
    config = {**bundle.config, "evaluation": [*kept, dict(entry)]}
    with atomic_path(bundle.path / CONFIG_FILE) as tmp:
        tmp.write_text(_config_text(config))


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check a bundle: format, version, files present, sha256 of every file (unless
    verify=False), vocabulary and config. Raises BundleError naming the problem and the file."""
    path = Path(path)
    if not path.is_dir():
        what = "no such directory" if not path.exists() else "not a directory"
        raise BundleError(f"{path}: {what}; a model bundle is a directory (scgpt-train export)")
    config = _read_json(path / CONFIG_FILE)
    if config.get("format") != FORMAT:
        raise BundleError(
            f'{path}: not an scGPT model bundle ({CONFIG_FILE} lacks "format": "{FORMAT}"); '
            "make one with scgpt-train export"
        )
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} is not supported "
            f"(this runtime reads {FORMAT_VERSION})"
        )
    try:
        _check_files(path, config["files"], verify)
        return _bundle(path, config)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise BundleError(f"{path / CONFIG_FILE}: invalid bundle config ({detail})") from e


# Writing


def _config(model, tokens, vocab, variants, labels, gene_panel, validation, provenance) -> dict:
    n_cls = int(model.get("n_cls", 0))
    if len(vocab) != model["vocab_size"]:
        raise ValueError(f"vocab has {len(vocab)} tokens, the model {model['vocab_size']}")
    if (labels is not None or n_cls) and (labels is None or len(labels) != n_cls):
        raise ValueError(f"the model has {n_cls} classes but labels are {labels!r}")
    if gene_panel is not None and (missing := [g for g in gene_panel if g not in vocab]):
        raise ValueError(f"gene panel genes not in the vocabulary: {missing[:5]}")
    records = [_variant_record(v) for v in variants]
    _check_variants(records, tokens.max_seq_len)
    outputs = {CELL_EMB: model["d_model"], CELL_EMB_NORMALIZED: model["d_model"]}
    if n_cls:
        outputs[CLASS_PROBS] = n_cls
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dict(model),
        "preprocessing": {
            "tokens": tokens.to_dict(),
            "pad_id": vocab.pad_id,
            "cls_id": vocab.cls_id,
            "gene_panel": gene_panel is not None,
        },
        "vocab": {"file": VOCAB_FILE, "n_tokens": len(vocab), "n_labels": len(labels or [])},
        "inputs": [_io(n, t, "max_seq_len") for n, t in INPUTS.items()],
        "outputs": [_io(n, "float32", size) for n, size in outputs.items()],
        "variants": records,
        "validation": dict(validation or {}),
        "provenance": dict(provenance or {}),
    }


def _config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, allow_nan=False) + "\n"


def _variant_record(v: Variant) -> dict[str, Any]:
    return {
        "precision": v.precision,
        "max_seq_len": int(v.max_seq_len),
        "file": _graph_file(v),
        "errors": {k: float(x) for k, x in v.errors.items()},
        "tolerance": {k: float(x) for k, x in v.tolerance.items()},
    }


def _io(name: str, dtype: str, width: int | str) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": ["batch", width]}


def _graph_file(v: Variant) -> str:
    return f"model-{v.precision}-{int(v.max_seq_len)}.onnx"


def _save_strings(
    path: Path, vocab: Vocab, labels: Sequence[str] | None, gene_panel: Sequence[str] | None
) -> None:
    tensors = dict(zip(("vocab.bytes", "vocab.offsets"), _encode(vocab.names), strict=True))
    if labels is not None:
        tensors.update(zip(("labels.bytes", "labels.offsets"), _encode(labels), strict=True))
    if gene_panel is not None:
        tensors["gene_panel"] = np.array([vocab[g] for g in gene_panel], dtype=np.int64)
    save_file(tensors, path)


def _encode(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as (UTF-8 bytes concatenated, uint8) and (offsets, int64, len + 1)."""
    encoded = [str(n).encode("utf-8") for n in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Reading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"{path.parent}: not a model bundle ({path.name} is missing)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise BundleError(f"{path}: must hold a JSON object")
    return config


def _is_bundle(path: Path) -> bool:
    try:
        return _read_json(path / CONFIG_FILE).get("format") == FORMAT
    except BundleError:
        return False


def _check_files(path: Path, files: Mapping[str, Any], verify: bool) -> None:
    for name, entry in files.items():
        if Path(name).name != name or name in (".", "..", CONFIG_FILE):
            raise ValueError(f"file name {name!r} is not a plain file of the bundle")
        file = path / name
        if not file.is_file():
            raise BundleError(
                f"{file}: is missing (listed in {CONFIG_FILE}); export the bundle again"
            )
        if file.stat().st_size != entry["bytes"] or (verify and _sha256(file) != entry["sha256"]):
            raise BundleError(
                f"{file}: checksum mismatch (sha256 in {CONFIG_FILE} differs): the file is damaged "
                "or was changed; export the bundle again"
            )


def _bundle(path: Path, config: dict[str, Any]) -> Bundle:
    files, pre, model = config["files"], config["preprocessing"], config["model"]
    for name in [config["vocab"]["file"], *(r["file"] for r in config["variants"])]:
        if name not in files:
            raise BundleError(f"{path / name}: not listed in {CONFIG_FILE} files (no checksum)")
    vocab, labels, gene_panel = _load_strings(path / config["vocab"]["file"])
    tokens = TokenConfig.from_dict(pre["tokens"])
    if (pre["pad_id"], pre["cls_id"]) != (vocab[PAD], vocab[CLS]):
        raise ValueError("pad_id / cls_id disagree with the vocabulary")
    if len(vocab) != model["vocab_size"]:
        raise ValueError(f"{len(vocab)} vocabulary tokens but model vocab_size differs")
    if len(labels or []) != model.get("n_cls", 0):
        raise ValueError(f"{len(labels or [])} labels but model n_cls differs")
    if bool(pre["gene_panel"]) != (gene_panel is not None):
        raise ValueError(f"gene_panel is {pre['gene_panel']} but {VOCAB_FILE} disagrees")
    _check_variants(config["variants"], tokens.max_seq_len)
    variants = [
        Variant(r["precision"], r["max_seq_len"], path / r["file"], r["errors"], r["tolerance"])
        for r in config["variants"]
    ]
    return Bundle(path, config, tokens, vocab, labels, gene_panel, variants)


def _load_strings(path: Path) -> tuple[Vocab, list[str] | None, list[str] | None]:
    """The vocabulary, labels (if any) and gene panel (if any) of a vocab.safetensors file."""
    try:
        tensors = load_file(path)
        vocab = Vocab(_decode(tensors, "vocab"))
        labels = _decode(tensors, "labels") if "labels.bytes" in tensors else None
        gene_panel = None
        if "gene_panel" in tensors:
            ids = tensors["gene_panel"]
            if ids.dtype != np.int64 or ids.ndim != 1 or ((ids < 0) | (ids >= len(vocab))).any():
                raise ValueError("gene_panel must hold int64 vocabulary ids")
            gene_panel = [vocab.names[i] for i in ids]
    except (OSError, SafetensorError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({e})") from e
    except (KeyError, ValueError) as e:
        raise BundleError(f"{path}: invalid bundle vocabulary ({e})") from e
    return vocab, labels, gene_panel


def _decode(tensors: Mapping[str, np.ndarray], name: str) -> list[str]:
    """Strings stored by `_encode` under `name`.bytes and `name`.offsets."""
    data, offsets = tensors[f"{name}.bytes"], tensors[f"{name}.offsets"]
    if data.dtype != np.uint8 or offsets.dtype != np.int64 or data.ndim != 1 or offsets.ndim != 1:
        raise ValueError(f"{name}.bytes must be 1-D uint8 and {name}.offsets 1-D int64")
    ends = offsets.tolist()
    if not ends or ends[0] != 0 or ends[-1] != len(data) or (np.diff(offsets) < 0).any():
        raise ValueError(f"{name}.offsets must rise from 0 to the length of {name}.bytes")
    raw = data.tobytes()
    return [raw[a:b].decode("utf-8") for a, b in pairwise(ends)]


def _check_variants(records: Sequence[Mapping[str, Any]], max_seq_len: int) -> None:
    """Known precisions, no duplicate, each precision with a graph of the full length."""
    if not records:
        raise ValueError("a bundle needs at least one graph")
    seen = set()
    for r in records:
        precision, length = r["precision"], r["max_seq_len"]
        key = (precision, length)
        if precision not in PRECISIONS or key in seen or not 2 <= length <= max_seq_len:
            raise ValueError(f"variant {key}: unknown precision, duplicate or bad max_seq_len")
        seen.add(key)
    for precision in {p for p, _ in seen}:
        if (precision, max_seq_len) not in seen:
            raise ValueError(f"no {precision} graph of the full length {max_seq_len}")
