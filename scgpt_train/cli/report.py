"""`scgpt-train report`: an HTML report of a run directory."""

from __future__ import annotations

import json

import click

from scgpt_runtime.cli.common import EXIT_CODES
from scgpt_runtime.outputs import check_output
from scgpt_runtime.report import report_path, require


@click.command(
    epilog="""\b
Examples:
  scgpt-train report runs/pre --out pre.html
  scgpt-train report runs/kang-annot --out kang-annot.html --overwrite   # again, later
"""
    + EXIT_CODES
)
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The report (.html).")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def report(run: str, out: str, overwrite: bool, as_json: bool) -> None:
    """Write an HTML report of the run directory RUN: loss curves (every objective apart,
    train beside validation), learning rate, throughput, validation scores, the last logged
    values, the run's configuration and provenance. Works on a run that is still training:
    it shows what metrics.jsonl holds so far. Needs the [report] extra."""
    try:
        path = report_path(out, "--out")
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    require()
    check_output(path, overwrite=overwrite)
    from ..reports import run_report

    page = run_report(run)
    page.write(path)
    if as_json:
        click.echo(json.dumps({"run": run, "output": out, "sections": page.anchors()}))
    else:
        click.echo(f"wrote {out}")
