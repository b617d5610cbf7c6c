"""Re-export the shipped default model, a bundle of format 1, as format 2: the same ONNX graphs
(so the same embeddings and class probabilities, checked bit for bit), the v2 layout, its
parameter count, and the head's temperature fitted on the fine-tuning's own validation cells
(Kang control, the 10% stratified split of seed 0, as `finetune annotate` drew it) and served
from then on. Then the held-out metrics are recorded again (Kang stimulated, fp32 and fp16),
with the expected calibration error as served and without the temperature.

The weights are not retrained: tools/build_default_model.sh rebuilds the model itself.

Usage: python tools/upgrade_default_model.py KANG_H5AD OUT [--from BUNDLE] [--json REPORT]
       (OUT may be scgpt_runtime/default_model: the old bundle is then swapped out in one step)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from scgpt_export.to_onnx import served_parameters
from scgpt_runtime import Model
from scgpt_runtime.bundle import Variant, load_bundle, write_bundle
from scgpt_runtime.bundle.format import sha256_file
from scgpt_runtime.io import open_counts
from scgpt_runtime.obs import obs_strings
from scgpt_runtime.results import temperature_scaled
from scgpt_runtime.served import default_bundle
from scgpt_train.calibration import calibrate
from scgpt_train.cells import stratified_split
from scgpt_train.config import ModelConfig
from scgpt_train.evaluate import EvaluateConfig, evaluate
from scgpt_train.model import ScGPT

VAL_FRACTION, SEED = 0.1, 0  # of the fine-tuning (tools/build_default_model.sh)


def upgrade(kang: Path, source: Path, out: Path) -> dict:
    old = load_bundle(source)
    if old.config["format_version"] != 1:
        raise SystemExit(f"{source}: is already of format {old.config['format_version']}")
    before = _served(old.path, kang)
    model = ModelConfig.from_dict(old.config["model"])
    calibration = _calibration(kang, old, before)
    with tempfile.TemporaryDirectory() as tmp:
        variants = []
        for v in old.variants:
            copy = Path(tmp) / v.path.name
            shutil.copyfile(v.path, copy)
            variants.append(Variant(v.precision, v.max_seq_len, copy, v.errors, v.tolerance))
        provenance = dict(old.config["provenance"])
        provenance["upgrade"] = {
            "from_format": 1,
            "from_sha256": old.sha256,
            "command": "python tools/upgrade_default_model.py",
            "graphs": "unchanged: the format 1 files, byte for byte",
        }
        write_bundle(
            out,
            model=model.to_dict(),
            tokens=old.tokens,
            vocab=old.vocab,
            variants=variants,
            labels=old.labels,
            gene_panel=old.gene_panel,
            parameters=served_parameters(ScGPT(model)),
            calibration=calibration,
            validation=old.config["validation"],
            provenance=provenance,
            overwrite=True,
        )
    new = load_bundle(out)
    after = _served(new.path, kang)
    same_graphs = {v.precision: sha256_file(v.path) for v in new.variants} == {
        v.precision: before["graph_sha256"][v.precision] for v in old.variants
    }
    checks = {
        "graphs_identical": same_graphs,
        "embeddings_identical": all(
            np.array_equal(before[p]["embedding"], after[p]["embedding"]) for p in old.precisions
        ),
        "labels_identical": all(
            np.array_equal(before[p]["labels"], after[p]["labels"]) for p in old.precisions
        ),
        "probs_equal_scaled": all(
            np.array_equal(
                temperature_scaled(before[p]["probs"], new.temperature), after[p]["probs"]
            )
            for p in old.precisions
        ),
    }
    if not all(checks.values()):
        raise SystemExit(f"the format 2 bundle serves other outputs: {checks}")
    metrics = {}
    for precision in new.precisions:
        cfg = EvaluateConfig(
            data=[str(kang)],
            label_key="cell_type",
            bundle=str(out),
            precision=precision,
            where=("condition=stimulated",),
            record=True,
        )
        m = evaluate(cfg)["classifier"]
        metrics[precision] = {k: m[k] for k in ("accuracy", "macro_f1", "ece", "ece_uncalibrated")}
    return {
        "from": str(source),
        "out": str(out),
        "sha256": new.sha256,
        "parameters": new.parameters,
        "calibration": calibration,
        "checks": checks,
        "stimulated": metrics,
    }


def _served(path: Path, kang: Path) -> dict:
    """Embeddings, labels and class probabilities of every Kang cell at each precision."""
    bundle = load_bundle(path)
    out: dict = {"graph_sha256": {v.precision: sha256_file(v.path) for v in bundle.variants}}
    for precision in bundle.precisions:
        with Model.load(path, device="cpu", precision=precision) as model:
            result = model.annotate(kang)
        out[precision] = {
            "embedding": result.embedding,
            "labels": result.predicted_labels,
            "probs": result.class_probs,
        }
    return out


def _calibration(kang: Path, bundle, served: dict) -> dict:
    """The temperature on the fine-tuning's validation cells (fp32, as served)."""
    with open_counts(kang) as counts:
        control = np.flatnonzero(obs_strings(counts.read_obs("condition")) == "control")
        labels = obs_strings(counts.read_obs("cell_type"))[control]
    index = {c: i for i, c in enumerate(bundle.labels)}
    codes = np.array([index[c] for c in labels.tolist()], dtype=np.int64)
    _, val = stratified_split(codes, VAL_FRACTION, SEED)
    probs = served["fp32"]["probs"][control[val]]
    return calibrate(probs, codes[val]) | {"cells": "Kang control, fine-tuning validation split"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kang", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--from", dest="source", type=Path, default=default_bundle())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = upgrade(args.kang, args.source, args.out)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
