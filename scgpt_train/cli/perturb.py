"""`scgpt-train finetune perturb`, `perturb predict` and `perturb evaluate`: genetic
perturbation prediction from a control cell with the perturbed genes flagged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from scgpt_runtime.cli.common import EXIT_CODES, check_where, option

from ..perturb import PerturbConfig, cells_path, finetune_perturb, predict_perturbations
from ..perturb_evaluate import PerturbEvalConfig, evaluate_perturbation, format_table
from .common import echo_summary, finetune_config, start_options

KEY_HELP = "obs column with each cell's condition (GEARS style ctrl, GENE+ctrl, A+B; or names)."
CONTROL_HELP = "The control condition's label in that column."


@click.command(
    "perturb",
    epilog="""\b
Examples:
  scgpt-train finetune perturb --from runs/pre --data screen.h5ad \\
      --perturbation-key condition --control ctrl --exclude-target unassigned \\
      --exclude-target STAT1 --exclude-target JAK2 --out runs/perturb
  scgpt-train finetune perturb --from-scratch --data screen.h5ad --perturbation-key gene \\
      --control non-targeting --out runs/perturb-scratch --json""",
)
@start_options(PerturbConfig)
@click.option("--perturbation-key", required=True, help=KEY_HELP)
@option(PerturbConfig, "control", help=CONTROL_HELP)
@click.option(
    "--exclude-target",
    multiple=True,
    help="Leave out cells of this condition, or of every condition naming this gene "
    "(held-out targets; cells without a target such as 'unassigned'); repeatable.",
)
@option(PerturbConfig, "val_fraction", type=float, help="Share of conditions for early stopping.")
@option(PerturbConfig, "patience", type=int, help="Epochs without a better validation score.")
@option(PerturbConfig, "max_len", type=int, help="Tokens per input; longer panels are chunked.")
@click.pass_context
def finetune_perturb_command(
    ctx: click.Context,
    data: tuple[str, ...],
    config_file: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Fine-tune a model to predict perturbed expression from control cells.

    Each perturbed cell is paired with a random control cell (seeded); the control cell's
    genes go in with the condition's genes flagged, and the model predicts the perturbed
    cell's log1p(CP10k) value of every panel gene (MSE). A target outside the measured panel
    enters as an extra flagged token. Early stopping on held-out conditions (pearson of the
    predicted change from the control mean).
    """
    cfg = finetune_config(PerturbConfig, ctx, data, config_file, **options)
    summary = finetune_perturb(cfg)
    echo_summary(
        summary,
        as_json,
        f"{cfg.out}: best epoch {summary['best_epoch']}, validation pearson_delta "
        f"{summary['val_pearson_delta']} on {len(summary['val_conditions'])} conditions",
    )


@click.group(epilog=EXIT_CODES)
def perturb() -> None:
    """Predict and evaluate genetic perturbations with a `finetune perturb` run."""


@perturb.command(
    epilog="""\b
Examples:
  scgpt-train perturb predict --from runs/perturb --control controls.h5ad \\
      --target STAT1 --target STAT1+JAK2 --out pred.h5ad
  scgpt-train perturb predict --from runs/perturb --control screen.h5ad \\
      --where condition=ctrl --target IRF1 --n-cells 100 --out irf1.h5ad"""
)
@click.option("--from", "run", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--control",
    "control_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Control cells (.h5ad or 10x .h5) the predictions start from.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    required=True,
    help="Gene, or genes joined by '+' for a combination; repeatable.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--where", multiple=True, callback=check_where, help="COL=VALUE filter of --control.")
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option(
    "--n-cells",
    type=click.IntRange(min=1),
    help="Start from N control cells drawn at random and write the N predicted cells per "
    "target to PRED.cells.h5ad too [default: every control cell, means only].",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def predict(
    run: str, control_file: str, targets: tuple[str, ...], out: str, as_json: bool, **options: Any
) -> None:
    """Predict the mean expression after each perturbation.

    Writes an .h5ad with one row per target (obs_names = the target as given), var = the
    run's panel genes and X = the predicted mean log1p(CP10k) over the control cells. With
    --n-cells, the predicted single cells go to PRED.cells.h5ad (obs column 'target').
    """
    summary = predict_perturbations(run, control_file, list(targets), Path(out), **options)
    line = f"{out}: {len(targets)} targets x {summary['genes']} genes"
    if options["n_cells"]:
        line += f"; cells: {cells_path(Path(out))}"
    echo_summary(summary, as_json, line)


@perturb.command(
    epilog="""\b
Examples:
  scgpt-train perturb evaluate --from runs/perturb --data screen.h5ad \\
      --perturbation-key condition --control ctrl --exclude-target unassigned \\
      --targets STAT1,JAK2 --reverse
  scgpt-train perturb evaluate --from runs/perturb --data screen.h5ad \\
      --perturbation-key condition --exclude-target unassigned --json > eval.json"""
)
@click.option("--from", "run", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--perturbation-key", required=True, help=KEY_HELP)
@option(PerturbEvalConfig, "control", help=CONTROL_HELP)
@click.option(
    "--targets",
    default="",
    help="Held-out conditions or genes, comma-separated [default: all the run never saw].",
)
@click.option("--exclude-target", multiple=True, help="Leave these conditions out; repeatable.")
@click.option("--where", multiple=True, callback=check_where)
@click.option("--gene-column")
@click.option("--reverse", is_flag=True, help="Also rank every condition as the cause of each.")
@option(
    PerturbEvalConfig,
    "n_controls",
    type=click.IntRange(min=1),
    help="Control cells behind each predicted mean.",
)
@option(PerturbEvalConfig, "seed", type=int)
@option(PerturbEvalConfig, "device")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON.")
def evaluate(
    targets: str,
    as_json: bool,
    exclude_target: tuple[str, ...],
    where: tuple[str, ...],
    **options: Any,
) -> None:
    """Score a perturbation run on held-out conditions beside the baselines.

    Metrics per condition on pseudobulk log1p(CP10k), averaged over all, in-panel and
    out-of-panel targets: pearson, pearson_delta, pearson_de_delta (top-20 DE genes), the
    Systema change against the mean perturbation, centroid accuracy and L2; for scGPT, the
    control mean, the mean of the training perturbations, the linear model of Ahlmann-Eltze et
    al., ridge on the targets' gene embeddings, and a replicate-halves noise ceiling.
    """
    cfg = PerturbEvalConfig(
        targets=tuple(t for t in targets.split(",") if t),
        exclude_target=exclude_target,
        where=where,
        **options,
    )
    result = evaluate_perturbation(cfg)
    click.echo(json.dumps(result) if as_json else format_table(result))
