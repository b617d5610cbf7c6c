"""`scgpt-train`: pretrain, fine-tune and import scGPT models (export: see scgpt_export.cli)."""

from __future__ import annotations

import glob
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from scgpt_runtime.cli import EXIT_CODES, command_group, progress_bar
from scgpt_runtime.errors import InputError

from .evaluate import EvaluateConfig
from .evaluate import evaluate as run_evaluate
from .finetune import CLASS_WEIGHTS, FREEZE, AnnotateConfig
from .finetune import annotate as run_annotate
from .integrate import IntegrateConfig
from .integrate import integrate as run_integrate
from .metrics import VOTES
from .model import PRESETS
from .official import import_scgpt as run_import
from .pretrain import PretrainConfig
from .pretrain import pretrain as run_pretrain

DATA_SUFFIXES = (".h5ad", ".h5")


cli = command_group(
    "Train scGPT models with PyTorch: pretrain, fine-tune, import official checkpoints."
)


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
    help="vocab.json, or a .h5ad/.h5 file whose genes make the vocabulary "
    "[default: every gene name in the data]",
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


# ---------------------------------------------------------------------------- fine-tuning


def start_options(f: Any) -> Any:
    """Options every fine-tuning command shares: where it starts, data, output, run settings."""
    for decorator in reversed([
        click.option("--from", "from_run", type=click.Path(exists=True, file_okay=False),
                     help="Run directory to start from (pretrained, imported or fine-tuned)."),
        click.option("--from-scratch", is_flag=True,
                     help="Start from random weights of --preset instead of a run."),
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default="small",
                     show_default=True, help="Model size with --from-scratch."),
        click.option("--data", multiple=True, required=True,
                     help="A .h5ad or 10x .h5 file, a folder of them, or a quoted glob; "
                     "repeatable."),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Run directory to write."),
        click.option("--where", multiple=True,
                     help="COL=VALUE: use only cells whose obs COL equals VALUE; repeatable."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="JSON with any of these settings (and 'model'/'tokens' overrides); "
                     "options given here win."),
        click.option("--gene-column", help="var column with gene names [default: best match]"),
        click.option("--epochs", type=int, default=None,
                     help="Passes over the training cells [default: annotate 10, integrate 15]."),
        click.option("--batch-size", type=int, default=32, show_default=True),
        click.option("--lr", type=float, default=1e-4, show_default=True),
        click.option("--lr-decay", type=float, default=0.9, show_default=True,
                     help="Learning-rate factor per epoch (official schedule)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N"),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]):  # fmt: skip
        f = decorator(f)
    return f


def _finetune_config(cls: type, ctx: click.Context, data: tuple[str, ...],
                     config_file: str | None, **options: Any) -> Any:  # fmt: skip
    if options.get("epochs") is None:
        options.pop("epochs")  # the config's own default (annotate 10, integrate 15)
    return merged_config(cls, ctx, load_config_file(config_file), data=expand_data(data),
                         **options)  # fmt: skip


def _echo_summary(summary: dict[str, Any], as_json: bool, line: str) -> None:
    click.echo(json.dumps(summary) if as_json else line)


@cli.group(epilog=EXIT_CODES)
def finetune() -> None:
    """Fine-tune a run for cell-type annotation or batch integration."""


@finetune.command(
    epilog="""\b
Examples:
  scgpt-train finetune annotate --from runs/pre --data pbmc.h5ad --label-key cell_type \\
      --out runs/pbmc-annot
  scgpt-train finetune annotate --from runs/pre --data kang.h5ad --label-key cell_type \\
      --where condition=control --out runs/kang-annot --class-weight balanced --json
  scgpt-train finetune annotate --from-scratch --preset small --data a.h5ad \\
      --label-key cell_type --out runs/scratch --epochs 20 --lr 1e-3"""
)
@start_options
@click.option("--label-key", required=True, help="obs column with the cell-type labels.")
@click.option("--batch-key", help="obs column with batches: adds DSBN (batch-pure minibatches).")
@click.option(
    "--freeze",
    type=click.Choice(FREEZE),
    default="none",
    show_default=True,
    help="Keep fixed: nothing, the gene/value encoders, or all but the classifier.",
)
@click.option(
    "--class-weight",
    type=click.Choice(CLASS_WEIGHTS),
    default="none",
    show_default=True,
    help="'balanced' weights each class by n / (C * n_class).",
)
@click.option(
    "--val-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Stratified validation share; early stopping on its macro-F1.",
)
@click.option(
    "--patience",
    type=int,
    default=3,
    show_default=True,
    help="Epochs without a better validation macro-F1 before stopping.",
)
@click.pass_context
def annotate(ctx: click.Context, data: tuple[str, ...], config_file: str | None,
             as_json: bool, **options: Any) -> None:  # fmt: skip
    """Fine-tune a cell-type classifier on labelled cells.

    Starts from a run (--from: its vocabulary, tokenization and weights; new heads start fresh)
    or from scratch. Trains with cross-entropy on the cells that have a label (missing labels
    are left out of the loss), keeps the epoch with the best validation macro-F1, and writes a
    run whose config.json holds the class names in output order.
    """
    cfg = _finetune_config(AnnotateConfig, ctx, data, config_file, **options)
    summary = run_annotate(cfg)
    _echo_summary(summary, as_json, f"{cfg.out}: best epoch {summary['best_epoch']}, "
                  f"validation macro-F1 {summary['val_macro_f1']}")  # fmt: skip


