"""`scgpt-run info` and `inspect`: what a bundle is, what a data file holds."""

from __future__ import annotations

import json

import click

from .. import pipeline
from ..inspection import bundle_info
from ..inspection import inspect as inspect_file
from ..served import bundle_or_default
from .common import gene_fraction_option, input_options, progress_bar


@click.command(
    epilog="""\b
Examples:
  scgpt-run info
  scgpt-run info bundles/pbmc
  scgpt-run info bundles/pbmc --json"""
)
@click.argument("bundle", required=False, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(bundle: str | None, as_json: bool) -> None:
    """Describe the model bundle BUNDLE (default: the default model): size, vocabulary, labels,
    graphs and their errors against PyTorch measured at export, validation, provenance and
    recorded metrics. Checks every checksum."""
    report = bundle_info(bundle_or_default(bundle))
    if as_json:
        click.echo(json.dumps(report))
        return
    m = report["model"]
    click.echo(f"bundle:         {report['bundle']} (format {report['format_version']})")
    click.echo(f"sha256:         {report['bundle_sha256']}")
    click.echo(
        f"model:          {_count(report['parameters'])}, d_model {m['d_model']}, "
        f"{m['n_layer']} layers, {m['n_head']} heads"
    )
    panel = f", gene panel of {report['gene_panel']}" if report["gene_panel"] else ""
    genes = (
        "gene embeddings (scgpt-run genes)" if report["gene_embeddings"] else "no gene embeddings"
    )
    click.echo(f"vocabulary:     {report['vocab_size']} tokens{panel}; {genes}")
    labels = report["labels"]
    click.echo(
        f"labels:         {len(labels)}: {', '.join(labels)}" if labels else "labels:         none"
    )
    tokens = report["tokens"]
    click.echo(
        f"tokens:         max_seq_len {tokens['max_seq_len']}, {tokens['n_bins']} bins "
        f"({tokens['binning']}), selection {tokens['selection']}, cls_value {tokens['cls_value']}"
    )
    click.echo("graphs:")
    for v in report["variants"]:
        errors = ", ".join(f"{k} {x:.3g}" for k, x in v["errors"].items())
        click.echo(f"  {v['precision']} {v['max_seq_len']:>5}: {v['megabytes']} MB; {errors}")
    calibration = report["calibration"]
    if calibration:
        click.echo(
            f"calibration:    temperature {calibration['temperature']:.3g}, expected calibration "
            f"error {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f} on "
            f"{calibration['n_cells']} validation cells"
        )
    validation = report["validation"]
    if validation:
        click.echo(
            f"validated on:   {validation.get('n_cells')} {validation.get('cells')} cells"
            f" of {validation.get('file') or '-'} with {validation.get('provider')}"
        )
    export = report["provenance"].get("export", {})
    if export:
        click.echo(f"exported:       {export.get('created')} from {export.get('run')}")
    for e in report["evaluation"]:
        where = f" where {' '.join(e['where'])}" if e["where"] else ""
        ece = f", ECE {e['ece']} (uncalibrated {e['ece_uncalibrated']})" if "ece" in e else ""
        sibling = e.get("measured_on")
        build = f", held-out build {sibling['bundle_sha256'][:12]}" if sibling else ""
        click.echo(
            f"evaluated:      macro-F1 {e['macro_f1']}, accuracy {e['accuracy']}{ece} on "
            f"{e['n_cells']} cells of {', '.join(e['data'])}{where} ({e['precision']}{build})"
        )


@click.command(
    epilog="""\b
Examples:
  scgpt-run inspect pbmc.h5ad
  scgpt-run inspect filtered_feature_bc_matrix.h5 --json
  scgpt-run inspect cite.h5mu
  scgpt-run inspect pbmc.h5ad --layer counts --gene-column gene_symbols
  scgpt-run inspect pbmc.h5ad --model bundles/pbmc"""
)
@input_options
@click.option(
    "--model",
    "bundle",
    type=click.Path(path_type=str),
    help="Also match the genes to this model bundle's vocabulary [default: no gene match]",
)
@gene_fraction_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect(
    file: str,
    layer: str | None,
    no_raw: bool,
    genome: str | None,
    gene_column: str | None,
    bundle: str | None,
    min_gene_fraction: float,
    as_json: bool,
) -> None:
    """Describe FILE (.h5ad, .h5mu, 10x .h5 or mtx folder): format, matrix, size, counts, genes.

    Counts come from raw/X when present, else X; --layer and --no-raw choose otherwise. A
    .h5mu file is described modality by modality: what it holds (genes, proteins, peaks),
    its features, the cells it measured and its non-zeros.
    With --model, also how the genes match that bundle's vocabulary (gene_match); fewer than
    --min-gene-fraction matching is an error (exit 4), as it would be for annotate and embed.
    """
    with progress_bar("Reading cells") as progress:
        report = inspect_file(
            file,
            layer=layer,
            use_raw=not no_raw,
            genome=genome,
            gene_column=gene_column,
            progress=progress,
        )
    if bundle is not None:
        report["gene_match"] = pipeline.gene_report(
            file,
            bundle,
            layer=layer,
            use_raw=not no_raw,
            genome=genome,
            gene_column=gene_column,
            min_gene_fraction=min_gene_fraction,
        )
    if as_json:
        click.echo(json.dumps(report))
        return
    for key, value in report.items():
        if key == "obs_columns":
            value = ", ".join(value) or "(none)"
        if key == "modalities":
            click.echo("modalities:")
            for m in value:
                click.echo(
                    f"  {m['name'] + ':':14}{m['holds']}, {m['n_features']:,} features, "
                    f"{m['n_cells']:,} cells, {m['nnz']:,} non-zeros ({m['matrix']}; e.g. "
                    f"{', '.join(m['examples'])})"
                )
            continue
        if key == "gene_match":
            click.echo("gene_match:")
            for sub, v in value.items():
                v = ", ".join(v) if isinstance(v, list) else v
                click.echo(f"  {sub + ':':18}{v}")
            continue
        click.echo(f"{key + ':':16}{value}")


def _count(parameters: int | None) -> str:
    return "parameters not recorded" if parameters is None else f"{parameters:,} parameters"
