"""`export_run`: a training run directory to a validated model bundle."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from scgpt_runtime.bundle import (
    PRECISIONS,
    Variant,
    check_target,
    load_bundle,
    write_bundle,
)
from scgpt_runtime.errors import InputError
from scgpt_runtime.io.atomic import atomic_dir, output_errors, writing
from scgpt_runtime.session import PROVIDERS
from scgpt_train.checkpoint import RunInfo, command_line, created, load_run
from scgpt_train.gene_embeddings import encoder_embeddings
from scgpt_train.model import MASK_BIAS

from .ladder import choose_ladder, halving_ladder
from .quantize import to_fp16, to_int8
from .to_onnx import export_onnx, served_parameters
from .validate import (
    TOLERANCE,
    ToleranceError,
    make_cells,
    read_cells,
    reference,
    token_counts,
    validate,
)

log = logging.getLogger("scgpt_export")


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    max_lens: Sequence[int] | None = None,
    precisions: Sequence[str] = PRECISIONS,
    validation_data: str | Path | None = None,
    validation_cells: int = 64,
    device: str = "cpu",
    opset: int = 18,
    fuse_attention: bool = True,
    batch_size: int = 16,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export the model of run directory `run` as a bundle directory `out`.

    Args:
        max_lens: the lengths the graphs serve (tokens per cell, <cls> included), each
            validated; the longest becomes the bundle's max_seq_len. None: a ladder up to the
            run's max_seq_len chosen from the token counts of the validation file's cells
            (ladder.py; halving from the run's length where no cells are known).
        precisions: any of "fp32", "fp16", "int8"; one graph per precision serves every length.
            A precision whose graph misses its tolerance at a length is left out with a
            warning (and named in the summary); the export fails only where none is left.
        validation_data: a count file (.h5ad, 10x .h5) whose first `validation_cells` cells
            validate every graph. None: the first training data file of the run that still
            exists; as many synthetic cells only where the run names no training data at all.
        device: "cpu" or "cuda": where onnxruntime runs the graphs for validation.
        opset: ONNX opset, 18 to 20. fuse_attention: fuse attention into MultiHeadAttention.
        batch_size: cells per validation batch. overwrite: replace an existing bundle.
    Returns a summary: bundle path, the graph files and their bytes, per variant (precision and
    length) its file and errors, seconds of each step (export, conversions, validations), the
    validation record, the shape of the gene embeddings stored (every vocabulary id's gene
    encoder output), total seconds.
    Raises ToleranceError (a BundleError) where a graph misses its tolerance, InputError where
    the run or its validation data cannot be read; nothing is written then.
    """
    t_start = time.perf_counter()
    out = check_target(out, overwrite)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"precisions must be among {PRECISIONS}, not {list(precisions)}")
    if device not in PROVIDERS:
        raise ValueError(f"device must be one of {sorted(PROVIDERS)}, not {device!r}")
    model, info = load_run(run)
    if max_lens is not None and min(max_lens) < 2:
        raise ValueError(f"sequence lengths must be at least 2 (<cls> and a gene), not {max_lens}")
    if info.model.n_dsbn:
        raise InputError(f"{run}: the model uses DSBN, which needs batch labels: not exportable")
    if info.model.n_cls and not info.labels:
        raise InputError(f"{run}: the model has a cell-type head but the run names no labels")
    source = _validation_source(Path(run), info, validation_data)
    real = None
    if source is not None:
        gene_column = info.train.get("gene_column")
        real = read_cells(source, info.vocab, validation_cells, gene_column, info.modalities)
    log.info("validating on %s", source or f"{validation_cells} synthetic cells")
    lengths = sorted(set(max_lens or _ladder(model, info, source)))
    if info.modalities and lengths[-1] != info.tokens.max_seq_len:
        raise ValueError(
            f"a multi-omics model is served at its full length {info.tokens.max_seq_len} "
            "(the sum of its modalities' tokens): include it in --max-len"
        )
    tokens = replace(info.tokens, max_seq_len=lengths[-1])
    log.info("lengths served: %s", ", ".join(map(str, lengths)))

    # SIGTERM removes the scratch folder and any half-written bundle
    with writing(), atomic_dir(out, suffix=".export") as scratch, output_errors(out):
        t0 = time.perf_counter()
        fp32 = export_onnx(
            model,
            scratch / "fp32.onnx",
            lengths[-1],
            opset=opset,
            fuse_attention=fuse_attention,
        )
        timings: dict[str, float] = {"export": round(time.perf_counter() - t0, 2)}
        graphs = {}
        for precision in precisions:
            t0 = time.perf_counter()
            graphs[precision] = _convert(fp32, precision)
            timings[f"convert_{precision}"] = round(time.perf_counter() - t0, 2)
        variants, full_length, left_out = [], {}, {}
        for length in lengths:
            cells, full_length[str(length)] = make_cells(
                replace(tokens, max_seq_len=length), info.vocab, real, validation_cells
            )
            expected = reference(model, cells, batch_size)
            for precision in [p for p in precisions if p not in left_out]:
                t0 = time.perf_counter()
                try:
                    errors = validate(
                        graphs[precision],
                        precision,
                        cells,
                        expected,
                        device=device,
                        batch_size=batch_size,
                    )
                except ToleranceError as e:
                    left_out[precision] = str(e)
                    log.warning("%s: %s is left out of the bundle", e, precision)
                    continue
                timings[f"validate_{precision}_{length}"] = round(time.perf_counter() - t0, 2)
                log.info("%s graph at %d tokens: %s", precision, length, _brief(errors))
                tolerance = TOLERANCE[precision]
                variants.append(Variant(precision, length, graphs[precision], errors, tolerance))
        variants = sorted(
            (v for v in variants if v.precision not in left_out),
            key=lambda v: (precisions.index(v.precision), v.max_seq_len),
        )
        if not variants:
            raise ToleranceError("no graph passed its tolerance: " + "; ".join(left_out.values()))
        validation = {
            "cells": "real" if source is not None else "synthetic",
            "file": None if source is None else str(source),
            "n_cells": validation_cells if real is None else real[0].n_rows,
            "cls_only_cell": True,
            "full_length_cell": full_length,  # per graph length: "real" or "synthetic"
            "batch_size": batch_size,
            "provider": PROVIDERS[device],
        }
        write_bundle(
            out,
            model=info.model.to_dict(),
            tokens=tokens,
            vocab=info.vocab,
            variants=variants,
            labels=info.labels,
            gene_panel=info.train.get("gene_panel"),
            parameters=served_parameters(model),
            calibration=info.calibration,
            validation=validation,
            provenance={"training": info.provenance, "export": _provenance(run, opset)},
            gene_embeddings=encoder_embeddings(model, np.arange(len(info.vocab))),
            modalities=info.modalities,
            overwrite=overwrite,
        )
    bundle = load_bundle(out, verify=False)
    return {
        "bundle": str(out),
        "graphs": {p.name: p.stat().st_size for p in sorted({v.path for v in bundle.variants})},
        "variants": [
            {
                "precision": v.precision,
                "max_seq_len": v.max_seq_len,
                "file": v.path.name,
                "errors": v.errors,
            }
            for v in bundle.variants
        ],
        "lengths": lengths,
        "left_out": left_out,
        "gene_embeddings": bundle.config["genes"]["shape"],
        "timings": timings,
        "validation": validation,
        "seconds": round(time.perf_counter() - t_start, 2),
    }


