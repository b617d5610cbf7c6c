"""Kang control -> stimulated with the CLI on its defaults, end to end, beside the baselines.

    python tools/eval_cli_defaults.py --out build/cli-defaults [--seeds 3]

What a new user runs, with only the required arguments and a seed (S = 0, 1, 2):
  scgpt-train pretrain --data $D/unlabelled --out OUT/pre-S --seed S
  scgpt-train finetune annotate --from OUT/pre-S --data KANG --where condition=control \
      --label-key cell_type --out OUT/ft-S --seed S
  scgpt-train export OUT/ft-S --out OUT/bundle-S
  scgpt-run annotate KANG --model OUT/bundle-S --out OUT/pred-S.csv
(the unlabelled folder holds Harmony's Kang subset, control and stimulated, without labels, as
the issue allows), scored on the 1,039 stimulated cells; beside it in the same run, on the same
cells: logistic regression and PCA(50) + 10-NN on log1p(CP10k) fit on the 936 control cells
(tools/evaluate.py's baselines, deterministic), and the same fine-tuning from random weights
(`--from-scratch`, so what pretraining adds is measured). Zero-shot, each pretrained run's
L2-normalised <cls> embeddings of all Kang cells: 10-NN from the control to the stimulated cells
(majority vote, as the official reference mapping) and the mean cosine between two cells (near
1: collapsed), and its integration of control and stimulated (AvgBIO, AvgBATCH) beside
HVG + PCA (tools/evaluate.py's). The same fine-tuning, export and annotation (from each
pretrained run and from scratch) on Tabula Muris: trained on tools/evaluate.py's stratified 70%
(seed 0), scored on the other 30%, beside the same baselines. Each stage is skipped where its
output exists. Results: OUT/results.json, with each command's wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import annotation_baselines, hvg_pca, split_file
from recipe import run, stat

from scgpt_runtime.knn import l2_normalize
from scgpt_train.cells import load_cells
from scgpt_train.checkpoint import load_run
from scgpt_train.inference import embed
from scgpt_train.metrics import annotation_metrics, integration_metrics, knn_probe, knn_transfer

DATA = Path(os.environ.get("SCGPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
KANG = DATA / "labelled" / "kang2018_pbmc_counts.h5ad"


def timed(cmd: list[str], done: Path, log: Path) -> float | None:
    """Run `cmd` unless `done` exists; its wall seconds, kept beside `log` so that a rerun that
    skips it still reports them (None where they were never measured)."""
    seconds = log.with_suffix(".seconds")
    if not done.exists():
        t0 = time.perf_counter()
        run(cmd, log)
        seconds.write_text(f"{time.perf_counter() - t0:.1f}")
    return float(seconds.read_text()) if seconds.exists() else None


def predictions(path: Path) -> dict[str, str]:
    with path.open() as f:
        return {row["cell"]: row["predicted_labels"] for row in csv.DictReader(f)}


@dataclass(frozen=True)
class Task:
    """Fine-tune on `train` (rows obs[key] == value of `where`), predict every cell of `test`,
    score those of `test_where`."""

    name: str  # prefix of the run names ("" for Kang, whose runs came first)
    pretrain: tuple[Path, ...]  # unlabelled cells (of the task's species)
    train: Path
    test: Path
    where: tuple[str, str] | None = None
    test_where: tuple[str, str] | None = None


def tasks(out: Path) -> dict[str, Task]:
    """Kang control -> stimulated, and Tabula Muris's stratified 70/30 split (seed 0)."""
    tm = out / "data" / "tabula_muris"
    if not (tm.parent / "tabula_muris_test.h5ad").exists():
        tm.parent.mkdir(parents=True, exist_ok=True)
        split_file(DATA / "labelled" / "tabula_muris_actinn_1000.h5ad", tm, "cell_type")
    return {
        "kang": Task(
            "",
            (DATA / "unlabelled",),
            KANG,
            KANG,
            ("condition", "control"),
            ("condition", "stimulated"),
        ),
        "tabula_muris": Task(
            "tm-",
            (DATA / "unlabelled" / "smnn_mouse_2batch_900.h5ad", tm.with_suffix(".h5ad")),
            tm.parent / "tabula_muris_train.h5ad",
            tm.parent / "tabula_muris_test.h5ad",
        ),
    }


