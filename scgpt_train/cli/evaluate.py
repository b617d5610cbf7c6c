"""`scgpt-train evaluate`: a run or a bundle scored on labelled cells."""

from __future__ import annotations

import json
from typing import Any

import click

from scgpt_runtime.cli.common import check_where
from scgpt_runtime.knn import VOTES

from ..evaluate import EvaluateConfig
from ..evaluate import evaluate as run_evaluate
from .common import expand_data, option


@click.command(
    epilog="""\b
Examples:
  scgpt-train evaluate --from runs/kang-annot --data kang.h5ad --label-key cell_type \\
      --where condition=stimulated
  scgpt-train evaluate --from runs/pre --data kang.h5ad --where condition=stimulated \\
      --reference kang.h5ad --reference-where condition=control --label-key cell_type
  scgpt-train evaluate --from runs/kang-int --data kang.h5ad --label-key cell_type \\
      --batch-key condition --json
  scgpt-train evaluate --bundle bundles/pbmc --data kang.h5ad --label-key cell_type \\
      --where condition=stimulated --record
  scgpt-train evaluate --bundle bundles/pbmc-control --data kang.h5ad --label-key cell_type \\
      --where condition=stimulated --record-into bundles/pbmc-all
  scgpt-train evaluate --from runs/kang-annot --data kang.h5ad --label-key cell_type \\
      --where condition=stimulated --report kang_eval.html"""
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
@option(
    EvaluateConfig,
    "precision",
    type=click.Choice(["auto", "fp32", "fp16", "int8"]),
    help="With --bundle: the graphs to run (auto: int8 if the bundle has it, else fp32).",
)
@click.option(
    "--record",
    is_flag=True,
    help="With --bundle: store the metrics in the bundle's evaluation.json (its model card "
    "data; config.json and the bundle's identity stay as they are).",
)
@click.option(
    "--record-into",
    type=click.Path(exists=True, file_okay=False),
    help="With --bundle: store the metrics in this other bundle's evaluation.json instead, "
    "as the held-out figures of a model trained on these cells too (--bundle is its sibling "
    "build that kept them out; the record names it).",
)
@click.option("--data", multiple=True, required=True, help="Labelled cells; repeatable.")
@click.option("--label-key", required=True, help="obs column with the true labels.")
@click.option(
    "--where", multiple=True, callback=check_where, help="COL=VALUE filter of --data; repeatable."
)
@click.option("--batch-key", help="obs column with batches: integration metrics.")
@click.option(
    "--reference",
    multiple=True,
    help="Labelled reference cells: kNN label transfer (zero-shot); repeatable.",
)
@click.option(
    "--reference-where",
    multiple=True,
    callback=check_where,
    help="COL=VALUE filter of --reference.",
)
@option(EvaluateConfig, "k", type=int, help="Neighbours for kNN.")
@option(EvaluateConfig, "vote", type=click.Choice(VOTES))
@click.option(
    "--unknown-threshold",
    type=float,
    help="Label cells 'unknown' below this confidence [default: off].",
)
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option("--predictions", type=click.Path(dir_okay=False), help="Write per-cell CSV here.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    help="Write an HTML report here (confusion matrices, per-class scores, calibration, "
    "embedding maps); needs the [report] extra.",
)
@click.option(
    "--baselines/--no-baselines",
    default=True,
    show_default=True,
    help="Score logistic regression and PCA(50) + 10-NN beside the model, fit on the cells "
    "it learnt from (the run's fine-tuning data; the --reference cells for kNN).",
)
@option(EvaluateConfig, "seed", type=int, help="Seed of k-means.")
@click.option("--json", "as_json", is_flag=True, help="Print all metrics as JSON.")
def evaluate(
    data: tuple[str, ...], reference: tuple[str, ...], as_json: bool, **options: Any
) -> None:
    """Score a run or a bundle on labelled cells: classifier, kNN transfer, integration.

    With a classifier head: accuracy, macro-F1, per-class F1 and confusion matrix of its
    predictions. With --reference: the same for labels transferred by k nearest neighbours on
    L2-normalised cell embeddings (any run, no fine-tuning). With --batch-key: NMI and ARI of
    k-means clusters, label and batch silhouettes, graph connectivity, AvgBIO and AvgBATCH.
    With --bundle instead of --from: the classifier metrics of the exported graphs, exactly as
    scgpt-run annotate predicts; --record keeps them in the bundle.
    """
    try:
        cfg = EvaluateConfig(
            data=expand_data(data), reference=expand_data(reference) if reference else [], **options
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    result = run_evaluate(cfg)
    if as_json:
        click.echo(json.dumps(result))
        return
    for name in ("classifier", "knn"):
        if name in result:
            m = result[name]
            click.echo(
                f"{name}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} "
                f"({m['n_cells']} cells)"
            )
            for base, b in m.get("baselines", {}).items():
                click.echo(f"  {base}: accuracy {b['accuracy']:.4f} macro-F1 {b['macro_f1']:.4f}")
    if "integration" in result:
        click.echo("integration: " + " ".join(f"{k} {v}" for k, v in result["integration"].items()))
    if "report" in result:
        click.echo(f"wrote {result['report']}")