def _ladder(model: Any, info: RunInfo, source: Path | None) -> list[int]:
    """The lengths to serve, from the token counts of the validation file's cells."""
    if source is None:
        return halving_ladder(info.tokens.max_seq_len)
    n_tokens = token_counts(
        source, info.vocab, info.tokens, info.train.get("gene_column"), modalities=info.modalities
    )
    cfg = info.model
    return choose_ladder(n_tokens, info.tokens.max_seq_len, cfg.d_model, cfg.d_hid)


def _validation_source(run: Path, info: RunInfo, given: str | Path | None) -> Path | None:
    """The file to take validation cells from; None: synthetic cells (the run names no data)."""
    if given is not None:
        if not Path(given).is_file():
            raise InputError(f"{given}: no such file (--validation-data)")
        return Path(given)
    files = [Path(d["file"]) for d in info.provenance.get("data", [])]
    for file in files:
        if file.is_file():
            return file
    if files:
        raise InputError(
            f"{run}: its training data files are gone ({', '.join(map(str, files[:3]))}); "
            "pass --validation-data FILE with real cells to validate the export on"
        )
    return None


def _convert(fp32: Path, precision: str) -> Path:
    if precision == "fp32":
        return fp32
    dst = fp32.with_name(fp32.name.replace("fp32", precision))
    return to_fp16(fp32, dst) if precision == "fp16" else to_int8(fp32, dst)


def _brief(errors: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in errors.items())


def _provenance(run: str | Path, opset: int) -> dict[str, Any]:
    return {
        "run": str(run),
        "command": command_line(),
        "code_version": version("scgpt-deploy"),
        "created": created(),
        "opset": opset,
        "mask_bias": MASK_BIAS,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