def scgpt(out: Path, seed: int, scratch: bool, task: Task) -> dict:
    tag = f"{task.name}{'scratch' if scratch else 'pre'}-{seed}"
    pre = out / f"pre-{task.name}{seed}"
    ft, bundle = out / f"ft-{tag}", out / f"bundle-{tag}"
    seconds = {}
    if not scratch:
        cmd = ["scgpt-train", "pretrain", *(a for f in task.pretrain for a in ("--data", str(f)))]
        seconds["pretrain"] = timed(
            [*cmd, "--out", str(pre), "--seed", str(seed), "--overwrite", "--json"],
            pre / "summary.json",
            pre.with_suffix(".json"),
        )
    start = ["--from-scratch"] if scratch else ["--from", str(pre)]
    cmd = ["scgpt-train", "finetune", "annotate", *start, "--data", str(task.train)]
    cmd += ["--where", "=".join(task.where)] if task.where else []
    cmd += ["--label-key", "cell_type", "--out", str(ft)]
    seconds["finetune"] = timed(
        [*cmd, "--seed", str(seed), "--overwrite", "--json"],
        ft / "summary.json",
        out / f"ft-{tag}.json",
    )
    cmd = ["scgpt-train", "export", str(ft), "--out", str(bundle), "--overwrite", "--json"]
    seconds["export"] = timed(cmd, bundle / "config.json", out / f"export-{tag}.json")
    pred = out / f"pred-{tag}.csv"
    cmd = ["scgpt-run", "annotate", str(task.test), "--model", str(bundle), "--out", str(pred)]
    seconds["annotate"] = timed([*cmd, "--overwrite"], pred, out / f"annotate-{tag}.log")
    summary = json.loads((ft / "summary.json").read_text())
    return {
        "predicted": predictions(pred),
        "seconds": seconds,
        "finetune": {k: summary.get(k) for k in ("epochs_run", "best_epoch", "val_macro_f1")},
    }


def rows(adata: ad.AnnData, where: tuple[str, str] | None) -> ad.AnnData:
    """The cells with obs[key] == value (all without a filter)."""
    return adata if where is None else adata[adata.obs[where[0]].astype(str) == where[1]]


def score_task(out: Path, seeds: int, task: Task) -> dict:
    """Baselines and scGPT (pretrained and from scratch) on one task's test cells."""
    train, test = (
        rows(ad.read_h5ad(task.train), task.where),
        rows(ad.read_h5ad(task.test), task.test_where),
    )
    truth = test.obs["cell_type"].astype(str).to_numpy()
    results: dict = {"baselines": annotation_baselines(train, test, "cell_type")}
    for label, scratch in (("pretrained + fine-tuned", False), ("fine-tuned from scratch", True)):
        runs = [scgpt(out, seed, scratch, task) for seed in range(seeds)]
        scores = []
        for r in runs:
            guess = np.asarray([r["predicted"][c] for c in test.obs_names])
            m = annotation_metrics(truth, guess)
            scores.append({"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
        results[label] = {
            "accuracy": stat([s["accuracy"] for s in scores]),
            "macro_f1": stat([s["macro_f1"] for s in scores]),
            "per_seed": scores,
            "runs": [{k: v for k, v in r.items() if k != "predicted"} for r in runs],
        }
    return results


def zero_shot(pre: Path, kang: ad.AnnData) -> dict[str, float]:
    """10-NN control -> stimulated on the pretrained embeddings, and their mean cosine."""
    model, info = load_run(pre)
    cells = load_cells([str(KANG)], info.vocab, info.tokens)
    x = embed(model, cells.tokens)
    control = (kang.obs["condition"] == "control").to_numpy()
    labels = kang.obs["cell_type"].astype(str).to_numpy()
    m = transfer(x, labels, control)
    cosine = knn_probe(x, labels)["probe_mean_cosine"]
    mixed = integration_metrics(l2_normalize(x), labels, batch(kang))
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "mean_cosine": cosine,
        "avg_bio": mixed["avg_bio"],
        "avg_batch": mixed["avg_batch"],
    }


def transfer(x: np.ndarray, labels: np.ndarray, control: np.ndarray) -> dict:
    """Annotation metrics of 10-NN (majority vote) from the control cells to the others."""
    guess = knn_transfer(x[control], labels[control], x[~control], k=10).predicted_labels
    return annotation_metrics(labels[~control], guess)


def batch(kang: ad.AnnData) -> np.ndarray:
    return kang.obs["condition"].astype(str).to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/cli-defaults"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kang = ad.read_h5ad(KANG)
    labels = kang.obs["cell_type"].astype(str).to_numpy()
    all_tasks = tasks(args.out)
    results: dict = score_task(args.out, args.seeds, all_tasks["kang"])
    results["HVG + PCA integration"] = integration_metrics(hvg_pca(kang), labels, batch(kang))
    results["tabula_muris"] = score_task(args.out, args.seeds, all_tasks["tabula_muris"])
    zero = [zero_shot(args.out / f"pre-{seed}", kang) for seed in range(args.seeds)]
    results["zero-shot 10-NN on the pretrained embeddings"] = {
        k: stat([z[k] for z in zero]) for k in zero[0]
    } | {"per_seed": zero}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
