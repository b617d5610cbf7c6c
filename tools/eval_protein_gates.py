"""Score PBMC annotators on the quickstart sample against labels gated from its surface proteins.

The sample (10x pbmc_10k_protein_v3, 200 cells, python tools/get_sample.py) has no cell-type
labels but 14 antibody counts per cell. A cell's lineage is the highest of CD3 (T), CD19 (B),
CD56 (NK) and CD14 (monocyte) after a centred log-ratio per cell and a z-score per protein; a T
cell is CD4T or CD8T by CD4 against CD8a, a monocyte CD14+Mono or FCGR3A+Mono by CD14 against
CD16. These gates are rough (no dendritic gate, doublets pass): a check of agreement on an
experiment none of the models saw, not ground truth.

Scored, in one run: each bundle as scgpt-run serves it (CPU), and logistic regression and
PCA(50) + 10-NN (scgpt_train.baselines) fit on each labelled training set given.
Usage: python tools/eval_protein_gates.py SAMPLE --bundle NAME=DIR ... --train NAME=FILE[:COL=VAL]
    [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np

from scgpt_runtime import Model
from scgpt_runtime.bundle import load_bundle
from scgpt_train.baselines import baseline_predictions
from scgpt_train.metrics import annotation_metrics

LINEAGES = {"CD3": "T", "CD19": "B", "CD56": "NK", "CD14": "Mono"}
LINEAGE_OF = {"CD4T": "T", "CD8T": "T", "B": "B", "NK": "NK", "CD14+Mono": "Mono"}
LINEAGE_OF |= {"FCGR3A+Mono": "Mono", "Dendritic": "Dendritic"}


def gated_labels(sample: Path) -> np.ndarray:
    """Each cell's type by its proteins (see the module docstring)."""
    with h5py.File(sample) as f:
        counts = f["obsm/protein_expression"][:].astype(np.float64)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["uns/protein_names"][:]]
    logs = np.log1p(counts)
    clr = logs - logs.mean(1, keepdims=True)
    z = (clr - clr.mean(0)) / clr.std(0)
    col = {n.split("_")[0]: i for i, n in enumerate(names)}
    lineage = np.array(list(LINEAGES.values()))[z[:, [col[m] for m in LINEAGES]].argmax(1)]
    t_type = np.where(z[:, col["CD4"]] >= z[:, col["CD8a"]], "CD4T", "CD8T")
    mono = np.where(z[:, col["CD14"]] >= z[:, col["CD16"]], "CD14+Mono", "FCGR3A+Mono")
    fine = np.where(lineage == "T", t_type, np.where(lineage == "Mono", mono, lineage))
    return fine.astype(str)


def scores(gated: np.ndarray, predicted: np.ndarray) -> dict:
    """Agreement of predicted with gated labels: lineage and type accuracy, macro-F1 over the
    gated types, and the predicted label counts."""
    lineage = np.array([LINEAGE_OF.get(p, p) for p in predicted])
    gated_lineage = np.array([LINEAGE_OF[g] for g in gated])
    fine = annotation_metrics(gated, predicted.astype(str))
    names, counts = np.unique(predicted, return_counts=True)
    return {
        "lineage_accuracy": round(float((lineage == gated_lineage).mean()), 4),
        "accuracy": fine["accuracy"],
        "macro_f1": fine["macro_f1"],
        "per_class_f1": fine["per_class_f1"],
        "predicted": dict(zip(names.tolist(), counts.tolist(), strict=True)),
    }


def pairs(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sample", type=Path)
    ap.add_argument("--bundle", action="append", default=[], help="NAME=DIR")
    ap.add_argument("--train", action="append", default=[], help="NAME=FILE[:COL=VAL]")
    ap.add_argument("--label-key", default="cell_type")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.bundle:
        ap.error("give at least one --bundle NAME=DIR (its genes are the baselines' too)")
    gated = gated_labels(args.sample)
    names, counts = np.unique(gated, return_counts=True)
    out: dict = {"gated": dict(zip(names.tolist(), counts.tolist(), strict=True)), "rows": {}}
    bundles = pairs(args.bundle)
    for name, path in bundles.items():
        predicted = Model.load(path, device="cpu").annotate(args.sample).predicted_labels
        out["rows"][name] = scores(gated, np.asarray(predicted).astype(str))
    vocab = load_bundle(next(iter(bundles.values()))).vocab  # the genes the models see
    for name, spec in pairs(args.train).items():
        file, _, where = spec.partition(":")
        fitted = baseline_predictions(
            ([file], (where,) if where else ()), ([str(args.sample)], ()), args.label_key, vocab
        )
        for baseline, predicted in fitted.items():
            out["rows"][f"{baseline} ({name})"] = scores(gated, predicted)
    for name, row in out["rows"].items():
        print(
            f"{name:40s} lineage {row['lineage_accuracy']:.3f}  type {row['accuracy']:.3f}"
            f"  macro-F1 {row['macro_f1']:.3f}  {row['predicted']}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
