"""`scgpt-run inspect` and `info`: what a data file holds and which matrix the model would read;
what a model bundle is."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .bundle import load_bundle
from .errors import InputError
from .genes import default_gene_column
from .io import open_counts
from .io.multimodal import MultiModalMatrix, feature_index
from .io.probe import probe

log = logging.getLogger(__name__)

N_OBS_COLUMNS = 20  # enough to spot the label and batch columns without flooding the screen


def inspect(
    path: str | Path,
    *,
    layer: str | None = None,
    use_raw: bool = True,
    genome: str | None = None,
    gene_column: str | None = None,
    block_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Describe a .h5ad or 10x .h5 file in one streaming pass over its counts.

    Returns the keys format, matrix, n_cells, n_genes, nnz, total_counts, integer_counts,
    gene_column and obs_columns; for a file of several modalities (.h5mu) also "modalities":
    per modality its matrix, what it holds, features, cells measured and non-zeros.
    `progress(n, total)` is called after each block of n cells.
    """
    probe(path)
    with open_counts(path, layer=layer, use_raw=use_raw, genome=genome) as counts:
        nnz, total, integer = 0, 0.0, True
        per_column = np.zeros(counts.n_genes, dtype=np.int64)
        for block in counts.iter_blocks(block_size):
            per_column += np.bincount(block.indices[block.data != 0], minlength=counts.n_genes)
            nnz += int(np.count_nonzero(block.data))
            total += float(block.data.sum(dtype=np.float64))
            integer = integer and bool(np.all(block.data == np.round(block.data)))
            if progress:
                progress(block.n_rows, counts.n_cells)
        if gene_column is not None and gene_column not in counts.var:
            raise InputError(
                f"{counts.path}: has no gene column {gene_column!r} "
                f"(available: {', '.join(counts.var)})"
            )
        if not integer:
            log.warning(
                "%s: %s does not look like raw integer counts; scGPT expects raw counts "
                "(pass --layer or drop --no-raw to choose another matrix)",
                counts.path,
                counts.matrix,
            )
        extra = {}
        if isinstance(counts, MultiModalMatrix):
            extra["modalities"] = _modalities(counts, per_column)
        return {
            "format": counts.format,
            "matrix": counts.matrix,
            "n_cells": counts.n_cells,
            "n_genes": counts.n_genes,
            "nnz": nnz,
            "total_counts": int(total) if integer else total,
            "integer_counts": integer,
            "gene_column": gene_column or default_gene_column(counts.var),
            "obs_columns": counts.obs_columns[:N_OBS_COLUMNS],
            **extra,
        }


def _modalities(counts: MultiModalMatrix, per_column: np.ndarray) -> list[dict]:
    from .modalities import namespace_of

    return [
        {
            "name": p.name,
            "holds": namespace_of(p) or "unknown",
            "matrix": p.counts.matrix,
            "n_features": p.counts.n_genes,
            "n_cells": p.n_present,
            "nnz": int(per_column[p.columns].sum()),
            "examples": [str(n) for n in feature_index(p.counts.var)[:3]],
        }
        for p in counts.parts
    ]


def bundle_info(path: str | Path, *, verify: bool = True) -> dict:
    """What a bundle is: model size, vocabulary, labels, graphs with the errors measured at
    export, validation, provenance and recorded evaluations (`scgpt-run info`). Raises
    BundleError."""
    b = load_bundle(path, verify=verify)
    m = b.config["model"]
    return {
        "bundle": str(b.path),
        "format_version": b.config["format_version"],
        "bundle_sha256": b.sha256,
        "parameters": b.parameters,  # counted at export; None for format 1 bundles
        "model": {
            k: m[k] for k in ("d_model", "n_head", "d_hid", "n_layer", "input_emb") if k in m
        },
        "megabytes": round(sum(f["bytes"] for f in b.config["files"].values()) / 1e6, 1),
        "vocab_size": len(b.vocab),
        "gene_panel": None if b.gene_panel is None else len(b.gene_panel),
        "gene_embeddings": b.gene_embeddings_file is not None,  # served by scgpt-run genes
        "labels": b.labels or [],
        "tokens": b.tokens.to_dict(),
        "variants": [
            {
                "precision": v.precision,
                "max_seq_len": v.max_seq_len,
                "file": v.path.name,
                "megabytes": round(v.path.stat().st_size / 1e6, 1),
                "errors": v.errors,
                "tolerance": v.tolerance,
            }
            for v in sorted(
                b.variants, key=lambda v: (b.precisions.index(v.precision), v.max_seq_len)
            )
        ],
        "calibration": b.config.get("calibration"),
        "validation": b.config.get("validation", {}),
        "provenance": b.config.get("provenance", {}),
        "evaluation": b.evaluation,
    }
