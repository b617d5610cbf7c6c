"""Reference mapping on Kang PBMC beside the baselines: reference = the control cells, query =
the interferon-stimulated cells, with the default model's held-out build (its recipe on the
control cells only: tools/build_default_model.sh writes it to WORK_DIR/heldout; the shipped
model trained on the stimulated cells too) and with small models fine-tuned from scratch on the
control cells (three seeds); and the Unknown threshold on validation cells.

    python tools/evaluate_mapping.py [--held-out-build build/default-model/heldout]
        [--work /tmp/eval-mapping] [--seeds 0,1,2] [--json OUT]

For each bundle: `scgpt-run`'s reference mapping (runtime API: k = 10 majority vote on the
bundle's L2-normalised embeddings) with Unknown off and at the defaults (vote share below
UNKNOWN_BELOW, or farther than the DISTANCE_QUANTILE of the reference's own nearest-neighbour
distances), its head (as served, calibrated where the bundle is) and the head's expected
calibration error with and without its temperature; beside logistic regression and
PCA(50) + 10-NN fit on the same control cells (tools/evaluate.py). Unknown counts as a wrong
label. The threshold sweep uses validation cells only: reference = 80% of the control cells,
query = the other 20% (stratified, seed 0); the stimulated cells are never used to choose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
from evaluate import KANG, annotation_baselines
from sklearn.model_selection import train_test_split

from scgpt_runtime import Model
from scgpt_runtime.results import UNKNOWN, temperature_scaled
from scgpt_train.calibration import expected_calibration_error
from scgpt_train.metrics import annotation_metrics

SWEEP = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SCRATCH = {"model": {"dropout": 0.0}, "tokens": {"max_seq_len": 128, "selection": "top"}}
FINETUNE = ["--epochs", "12", "--lr", "1e-3", "--class-weight", "balanced", "--patience", "5"]


def train_scratch(work: Path, seed: int) -> Path:
    """A small model fine-tuned from scratch on the control cells, exported (fp32)."""
    bundle = work / f"scratch-{seed}" / "bundle"
    if bundle.is_dir():
        return bundle
    run, config = work / f"scratch-{seed}" / "run", work / "scratch.json"
    config.write_text(json.dumps(SCRATCH))
    cli = [sys.executable, "-m", "scgpt_train.cli", "-q"]
    subprocess.run(
        [
            *cli,
            "finetune",
            "annotate",
            "--from-scratch",
            "--config",
            str(config),
            "--data",
            str(KANG),
            "--where",
            "condition=control",
            "--label-key",
            "cell_type",
            "--out",
            str(run),
            "--seed",
            str(seed),
            *FINETUNE,
        ],
        check=True,
    )
    export = [sys.executable, "-c", "from scgpt_export.cli import main; main()", "-q", "export"]
    subprocess.run([*export, str(run), "--out", str(bundle)], check=True)
    return bundle


def cells(adata: ad.AnnData) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], list[str]]:
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    return (x.data, x.indices, x.indptr), list(adata.var_names)


def scores(truth: np.ndarray, result) -> dict[str, Any]:
    pred = result.predicted_labels
    known = pred != UNKNOWN
    out = {k: annotation_metrics(truth, pred)[k] for k in ("accuracy", "macro_f1")}
    out["unknown_share"] = round(float(1 - known.mean()), 4)
    out["accuracy_on_the_rest"] = round(float((pred[known] == truth[known]).mean()), 4)
    return out


def mapping(model: Model, ref: ad.AnnData, query: ad.AnnData, **unknown: float) -> dict:
    x, genes = cells(ref)
    built = model.reference(x, {"cell_type": list(ref.obs["cell_type"].astype(str))}, genes=genes)
    qx, _ = cells(query)
    result = model.annotate(qx, genes=genes, reference=built, **unknown)
    return scores(query.obs["cell_type"].astype(str).to_numpy(), result)


def head(model: Model, query: ad.AnnData) -> dict[str, Any]:
    qx, genes = cells(query)
    result = model.annotate(qx, genes=genes)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    codes = np.array([model.labels.index(t) if t in model.labels else -1 for t in truth])
    raw = temperature_scaled(result.class_probs, 1 / model.bundle.temperature)
    return {
        **scores(truth, result),
        "temperature": model.bundle.temperature,
        "ece": round(expected_calibration_error(result.class_probs, codes), 4),
        "ece_uncalibrated": round(expected_calibration_error(raw, codes), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--held-out-build", type=Path, default=Path("build/default-model/heldout"))
    p.add_argument("--work", type=Path, default=Path("/tmp/eval-mapping"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not args.held_out_build.is_dir():
        p.error(f"{args.held_out_build}: no bundle; run tools/build_default_model.sh first")
    args.work.mkdir(parents=True, exist_ok=True)
    kang = ad.read_h5ad(KANG)
    control = kang[kang.obs["condition"] == "control"].copy()
    stimulated = kang[kang.obs["condition"] == "stimulated"].copy()
    fit, val = train_test_split(
        np.arange(control.n_obs), test_size=0.2, random_state=0, stratify=control.obs["cell_type"]
    )
    bundles = {"default model, held-out build": args.held_out_build}
    bundles |= {
        f"scratch seed {s}": train_scratch(args.work, int(s)) for s in args.seeds.split(",")
    }
    report: dict[str, Any] = {"baselines": annotation_baselines(control, stimulated, "cell_type")}
    off = {"unknown_below": 0.0, "distance_quantile": 1.0}
    for name, path in bundles.items():
        model = Model.load(path, device="cpu", precision="fp32")
        sweep = {str(t): mapping(model, control[fit], control[val], unknown_below=t) for t in SWEEP}
        report[name] = {
            "validation_sweep": sweep,
            "mapping_unknown_off": mapping(model, control, stimulated, **off),
            "mapping_defaults": mapping(model, control, stimulated),
            "head": head(model, stimulated),
        }
        print(name, json.dumps(report[name]), flush=True)
    print(json.dumps(report["baselines"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
