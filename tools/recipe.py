"""What the evaluation tools share: the previous default model's pretraining recipe (small preset,
128 tokens of each cell's most expressed genes, lr 1e-3, GEP + GEPC + half-weight MLM),
how they run a command, and their mean and sd over seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

PRETRAIN_FILES = (  # the unlabelled human files, in the previous default model's order
    "unlabelled/liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5",
    "unlabelled/liao2020_balf_GSM4339774_C146_filtered_feature_bc_matrix.h5",
    "unlabelled/liao2020_balf_GSM4475052_C149_filtered_feature_bc_matrix.h5",
    "unlabelled/harmony_kang2018_ctrl_stim_2000.h5ad",
    "unlabelled/scvi_pbmc_5k_protein_v3_200.h5ad",
)
KANG_UNLABELLED = PRETRAIN_FILES[3]  # may hold the labelled Kang file's cells


def stat(values: list[float]) -> dict[str, float]:
    """Mean and standard deviation over seeds, rounded for a results file."""
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values)), 4)}


def run(cmd: list[str], out: Path | None = None) -> str:
    """Run a command (printed on stderr); its stdout, saved to `out` if given."""
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if out is not None:
        out.write_text(res.stdout)
    return res.stdout


def pretrain(out: Path, files: list[Path], vocab: Path, *, steps: int = 2000, seed: int = 0):
    """Pretrain into `out` unless a finished run is there; the summary goes to OUT.json."""
    if (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / "pretrain.config.json"
    config.write_text(json.dumps({"model": {"max_seq_len": 128}, "tokens": {"selection": "top"}}))
    cmd = ["scgpt-train", "pretrain"] + [a for f in files for a in ("--data", str(f))]
    cmd += [
        "--vocab",
        str(vocab),
        "--config",
        str(config),
        "--out",
        str(out),
        "--preset",
        "small",
        "--max-steps",
        str(steps),
        "--batch-size",
        "32",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "100",
        "--mlm-weight",
        "0.5",
        "--val-fraction",
        "0.02",
        "--eval-every",
        str(steps),
        "--seed",
        str(seed),
        "--overwrite",
        "--json",
    ]
    run(cmd, out.with_suffix(".json"))
    return out
