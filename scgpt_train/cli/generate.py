"""`scgpt-train generate`: pseudo-cells from cell-type prompts, or completion of missing genes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from scgpt_runtime.cli.common import EXIT_CODES, check_where, progress_bar

from ..generate import DECODERS, PROMPTS
from ..generate_files import write_completed, write_generated
from .common import echo_summary


@click.command(
    epilog="""\b
Examples:
  scgpt-train generate --from runs/pre --data kang.h5ad --label-key cell_type --out gen.h5ad
  scgpt-train generate --from runs/pre --data kang.h5ad --label-key cell_type \\
      --labels B,NK --n-cells 500 --decoder gepc --prompt cells --seed 1 --out gen.h5ad
  scgpt-train generate --complete --from runs/pre --data panel.h5ad --genes more.txt \\
      --out done.h5ad
"""
    + EXIT_CODES
)
@click.option("--from", "run", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Reference cells (generation) or the cells to complete.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .h5ad to write (X in log1p(CP10k)).",
)
@click.option("--complete", is_flag=True, help="Predict the --genes each cell lacks instead.")
@click.option("--label-key", help="obs column of the reference's cell types (generation).")
@click.option("--n-cells", default=200, show_default=True, help="Cells generated per type.")
@click.option("--labels", help="Comma-separated types to generate [default: every type].")
@click.option(
    "--genes",
    "genes_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Genes, one per line: those generated [default: the 2,000 most variable], "
    "or those to complete (required with --complete).",
)
@click.option(
    "--decoder",
    type=click.Choice(DECODERS),
    default="gen",
    show_default=True,
    help="gen: the generative path; gepc: the GEPC decoder.",
)
@click.option(
    "--prompt",
    type=click.Choice(PROMPTS),
    default="mean",
    show_default=True,
    help="mean: the type's mean embedding; cells: one reference cell's per cell.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--where", multiple=True, callback=check_where, help="COL=VALUE filter of --data.")
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def generate(run: str, data: str, out: Path, complete: bool, as_json: bool, **options: Any) -> None:
    """Generate pseudo-cells per cell type of a reference, or complete missing genes.

    Generation: each type's prompt is the mean embedding of its reference cells (or, with
    --prompt cells, a random reference cell's); the decoder predicts each gene's bin; a
    residual of the decoder on a random reference cell of the type is added per gene, so that
    cells vary; bins become log1p(CP10k) through the type's mean value per bin. obs: the
    label key and source = generated. --complete: every cell's measured genes as measured
    (log1p(CP10k)) and the --genes it lacks predicted from its own tokens (var completed).
    Deterministic for a seed.
    """
    common = {k: options.pop(k) for k in ("where", "gene_column", "device", "overwrite")}
    if complete:
        if not options["genes_file"]:
            raise click.UsageError("--complete needs --genes FILE (the genes to predict)")
        with progress_bar("Completing") as progress:
            summary = write_completed(
                run, data, out, genes_file=options["genes_file"], progress=progress, **common
            )
        line = f"{out}: {summary['cells']} cells, {summary['completed']} genes completed"
    else:
        if not options["label_key"]:
            raise click.UsageError("generation needs --label-key (the reference's cell types)")
        labels = options.pop("labels")
        labels = [v.strip() for v in labels.split(",") if v.strip()] if labels else None
        with progress_bar("Generating") as progress:
            summary = write_generated(
                run, data, out, labels=labels, progress=progress, **options, **common
            )
        line = f"{out}: {summary['cells']} cells x {summary['genes']} genes ({summary['units']})"
    echo_summary(summary, as_json, line)
