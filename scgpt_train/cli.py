"""`scgpt-train`: pretrain, fine-tune and import scGPT models (export: see scgpt_export.cli)."""

from __future__ import annotations

import glob
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from scgpt_runtime.cli import EXIT_CODES, ScgptGroup, configure_logging, progress_bar
from scgpt_runtime.errors import InputError

from .model import PRESETS
from .official import import_scgpt as run_import
from .pretrain import PretrainConfig
from .pretrain import pretrain as run_pretrain

DATA_SUFFIXES = (".h5ad", ".h5")


@click.group(
    cls=ScgptGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES
)
@click.version_option(package_name="scgpt-deploy")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Log errors only.")
def cli(verbose: bool, quiet: bool) -> None:
    """Train scGPT models with PyTorch: pretrain, fine-tune, import official checkpoints."""
    configure_logging(verbose, quiet)


def expand_data(values: tuple[str, ...]) -> list[str]:
    """Files, folders (their .h5ad and .h5 files) and quoted glob patterns, in order."""
    files: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        elif any(c in value for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(value))  # noqa: PTH207 (absolute patterns)
        else:
            found = [path]
        if not found:
            raise InputError(f"{value}: no .h5ad or .h5 file there")
        files += [str(p) for p in found]
    return files


def load_config_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise InputError(f"{path}: a config file holds one JSON object")
    return config


def merged_config(cls: type, ctx: click.Context, file_config: dict[str, Any], **values: Any):
    """A config dataclass from defaults < config file < options given on the command line."""
    known = {f.name for f in fields(cls)}
    unknown = set(file_config) - known
    if unknown:
        raise click.UsageError(f"unknown fields in --config: {', '.join(sorted(unknown))}")
    given = {
        k: v for k, v in values.items()
        if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT or k not in file_config
    }  # fmt: skip
    try:
        return cls(**{**file_config, **given})
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from e


@cli.command(
    epilog="""\b
Examples:
  scgpt-train pretrain --data ../shared/data/unlabelled --out runs/pre --max-steps 2000
  scgpt-train pretrain --data a.h5ad --data b.h5 --out runs/pre --preset base --batch-size 64
  scgpt-train pretrain --data a.h5ad --out runs/pre --resume
  torchrun --nproc-per-node 4 -m scgpt_train.cli pretrain --data corpus/ --out runs/pre"""
)
@click.option(
    "--data",
    multiple=True,
    required=True,
    help="A .h5ad or 10x .h5 file, a folder of them, or a quoted glob; repeatable.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="small", show_default=True)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON with any of these settings (and 'model'/'tokens' overrides); "
    "options given here win.",
)
@click.option(
    "--vocab",
    type=click.Path(exists=True, dir_okay=False),
    help="vocab.json to use [default: every gene name in the data]",
)
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option("--max-steps", type=int, default=1000, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=32,
    show_default=True,
    help="Cells per step over all processes.",
)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--warmup-steps", type=int, default=100, show_default=True)
@click.option(
    "--mlm-weight",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of the masked-value objective on observed genes (0 = off).",
)
@click.option("--val-fraction", type=float, default=0.05, show_default=True)
@click.option("--eval-every", type=int, default=100, show_default=True)
@click.option("--checkpoint-every", type=int, default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--resume", is_flag=True, help="Continue from the run's latest checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
@click.pass_context
def pretrain(ctx: click.Context, data: tuple[str, ...], config_file: str | None, as_json: bool,
             **options: Any) -> None:  # fmt: skip
    """Generative pretraining (GEP + GEPC) on unlabelled cells.

    Builds a gene vocabulary from the data (or takes --vocab), streams cells from all files in
    shuffled windows, trains with Adam, warm-up then cosine decay, gradient clipping, and bf16
    on GPU. The run directory gets weights (safetensors), config.json, vocab.json,
    metrics.jsonl and resumable checkpoints. Under torchrun each process trains on its slice of
    every global batch (DistributedDataParallel).
    """
    cfg = merged_config(
        PretrainConfig, ctx, load_config_file(config_file), data=expand_data(data), **options
    )
    with progress_bar("Pretraining") as progress:
        result = run_pretrain(cfg, progress)
    if as_json:
        click.echo(json.dumps(result))


@cli.command(
    "import-scgpt",
    epilog="""\b
Examples:
  scgpt-train import-scgpt scGPT_human/ --out runs/scgpt_human
  scgpt-train import-scgpt scGPT_human/ --out runs/scgpt_human --json""",
)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
def import_scgpt(folder: str, out: str, as_json: bool) -> None:
    """Import an official scGPT model folder (best_model.pt, args.json, vocab.json).

    Accepts the released flash-attention names (Wqkv), torch's in_proj names, the newer
    `_impl.` wrapper, DDP's `module.` prefix, old input BatchNorm keys and fine-tuned heads.
    Tensors that do not fit are reported, never dropped silently. The pickle is loaded with
    weights_only=True: a file that would run code is refused.
    """
    report = run_import(folder, out)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(report.summary())


def main() -> None:
    cli(prog_name="scgpt-train")


if __name__ == "__main__":  # torchrun -m scgpt_train.cli ...
    main()
