"""`scgpt-train pretrain` and `import-scgpt`: a model from unlabelled cells, or from an official
checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from scgpt_runtime.cli.common import check_where, progress_bar

from ..checkpoint import latest_checkpoint
from ..config import LR_HELP
from ..model import PRESETS
from ..official import import_scgpt as run_import
from ..pretrain import PretrainConfig, resumed_config
from ..pretrain import pretrain as run_pretrain
from .common import expand_data, load_config_file, merged_config, option

log = logging.getLogger("scgpt_train")


@click.command(
    epilog="""\b
Examples:
  scgpt-train pretrain --data ../shared/data/unlabelled --out runs/pre --max-steps 2000
  scgpt-train pretrain --data a.h5ad --data b.h5 --out runs/pre --preset base --batch-size 64
  scgpt-train pretrain --data ../shared/data/unlabelled --out runs/pre \\
      --probe-data kang.h5ad --probe-label-key cell_type --probe-where condition=control
  scgpt-train pretrain --out runs/pre --resume
  torchrun --nproc-per-node 4 -m scgpt_train.cli pretrain --data corpus/ --out runs/pre"""
)
@click.option(
    "--data",
    multiple=True,
    help="A .h5ad, .h5mu or 10x .h5 file, a 10x mtx folder, a folder of files, or a quoted "
    "glob; repeatable (required unless --resume, which takes the run's own).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@option(PretrainConfig, "preset", type=click.Choice(sorted(PRESETS)))
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
    help="vocab.json, or a .h5ad/.h5 file whose genes make the vocabulary "
    "[default: every gene name in the data]",
)
@click.option("--gene-column", help="var column with gene names [default: best match]")
@option(PretrainConfig, "max_steps", type=int)
@option(
    PretrainConfig,
    "batch_size",
    type=int,
    help="Cells per step over all processes.",
)
@option(PretrainConfig, "grad_accum", type=int)
@option(PretrainConfig, "lr", type=float, help=LR_HELP)
@option(PretrainConfig, "warmup_steps", type=int)
@option(
    PretrainConfig,
    "mlm_weight",
    type=float,
    help="Weight of the masked-value objective on observed genes (0 = off).",
)
@option(
    PretrainConfig,
    "unexpressed_ratio",
    type=float,
    help="Genes that other cells of the batch express and a cell does not, queried with the "
    "target 0, per generated gene (0 = off, the official objective).",
)
@option(
    PretrainConfig,
    "ecs_weight",
    type=float,
    help="Weight of elastic cell similarity (the official ECS term) on the cell embeddings "
    "(0 = off).",
)
@option(
    PretrainConfig,
    "nonzero_weight",
    type=float,
    help="Weight of the explicit-zero heads' loss, P(value > 0) of each generated gene "
    "(models configured with explicit_zero).",
)
@option(
    PretrainConfig,
    "contrast_weight",
    type=float,
    help="Weight of InfoNCE between the cell embeddings of a cell's observed and generated "
    "genes (0 = off).",
)
@option(PretrainConfig, "val_fraction", type=float)
@option(PretrainConfig, "eval_every", type=int)
@click.option(
    "--probe-data",
    multiple=True,
    help="Labelled cells to probe the cell embedding with at every evaluation: the "
    "leave-one-out 10-NN macro-F1 and the mean cosine, logged in metrics.jsonl; repeatable.",
)
@click.option("--probe-label-key", help="obs column with the probe cells' labels.")
@click.option(
    "--probe-where",
    multiple=True,
    callback=check_where,
    help="COL=VALUE filter of --probe-data; repeatable.",
)
@option(PretrainConfig, "checkpoint_every", type=int)
@option(PretrainConfig, "seed", type=int)
@option(PretrainConfig, "device", help="auto, cpu, cuda or cuda:N")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue RUN from its latest checkpoint, with the data and settings it was started "
    "with (given options that differ are named, not used).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run at --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
@click.pass_context
def pretrain(
    ctx: click.Context,
    data: tuple[str, ...],
    config_file: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Generative pretraining (GEP + GEPC) on unlabelled cells.

    Builds a gene vocabulary from the data (or takes --vocab), streams cells from all files in
    shuffled windows, trains with Adam, warm-up then cosine decay, gradient clipping, and bf16
    on GPU. The run directory gets weights (safetensors), config.json, vocab.json,
    metrics.jsonl and resumable checkpoints. Under torchrun each process trains on its slice of
    every global batch (DistributedDataParallel).
    """
    file_config = load_config_file(config_file)
    if options["resume"]:
        given = {
            k: v
            for k, v in options.items()
            if ctx.get_parameter_source(k) != ParameterSource.DEFAULT
        }
        given |= file_config | ({"data": expand_data(data)} if data else {})
        cfg, differ = resumed_config(options["out"], given)
        if differ:
            log.warning(
                "--resume continues %s with the settings it was started with; these "
                "given options differ and are not used: %s",
                cfg.out,
                ", ".join(differ),
            )
    elif not data:
        raise click.UsageError("Missing option '--data'.")
    else:
        cfg = merged_config(PretrainConfig, ctx, file_config, data=expand_data(data), **options)
    try:
        with progress_bar("Pretraining") as progress:
            result = run_pretrain(cfg, progress)
    except KeyboardInterrupt:
        ckpt = latest_checkpoint(Path(cfg.out))
        log.error(
            "stopped: --resume continues %s from %s",
            cfg.out,
            ckpt or "the start (no checkpoint was written yet)",
        )
        raise
    if as_json:
        click.echo(json.dumps(result))


@click.command(
    "import-scgpt",
    epilog="""\b
Examples:
  scgpt-train import-scgpt scGPT_human/ --out runs/scgpt_human
  scgpt-train import-scgpt scGPT_human/ --out runs/scgpt_human --json""",
)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run at --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
def import_scgpt(folder: str, out: str, overwrite: bool, as_json: bool) -> None:
    """Import an official scGPT model folder (best_model.pt, args.json, vocab.json).

    Accepts the released flash-attention names (Wqkv), torch's in_proj names, the newer
    `_impl.` wrapper, DDP's `module.` prefix, old input BatchNorm keys and fine-tuned heads.
    Tensors that do not fit are reported, never dropped silently. The pickle is loaded with
    weights_only=True: a file that would run code is refused.
    """
    report = run_import(folder, out, overwrite)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(report.summary())
