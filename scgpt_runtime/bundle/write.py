"""Writing a bundle (format version 2, docs/bundle-format.md), and recording evaluations.

A bundle is built in a temporary directory beside its target and renamed into place, so a
reader never sees half of one. config.json is written once: metrics recorded later go
to evaluation.json, so the bundle's identity (the sha256 of config.json) never changes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from ..errors import OutputError
from ..io.atomic import atomic_dir, atomic_path, exchange, new_file_mode, output_errors, writing
from ..modalities import Modality
from ..tokens import TokenConfig, input_specs
from ..vocab import GENE, Vocab
from .format import (
    CELL_EMB,
    CELL_EMB_NORMALIZED,
    CLASS_PROBS,
    CONFIG_FILE,
    EMBED,
    EVALUATION_FILE,
    FORMAT,
    FORMAT_VERSION,
    GENE_EMBEDDING_DESCRIPTION,
    GENE_EMBEDDINGS,
    GENES_FILE,
    MODALITIES_VERSION,
    VOCAB_FILE,
    Variant,
    encode_strings,
    graph_file,
    read_evaluation,
    sha256_file,
)
from .read import check_variants, is_bundle, load_bundle

EVALUATION_KEY = ("data", "where", "label_key", "precision")  # one record per such measurement


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
    if any(out.iterdir()) and not is_bundle(out):
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
    parameters: int | None = None,
    calibration: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    gene_embeddings: np.ndarray | None = None,
    modalities: Sequence[Modality] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory at `out`; the variants' ONNX files are moved into it (the
    variants of one kind and precision may share a graph whose length axis is symbolic).

    Args:
        model: hyper-parameters (ModelConfig.to_dict()); d_model, n_cls and vocab_size used here.
        tokens: how cells become tokens; tokens.max_seq_len must equal the longest graph's.
        vocab: token names in id order. labels: class names, required when model n_cls > 0.
        gene_panel: genes the model was restricted to, all in the vocabulary (None: all).
        parameters: parameters of what the graphs compute (the model without its training
            decoders). calibration: the head's temperature ("temperature") and its record,
            applied by the runtime to class_probs. validation, provenance: stored as they are.
        gene_embeddings: (len(vocab), d_model), row i the gene encoder output of id i, stored
            as float32 in genes.safetensors (None: a bundle without them).
        modalities: a multi-omics model's, in token order (format version 3); the graphs
            take a MODALITY input where model["mod_input"].
    Returns the bundle path. Raises OutputError where `out` exists (see check_target).
    """
    out = check_target(out, overwrite)
    config = _config(
        model, parameters, tokens, vocab, variants, labels, gene_panel, validation, provenance
    )
    if modalities is not None:
        config = _with_modalities(config, model, modalities, tokens, vocab)
    if calibration is not None:
        if not labels or not calibration.get("temperature", 0) > 0:
            raise ValueError("a calibration needs a cell-type head and a positive temperature")
        config = {**config, "calibration": dict(calibration)}
    if gene_embeddings is not None:
        gene_embeddings = _checked_embeddings(gene_embeddings, len(vocab), model["d_model"])
        config = {**config, "genes": _genes_record(gene_embeddings)}
    with writing():
        _write_files(out, config, vocab, labels, gene_panel, variants, gene_embeddings)
    return out


def _with_modalities(
    config: dict, model: Mapping[str, Any], modalities: Sequence[Modality], tokens, vocab
) -> dict:
    """The config of a multi-omics bundle: version 3, its modalities, the MODALITY input where
    the graphs take it."""
    if 1 + sum(m.max_tokens for m in modalities) != tokens.max_seq_len:
        raise ValueError("<cls> and the modalities' max_tokens must add up to max_seq_len")
    if missing := [m.namespace for m in modalities if m.namespace not in vocab.namespace_names]:
        raise ValueError(f"modality namespaces {missing} have no tokens in the vocabulary")
    specs = input_specs(tokens, vocab.cls_id, vocab.pad_id, modality=True)
    specs = specs if model.get("mod_input") else specs[:-1]
    return {
        **config,
        "format_version": MODALITIES_VERSION,
        "modalities": [m.to_dict() for m in modalities],
        "inputs": [{**s.to_dict(), "shape": ["batch", "max_seq_len"]} for s in specs],
    }


