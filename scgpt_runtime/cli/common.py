"""What both command-line tools share: the group (logging flags, one-line errors, exit codes),
a progress bar, and the options of the commands that read data and run a model."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from .. import pipeline
from ..bundle import PRECISIONS
from ..errors import GeneMatchError, ScgptError, Terminated
from ..obs import parse_where
from ..session import DEVICES

EXIT_CODES = """\b
Exit codes:
  0  success
  1  internal error (a bug: please report it)
  2  usage error (bad options)
  3  input file error (missing, damaged, wrong format, invalid values)
  4  gene match error (too few genes match the model vocabulary)
  5  model bundle error
  6  output error (exists without --overwrite, not writable)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM) while writing: no partial output"""


class ScgptGroup(click.Group):
    """Turns every ScgptError into one line on stderr and its exit code, and an interrupt into
    130 (SIGINT) or 143 (SIGTERM): no tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ScgptError as e:
            click.echo(f"Error: {_one_line(str(e))}{_advice(e, self, ctx)}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            click.echo(f"Error: {'terminated' if terminated else 'interrupted'}", err=True)
            ctx.exit(143 if terminated else 130)


def _one_line(text: str) -> str:
    """Control characters (a damaged file's names) escaped: the message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _advice(e: ScgptError, group: click.Group, ctx: click.Context) -> str:
    """The options of the command that ran which could fix a gene match error."""
    command = group.get_command(ctx, ctx.invoked_subcommand or "")
    if not isinstance(e, GeneMatchError) or command is None:
        return ""
    options = {o for p in command.params for o in p.opts}
    hints = []
    others = [c for c in e.columns if e.match is None or c != e.match.column]
    if "--gene-column" in options and others:
        hints.append(f"--gene-column chooses another column ({', '.join(others[:6])})")
    # Accepting fewer genes helps a file that nearly matches, not one of another kind.
    if "--min-gene-fraction" in options and e.match is not None and e.match.fraction >= 0.1:
        hints.append("--min-gene-fraction accepts fewer")
    return f"; {'; '.join(hints)}" if hints else ""


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


def option(source: Callable, name: str, *decls: str, **kw: Any) -> Callable:
    """A click option for the parameter `name` of `source` (a library function or a config
    dataclass): its default, and the help's [default: ...], are the library's, never restated
    in a CLI."""
    default = inspect.signature(source).parameters[name].default
    flag = decls or (f"--{name.replace('_', '-')}",)
    return click.option(*flag, default=default, show_default=True, **kw)


def check_where(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]):
    """A click callback: malformed COL=VALUE filters are usage errors (exit 2)."""
    try:
        parse_where(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    return value


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
    return option(
        pipeline.serve,
        "min_gene_fraction",
        type=click.FloatRange(0, 1),
        help="Fail when fewer of the possible genes (of the file or of the vocabulary, "
        "whichever has fewer) match.",
    )(f)


def run_options(f: Callable) -> Callable:
    """Options of the commands that run the model (annotate, embed), in help order."""
    shown = [
        option(
            pipeline.serve,
            "device",
            type=click.Choice(DEVICES),
            help="auto: CUDA when its provider starts, else CPU (the log says which runs).",
        ),
        option(
            pipeline.serve,
            "precision",
            type=click.Choice(("auto", *PRECISIONS)),
            help="Graph precision; auto: fp16 on CUDA, int8 (else fp32) on CPU.",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            help="CPU threads running the model [default: OMP_NUM_THREADS, else all CPUs of "
            "this process]",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            help="Cells per graph call [default: 64 on CUDA, 16 on CPU; int8: 1]",
        ),
        option(
            pipeline.serve,
            "block_size",
            type=click.IntRange(min=1),
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


def report_options(f: Callable) -> Callable:
    """--report and --color-by, of the commands that serve a file."""
    f = click.option(
        "--color-by",
        multiple=True,
        metavar="COL",
        help="With --report: also colour the embedding map by this obs column; repeatable.",
    )(f)
    return click.option(
        "--report",
        type=click.Path(dir_okay=False, path_type=str),
        help="Also write a self-contained HTML report (gene match, labels, confidence, "
        "embedding map); needs the [report] extra.",
    )(f)


def inplace_option(f: Callable) -> Callable:
    return click.option(
        "--inplace", is_flag=True, help="Write the results into FILE (.h5ad) instead of --out."
    )(f)
