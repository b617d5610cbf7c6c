"""Official scGPT checkpoints: the only module that knows their names and layout.

A released model is a folder with `best_model.pt` (a plain state dict), `args.json` (flat
training arguments) and `vocab.json` ({gene: id}). Our parameter names equal the official ones
(see model.py), so KEY_MAP only strips wrappers and renames attention variants. Loading keeps
every tensor whose name and shape match the model, as the official loader does, and reports
the rest instead of dropping it silently.

Embedding pipeline of the official zero-shot API (to record beside an imported model): raw
counts, <cls> first with value = pad_value (-2), at most max_seq_len tokens including <cls>,
cell embedding = output at position 0, L2-normalised.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scgpt_runtime.errors import InputError
from scgpt_runtime.tokens import TokenConfig
from scgpt_runtime.vocab import Vocab

from .checkpoint import RunInfo, new_run_dir, save_run, sha256_file
from .model import ModelConfig, ScGPT

CHECKPOINT_FILE, ARGS_FILE, VOCAB_FILE = "best_model.pt", "args.json", "vocab.json"

# args.json field -> ModelConfig field (n_bins and max_seq_len go to the TokenConfig too)
ARGS_FIELDS: dict[str, str] = {
    "embsize": "d_model",
    "nheads": "n_head",
    "d_hid": "d_hid",
    "nlayers": "n_layer",
    "n_layers_cls": "n_layers_cls",
    "dropout": "dropout",
    "n_bins": "n_bins",
    "max_seq_len": "max_seq_len",
    "input_emb_style": "input_emb",
    "explicit_zero_prob": "explicit_zero",
}  # pad_token, pad_value, input_style: read by config_from_args and tokens_from_args
REQUIRED_ARGS = ("embsize", "nheads", "d_hid", "nlayers")

# (pattern, replacement) applied in order to every official name; None drops the tensor.
KEY_MAP: list[tuple[str, str | None]] = [
    (r"^(module\.)+", ""),  # DistributedDataParallel / DataParallel wrapper
    (r"\.self_attn\._impl\.", ".self_attn."),  # newer official attention wrapper
    (r"\.self_attn\.in_proj_weight$", ".self_attn.Wqkv.weight"),  # torch nn.MultiheadAttention
    (r"\.self_attn\.in_proj_bias$", ".self_attn.Wqkv.bias"),
    (r"^cls_decoder\.(cls_token_matrix|embed_norm\.|token_norm\.)", None),  # SimDecoder head
    (r"^mvc_decoder\.(fc1|fc2|hidden_activation)\.", None),  # "concat/sum query" MVC styles
]
_DROP_REASON = "official part this model does not implement"


@dataclass
class ImportReport:
    """What `load_official_state` did with each tensor."""

    loaded: list[str] = field(default_factory=list)  # our names that got a checkpoint tensor
    renamed: dict[str, str] = field(default_factory=dict)  # official -> our name, if different
    dropped: dict[str, str] = field(default_factory=dict)  # official name -> why not loaded
    missing: list[str] = field(default_factory=list)  # our names left at their initial values

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors ({len(self.renamed)} renamed), "
            f"dropped {len(self.dropped)}, missing {len(self.missing)}"
        ]
        lines += [f"dropped {k}: {why}" for k, why in self.dropped.items()]
        lines += [f"missing {k}: left at its initial value" for k in self.missing]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def map_key(name: str) -> str | None:
    """Our name for an official state-dict key, or None when KEY_MAP drops it."""
    for pattern, repl in KEY_MAP:
        if re.search(pattern, name):
            if repl is None:
                return None
            name = re.sub(pattern, repl, name)
    return name


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict in `path`, read with torch.load(weights_only=True): never runs code."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise InputError(
                f"{path}: refused: loading it would run code (it pickles {found.group(1)}); only "
                "a plain state dict of tensors is read (re-save: torch.save(model.state_dict(), f))"
            ) from e
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        why = detail.group(1).strip() if detail else type(e).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({why})") from e
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise InputError(f"{path}: not a plain state dict ({{name: tensor}})")
    return state


def read_args(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        args = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable args.json ({e})") from e
    if not isinstance(args, dict):
        raise InputError(f"{path}: args.json must hold a JSON object")
    return args


def tokens_from_args(args: dict[str, Any]) -> TokenConfig:
    """How the official zero-shot pipeline tokenizes cells for this model: raw counts binned
    per cell, <cls> first with value = pad_value, at most max_seq_len tokens. Where a cell has
    more genes the official code samples them at random; we keep the top ones (deterministic)."""
    if args.get("input_style", "binned") != "binned":
        raise InputError(f"input_style {args['input_style']!r} is not supported (only binned)")
    pad_value = float(args.get("pad_value", -2))
    return TokenConfig(
        max_seq_len=int(args.get("max_seq_len", 1200)),
        n_bins=int(args.get("n_bins", 51)),
        cls_value=pad_value,
        pad_value=pad_value,
    )


def config_from_args(
    args: dict[str, Any], vocab: Vocab, state: dict[str, Tensor] | None = None, **overrides: Any
) -> ModelConfig:
    """ModelConfig of an official model: architecture from args.json, size and <pad> from the
    vocabulary and, when `state` is given, the optional heads its tensors reveal (cell-type
    classes, batch tokens, DSBN, DAB, explicit-zero heads, the old input BatchNorm).
    `overrides` win over both (e.g. n_cls=12 for a new cell-type head, dropout=0.0)."""
    missing = [k for k in REQUIRED_ARGS if k not in args]
    if missing:
        raise InputError(f"args.json lacks the architecture fields {missing}")
    known = {f.name for f in fields(ModelConfig)}
    kw = {ARGS_FIELDS[k]: v for k, v in args.items() if ARGS_FIELDS.get(k) in known}
    if kw.get("input_emb", "continuous") not in ("continuous", "category"):
        raise InputError(f"args.json: input_emb_style {kw['input_emb']!r} is not supported")
    pad_token = args.get("pad_token", "<pad>")
    if pad_token not in vocab:
        raise InputError(f"vocab.json lacks the pad token {pad_token!r} named in args.json")
    kw.update(vocab_size=len(vocab), pad_id=vocab[pad_token])
    if state is not None:
        kw.update(_heads_in(state, len(vocab)))
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise InputError(f"args.json: {e}") from e


def _heads_in(state: dict[str, Tensor], vocab_size: int) -> dict[str, Any]:
    """Config fields implied by the tensors of a (fine-tuned) official state dict."""
    ours = {map_key(k): v for k, v in state.items()}
    ours.pop(None, None)
    emb = ours.get("encoder.embedding.weight")
    if emb is None:
        raise InputError("checkpoint lacks encoder.embedding.weight: not an scGPT state dict")
    if emb.shape[0] != vocab_size:
        raise InputError(
            f"checkpoint has {emb.shape[0]} gene embedding rows but vocab.json has "
            f"{vocab_size} entries: the vocabulary does not belong to this checkpoint"
        )
    kw: dict[str, Any] = {"pre_norm_bn": "bn.weight" in ours}
    kw["explicit_zero"] = "decoder.zero_logit.0.weight" in ours
    if "cls_decoder.out_layer.weight" in ours:
        kw["n_cls"] = ours["cls_decoder.out_layer.weight"].shape[0]
        kw["n_layers_cls"] = (
            1 + sum(bool(re.fullmatch(r"cls_decoder\._decoder\.\d+\.weight", k)) for k in ours) // 2
        )  # each hidden layer has a Linear and a LayerNorm weight
    rows = {  # the embedding (or output) whose first axis sizes each optional part
        "n_batch_tokens": "batch_encoder.embedding.weight",
        "n_dab": "grad_reverse_discriminator.out_layer.weight",
        "n_mod": "mod_encoder.embedding.weight",
        "n_pert": "pert_encoder.weight",
    }
    kw |= {field: ours[key].shape[0] for field, key in rows.items() if key in ours}
    dsbn = {m.group(1) for k in ours if (m := re.match(r"dsbn\.bns\.(\d+)\.", k))}
    if dsbn:
        kw["n_dsbn"] = len(dsbn)
    return kw


def load_official_state(state: dict[str, Tensor], model: ScGPT) -> ImportReport:
    """Copy the tensors of an official state dict into `model`, keeping each tensor whose
    mapped name and shape match, and report what was loaded, dropped (and why) and missing.

    Raises InputError when the gene embedding does not fit the model: the vocabulary or
    d_model belongs to another checkpoint, and nothing useful could be loaded.
    """
    target = model.state_dict()
    report, keep = ImportReport(), {}
    for name, tensor in state.items():
        ours = map_key(name)
        if ours is None:
            report.dropped[name] = _DROP_REASON
            continue
        if ours not in target:
            report.dropped[name] = "no such parameter in this model (unknown, or head not enabled)"
            continue
        if ours in keep:
            report.dropped[name] = f"duplicate of another key mapped to {ours}"
            continue
        if tuple(tensor.shape) != tuple(target[ours].shape):
            if ours == "encoder.embedding.weight":
                raise InputError(
                    f"checkpoint gene embedding is {tuple(tensor.shape)} but the model expects "
                    f"{tuple(target[ours].shape)} (vocabulary size, d_model): the vocabulary "
                    "or args.json does not belong to this checkpoint"
                )
            report.dropped[name] = (
                f"shape {tuple(tensor.shape)} != model {tuple(target[ours].shape)}"
            )
            continue
        keep[ours] = tensor
        if ours != name:
            report.renamed[name] = ours
    model.load_state_dict(keep, strict=False)
    report.loaded = list(keep)
    report.missing = [k for k in target if k not in keep]
    return report


@dataclass
class OfficialModel:
    model: ScGPT
    vocab: Vocab
    tokens: TokenConfig
    report: ImportReport


def load_official_folder(folder: str | Path, **overrides: Any) -> OfficialModel:
    """Read an official model folder (best_model.pt, args.json, vocab.json) into an ScGPT in
    eval mode; `overrides` go to `config_from_args`."""
    folder = Path(folder)
    for name in (CHECKPOINT_FILE, ARGS_FILE, VOCAB_FILE):
        if not (folder / name).is_file():
            raise InputError(
                f"{folder}: no {name}; an official scGPT model folder holds "
                f"{CHECKPOINT_FILE}, {ARGS_FILE} and {VOCAB_FILE}"
            )
    state = read_checkpoint(folder / CHECKPOINT_FILE)
    args = read_args(folder / ARGS_FILE)
    vocab = Vocab.from_json(folder / VOCAB_FILE)
    model = ScGPT(config_from_args(args, vocab, state, **overrides))
    report = load_official_state(state, model)
    return OfficialModel(model.eval(), vocab, tokens_from_args(args), report)


def import_scgpt(folder: str | Path, out: str | Path, overwrite: bool = False) -> ImportReport:
    """Turn an official model folder into a run directory that fine-tuning and export accept;
    an existing run at `out` is replaced only with `overwrite`."""
    new_run_dir(out, overwrite)
    official = load_official_folder(folder)
    checkpoint = Path(folder) / CHECKPOINT_FILE
    provenance = {
        "imported_from": str(Path(folder).resolve()),
        "checkpoint_sha256": sha256_file(checkpoint),
        "import_report": official.report.to_dict(),
    }
    info = RunInfo(official.model.cfg, official.tokens, official.vocab, provenance=provenance)
    save_run(out, official.model, info)
    return official.report
