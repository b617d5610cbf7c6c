"""`scgpt-train generate` on files: pseudo-cells per type of a reference, and completion of
the genes a file lacks; both written as .h5ad in log1p(CP10k) units (generate.py has the
method)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scgpt_runtime.errors import InputError
from scgpt_runtime.genes import read_gene_list
from scgpt_runtime.io.write import write_dense_h5ad
from scgpt_runtime.outputs import check_output

from .cells import load_cells
from .gene_data import load_gene_cells
from .generate import Reference, complete, generate, token_expression
from .inference import embed, load_for_inference

log = logging.getLogger(__name__)

N_GENES = 2000  # highly variable genes generated without --genes
UNITS = "log1p(CP10k)"


def write_generated(
    run: str,
    data: str,
    out: Path,
    *,
    label_key: str,
    n_cells: int = 200,
    labels: list[str] | None = None,
    genes_file: str | None = None,
    decoder: str = "gen",
    prompt: str = "mean",
    seed: int = 0,
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """GEN.h5ad: `n_cells` generated cells per label of the reference `data`. Returns a
    summary."""
    check_output(out, overwrite=overwrite, source=Path(data))
    model, info = load_for_inference(run, device)
    genes = read_gene_list(genes_file) if genes_file else None
    cells = load_gene_cells(
        data,
        info.vocab,
        info.tokens,
        genes=genes,
        n_top=N_GENES,
        where=where,
        gene_column=gene_column,
        label_key=label_key,
    )
    tokens = load_cells([data], info.vocab, info.tokens, where=where, gene_column=gene_column)
    known = sorted({v for v in cells.labels.tolist() if v is not None})
    chosen = labels or known
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise InputError(
            f"{data}: no cell has {label_key} == {unknown[0]!r} (labels: {', '.join(known[:10])})"
        )
    ref = Reference(cells, embed(model, tokens.tokens))
    cls = (info.vocab.cls_id, info.tokens.cls_value)
    x, made = generate(
        model,
        ref,
        dict.fromkeys(chosen, n_cells),
        decoder=decoder,
        prompt=prompt,
        cls=cls,
        n_bins=info.tokens.n_bins,
        seed=seed,
        progress=progress,
    )
    names = np.array([f"generated-{i}" for i in range(len(made))])
    obs = {label_key: made, "source": np.full(len(made), "generated", dtype=object)}
    uns = {
        "scgpt_generate": {
            "run": str(run),
            "data": str(data),
            "decoder": decoder,
            "prompt": prompt,
            "seed": seed,
            "units": UNITS,
        }
    }
    write_dense_h5ad(out, x, names, np.array(cells.genes), obs=obs, uns=uns, overwrite=overwrite)
    return {
        "out": str(out),
        "cells": len(made),
        "genes": len(cells.genes),
        "labels": chosen,
        "decoder": decoder,
        "prompt": prompt,
        "seed": seed,
        "units": UNITS,
    }


def write_completed(
    run: str,
    data: str,
    out: Path,
    *,
    genes_file: str,
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """DONE.h5ad: every cell over its measured genes in the vocabulary (log1p(CP10k), as
    measured) and the genes of `genes_file` it lacks (predicted; var `completed`)."""
    check_output(out, overwrite=overwrite, source=Path(data))
    model, info = load_for_inference(run, device)
    observed = load_gene_cells(
        data,
        info.vocab,
        info.tokens,
        n_top=None,
        where=where,
        gene_column=gene_column,
        with_bins=False,
    )
    wanted = read_gene_list(genes_file)
    new = [g for g in wanted if g in info.vocab and g not in set(observed.genes)]
    if not new:
        raise InputError(
            f"{genes_file}: no gene that is in the run's vocabulary and not "
            f"already measured in {data}"
        )
    if len(new) < len(wanted):
        log.warning(
            "%d of %d genes are measured already or not in the vocabulary: skipped",
            len(wanted) - len(new),
            len(wanted),
        )
    tokens = load_cells([data], info.vocab, info.tokens, where=where, gene_column=gene_column)
    values = token_expression(tokens.tokens, observed.gene_ids, observed.expression)
    predicted = complete(
        model, tokens.tokens, values, info.vocab.lookup(new), info.tokens.n_bins, progress
    )
    x = np.concatenate([observed.expression, predicted], axis=1)
    var = {"completed": np.r_[np.zeros(len(observed.genes), bool), np.ones(len(new), bool)]}
    uns = {"scgpt_complete": {"run": str(run), "data": str(data), "units": UNITS}}
    write_dense_h5ad(
        out,
        x,
        tokens.obs_names,
        np.array(observed.genes + new),
        uns=uns,
        overwrite=overwrite,
        var=var,
    )
    return {
        "out": str(out),
        "cells": int(x.shape[0]),
        "measured": len(observed.genes),
        "completed": len(new),
        "units": UNITS,
    }
