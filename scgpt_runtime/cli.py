"""`scgpt-run`: annotate and embed cells with an exported scGPT model bundle."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from .errors import ScgptError
from .inspection import inspect as inspect_file

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


@click.group(
    cls=ScgptGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES
)
@click.version_option(package_name="scgpt-deploy")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Log errors only.")
def cli(verbose: bool, quiet: bool) -> None:
    """Annotate and embed single cells with scGPT, on GPU when there is one."""
    configure_logging(verbose, quiet)


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


@cli.command(
    epilog="""\b
Examples:
  scgpt-run inspect pbmc.h5ad
  scgpt-run inspect filtered_feature_bc_matrix.h5 --json
  scgpt-run inspect pbmc.h5ad --layer counts --gene-column gene_symbols"""
)
@input_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect(
    file: str,
    layer: str | None,
    no_raw: bool,
    genome: str | None,
    gene_column: str | None,
    as_json: bool,
) -> None:
    """Describe FILE (.h5ad or 10x .h5): format, matrix read, size, counts, gene column.

    Counts come from raw/X when present, else X; --layer and --no-raw choose otherwise.
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
    if as_json:
        click.echo(json.dumps(report))
        return
    for key, value in report.items():
        if key == "obs_columns":
            value = ", ".join(value) or "(none)"
        click.echo(f"{key + ':':16}{value}")


def main() -> None:
    cli(prog_name="scgpt-run")