def _checked_embeddings(x: np.ndarray, n_tokens: int, d_model: int) -> np.ndarray:
    """`x` as float32, after checking it has one finite row of d_model per token."""
    x = np.asarray(x)
    if x.shape != (n_tokens, d_model) or x.dtype.kind != "f" or not np.isfinite(x).all():
        raise ValueError(
            f"gene_embeddings must be finite floats of shape ({n_tokens}, {d_model}), "
            f"not {x.dtype} {x.shape}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _genes_record(x: np.ndarray) -> dict[str, Any]:
    return {
        "file": GENES_FILE,
        "embedding": GENE_EMBEDDING_DESCRIPTION,
        "shape": list(x.shape),
        "dtype": "float32",
    }


def _write_files(
    out: Path,
    config: dict[str, Any],
    vocab: Vocab,
    labels: Sequence[str] | None,
    gene_panel: Sequence[str] | None,
    variants: Sequence[Variant],
    gene_embeddings: np.ndarray | None,
) -> None:
    """The bundle's files in a hidden folder beside `out`, put in place when complete (an old
    bundle at `out` is swapped out in one step, then deleted with the folder)."""
    with atomic_dir(out) as tmp, output_errors(out):
        _save_strings(tmp / VOCAB_FILE, vocab, labels, gene_panel)
        if gene_embeddings is not None:
            save_file({GENE_EMBEDDINGS: gene_embeddings}, tmp / GENES_FILE)
        moved: dict[Path, Path] = {}
        for v in variants:
            if moved.setdefault(tmp / graph_file(v.kind, v.precision), v.path) != v.path:
                raise ValueError(f"the {v.kind} {v.precision} variants must share one graph file")
        for target, source in moved.items():
            shutil.move(source, target)
        config["files"] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
        }
        (tmp / CONFIG_FILE).write_text(config_text(config))
        for p in tmp.iterdir():
            p.chmod(new_file_mode())
        exchange(tmp, out)


def record_evaluation(path: str | Path, entry: Mapping[str, Any]) -> None:
    """Add `entry` (metrics measured on this bundle, or on its held-out build where the entry
    has `measured_on`) to its evaluation.json, replacing an entry of the same kind on the same
    data, filters, labels and precision. Only that file is written (atomically):
    config.json, the graphs and the bundle's identity stay as they are."""
    bundle = load_bundle(path)
    kept = [
        e
        for e in read_evaluation(bundle.path, bundle.config)
        if any(e.get(k) != entry.get(k) for k in EVALUATION_KEY)
        or ("measured_on" in e) != ("measured_on" in entry)
    ]
    with atomic_path(bundle.path / EVALUATION_FILE) as tmp:
        tmp.write_text(json.dumps([*kept, dict(entry)], indent=2, allow_nan=False) + "\n")


def config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, allow_nan=False) + "\n"


def _config(
    model, parameters, tokens, vocab, variants, labels, gene_panel, validation, provenance
) -> dict:
    n_cls = int(model.get("n_cls", 0))
    if len(vocab) != model["vocab_size"]:
        raise ValueError(f"vocab has {len(vocab)} tokens, the model {model['vocab_size']}")
    if (labels is not None or n_cls) and (labels is None or len(labels) != n_cls):
        raise ValueError(f"the model has {n_cls} classes but labels are {labels!r}")
    if gene_panel is not None and (missing := [g for g in gene_panel if g not in vocab]):
        raise ValueError(f"gene panel genes not in the vocabulary: {missing[:5]}")
    records = [_variant_record(v) for v in variants]
    check_variants(records, tokens.max_seq_len)
    outputs = {CELL_EMB: model["d_model"], CELL_EMB_NORMALIZED: model["d_model"]}
    if n_cls:
        outputs[CLASS_PROBS] = n_cls
    specs = input_specs(tokens, vocab.cls_id, vocab.pad_id)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dict(model),
        "parameters": parameters,
        "preprocessing": {
            "tokens": tokens.to_dict(),
            "pad_id": vocab.pad_id,
            "cls_id": vocab.cls_id,
            "gene_panel": gene_panel is not None,
        },
        "vocab": {
            "file": VOCAB_FILE,
            "n_tokens": len(vocab),
            "n_labels": len(labels or []),
            "namespaces": vocab.namespace_names,
        },
        "inputs": [{**s.to_dict(), "shape": ["batch", "max_seq_len"]} for s in specs],
        "graphs": {
            EMBED: {
                "outputs": [
                    {"name": n, "dtype": "float32", "shape": ["batch", w]}
                    for n, w in outputs.items()
                ],
                "variants": records,
            }
        },
        "validation": dict(validation or {}),
        "provenance": dict(provenance or {}),
    }


def _variant_record(v: Variant) -> dict[str, Any]:
    return {
        "precision": v.precision,
        "max_seq_len": int(v.max_seq_len),
        "file": graph_file(v.kind, v.precision),
        "errors": {k: float(x) for k, x in v.errors.items()},
        "tolerance": {k: float(x) for k, x in v.tolerance.items()},
    }


def _save_strings(
    path: Path, vocab: Vocab, labels: Sequence[str] | None, gene_panel: Sequence[str] | None
) -> None:
    tensors = dict(zip(("vocab.bytes", "vocab.offsets"), encode_strings(vocab.names), strict=True))
    if vocab.namespace_names != [GENE]:
        table = vocab.namespace_names
        tensors.update(
            zip(("namespaces.bytes", "namespaces.offsets"), encode_strings(table), strict=True)
        )
        tensors["namespace_ids"] = np.array([table.index(n) for n in vocab.namespaces], np.int64)
    if labels is not None:
        tensors.update(zip(("labels.bytes", "labels.offsets"), encode_strings(labels), strict=True))
    if gene_panel is not None:
        tensors["gene_panel"] = np.array([vocab[g] for g in gene_panel], dtype=np.int64)
    save_file(tensors, path)
