"""Reading a bundle: format versions 1 to 3, every checksum, then its parts.

A version 1 config is first rewritten in memory into the version 2 shape (its graphs become
the "embed" kind, its inputs get their pad and <cls> values from the preprocessing), so one
reader checks and builds both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from ..errors import BundleError
from ..modalities import Modality
from ..tokens import InputSpec, TokenConfig, input_specs
from ..vocab import CLS, PAD, Vocab
from .format import (
    CONFIG_FILE,
    EMBED,
    FORMAT,
    GENE_EMBEDDINGS,
    MODALITIES_VERSION,
    PRECISIONS,
    READ_VERSIONS,
    Bundle,
    Graphs,
    Variant,
    decode_strings,
    sha256_file,
)


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check a bundle: format, version, files present, sha256 of every file (unless
    verify=False), vocabulary, inputs, graphs and the gene embeddings record (the embeddings
    are read by `load_gene_embeddings`). Raises BundleError naming the problem and the file."""
    path = Path(path)
    if not path.is_dir():
        what = "no such directory" if not path.exists() else "not a directory"
        raise BundleError(f"{path}: {what}; a model bundle is a directory (scgpt-train export)")
    config = read_config(path)
    try:
        if config["format_version"] == 1:
            config = upgrade_v1(config)
        _check_files(path, config["files"], verify)
        return _bundle(path, config)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise BundleError(f"{path / CONFIG_FILE}: invalid bundle config ({detail})") from e


def read_config(path: Path) -> dict[str, Any]:
    """config.json of the bundle at `path`, its format and version checked."""
    config = _read_json(path / CONFIG_FILE)
    if config.get("format") != FORMAT:
        raise BundleError(
            f'{path}: not an scGPT model bundle ({CONFIG_FILE} lacks "format": "{FORMAT}"); '
            "make one with scgpt-train export"
        )
    version = config.get("format_version")
    if version not in READ_VERSIONS:
        raise BundleError(
            f"{path}: bundle format version {version} is not supported "
            f"(this runtime reads {', '.join(map(str, READ_VERSIONS))})"
        )
    return config


def is_bundle(path: Path) -> bool:
    try:
        return _read_json(path / CONFIG_FILE).get("format") == FORMAT
    except BundleError:
        return False


def upgrade_v1(config: dict[str, Any]) -> dict[str, Any]:
    """A version 1 config in the version 2 shape (nothing on disk changes)."""
    pre = config["preprocessing"]
    tokens = TokenConfig.from_dict(pre["tokens"])
    specs = {s.name: s for s in input_specs(tokens, pre["cls_id"], pre["pad_id"])}
    inputs = [{**i, **specs[i["name"]].to_dict()} for i in config["inputs"]]
    graphs = {EMBED: {"outputs": config["outputs"], "variants": config["variants"]}}
    rest = {k: v for k, v in config.items() if k not in ("inputs", "outputs", "variants")}
    return {**rest, "inputs": inputs, "graphs": graphs, "parameters": None}


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


def _check_files(path: Path, files: Mapping[str, Any], verify: bool) -> None:
    for name, entry in files.items():
        if Path(name).name != name or name in (".", "..", CONFIG_FILE):
            raise ValueError(f"file name {name!r} is not a plain file of the bundle")
        file = path / name
        if not file.is_file():
            raise BundleError(
                f"{file}: is missing (listed in {CONFIG_FILE}); export the bundle again"
            )
        if file.stat().st_size != entry["bytes"] or (
            verify and sha256_file(file) != entry["sha256"]
        ):
            raise BundleError(
                f"{file}: checksum mismatch (sha256 in {CONFIG_FILE} differs): the file is damaged "
                "or was changed; export the bundle again"
            )


def _bundle(path: Path, config: dict[str, Any]) -> Bundle:
    files, pre, model = config["files"], config["preprocessing"], config["model"]
    vocab_file = config["vocab"]["file"]
    if vocab_file not in files:
        raise BundleError(f"{path / vocab_file}: not listed in {CONFIG_FILE} files (no checksum)")
    vocab, labels, gene_panel = _load_strings(path / vocab_file)
    tokens = TokenConfig.from_dict(pre["tokens"])
    if (pre["pad_id"], pre["cls_id"]) != (vocab[PAD], vocab[CLS]):
        raise ValueError("pad_id / cls_id disagree with the vocabulary")
    if len(vocab) != model["vocab_size"]:
        raise ValueError(f"{len(vocab)} vocabulary tokens but model vocab_size differs")
    if len(labels or []) != model.get("n_cls", 0):
        raise ValueError(f"{len(labels or [])} labels but model n_cls differs")
    if bool(pre["gene_panel"]) != (gene_panel is not None):
        raise ValueError(f"gene_panel is {pre['gene_panel']} but the vocabulary file disagrees")
    modalities = _modalities(config, vocab, tokens)
    made = input_specs(tokens, vocab.cls_id, vocab.pad_id, modality=modalities is not None)
    inputs = _inputs(config["inputs"], made)
    graphs = {kind: _graphs(path, kind, g, files) for kind, g in config["graphs"].items()}
    if EMBED not in graphs:
        raise ValueError(f"a bundle needs {EMBED!r} graphs")
    check_variants(config["graphs"][EMBED]["variants"], tokens.max_seq_len)
    parameters = config.get("parameters")
    if "calibration" in config:
        t = config["calibration"]["temperature"]
        if not labels or not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise ValueError("calibration needs a cell-type head and a positive temperature")
    genes = _genes_file(path, config)
    return Bundle(
        path,
        config,
        tokens,
        vocab,
        labels,
        gene_panel,
        inputs,
        graphs,
        parameters,
        genes,
        modalities,
    )