@finetune.command(
    epilog="""\b
Examples:
  scgpt-train finetune integrate --from runs/pre --data kang.h5ad --batch-key condition \\
      --out runs/kang-int
  scgpt-train finetune integrate --from runs/pre --data a.h5ad --data b.h5ad \\
      --batch-key batch --out runs/ab --ecs-weight 10 --dab-weight 1 --epochs 15"""
)
@start_options
@click.option("--batch-key", required=True, help="obs column with the batch of each cell.")
@click.option("--mask-ratio", type=float, default=0.4, show_default=True)
@click.option("--gep-weight", type=float, default=1.0, show_default=True)
@click.option("--gepc-weight", type=float, default=1.0, show_default=True)
@click.option("--ecs-weight", type=float, default=10.0, show_default=True)
@click.option("--ecs-threshold", type=float, default=0.8, show_default=True)
@click.option(
    "--dab-weight",
    type=float,
    default=1.0,
    show_default=True,
    help="Batch discriminator behind gradient reversal (0 = off).",
)
@click.option(
    "--dsbn/--no-dsbn",
    default=True,
    show_default=True,
    help="Per-batch BatchNorm with batch-pure minibatches.",
)
@click.option("--batch-tokens/--no-batch-tokens", default=True, show_default=True)
@click.pass_context
def integrate(ctx: click.Context, data: tuple[str, ...], config_file: str | None,
              as_json: bool, **options: Any) -> None:  # fmt: skip
    """Fine-tune for batch integration (GEP + GEPC + ECS + DAB, DSBN, batch tokens).

    The official recipe: masked gene values (ratio 0.4, mask value -1) predicted per gene and
    from the cell embedding, elastic cell similarity (weight 10, threshold 0.8), a batch
    discriminator behind gradient reversal, per-batch BatchNorm trained on minibatches of one
    batch, and batch tokens in the decoders. No labels are used.
    """
    cfg = _finetune_config(IntegrateConfig, ctx, data, config_file, **options)
    summary = run_integrate(cfg)
    _echo_summary(summary, as_json, f"{cfg.out}: {summary['epoch']} epochs, loss "
                  f"{summary.get('loss')}")  # fmt: skip


@cli.command(
    epilog="""\b
Examples:
  scgpt-train evaluate --from runs/kang-annot --data kang.h5ad --label-key cell_type \\
      --where condition=stimulated
  scgpt-train evaluate --from runs/pre --data kang.h5ad --where condition=stimulated \\
      --reference kang.h5ad --reference-where condition=control --label-key cell_type
  scgpt-train evaluate --from runs/kang-int --data kang.h5ad --label-key cell_type \\
      --batch-key condition --json
  scgpt-train evaluate --bundle bundles/pbmc --data kang.h5ad --label-key cell_type \\
      --where condition=stimulated --record"""
)
@click.option(
    "--from",
    "run",
    type=click.Path(exists=True, file_okay=False),
    help="Run directory to evaluate (PyTorch).",
)
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False),
    help="Or a model bundle: its cell-type head as scgpt-run serves it (onnxruntime, CPU).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "int8"]),
    default="auto",
    show_default=True,
    help="With --bundle: the graphs to run (auto: int8 if the bundle has it, else fp32).",
)
@click.option(
    "--record",
    is_flag=True,
    help="With --bundle: store the metrics in the bundle's config.json (its model card data).",
)
@click.option("--data", multiple=True, required=True, help="Labelled cells; repeatable.")
@click.option("--label-key", required=True, help="obs column with the true labels.")
@click.option("--where", multiple=True, help="COL=VALUE filter of --data; repeatable.")
@click.option("--batch-key", help="obs column with batches: integration metrics.")
@click.option(
    "--reference",
    multiple=True,
    help="Labelled reference cells: kNN label transfer (zero-shot); repeatable.",
)
@click.option("--reference-where", multiple=True, help="COL=VALUE filter of --reference.")
@click.option("--k", type=int, default=10, show_default=True, help="Neighbours for kNN.")
@click.option("--vote", type=click.Choice(VOTES), default="majority", show_default=True)
@click.option(
    "--unknown-threshold",
    type=float,
    help="Label cells 'unknown' below this confidence [default: off].",
)
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option("--predictions", type=click.Path(dir_okay=False), help="Write per-cell CSV here.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of k-means.")
@click.option("--json", "as_json", is_flag=True, help="Print all metrics as JSON.")
def evaluate(data: tuple[str, ...], reference: tuple[str, ...], as_json: bool,
             **options: Any) -> None:  # fmt: skip
    """Score a run or a bundle on labelled cells: classifier, kNN transfer, integration.

    With a classifier head: accuracy, macro-F1, per-class F1 and confusion matrix of its
    predictions. With --reference: the same for labels transferred by k nearest neighbours on
    L2-normalised cell embeddings (any run, no fine-tuning). With --batch-key: NMI and ARI of
    k-means clusters, label and batch silhouettes, graph connectivity, AvgBIO and AvgBATCH.
    With --bundle instead of --from: the classifier metrics of the exported graphs, exactly as
    scgpt-run annotate predicts; --record keeps them in the bundle.
    """
    try:
        cfg = EvaluateConfig(data=expand_data(data),
                             reference=expand_data(reference) if reference else [],
                             **options)  # fmt: skip
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    result = run_evaluate(cfg)
    if as_json:
        click.echo(json.dumps(result))
        return
    for name in ("classifier", "knn"):
        if name in result:
            m = result[name]
            click.echo(f"{name}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} "
                       f"({m['n_cells']} cells)")  # fmt: skip
    if "integration" in result:
        click.echo("integration: " + " ".join(f"{k} {v}" for k, v in result["integration"].items()))


def main() -> None:
    cli(prog_name="scgpt-train")


if __name__ == "__main__":  # torchrun -m scgpt_train.cli ...
    main()
