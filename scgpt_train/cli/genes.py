"""`scgpt-train genes embed`: a run's gene embeddings as an .h5ad."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from scgpt_runtime.cli.common import EXIT_CODES, check_where

from ..gene_embeddings import embed_genes
from .common import echo_summary, expand_data


@click.group(epilog=EXIT_CODES)
def genes() -> None:
    """Gene embeddings of a run."""


@genes.command(
    epilog="""\b
Examples:
  scgpt-train genes embed --from runs/pre --out genes.h5ad
  scgpt-train genes embed --from runs/pre --data kang.h5ad --contextual \\
      --where condition=control --out kang-genes.h5ad --json"""
)
@click.option("--from", "run", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="GENES.h5ad to write.")
@click.option(
    "--data",
    multiple=True,
    help="Cells: embed only their genes (those in the vocabulary); repeatable.",
)
@click.option(
    "--contextual",
    is_flag=True,
    help="Also the mean transformer output of each gene over the cells (obsm X_contextual).",
)
@click.option("--where", multiple=True, callback=check_where, help="COL=VALUE filter of --data.")
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def embed(run: str, out: str, data: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Write one row per gene: obs_names = gene names, X = the gene encoder output.

    Without --data: every gene of the run's vocabulary; with it, the data's genes in the
    vocabulary (in vocabulary order). --contextual adds each gene's mean transformer output
    over the cells where it is a token (obsm X_contextual; NaN for a gene never seen) and the
    number of those cells (obs n_cells).
    """
    files = expand_data(data) if data else None
    summary = embed_genes(run, Path(out), data=files, **options)
    echo_summary(summary, as_json, f"{out}: {summary['genes']} genes x {summary['dim']}")
