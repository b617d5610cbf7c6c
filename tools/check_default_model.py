"""Check an installed default model end to end, without torch: `scgpt-run annotate` on the
Kang PBMC file with no --model on the CPU, the output's columns, and macro-F1 on all its cells
(which the model trained on), which must equal the figure the build recorded in the bundle (the
runtime is deterministic). The bundle's held-out figure was measured on its held-out build
(`measured_on`), which is not shipped; this check only reports it.

Usage: python tools/check_default_model.py KANG_H5AD OUT_DIR   (prints a JSON report; exit 1
on any mismatch). CI runs it in a virtual environment with the base install only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from scgpt_runtime.inspection import bundle_info
from scgpt_runtime.io import open_counts
from scgpt_runtime.served import default_bundle
from scgpt_train.metrics import annotation_metrics  # numpy only: no torch

COLUMNS = ("scgpt_predicted_labels", "scgpt_conf_score", "scgpt_n_genes")


def check(kang: Path, out_dir: Path) -> dict:
    out = out_dir / "kang_default_model.h5ad"
    # the console script of the environment running this check, whatever PATH says
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "scgpt-run"),
            "annotate",
            str(kang),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--overwrite",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    summary = json.loads(run.stdout)
    with open_counts(out) as counts:
        missing = [c for c in COLUMNS if c not in counts.obs_columns]
        if missing:
            raise SystemExit(f"{out}: lacks the obs columns {missing}")
        pred = counts.read_obs("scgpt_predicted_labels").astype(str)
        truth = counts.read_obs("cell_type").astype(str)
    with h5py.File(out) as f:
        emb = f["obsm/X_scGPT"][:]
    norms = np.linalg.norm(emb, axis=1)
    if emb.shape[0] != len(pred) or not np.allclose(norms, 1, atol=1e-5):
        raise SystemExit(f"{out}: obsm/X_scGPT is not one unit vector per cell")
    metrics = annotation_metrics(truth, pred)
    records = bundle_info(default_bundle())["evaluation"]
    own = [
        e
        for e in records
        if e["precision"] == summary["precision"] and not e["where"] and "measured_on" not in e
    ]
    report = {
        "bundle": str(default_bundle()),
        "precision": summary["precision"],
        "execution_provider": summary["execution_provider"],
        "n_cells": summary["n_cells"],
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "recorded_macro_f1": own[0]["macro_f1"] if own else None,
        "held_out_macro_f1": {e["precision"]: e["macro_f1"] for e in records if "measured_on" in e},
    }
    if report["macro_f1"] != report["recorded_macro_f1"]:
        raise SystemExit(f"macro-F1 differs from the bundle's record: {json.dumps(report)}")
    return report


if __name__ == "__main__":
    print(json.dumps(check(Path(sys.argv[1]), Path(sys.argv[2]))))
