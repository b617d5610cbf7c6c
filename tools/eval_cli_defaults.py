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
HVG + PCA (tools/evaluate.py's). Each stage is skipped where its output exists. Results:
OUT/results.json, with each command's wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import annotation_baselines, hvg_pca
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


def scgpt(out: Path, seed: int, scratch: bool) -> dict:
    tag = f"{'scratch' if scratch else 'pre'}-{seed}"
    pre, ft, bundle = out / f"pre-{seed}", out / f"ft-{tag}", out / f"bundle-{tag}"
    seconds = {}
    if not scratch:
        cmd = ["scgpt-train", "pretrain", "--data", str(DATA / "unlabelled"), "--out", str(pre)]
        seconds["pretrain"] = timed(
            [*cmd, "--seed", str(seed), "--overwrite", "--json"],
            pre / "summary.json",
            out / f"pre-{seed}.json",
        )
    start = ["--from-scratch"] if scratch else ["--from", str(pre)]
    cmd = ["scgpt-train", "finetune", "annotate", *start, "--data", str(KANG)]
    cmd += ["--where", "condition=control", "--label-key", "cell_type", "--out", str(ft)]
    seconds["finetune"] = timed(
        [*cmd, "--seed", str(seed), "--overwrite", "--json"],
        ft / "summary.json",
        out / f"ft-{tag}.json",
    )
    cmd = ["scgpt-train", "export", str(ft), "--out", str(bundle), "--overwrite", "--json"]
    seconds["export"] = timed(cmd, bundle / "config.json", out / f"export-{tag}.json")
    pred = out / f"pred-{tag}.csv"
    cmd = ["scgpt-run", "annotate", str(KANG), "--model", str(bundle), "--out", str(pred)]
    seconds["annotate"] = timed([*cmd, "--overwrite"], pred, out / f"annotate-{tag}.log")
    summary = json.loads((ft / "summary.json").read_text())
    return {
        "predicted": predictions(pred),
        "seconds": seconds,
        "finetune": {k: summary.get(k) for k in ("epochs_run", "best_epoch", "val_macro_f1")},
    }


def zero_shot(pre: Path, kang: ad.AnnData) -> dict[str, float]:
    """10-NN control -> stimulated on the pretrained embeddings, and their mean cosine."""
    model, info = load_run(pre)
    cells = load_cells([str(KANG)], info.vocab, info.tokens)
    x = embed(model, cells.tokens)
    control = (kang.obs["condition"] == "control").to_numpy()
    labels = kang.obs["cell_type"].astype(str).to_numpy()
    guess = knn_transfer(x[control], labels[control], x[~control], k=10).predicted_labels
    m = annotation_metrics(labels[~control], guess)
    cosine = knn_probe(x, labels)["probe_mean_cosine"]
    mixed = integration_metrics(l2_normalize(x), labels, batch(kang))
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "mean_cosine": cosine,
        "avg_bio": mixed["avg_bio"],
        "avg_batch": mixed["avg_batch"],
    }


def batch(kang: ad.AnnData) -> np.ndarray:
    return kang.obs["condition"].astype(str).to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/cli-defaults"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kang = ad.read_h5ad(KANG)
    control = kang[kang.obs["condition"] == "control"]
    stimulated = kang[kang.obs["condition"] == "stimulated"]
    truth = stimulated.obs["cell_type"].astype(str).to_numpy()
    results: dict = {"baselines": annotation_baselines(control, stimulated, "cell_type")}
    labels = kang.obs["cell_type"].astype(str).to_numpy()
    results["HVG + PCA integration"] = integration_metrics(hvg_pca(kang), labels, batch(kang))
    for label, scratch in (("pretrained + fine-tuned", False), ("fine-tuned from scratch", True)):
        runs = [scgpt(args.out, seed, scratch) for seed in range(args.seeds)]
        scores = []
        for r in runs:
            guess = np.asarray([r["predicted"][c] for c in stimulated.obs_names])
            m = annotation_metrics(truth, guess)
            scores.append({"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
        results[label] = {
            "accuracy": stat([s["accuracy"] for s in scores]),
            "macro_f1": stat([s["macro_f1"] for s in scores]),
            "per_seed": scores,
            "runs": [{k: v for k, v in r.items() if k != "predicted"} for r in runs],
        }
    zero = [zero_shot(args.out / f"pre-{seed}", kang) for seed in range(args.seeds)]
    results["zero-shot 10-NN on the pretrained embeddings"] = {
        k: stat([z[k] for z in zero]) for k in zero[0]
    } | {"per_seed": zero}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
