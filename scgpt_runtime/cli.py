"""`scgpt-run`: annotate and embed cells with an exported scGPT model bundle."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from . import outputs, pipeline
from .bundle import PRECISIONS
from .errors import ScgptError
from .inspection import bundle_info
from .inspection import inspect as inspect_file
from .model import bundle_or_default
from .session import DEVICES

log = logging.getLogger("scgpt_runtime")

EXIT_CODES = """\b
Exit codes:
  0  success
  1  internal error (a bug: please report it)
  2  usage error (bad options)
  3  input file error (missing, damaged, wrong format, invalid values)
  4  gene match error (too few genes match the model vocabulary)
  5  model bundle error
  6  output error (exists without --overwrite, not writable)"""


class ScgptGroup(click.Group):
    """Turns every ScgptError into one line on stderr and its exit code: no tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ScgptError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)


def configure_logging(verbose: bool, quiet: bool) -> None:
    """Logs to stderr: info by default, debug with -v, errors only with -q."""
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True
    )


def command_group(help_text: str) -> click.Group:
    """A top-level command group: -h, --version, -v/-q logging, one-line errors, exit codes."""

    @click.group(
        cls=ScgptGroup,
        help=help_text,
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog=EXIT_CODES,
    )
    @click.version_option(package_name="scgpt-deploy")
    @click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
    @click.option("-q", "--quiet", is_flag=True, help="Log errors only.")
    def group(verbose: bool, quiet: bool) -> None:
        configure_logging(verbose, quiet)

    return group


cli = command_group("Annotate and embed single cells with scGPT, on GPU when there is one.")


def input_options(f: Callable) -> Callable:
    """Options that choose which matrix of a file is read."""
    f = click.option(
        "--gene-column", help="var column with gene names or Ensembl ids [default: best match]"
    )(f)
    f = click.option("--genome", help="Genome group of a multi-genome 10x v2 file.")(f)
    f = click.option("--no-raw", is_flag=True, help="Read X even when the file has raw/X.")(f)
    f = click.option("--layer", help="Read counts from layers/NAME instead of raw/X or X.")(f)
    return click.argument("file", type=click.Path(dir_okay=True, path_type=str))(f)


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[..., None] | None]:
    """A callback `(n, total, status="")` drawing a bar on stderr if it is a terminal, else None.

    `status` (a loss, a rate) is shown after the label."""
    if not sys.stderr.isatty():
        yield None
        return
    bars: list = []

    def update(n: int, total: int, status: str = "") -> None:
        if not bars:
            bars.append(click.progressbar(length=total, label=label, file=sys.stderr))
            bars[0].__enter__()
        bars[0].label = f"{label} {status}".strip()
        bars[0].update(n)

    try:
        yield update
    finally:
        if bars:
            bars[0].__exit__(None, None, None)


def model_option(f: Callable) -> Callable:
    return click.option(
        "--model",
        "bundle",
        type=click.Path(path_type=str),
        help="Model bundle directory (scgpt-train export) [default: the default model, "
        "docs/default-model.md]",
    )(f)


def gene_fraction_option(f: Callable) -> Callable:
    return click.option(
        "--min-gene-fraction",
        type=click.FloatRange(0, 1),
        default=0.5,
        show_default=True,
        help="Fail when fewer of the possible genes (of the file or of the vocabulary, "
        "whichever has fewer) match.",
    )(f)


