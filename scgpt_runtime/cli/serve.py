"""`scgpt-run annotate`, `embed` and `merge`: serve a file with a bundle, join shard parts."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .. import outputs, pipeline
from ..knn import VOTES
from ..reference import UNKNOWN_BELOW
from .common import (
    inplace_option,
    model_option,
    option,
    progress_bar,
    report_options,
    run_options,
)

log = logging.getLogger("scgpt_runtime")


def _serve(
    command: str,
    file: str,
    bundle: str | None,
    out: str | None,
    inplace: bool,
    shard: str | None,
    as_json: bool,
    no_raw: bool,
    **options,
) -> None:
    """Checks of the options, the library call, and what goes to stdout."""
    try:
        if shard is not None:
            pipeline.Shard.parse(shard)
        kind = outputs.output_kind(
            command, None if out is None else Path(out), inplace=inplace, shard=shard is not None
        )
        report, color_by = options["report"], options["color_by"]
        pipeline.check_report(report, color_by, Path(file), options["overwrite"])
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if kind == "stdout" and as_json:
        raise click.UsageError("--json prints a summary on stdout: pass --out for the results")
    root = click.get_current_context().find_root()
    label = "Annotating" if command == "annotate" else "Embedding"
    with progress_bar(label) as progress:
        summary = (pipeline.annotate if command == "annotate" else pipeline.embed)(
            file,
            model=bundle,
            out=out,
            inplace=inplace,
            shard=shard,
            use_raw=not no_raw,
            stream=sys.stdout,
            progress=progress,
            verbose=root.params.get("verbose", False),
            **options,
        )
    if as_json:
        click.echo(json.dumps(summary))
        return
    message = (
        f"{summary['n_cells']} cells in {summary['seconds']:.1f} s "
        f"({summary['cells_per_s']:,.0f} cells/s, {summary['precision']} on "
        f"{summary['execution_provider']})"
    )
    if summary["output"] is None:
        log.info("%s", message)
    else:
        click.echo(f"wrote {summary['output']}: {message}")
    if summary.get("report"):  # stdout may hold the CSV: the report is named on stderr
        log.info("wrote %s", summary["report"])


@click.command(
    epilog="""\b