def _modalities(config: dict[str, Any], vocab: Vocab, tokens: TokenConfig) -> list[Modality] | None:
    """A multi-omics bundle's modalities (version 3), checked against the vocabulary and the
    sequence length; None for a bundle of genes only."""
    if config["format_version"] < MODALITIES_VERSION:
        return None
    modalities = [Modality.from_dict(m) for m in config["modalities"]]
    if not modalities or len({m.name for m in modalities}) < len(modalities):
        raise ValueError("modalities must be a non-empty list of distinct names")
    if missing := [m.namespace for m in modalities if m.namespace not in vocab.namespace_names]:
        raise ValueError(f"modality namespaces {missing} have no tokens in the vocabulary")
    if 1 + sum(m.max_tokens for m in modalities) != tokens.max_seq_len:
        raise ValueError("<cls> and the modalities' max_tokens must add up to max_seq_len")
    return modalities


def _genes_file(path: Path, config: dict[str, Any]) -> Path | None:
    """The gene embeddings file its record names, checked but not read (a whole-human one is
    124 MB); None where the bundle has none."""
    record = config.get("genes")
    if record is None:
        return None
    if record["file"] not in config["files"]:
        raise BundleError(
            f"{path / record['file']}: not listed in {CONFIG_FILE} files (no checksum)"
        )
    model = config["model"]
    if record["shape"] != [model["vocab_size"], model["d_model"]] or record["dtype"] != "float32":
        raise ValueError("genes must be float32 of shape [vocab_size, d_model]")
    return path / record["file"]


def load_gene_embeddings(bundle: Bundle) -> np.ndarray:
    """The (n_tokens, d_model) float32 gene embeddings, row i for vocabulary id i. Raises
    BundleError where the bundle has none or their file is damaged."""
    file = bundle.gene_embeddings_file
    if file is None:
        raise BundleError(
            f"{bundle.path}: has no gene embeddings (exported before they were added); "
            "export it again with scgpt-train export"
        )
    try:
        x = load_file(file).get(GENE_EMBEDDINGS)
    except (OSError, SafetensorError) as e:
        raise BundleError(f"{file}: not a readable safetensors file ({e})") from e
    shape = (len(bundle.vocab), bundle.config["model"]["d_model"])
    if x is None or x.dtype != np.float32 or x.shape != shape:
        found = "nothing" if x is None else f"{x.dtype} {x.shape}"
        raise BundleError(
            f"{file}: {GENE_EMBEDDINGS} must be float32 {shape}, not {found}; "
            "export the bundle again"
        )
    return x


def _inputs(records: list[dict[str, Any]], made: tuple[InputSpec, ...]) -> tuple[InputSpec, ...]:
    """The declared graph inputs, each one the tokenizer makes, with its dtype and values."""
    known = {s.name: s for s in made}
    specs = []
    for r in records:
        spec = InputSpec(r["name"], r["dtype"], r["pad"], r["cls"])
        if spec.name not in known:
            raise BundleError(
                f"the graphs take an input {spec.name!r} that this runtime does not make "
                f"(it makes {', '.join(known)}); update scgpt-deploy"
            )
        if spec != known[spec.name]:
            raise ValueError(f"input {spec.name}: {spec} disagrees with the preprocessing")
        specs.append(spec)
    return tuple(specs)


def _graphs(path: Path, kind: str, record: dict[str, Any], files: Mapping[str, Any]) -> Graphs:
    outputs = {o["name"]: int(o["shape"][1]) for o in record["outputs"]}
    variants = []
    for r in record["variants"]:
        file = path / r["file"]
        if r["file"] not in files:
            raise BundleError(f"{file}: not listed in {CONFIG_FILE} files (no checksum)")
        variants.append(
            Variant(r["precision"], r["max_seq_len"], file, r["errors"], r["tolerance"], kind)
        )
    return Graphs(outputs, variants)


def _load_strings(path: Path) -> tuple[Vocab, list[str] | None, list[str] | None]:
    """The vocabulary (with namespaces, if any), labels (if any) and gene panel (if any)."""
    try:
        tensors = load_file(path)
        names = decode_strings(tensors, "vocab")
        namespaces = None
        if "namespace_ids" in tensors:
            table = decode_strings(tensors, "namespaces")
            namespaces = [table[i] for i in tensors["namespace_ids"].tolist()]
        vocab = Vocab(names, namespaces)
        labels = decode_strings(tensors, "labels") if "labels.bytes" in tensors else None
        gene_panel = None
        if "gene_panel" in tensors:
            ids = tensors["gene_panel"]
            if ids.dtype != np.int64 or ids.ndim != 1 or ((ids < 0) | (ids >= len(vocab))).any():
                raise ValueError("gene_panel must hold int64 vocabulary ids")
            gene_panel = [vocab.names[i] for i in ids]
    except (OSError, SafetensorError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({e})") from e
    except (IndexError, KeyError, ValueError) as e:
        raise BundleError(f"{path}: invalid bundle vocabulary ({e})") from e
    return vocab, labels, gene_panel


def check_variants(records: list[Mapping[str, Any]], max_seq_len: int) -> None:
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
