"""`scgpt-train export`: the export command, added to the `scgpt-train` group.

Imports point one way (export -> scgpt_train -> scgpt_runtime), so scgpt_train cannot import
this package to register the command. Instead this module takes the `scgpt-train` click group,
adds `export` to it, and pyproject.toml points the `scgpt-train` script at `main` here: every
scgpt-train command is available, and scgpt_train stays free of onnx and onnxruntime.
"""

from __future__ import annotations

import json
import logging

import click

from scgpt_runtime.bundle import PRECISIONS
from scgpt_runtime.cli.common import option
from scgpt_runtime.session import PROVIDERS
from scgpt_train.cli import cli

from .run import export_run
from .to_onnx import OPSETS


@cli.command(
    epilog="""\b
Examples:
  scgpt-train export runs/pbmc --out bundles/pbmc
  scgpt-train export runs/pbmc --out bundles/pbmc --precision fp32 --precision int8
  scgpt-train export runs/scgpt_human --out bundles/human --validation-data pbmc.h5ad \\
      --max-len 1200 --max-len 512 --max-len 256 --precision fp16 --precision int8
  scgpt-train export runs/pbmc --out bundles/pbmc --overwrite --json"""
)
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option(
    "--max-len",
    type=click.IntRange(min=2),
    multiple=True,
    help="A length cells are served at (tokens, <cls> included); repeatable: short cells run "
    "cheaper at a short length, the longest sets the bundle's max_seq_len [default: up to 5 "
    "lengths up to the run's max_seq_len, chosen from the token counts of the validation "
    "cells]",
)
@option(
    export_run,
    "precisions",
    "--precision",
    type=click.Choice(PRECISIONS),
    multiple=True,
    help="fp32 (reference), fp16 (GPU), int8 (dynamic quantization, CPU); repeatable. A "
    "precision that misses its tolerance is left out with a warning.",
)
@click.option(
    "--validation-data",
    type=click.Path(exists=True, dir_okay=False),
    help="Count file with real cells to validate on [default: the run's training data]",
)
@option(export_run, "validation_cells", type=click.IntRange(min=1))
@option(
    export_run,
    "device",
    type=click.Choice(sorted(PROVIDERS)),
    help="Where onnxruntime runs the graphs for validation.",
)
@option(export_run, "opset", type=click.IntRange(min(OPSETS), max(OPSETS)))
@click.option(
    "--no-fuse", is_flag=True, help="Keep attention as plain ONNX ops (no com.microsoft)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
def export(
    run: str,
    out: str,
    max_len: tuple[int, ...],
    precision: tuple[str, ...],
    validation_data: str | None,
    validation_cells: int,
    device: str,
    opset: int,
    no_fuse: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Export the model of run directory RUN as a model bundle for scgpt-run.

    Writes one ONNX graph per precision (by default fp32, fp16 for GPUs and int8 for CPUs),
    served at each length of a ladder chosen from the cells (or --max-len), the vocabulary
    and labels (safetensors) and config.json with preprocessing, provenance and the sha256 of
    every file (format: docs/bundle-format.md). Every graph is checked at every length against
    PyTorch on real cells (the first --validation-cells cells of the run's training data or of
    --validation-data, a cell with <cls> alone, a full-length cell) and held to its tolerance:
    fp32 max abs error 1e-4 on the embeddings, fp16 cosine 0.999, int8 cosine 0.99 and top-1
    class agreement 99%. A precision that misses it is left out with a warning; where none
    is left the export fails and writes nothing.
    """
    _quiet_libraries()
    summary = export_run(
        run,
        out,
        max_lens=max_len or None,
        precisions=tuple(dict.fromkeys(precision)),
        validation_data=validation_data,
        validation_cells=validation_cells,
        device=device,
        opset=opset,
        fuse_attention=not no_fuse,
        overwrite=overwrite,
    )
    if as_json:
        click.echo(json.dumps(summary))
        return
    for v in summary["variants"]:
        errors = ", ".join(f"{k} {x:.6g}" for k, x in v["errors"].items())
        click.echo(f"{v['precision']} at {v['max_seq_len']} tokens: {errors}")
    for precision, why in summary["left_out"].items():
        click.echo(f"{precision}: left out ({why})")
    for name, size in summary["graphs"].items():
        click.echo(f"{name}: {size / 1e6:.1f} MB")
    click.echo(f"wrote {summary['bundle']}")


def _quiet_libraries() -> None:
    """At the default level, keep third-party logs out of stderr: onnxscript logs every rewrite
    at INFO, the onnxruntime quantizer every tensor (on the root logger) and torch.onnx missing
    optional packages; -v shows them all."""
    root = logging.getLogger()
    if root.level == logging.INFO:
        root.setLevel(logging.ERROR)
        for name in ("scgpt_export", "scgpt_train", "scgpt_runtime"):
            logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # has its own handler


def main() -> None:
    cli(prog_name="scgpt-train")