Examples:
  scgpt-run annotate pbmc.h5ad --out pbmc_scgpt.h5ad              # the default model
  scgpt-run annotate pbmc.h5ad --model bundles/pbmc --out pbmc_scgpt.h5ad
  scgpt-run annotate pbmc.h5ad --model bundles/pbmc --out labels.csv --top-k 3
  scgpt-run annotate pbmc.h5ad --model bundles/pbmc --inplace --prefix scgpt_
  scgpt-run annotate filtered_feature_bc_matrix.h5 --model bundles/pbmc > labels.csv
  scgpt-run annotate big.h5ad --model bundles/pbmc --shard 2/8 --out big.2.part
  scgpt-run annotate query.h5ad --reference ref.scref --out query_labels.csv
  scgpt-run annotate pbmc.h5ad --out pbmc.csv --report pbmc.html --color-by sample
  scgpt-run annotate query.h5ad --model bundles/human --reference lung.scref \\
      --label-key cell_type_fine --k 20 --vote distance --unknown-below 0.6"""
)
@model_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    help="Results file: .csv, .tsv or .h5ad [default: CSV on stdout]",
)
@inplace_option
@option(pipeline.serve, "prefix", help="Prefix of the obs columns in .h5ad.")
@option(
    pipeline.serve,
    "top_k",
    type=click.IntRange(min=0),
    help="Also give the K most probable labels and their probabilities.",
)
@click.option(
    "--reference",
    type=click.Path(dir_okay=False, path_type=str),
    help="Label cells by their nearest cells of this reference (scgpt-run reference build, "
    "with the same model) instead of the model's head.",
)
@click.option("--label-key", help="With --reference: its labels to transfer [default: its first]")
@option(
    pipeline.serve,
    "k",
    "--k",
    type=click.IntRange(min=1),
    help="With --reference: neighbours that vote.",
)
@option(
    pipeline.serve,
    "vote",
    type=click.Choice(VOTES),
    help="With --reference: majority, or votes weighed by 1 / distance.",
)
@click.option(
    "--unknown-below",
    type=click.FloatRange(0, 1),
    help="Call a cell Unknown where its probability (head) or vote share (reference) is below "
    f"this [default: head 0 (off), reference {UNKNOWN_BELOW}]",
)
@option(
    pipeline.serve,
    "distance_quantile",
    "--unknown-distance-quantile",
    "distance_quantile",
    type=click.FloatRange(0, 1),
    help="With --reference: Unknown where a cell is farther from its nearest reference cell "
    "than this share of reference cells are from theirs (1: off).",
)
@report_options
@run_options
def annotate(
    file: str,
    bundle: str | None,
    out: str | None,
    inplace: bool,
    prefix: str,
    top_k: int,
    shard: str | None,
    as_json: bool,
    no_raw: bool,
    **options,
) -> None:
    """Predict the cell type of every cell of FILE (.h5ad, .h5mu, 10x .h5 or 10x mtx folder).

    Per cell: the predicted label, its probability (conf_score), the number of genes the
    model saw (n_genes; 0 means no gene of the cell is in the vocabulary), and with --top-k the
    K most probable labels. With --reference the label is the vote of the cell's --k nearest
    reference cells (L2-normalised embeddings, exact search), conf_score its vote share, and
    knn_distance the distance to the nearest reference cell. Below --unknown-below, or too far
    from the reference, a cell is "Unknown". CSV/TSV rows are keyed by cell barcode, in file
    order. An .h5ad output is a copy of FILE (or a new file: a 10x file's gene expression, or a
    .h5mu's modalities side by side named in var["modality"]) with the obs
    columns {prefix}predicted_labels, {prefix}conf_score and {prefix}n_genes (and
    {prefix}knn_distance), the L2-normalised embedding in obsm["X_scGPT"] and the provenance
    in uns["scGPT"]; --inplace writes them into FILE itself (atomically: an interruption
    leaves FILE as it was).
    """
    _serve(
        "annotate",
        file,
        bundle,
        out,
        inplace,
        shard,
        as_json,
        no_raw,
        prefix=prefix,
        top_k=top_k,
        **options,
    )


@click.command(
    epilog="""\b
Examples:
  scgpt-run embed pbmc.h5ad --model bundles/pbmc --out pbmc_emb.npy
  scgpt-run embed pbmc.h5ad --model bundles/pbmc --out pbmc_scgpt.h5ad
  scgpt-run embed pbmc.h5ad --out pbmc_emb.npy --report pbmc_map.html --color-by batch
  scgpt-run embed filtered_feature_bc_matrix.h5 --model bundles/human --out emb.csv --raw
  scgpt-run embed big.h5ad --model bundles/human --device cuda --batch-size 128 --out e.npy"""
)
@model_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    help="Embeddings file: .npy, .h5ad, .csv or .tsv (required unless --inplace).",
)
@inplace_option
@click.option("--raw", is_flag=True, help="The raw <cls> output instead of the L2-normalised one.")
@report_options
@run_options
def embed(
    file: str,
    bundle: str | None,
    out: str | None,
    inplace: bool,
    raw: bool,
    shard: str | None,
    as_json: bool,
    no_raw: bool,
    **options,
) -> None:
    """Embed every cell of FILE (.h5ad, .h5mu, 10x .h5 or mtx folder): a row per cell, in order.

    The embedding is the model's <cls> output, L2-normalised as in the official scGPT
    zero-shot pipeline (--raw: as the model gives it). .npy: a (cells, d) float32 array;
    .csv/.tsv: the cell barcode then d columns; .h5ad: obsm["X_scGPT"] in a copy of FILE (or a
    new file for a 10x or .h5mu FILE, as annotate writes), or in FILE itself with --inplace.
    """
    _serve("embed", file, bundle, out, inplace, shard, as_json, no_raw, raw=raw, **options)


@click.command(
    epilog="""\b
Examples:
  scgpt-run merge big.1.part big.2.part --out big_labels.csv
  scgpt-run merge parts/big.*.part --out big_scgpt.h5ad --json
  scgpt-run merge parts/big.*.part --inplace"""
)
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    help="Output file, any format the sharded command writes [annotate: CSV on stdout]",
)
@click.option("--inplace", is_flag=True, help="Write into the input .h5ad file of the run.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def merge(
    parts: tuple[str, ...], out: str | None, inplace: bool, overwrite: bool, as_json: bool
) -> None:
    """Join the .part files of a run split with --shard I/N into one output, identical to
    what the unsharded command writes. Every shard 1..N must be given, once; parts of
    different inputs, models or options are refused."""
    if inplace and out is not None:
        raise click.UsageError("--inplace writes into the input file: drop --out")
    if as_json and out is None and not inplace:
        raise click.UsageError("--json prints a summary on stdout: pass --out for the results")
    try:
        summary = outputs.merge(
            parts, out=out, inplace=inplace, overwrite=overwrite, stream=sys.stdout
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if as_json:
        click.echo(json.dumps(summary))
    elif summary["output"] is not None:
        click.echo(f"wrote {summary['output']}: {summary['n_cells']} cells from {len(parts)} parts")
