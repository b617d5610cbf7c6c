"""`scgpt-run reference build` and `reference info`: labelled cells embedded once, to annotate
other cells by their nearest neighbours."""

from __future__ import annotations

import json

import click

from .. import pipeline
from .. import reference as reference_files
from .common import EXIT_CODES, check_where, model_option, progress_bar, run_options


@click.group(epilog=EXIT_CODES)
def reference() -> None:
    """Build and describe reference files for annotate --reference."""


@reference.command(
    epilog="""\b
Examples:
  scgpt-run reference build kang.h5ad --label-key cell_type --where condition=control \\
      --out kang_control.scref
  scgpt-run reference build atlas.h5ad --model bundles/human --label-key cell_type \\
      --label-key cell_type_fine --out atlas.scref --device cuda
  scgpt-run annotate query.h5ad --model bundles/human --reference atlas.scref --out q.csv"""
)
@model_option
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="The reference file to write (.scref).",
)
@click.option(
    "--label-key",
    "label_keys",
    multiple=True,
    required=True,
    help="obs column with labels to transfer; repeatable (coarse and fine).",
)
@click.option(
    "--where",
    multiple=True,
    callback=check_where,
    help="COL=VALUE: only cells whose obs COL equals VALUE; repeatable.",
)
@run_options
def build(
    file: str,
    bundle: str | None,
    out: str,
    shard: str | None,
    as_json: bool,
    no_raw: bool,
    **options,
) -> None:
    """Embed the labelled cells of FILE (.h5ad) with the model and write them, with their
    labels, as a reference file: L2-normalised embeddings, cell names, the labels of every
    --label-key (cells with none of them are left out), and the model bundle's sha256, so that
    annotate --reference refuses it with another model. Format: docs/reference-format.md.
    """
    if shard is not None:
        raise click.UsageError("a reference is built from the whole file: drop --shard")
    root = click.get_current_context().find_root()
    with progress_bar("Embedding the reference") as progress:
        try:
            summary = pipeline.build_reference(
                file,
                model=bundle,
                out=out,
                use_raw=not no_raw,
                progress=progress,
                verbose=root.params.get("verbose", False),
                **options,
            )
        except ValueError as e:
            raise click.UsageError(str(e)) from e
    if as_json:
        click.echo(json.dumps(summary))
        return
    keys = ", ".join(f"{k} ({len(v)} labels)" for k, v in summary["label_keys"].items())
    click.echo(f"wrote {summary['output']}: {summary['n_cells']} cells, {keys}")


@reference.command(
    epilog="""\b
Examples:
  scgpt-run reference info kang_control.scref
  scgpt-run reference info atlas.scref --json"""
)
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(file: str, as_json: bool) -> None:
    """Describe the reference file FILE: cells, embedding width, the model bundle it was built
    with (sha256), its label keys with their labels and counts, and the distances behind the
    Unknown threshold. Checks its checksum."""
    ref = reference_files.load(file)
    report = {
        "reference": file,
        "source": ref.source,
        "n_cells": len(ref.obs_names),
        "d": int(ref.embeddings.shape[1]),
        "bundle_sha256": ref.bundle_sha256,
        "labels": {
            key: dict(
                zip(classes, map(int, (codes[:, None] == range(len(classes))).sum(0)), strict=True)
            )
            for key, (classes, codes) in ref.labels.items()
        },
        "distance_threshold": ref.distance_threshold(reference_files.DISTANCE_QUANTILE),
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"reference:      {file} ({report['n_cells']} cells of {ref.source})")
    click.echo(f"bundle sha256:  {ref.bundle_sha256}")
    for key, counts in report["labels"].items():
        click.echo(f"{key}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    click.echo(
        f"unknown beyond: distance {report['distance_threshold']:.4g} "
        f"(quantile {reference_files.DISTANCE_QUANTILE} of nearest-neighbour distances)"
    )
