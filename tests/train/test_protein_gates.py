"""tools/eval_protein_gates.py: the protein gates give each cell the type of its markers, and
the agreement scores count a call against them (the default model's check on the sample)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np

TOOL = Path(__file__).resolve().parents[2] / "tools" / "eval_protein_gates.py"
spec = importlib.util.spec_from_file_location("eval_protein_gates", TOOL)
gates = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gates)

PROTEINS = ["CD3", "CD4", "CD8a", "CD14", "CD16", "CD56", "CD19"]
# the markers each cell carries high, and the type the gates must give it
CELLS = [
    (("CD3", "CD4"), "CD4T"),
    (("CD3", "CD8a"), "CD8T"),
    (("CD19",), "B"),
    (("CD56", "CD16"), "NK"),
    (("CD14",), "CD14+Mono"),
    (("CD14", "CD16"), "FCGR3A+Mono"),
]


def write_sample(path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    counts, truth = [], []
    for _ in range(20):  # enough cells for a z-score per protein
        for high, label in CELLS:
            row = rng.integers(5, 15, size=len(PROTEINS))
            row[[PROTEINS.index(p) for p in high]] = 2000
            if label == "FCGR3A+Mono":
                row[PROTEINS.index("CD16")] = 20000  # CD16 over CD14: the non-classical ones
            counts.append(row)
            truth.append(label)
    with h5py.File(path, "w") as f:
        f["obsm/protein_expression"] = np.array(counts)
        f["uns/protein_names"] = np.array([f"{p}_TotalSeqB" for p in PROTEINS], dtype="S")
    return truth


def test_gates_give_each_cell_the_type_of_its_markers(tmp_path):
    truth = write_sample(tmp_path / "sample.h5")
    assert gates.gated_labels(tmp_path / "sample.h5").tolist() == truth


def test_scores_count_lineage_and_type_agreement():
    gated = np.array(["CD4T", "CD8T", "CD14+Mono", "B"])
    called = np.array(["CD8T", "CD8T", "Dendritic", "B"])
    s = gates.scores(gated, called)
    assert s["lineage_accuracy"] == 0.75  # CD8T for CD4T is still a T cell; Dendritic is not
    assert s["accuracy"] == 0.5
    assert s["predicted"] == {"B": 1, "CD8T": 2, "Dendritic": 1}