def run_options(f: Callable) -> Callable:
    """Options of the commands that run the model (annotate, embed), in help order."""
    shown = [
        click.option(
            "--device",
            type=click.Choice(DEVICES),
            default="auto",
            show_default=True,
            help="auto: CUDA when its provider starts, else CPU (the log says which runs).",
        ),
        click.option(
            "--precision",
            type=click.Choice(("auto", *PRECISIONS)),
            default="auto",
            show_default=True,
            help="Graph precision; auto: fp16 on CUDA, int8 (else fp32) on CPU.",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            help="CPU threads running the model [default: all CPUs of this process]",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            help="Cells per graph call [default: 64 on CUDA, 16 on CPU; int8: 1]",
        ),
        click.option(
            "--block-size",
            type=click.IntRange(min=1),
            default=pipeline.BLOCK_SIZE,
            show_default=True,
            help="Cells read and tokenized at a time (memory).",
        ),
        click.option(
            "--shard",
            metavar="I/N",
            help="Process the I-th of N equal parts of the cells (1 <= I <= N) into a .part "
            "file for scgpt-run merge.",
        ),
        gene_fraction_option,
        input_options,
        click.option("--overwrite", is_flag=True, help="Replace an existing output file."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
    ]
    for decorator in reversed(shown):
        f = decorator(f)
    return f


def inplace_option(f: Callable) -> Callable:
    return click.option(
        "--inplace", is_flag=True, help="Write the results into FILE (.h5ad) instead of --out."
    )(f)


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


@cli.command(
    epilog="""\b
Examples:
  scgpt-run annotate pbmc.h5ad --out pbmc_scgpt.h5ad              # the default model
  scgpt-run annotate pbmc.h5ad --model bundles/pbmc --out pbmc_scgpt.h5ad
  scgpt-run annotate pbmc.h5ad --model bundles/pbmc --out labels.csv --top-k 3
  scgpt-run annotate pbmc.h5ad --model bundles/pbmc --inplace --prefix scgpt_
  scgpt-run annotate filtered_feature_bc_matrix.h5 --model bundles/pbmc > labels.csv
  scgpt-run annotate big.h5ad --model bundles/pbmc --shard 2/8 --out big.2.part"""
)
@model_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    help="Results file: .csv, .tsv or .h5ad [default: CSV on stdout]",
)
@inplace_option
@click.option(
    "--prefix", default="scgpt_", show_default=True, help="Prefix of the obs columns in .h5ad."
)
@click.option(
    "--top-k",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also give the K most probable labels and their probabilities.",
)
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
    """Predict the cell type of every cell of FILE (.h5ad or 10x .h5).

    Per cell: the predicted label, its probability (conf_score), the number of genes the
    model saw (n_genes; 0 means no gene of the cell is in the vocabulary), and with --top-k the
    K most probable labels. CSV/TSV rows are keyed by cell barcode, in file order. An .h5ad
    output is a copy of FILE (or, for a 10x FILE, a new file) with the obs columns
    {prefix}predicted_labels, {prefix}conf_score and {prefix}n_genes, the L2-normalised
    embedding in obsm["X_scGPT"] and the provenance in uns["scGPT"]; --inplace writes them
    into FILE itself (atomically: an interruption leaves FILE as it was).
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


@cli.command(
    epilog="""\b
Examples:
  scgpt-run embed pbmc.h5ad --model bundles/pbmc --out pbmc_emb.npy
  scgpt-run embed pbmc.h5ad --model bundles/pbmc --out pbmc_scgpt.h5ad
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
    """Embed every cell of FILE (.h5ad or 10x .h5): one row per cell, in file order.

    The embedding is the model's <cls> output, L2-normalised as in the official scGPT
    zero-shot pipeline (--raw: as the model gives it). .npy: a (cells, d) float32 array;
    .csv/.tsv: the cell barcode then d columns; .h5ad: obsm["X_scGPT"] in a copy of FILE (or a
    new file for a 10x FILE), or in FILE itself with --inplace.
    """
    _serve("embed", file, bundle, out, inplace, shard, as_json, no_raw, raw=raw, **options)


@cli.command(
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
    held-out metrics. Checks every checksum."""
    report = bundle_info(bundle_or_default(bundle))
    if as_json:
        click.echo(json.dumps(report))
        return
    m = report["model"]
    click.echo(f"bundle:         {report['bundle']} (format {report['format_version']})")
    click.echo(f"sha256:         {report['bundle_sha256']}")
    click.echo(
        f"model:          {report['parameters']:,} parameters, d_model {m['d_model']}, "
        f"{m['n_layer']} layers, {m['n_head']} heads"
    )
    panel = f", gene panel of {report['gene_panel']}" if report["gene_panel"] else ""
    click.echo(f"vocabulary:     {report['vocab_size']} tokens{panel}")
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
        click.echo(
            f"evaluated:      macro-F1 {e['macro_f1']}, accuracy {e['accuracy']} on "
            f"{e['n_cells']} cells of {', '.join(e['data'])}{where} ({e['precision']})"
        )


@cli.command(
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


@cli.command(
    epilog="""\b
Examples:
  scgpt-run inspect pbmc.h5ad
  scgpt-run inspect filtered_feature_bc_matrix.h5 --json
  scgpt-run inspect pbmc.h5ad --layer counts --gene-column gene_symbols
  scgpt-run inspect pbmc.h5ad --model bundles/pbmc"""
)
@input_options
@model_option
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
    """Describe FILE (.h5ad or 10x .h5): format, matrix read, size, counts, gene column.

    Counts come from raw/X when present, else X; --layer and --no-raw choose otherwise.
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
        if key == "gene_match":
            click.echo("gene_match:")
            for sub, v in value.items():
                v = ", ".join(v) if isinstance(v, list) else v
                click.echo(f"  {sub + ':':18}{v}")
            continue
        click.echo(f"{key + ':':16}{value}")


def main() -> None:
    cli(prog_name="scgpt-run")
