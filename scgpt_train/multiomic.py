"""Multi-omics fine-tuning (`scgpt-train finetune multiomic`): RNA with proteins or peaks.

The official MultiOmicTransformerModel recipe (downstream-reference section 3): the features of
every modality are tokens of their own vocabulary namespace (a protein CD4 is not the gene
CD4), binned per modality per cell; a modality embedding is concatenated to the transformer
output before the expression decoders (with `mod_input`, it is also added to the input
tokens); the objectives are GEP and GEPC on masked values (ratio 0.4) and, with batches, DAR
(a batch discriminator behind gradient reversal, here DAB) and batch tokens in the decoders.
Gene embeddings come from the run started from; protein and peak embeddings start fresh.
Defaults are the official tutorial's: lr 1e-3, batch 16, 25 epochs. No labels are used.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from scgpt_runtime.errors import InputError

from .cells import MISSING, codes_of, minibatches
from .checkpoint import MetricsLog, RunInfo, new_run_dir, save_run, write_json
from .distributed import resolve_device
from .epochs import objective_epochs
from .inference import batch_inputs, batch_modalities, codes_tensor
from .integrate import mask_values
from .model import ScGPT
from .multiomic_data import extend_vocab, load_multiomic_cells, plan_modalities
from .objectives import cross_entropy, masked_mse
from .start import LoadReport, Start, build_model, check_start, run_provenance, start_from


@dataclass
class MultiomicConfig:
    data: list[str]
    modalities: tuple[str, ...]  # the file's own modality names: "rna", "adt"
    out: str
    from_run: str | None = None
    from_scratch: bool = False
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)  # from scratch only
    batch_key: str | None = None  # adds DAB and batch tokens
    where: tuple[str, ...] = ()
    gene_column: str | None = None
    epochs: int = 25  # the official tutorial's
    batch_size: int = 16
    lr: float = 1e-3
    lr_decay: float = 0.9
    grad_clip: float = 1.0
    mask_ratio: float = 0.4
    gep_weight: float = 1.0
    gepc_weight: float = 1.0
    dab_weight: float = 1.0
    mod_input: bool = False  # the modality embedding also added to the input tokens
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_start(self)
        self.modalities = tuple(self.modalities)
        if len(self.modalities) < 2 or len(set(self.modalities)) < len(self.modalities):
            raise ValueError("--modalities names at least two distinct modalities (rna,adt)")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be at least 1 and batch size at least 2")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask ratio must be in (0, 1), got {self.mask_ratio}")
        if min(self.gep_weight, self.gepc_weight, self.dab_weight) < 0:
            raise ValueError("loss weights must be >= 0")


def multiomic_losses(
    model: ScGPT,
    inputs: list[torch.Tensor],
    mod_ids: torch.Tensor,
    batch_labels: torch.Tensor | None,
    cfg: MultiomicConfig,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Every objective of one minibatch, unweighted, and "loss", their weighted sum."""
    gene_ids, values, padding_mask = inputs
    masked_values, masked = mask_values(values, padding_mask, cfg.mask_ratio, gen)
    out = model(gene_ids, masked_values, padding_mask, batch_labels, mod_ids=mod_ids)
    parts = {
        "gep": masked_mse(out["mlm_output"], values, masked),
        "gepc": masked_mse(out["mvc_output"], values, masked),
    }
    weights = {"gep": cfg.gep_weight, "gepc": cfg.gepc_weight, "dab": cfg.dab_weight}
    if "dab_output" in out:
        parts["dab"] = cross_entropy(out["dab_output"], batch_labels)
    parts["loss"] = sum(weights[k] * v for k, v in parts.items())
    return parts


def _grown(start: Start, cfg: MultiomicConfig):
    """The start with the model's modalities, its vocabulary grown by their features and its
    token length the sum of theirs."""
    modalities = plan_modalities(cfg.data[0], list(cfg.modalities), start.tokens.max_seq_len - 1)
    vocab = extend_vocab(start.vocab, cfg.data, modalities)
    tokens = replace(start.tokens, max_seq_len=1 + sum(m.max_tokens for m in modalities))
    model = {**start.model, "vocab_size": len(vocab), "max_seq_len": tokens.max_seq_len}
    return replace(start, vocab=vocab, tokens=tokens, model=model), modalities


def _keep_gene_rows(model: ScGPT, start: Start, report: LoadReport) -> None:
    """The start's token embedding rows (its genes) in the grown embedding: new rows are the
    new features, fresh."""
    name = "encoder.embedding.weight"
    old = (start.state or {}).get(name)
    if old is None:
        return
    with torch.no_grad():
        model.encoder.embedding.weight[: len(old)] = old
    report.dropped.pop(name, None)
    report.new.remove(name)
    report.loaded.append(name)


def finetune_multiomic(cfg: MultiomicConfig) -> dict[str, Any]:
    """Fine-tune on several modalities; returns the summary also written to RUN/summary.json."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = new_run_dir(cfg.out, cfg.overwrite)
    start = start_from(
        cfg.from_run, cfg.preset, cfg.model, cfg.tokens, cfg.data, cfg.gene_column, cfg.seed
    )
    start, modalities = _grown(start, cfg)
    cells, present = load_multiomic_cells(
        cfg.data,
        start.vocab,
        start.tokens,
        modalities,
        batch_key=cfg.batch_key,
        where=cfg.where,
        gene_column=cfg.gene_column,
    )
    batch_names = batch_codes = None
    heads: dict[str, Any] = {"n_mod": len(modalities), "mod_input": cfg.mod_input, "n_cls": 0}
    heads.update(n_batch_tokens=0, n_dsbn=0, n_dab=0)
    if cells.batches is not None:
        batch_names = sorted({b for b in cells.batches.tolist() if b is not None})
        batch_codes = codes_of(cells.batches, batch_names)
        if (batch_codes == MISSING).any() or len(batch_names) < 2:
            raise InputError(
                f"{cfg.data[0]}: obs column {cfg.batch_key!r} needs a value for every cell "
                "and at least two batches"
            )
        heads.update(n_batch_tokens=len(batch_names), n_dab=len(batch_names) * (cfg.dab_weight > 0))
    model, report = build_model(start, heads, None, batch_names, cfg.seed)
    _keep_gene_rows(model, start, report)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    every = np.arange(cells.tokens.n_cells)

    def batches(rng: np.random.Generator) -> list[np.ndarray]:
        return minibatches(every, cfg.batch_size, rng)

    def losses(rows: np.ndarray, gen: torch.Generator) -> dict[str, torch.Tensor]:
        inputs = batch_inputs(cells.tokens, rows, device)
        mod_ids = batch_modalities(cells.tokens, rows, device)
        codes = codes_tensor(batch_codes, rows, device)
        return multiomic_losses(model, inputs, mod_ids, codes, cfg, gen)

    with MetricsLog(out) as metrics:
        last = objective_epochs(
            model,
            optimizer,
            cfg,
            metrics,
            lambda rng: minibatches(every, cfg.batch_size, rng),
            losses,
        )
    info = RunInfo(
        model.cfg,
        start.tokens,
        start.vocab,
        batches=batch_names,
        train=asdict(cfg),
        provenance=run_provenance(cfg.data, start, report),
        modalities=modalities,
    )
    save_run(out, model.cpu(), info)
    summary = {
        "out": str(out),
        "n_cells": cells.tokens.n_cells,
        "modalities": [m.to_dict() for m in modalities],
        "cells_measured": {k: int(v.sum()) for k, v in present.items()},
        "vocab_size": len(start.vocab),
        **last,
        "load_report": report.summary(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    return summary
