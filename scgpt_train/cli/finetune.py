"""`scgpt-train finetune annotate`, `integrate` and `multiomic`: a cell-type head, batch
integration, or a model of several modalities, trained from a run or from scratch."""

from __future__ import annotations

from typing import Any

import click

from scgpt_runtime.cli.common import EXIT_CODES

from ..finetune import CLASS_WEIGHTS, FREEZE, AnnotateConfig, finetune_annotate
from ..integrate import IntegrateConfig, finetune_integrate
from ..multiomic import MultiomicConfig, finetune_multiomic
from .common import echo_summary, finetune_config, option, start_options


@click.group(epilog=EXIT_CODES)
def finetune() -> None:
    """Fine-tune a run for cell-type annotation, batch integration or multi-omics."""


@finetune.command(
    epilog="""\b
Examples:
  scgpt-train finetune annotate --from runs/pre --data pbmc.h5ad --label-key cell_type \\
      --out runs/pbmc-annot
  scgpt-train finetune annotate --from runs/pre --data kang.h5ad --label-key cell_type \\
      --where condition=control --out runs/kang-annot --json
  scgpt-train finetune annotate --from-scratch --preset small --data a.h5ad \\
      --label-key cell_type --out runs/scratch --epochs 50 --patience 10"""
)
@start_options(AnnotateConfig)
@click.option("--label-key", required=True, help="obs column with the cell-type labels.")
@click.option("--batch-key", help="obs column with batches: adds DSBN (batch-pure minibatches).")
@option(
    AnnotateConfig,
    "dropout",
    type=float,
    help="Dropout while fine-tuning (the official 0.2 held the small model back).",
)
@option(
    AnnotateConfig,
    "freeze",
    type=click.Choice(FREEZE),
    help="Keep fixed: nothing, the gene/value encoders, or all but the classifier.",
)
@option(
    AnnotateConfig,
    "class_weight",
    type=click.Choice(CLASS_WEIGHTS),
    help="'balanced' weights each class by n / (C * n_class).",
)
@option(
    AnnotateConfig,
    "val_fraction",
    type=float,
    help="Stratified validation share; early stopping on its macro-F1.",
)
@option(
    AnnotateConfig,
    "patience",
    type=int,
    help="Epochs without a better validation macro-F1 before stopping.",
)
@click.pass_context
def annotate(
    ctx: click.Context,
    data: tuple[str, ...],
    config_file: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Fine-tune a cell-type classifier on labelled cells.

    Starts from a run (--from: its vocabulary, tokenization and weights; new heads start fresh)
    or from scratch. Trains with cross-entropy on the cells that have a label (missing labels
    are left out of the loss), keeps the epoch with the best validation macro-F1, and writes a
    run whose config.json holds the class names in output order.
    """
    cfg = finetune_config(AnnotateConfig, ctx, data, config_file, **options)
    summary = finetune_annotate(cfg)
    echo_summary(
        summary,
        as_json,
        f"{cfg.out}: best epoch {summary['best_epoch']}, "
        f"validation macro-F1 {summary['val_macro_f1']}",
    )


@finetune.command(
    epilog="""\b
Examples:
  scgpt-train finetune integrate --from runs/pre --data kang.h5ad --batch-key condition \\
      --out runs/kang-int
  scgpt-train finetune integrate --from runs/pre --data a.h5ad --data b.h5ad \\
      --batch-key batch --out runs/ab --ecs-weight 10 --dab-weight 1 --epochs 15"""
)
@start_options(IntegrateConfig)
@click.option("--batch-key", required=True, help="obs column with the batch of each cell.")
@option(IntegrateConfig, "mask_ratio", type=float)
@option(IntegrateConfig, "gep_weight", type=float)
@option(IntegrateConfig, "gepc_weight", type=float)
@option(IntegrateConfig, "ecs_weight", type=float)
@option(IntegrateConfig, "ecs_threshold", type=float)
@option(
    IntegrateConfig,
    "dab_weight",
    type=float,
    help="Batch discriminator behind gradient reversal (0 = off).",
)
@option(
    IntegrateConfig,
    "dsbn",
    "--dsbn/--no-dsbn",
    help="Per-batch BatchNorm with batch-pure minibatches.",
)
@option(IntegrateConfig, "batch_tokens", "--batch-tokens/--no-batch-tokens")
@click.pass_context
def integrate(
    ctx: click.Context,
    data: tuple[str, ...],
    config_file: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Fine-tune for batch integration (GEP + GEPC + ECS + DAB, DSBN, batch tokens).

    The official recipe: masked gene values (ratio 0.4, mask value -1) predicted per gene and
    from the cell embedding, elastic cell similarity (weight 10, threshold 0.8), a batch
    discriminator behind gradient reversal, per-batch BatchNorm trained on minibatches of one
    batch, and batch tokens in the decoders. No labels are used.
    """
    cfg = finetune_config(IntegrateConfig, ctx, data, config_file, **options)
    summary = finetune_integrate(cfg)
    echo_summary(
        summary, as_json, f"{cfg.out}: {summary['epoch']} epochs, loss {summary.get('loss')}"
    )


def _modality_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if len(names) < 2:
        raise click.BadParameter("name at least two modalities, e.g. rna,adt")
    return names


@finetune.command(
    epilog="""\b
Examples:
  scgpt-train finetune multiomic --from runs/pre --data cite.h5mu --modalities rna,adt \\
      --out runs/cite
  scgpt-train finetune multiomic --from runs/pre --data pbmc_10k_protein.h5 \\
      --modalities rna,adt --out runs/pbmc-cite --json
  scgpt-train finetune multiomic --from runs/pre --data multiome.h5mu --modalities rna,atac \\
      --batch-key sample --out runs/multiome"""
)
@start_options(MultiomicConfig)
@click.option(
    "--modalities",
    required=True,
    callback=_modality_list,
    help="The file's modalities to model, comma-separated: one of genes (rna), and proteins "
    "(adt, prot) or peaks (atac). A 10x file's are its feature types: rna, adt, atac.",
)
@click.option("--batch-key", help="obs column with batches: adds DAB and batch tokens.")
@option(MultiomicConfig, "mask_ratio", type=float)
@option(MultiomicConfig, "gep_weight", type=float)
@option(MultiomicConfig, "gepc_weight", type=float)
@option(
    MultiomicConfig,
    "dab_weight",
    type=float,
    help="Batch discriminator behind gradient reversal, with --batch-key (0 = off).",
)
@option(
    MultiomicConfig,
    "mod_input",
    "--mod-input/--no-mod-input",
    help="Also add the modality embedding to the input tokens (default: decoders only, as "
    "official).",
)
@click.pass_context
def multiomic(
    ctx: click.Context,
    data: tuple[str, ...],
    config_file: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Fine-tune a model of RNA with proteins (CITE-seq) or chromatin peaks (Multiome).

    Reads a .h5mu file (or a 10x .h5 / mtx folder with several feature types). Every
    modality's features are tokens of their own namespace, binned per modality per cell;
    a modality embedding joins the decoders; GEP + GEPC on masked values (ratio 0.4), and DAB
    with --batch-key. Gene embeddings come from --from; protein and peak embeddings start
    fresh. No labels are used. Export the run and embed with `scgpt-run embed FILE.h5mu`.
    """
    cfg = finetune_config(MultiomicConfig, ctx, data, config_file, **options)
    summary = finetune_multiomic(cfg)
    echo_summary(
        summary, as_json, f"{cfg.out}: {summary['epoch']} epochs, loss {summary.get('loss')}"
    )
