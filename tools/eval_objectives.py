"""Which pretraining objective keeps cell identity? A screen of short pretrainings on Kang.

    python tools/eval_objectives.py --out build/objectives [--seeds 1] [--steps 600] [--jobs 2]
        [--variants default,unexpressed-1]

Each variant pretrains the CLI default (small preset, every unlabelled file, GEP + GEPC + half
MLM) for --steps steps with one extra option, one thread per run, --jobs runs at a time:
  scgpt-train pretrain --data $D/unlabelled --out OUT/NAME-S --seed S --max-steps STEPS \
      FLAGS --probe-data KANG --probe-label-key cell_type --probe-where condition=control
Scored on Kang, beside HVG + PCA in the same run: the probe logged during pretraining
(leave-one-out 10-NN macro-F1 on the control cells, and the mean cosine), and, on the last
weights, 10-NN from control to stimulated cells and integration AvgBIO
(tools/eval_cli_defaults.py's zero-shot). A baseline of the input alone: PCA(20) of which genes
each cell expresses (0/1), probed and transferred the same way. Finished runs (summary.json)
are not repeated. Results: OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_cli_defaults import DATA, KANG, batch, transfer, zero_shot
from evaluate import annotation_baselines, hvg_pca
from recipe import stat

from scgpt_train.checkpoint import read_metrics
from scgpt_train.metrics import integration_metrics, knn_probe

ZERO_HEADS = ["--config", "explicit-zero.json"]  # written into OUT: the P(value > 0) heads
VARIANTS = {
    "default": [],
    "unexpressed-1": ["--unexpressed-ratio", "1"],
    "contrast-10": ["--contrast-weight", "10"],
    "contrast-100": ["--contrast-weight", "100"],
    "unexpressed-1-zero-1": ["--unexpressed-ratio", "1", *ZERO_HEADS],
    "unexpressed-1-zero-20": ["--unexpressed-ratio", "1", *ZERO_HEADS, "--nonzero-weight", "20"],
}


def pretrain(out: Path, flags: list[str], seed: int, steps: int) -> None:
    if (out / "summary.json").exists():
        return
    cmd = ["scgpt-train", "pretrain", "--data", str(DATA / "unlabelled"), "--out", str(out)]
    flags = [str(out.parent / f) if f.endswith(".json") else f for f in flags]
    cmd += ["--seed", str(seed), "--max-steps", str(steps), *flags, "--probe-data", str(KANG)]
    cmd += ["--probe-label-key", "cell_type", "--probe-where", "condition=control"]
    cmd += ["--overwrite"]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with out.with_suffix(".log").open("w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)


def probe_curve(run: Path) -> list[dict]:
    keys = ("step", "probe_knn_macro_f1", "probe_mean_cosine", "val_loss")
    return [{k: r[k] for k in keys} for r in read_metrics(run) if "probe_knn_macro_f1" in r]


def presence_pca(kang: ad.AnnData, labels: np.ndarray, control: np.ndarray) -> dict:
    """PCA(20) of each cell's 0/1 expressed genes: how much identity the bag of genes holds."""
    x = PCA(20, random_state=0).fit_transform(
        (sp.csr_matrix(kang.X) > 0).astype(np.float32).toarray()
    )
    return {
        "probe": knn_probe(x[control], labels[control])["probe_knn_macro_f1"],
        "transfer_macro_f1": transfer(x, labels, control)["macro_f1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/objectives"))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    args = parser.parse_args()
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ZERO_HEADS[1]).write_text(json.dumps({"model": {"explicit_zero": True}}))
    runs = [(name, seed) for name in names for seed in range(args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = [
            pool.submit(pretrain, args.out / f"{n}-{s}", VARIANTS[n], s, args.steps)
            for n, s in runs
        ]
        for f in done:
            f.result()
    kang = ad.read_h5ad(KANG)
    control = kang[kang.obs["condition"] == "control"]
    stimulated = kang[kang.obs["condition"] == "stimulated"]
    labels = kang.obs["cell_type"].astype(str).to_numpy()
    pca = hvg_pca(kang)
    is_control = (kang.obs["condition"] == "control").to_numpy()
    results: dict = {
        "baselines": annotation_baselines(control, stimulated, "cell_type"),
        "HVG + PCA probe": knn_probe(pca[is_control], labels[is_control]),
        "HVG + PCA integration": integration_metrics(pca, labels, batch(kang)),
        "presence PCA(20)": presence_pca(kang, labels, is_control),
    }
    for name in names:
        seeds = [args.out / f"{name}-{s}" for s in range(args.seeds)]
        zero = [zero_shot(run, kang) for run in seeds]
        curves = [probe_curve(run) for run in seeds]
        results[name] = {
            "flags": VARIANTS[name],
            **{k: stat([z[k] for z in zero]) for k in zero[0]},
            "probe_last": stat([c[-1]["probe_knn_macro_f1"] for c in curves]),
            "probe_best": stat([max(r["probe_knn_macro_f1"] for r in c) for c in curves]),
            "probe_curves": curves,
            "per_seed": zero,
        }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
