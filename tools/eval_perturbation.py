"""Perturbation prediction on Papalexi 2021 (docs/results.md, "Perturbation"): scGPT pretrained
and from scratch against the baselines, on a fixed split of held-out targets, several seeds.

    python tools/eval_perturbation.py --out build/perturbation [--pretrained RUN]

Without --pretrained it first pretrains the small preset on the unlabelled files (never on the
screen), with a vocabulary of the Liao genes plus the screen's panel and targets, so every
target has a gene token. Then, per seed and start (pretrained / scratch): `scgpt-train finetune
perturb` with the held-out targets excluded, and `scgpt-train perturb evaluate --reverse` on
them. Every command is printed; results go to OUT/results.json and OUT/perturbation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from scgpt_runtime.io import open_counts
from scgpt_runtime.obs import obs_strings
from scgpt_runtime.vocab import Vocab
from scgpt_train.perturb_data import condition_targets

sys.path.insert(0, str(Path(__file__).parent))
from recipe import PRETRAIN_FILES, run
from recipe import pretrain as recipe

DATA = Path(os.environ.get("SCGPT_DATA", "../shared/data"))
SCREEN = DATA / "wave2/perturbation/papalexi2021_thp1_eccite_sceptre_299genes.h5ad"
# About a quarter of the 25 targets, fixed before any result: the interferon-gamma axis
# knock-outs with the clearest published effect, and three others (in and out of the panel).
HELD_OUT = ("STAT1", "JAK2", "IFNGR1", "IRF1", "CMTM6", "NFKBIA", "ATF2")
COMMON = ["--data", str(SCREEN), "--perturbation-key", "condition", "--control", "ctrl"]
METHODS = ("scgpt", "train_mean", "linear", "embedding_ridge", "control_mean", "noise_ceiling")
METRICS = ("pearson_delta", "pearson_de_delta", "systema_delta", "centroid_accuracy", "l2")


def pretrain(work: Path, steps: int) -> Path:
    """The pretrained run: small preset, tools/recipe.py's pretraining, a vocabulary covering
    the screen."""
    names: list[str] = []
    for f in (PRETRAIN_FILES[0], str(SCREEN.relative_to(DATA))):
        with open_counts(DATA / f) as counts:
            col = "name" if "name" in counts.var else "index"
            names += [str(g) for g in counts.var[col]]
    with open_counts(SCREEN) as counts:
        labels = set(obs_strings(counts.read_obs("condition")).tolist()) - {"unassigned"}
    names += sorted({g for c in labels for g in condition_targets(c, "ctrl")})
    Vocab.from_genes(names).to_json(work / "vocab.json")
    files = [DATA / f for f in PRETRAIN_FILES]
    return recipe(work / "pretrained", files, work / "vocab.json", steps=steps)


def one_run(work: Path, start: list[str], name: str, seed: int, epochs: int | None) -> dict:
    """Fine-tune on the training targets, evaluate on the held-out ones."""
    excluded = ["--exclude-target", "unassigned"]
    held = [a for t in HELD_OUT for a in ("--exclude-target", t)]
    run_dir = work / f"{name}-seed{seed}"
    epochs_arg = [] if epochs is None else ["--epochs", str(epochs)]
    run(["scgpt-train", "finetune", "perturb", *start, *COMMON, *excluded, *held, *epochs_arg,
         "--seed", str(seed), "--out", str(run_dir), "--overwrite", "--json"],
        work / f"{name}-seed{seed}.finetune.json")  # fmt: skip
    out = run(["scgpt-train", "perturb", "evaluate", "--from", str(run_dir), *COMMON, *excluded,
               "--targets", ",".join(HELD_OUT), "--reverse", "--seed", str(seed), "--json"],
              work / f"{name}-seed{seed}.evaluate.json")  # fmt: skip
    return json.loads(out)


def mean_sd(values: list[float | None]) -> str:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return "-"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def markdown(results: dict[str, list[dict]]) -> str:
    """Tables: metrics per method (mean ± sd over seeds) per group; reverse perturbation."""
    lines = []
    for group in ("all", "in_panel", "out_of_panel"):
        n = results["pretrained"][0]["summary"]["scgpt"][group]["n"]
        lines += [
            f"\n**{group.replace('_', ' ')} ({n} held-out targets)**\n",
            "| method | " + " | ".join(METRICS) + " |",
            "|---" * (len(METRICS) + 1) + "|",
        ]
        rows = [
            ("scGPT pretrained", "pretrained", "scgpt"),
            ("scGPT from scratch", "scratch", "scgpt"),
        ]
        rows += [(m, "pretrained", m) for m in METHODS[1:]]
        rows.insert(4, ("embedding_ridge (scratch run's genes)", "scratch", "embedding_ridge"))
        for label, arm, method in rows:
            cells = [
                mean_sd([r["summary"][method][group].get(k) for r in results[arm]]) for k in METRICS
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rev = results["pretrained"][0]["reverse"]
    lines += [
        f"\n**Reverse perturbation** ({rev['candidates']} candidates; chance top-1 "
        f"{rev['chance_top1']:.3f}, top-3 {rev['chance_top3']:.3f})\n",
        "| method | top-1 | top-3 |",
        "|---|---|---|",
    ]
    for label, arm, method in (
        ("scGPT pretrained", "pretrained", "scgpt"),
        ("scGPT from scratch", "scratch", "scgpt"),
        ("train_mean", "pretrained", "train_mean"),
        ("linear", "pretrained", "linear"),
        ("embedding_ridge", "pretrained", "embedding_ridge"),
    ):
        lines.append(
            f"| {label} | "
            + " | ".join(
                mean_sd([r["reverse"][method][k] for r in results[arm]]) for k in ("top1", "top3")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def per_target(results: dict[str, list[dict]], metric: str = "pearson_delta") -> str:
    """One row per held-out condition: `metric` per method, mean over seeds."""
    cols = (("scGPT pretrained", "pretrained", "scgpt"), ("scGPT scratch", "scratch", "scgpt"),
            ("train_mean", "pretrained", "train_mean"), ("linear", "pretrained", "linear"),
            ("noise_ceiling", "pretrained", "noise_ceiling"))  # fmt: skip
    lines = [
        f"\n**{metric} per held-out target** (mean over seeds)\n",
        "| target | " + " | ".join(c[0] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for c in results["pretrained"][0]["held_out"]:
        vals = [[r["per_condition"][m][c][metric] for r in results[arm]] for _, arm, m in cols]
        lines.append(f"| {c} | " + " | ".join(mean_sd(v).split(" ±")[0] for v in vals) + " |")
    return "\n".join(lines) + "\n"


def changes(result: dict) -> str:
    """Predicted vs observed change of the top genes of the interferon-axis knock-outs."""
    lines = []
    for c in ("STAT1+ctrl", "JAK2+ctrl", "IFNGR1+ctrl", "IRF1+ctrl"):
        rows = result["changes"][c][:6]
        lines += [
            f"\n{c}: | " + " | ".join(r["gene"] for r in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
        ]
        for key in ("observed", "scgpt", "train_mean", "linear"):
            lines.append(f"| {key} | " + " | ".join(f"{r[key]:+.2f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/perturbation"))
    ap.add_argument("--pretrained", type=Path, help="reuse a pretrained run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="[default: the command's]")
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument(
        "--tables", action="store_true", help="only redo the tables of OUT/results.json"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tables:
        results = json.loads((args.out / "results.json").read_text())
    else:
        pre = args.pretrained or pretrain(args.out, args.pretrain_steps)
        results = {"pretrained": [], "scratch": []}
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm, start in (
                ("pretrained", ["--from", str(pre)]),
                ("scratch", ["--from-scratch"]),
            ):
                results[arm].append(one_run(args.out, start, arm, seed, args.epochs))
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = markdown(results) + per_target(results) + changes(results["pretrained"][0])
    (args.out / "perturbation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
