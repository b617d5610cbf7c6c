"""Multi-omics on the CITE-seq files, label-free, scGPT beside the baselines in one run.

    python tools/eval_multiomics.py --out build/multiomics

Per file (CiteFuse ECCITE PBMC 500 cells, 49 proteins; 10x PBMC 10k protein, 200 cells, 14):
- The gating proteins (CD3, CD4, CD8, CD14, CD16, CD19, CD56) are kept out of every model's
  input (a copy of the file without them is written to OUT), so no score below is circular.
- Pseudo-labels: per-cell CLR of every protein; a protein is "+" where a two-component
  Gaussian mixture on its CLR puts the cell in the upper component; CD4 T = CD3+ CD4+ CD8-,
  CD8 T = CD3+ CD8+ CD4-, B = CD19+ CD3-, NK = CD56+ CD3- CD19-, CD14 mono = CD14+ CD3- CD19-
  CD56-, CD16 mono = CD16+ CD14- CD3- CD19- CD56-; other cells are unassigned and not scored.
- Methods: scGPT joint (finetune multiomic rna + the other proteins from each of the three
  pretrainings of tools/eval_genes.py, made where missing; defaults, and --mod-input), scGPT
  RNA only (the same pretrainings, zero-shot), RNA PCA (2,000 HVGs of log1p CP10k, 50 PCs),
  RNA PCA + CLR protein PCA concatenated (each block scaled to unit total variance), WNN
  (muon's, on those RNA and protein PCs, where muon is installed).
- Metrics: agreement of the RNA-only and protein-only views of the same cells (scGPT: the
  joint model given only one modality's tokens; baselines: RNA PCA against protein PCA):
  FOSCTTM (same space only; 0.5 is chance) and kNN overlap at k 15; cross-validated (5 folds
  over cells) ridge prediction of each gating protein's CLR from the embedding, Spearman per
  protein; on the pseudo-labels, k-means with k = number of labels (as docs/results.md's
  integration protocol) for NMI and ARI, label ASW, AvgBIO (WNN: Leiden on its graph with the
  resolution giving that many clusters; no ASW). Seeds: 3 pretrainings (scGPT), 3 k-means and
  fold seeds (all methods).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_genes import pretrain
from recipe import run, stat

from scgpt_runtime.io import open_counts
from scgpt_runtime.modalities import feature_names
from scgpt_runtime.preprocess import highly_variable_genes
from scgpt_runtime.tokens import MODALITY, PAD_MASK, TokenBlock
from scgpt_train.cells import load_cells
from scgpt_train.checkpoint import load_run
from scgpt_train.inference import embed
from scgpt_train.metrics import ari, kmeans, knn_indices, nmi, silhouette
from scgpt_train.multiomic_data import load_multiomic_cells

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wave2" / "multiomics"
FILES = {
    "citefuse": ("citefuse_eccite_pbmc_500cells.h5mu", "adt"),
    "pbmc10k": ("scvi_pbmc_10k_protein_v3_200cells.h5mu", "prot"),
}
GATING = ("CD3", "CD4", "CD8", "CD14", "CD16", "CD19", "CD56")
ALIASES = {"CD8a": "CD8"}  # the 10x panel's CD8 antibody
PRETRAINED = Path("build/genes")  # tools/eval_genes.py's pretrainings, seeds 0-2
K = 15


def clr(x: np.ndarray) -> np.ndarray:
    """Per-cell centred log-ratio of protein counts: log1p(x) minus the cell's mean log1p."""
    y = np.log1p(x.astype(np.float64))
    return y - y.mean(axis=1, keepdims=True)


def read_modality(path: Path, name: str) -> tuple[np.ndarray, list[str]]:
    """Dense cells x features counts of one modality, and its feature names (matched form)."""
    with open_counts(path, modalities=[name]) as counts:
        part = counts.part(name)
        x = np.concatenate([b.to_dense() for b in counts.iter_blocks()])
        names = [str(n) for n in feature_names(part, "protein")["index"]]
    return x, [ALIASES.get(n, n) for n in names]


def positive(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """Cells in the upper component of a two-component Gaussian mixture of `values`."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(2, random_state=seed).fit(values[:, None])
    upper = int(np.argmax(gm.means_.ravel()))
    return gm.predict_proba(values[:, None])[:, upper] > 0.5


def gate(protein: np.ndarray, names: list[str]) -> np.ndarray:
    """Pseudo-labels of the module doc (None: unassigned)."""
    c = clr(protein)
    pos = {g: positive(c[:, names.index(g)]) for g in GATING}
    rules = {
        "CD4 T": pos["CD3"] & pos["CD4"] & ~pos["CD8"],
        "CD8 T": pos["CD3"] & pos["CD8"] & ~pos["CD4"],
        "B": pos["CD19"] & ~pos["CD3"],
        "NK": pos["CD56"] & ~pos["CD3"] & ~pos["CD19"],
        "CD14 mono": pos["CD14"] & ~pos["CD3"] & ~pos["CD19"] & ~pos["CD56"],
        "CD16 mono": pos["CD16"] & ~pos["CD14"] & ~pos["CD3"] & ~pos["CD19"] & ~pos["CD56"],
    }
    labels = np.full(len(c), None, dtype=object)
    for name, hit in rules.items():
        labels[hit & (labels == None)] = name  # noqa: E711 (element-wise)
    return labels


def without_gating(path: Path, modality: str, out: Path) -> Path:
    """A copy of the file whose protein modality lacks the gating proteins (mudata writes it)."""
    import mudata

    if out.exists():
        return out
    mdata = mudata.read_h5mu(path)
    prot = mdata.mod[modality]
    names = [ALIASES.get(n, n) for n in (s.split("_TotalSeq")[0] for s in prot.var_names)]
    mdata.mod[modality] = prot[:, [n not in GATING for n in names]].copy()
    mdata.update()
    mdata.write_h5mu(out)
    return out


def rna_pca(path: Path, n_pcs: int = 50) -> np.ndarray:
    """50 PCs of the 2,000 HVGs of log1p CP10k."""
    with open_counts(path, modalities=["rna"]) as counts:
        blocks = list(counts.iter_blocks())
        n = counts.n_genes
    hvg = highly_variable_genes(blocks, 2000, n)
    x = np.concatenate([b.to_dense() for b in blocks]).astype(np.float64)
    x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)[:, hvg]
    return pca(x, n_pcs)


def pca(x: np.ndarray, n: int) -> np.ndarray:
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :n] * s[:n]


def unit(x: np.ndarray) -> np.ndarray:
    """Scaled to total variance 1 (blocks of a concatenation weigh the same)."""
    return x / np.sqrt(x.var(axis=0).sum())


def view(tokens: TokenBlock, keep: int) -> TokenBlock:
    """The cells with only the tokens of modality `keep` (others moved to the end as padding)."""
    mod, pad = tokens.inputs[MODALITY], tokens.inputs[PAD_MASK]
    drop = (mod != keep) & ~pad
    drop[:, 0] = False  # <cls> stays
    order = np.argsort(drop | pad, axis=1, kind="stable")  # kept first, in their order
    inputs = {k: np.take_along_axis(a, order, axis=1) for k, a in tokens.inputs.items()}
    n = (~pad & ~drop).sum(axis=1) - 1
    inputs[PAD_MASK] = np.arange(pad.shape[1])[None] > n[:, None]
    return TokenBlock(inputs, n.astype(np.int64), tokens.start)


def foscttm(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of cells closer to a cell's view in `a` than its own view in `b` (cosine)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    d = 1 - a @ b.T
    own = np.diag(d)
    return float(((d < own[:, None]).mean(1) + (d < own[None]).mean(0)).mean() / 2)


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = K) -> float:
    """Mean share of a cell's k nearest neighbours in `a` that are among those in `b`."""
    na, nb = knn_indices(a, k), knn_indices(b, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb, strict=True)]))


def protein_spearman(x: np.ndarray, targets: np.ndarray, seed: int) -> list[float]:
    """Spearman per target of 5-fold out-of-fold ridge predictions (alpha by inner CV)."""
    from scipy.stats import spearmanr
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold

    pred = np.zeros_like(targets)
    for train, test in KFold(5, shuffle=True, random_state=seed).split(x):
        model = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x[train], targets[train])
        pred[test] = model.predict(x[test])
    return [float(spearmanr(pred[:, j], targets[:, j]).statistic) for j in range(targets.shape[1])]


def bio(x: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    assigned = labels != None  # noqa: E711
    x, y = x[assigned].astype(np.float64), labels[assigned].astype(str)
    clusters = kmeans(x, len(np.unique(y)), seed=seed)
    res = {"nmi": nmi(y, clusters), "ari": ari(y, clusters), "asw": (silhouette(x, y) + 1) / 2}
    res["avg_bio"] = (res["nmi"] + res["ari"] + res["asw"]) / 3
    return res


def wnn_clusters(rna: np.ndarray, prot: np.ndarray, n_clusters: int, seed: int):
    """Leiden on muon's WNN graph of the RNA and protein PCs, at the resolution giving
    `n_clusters`; None without muon. The PCs are this tool's own (scanpy's numba-compiled
    preprocessing crashes in this environment); neighbours are scanpy's exact Gaussian ones."""
    try:
        import anndata
        import muon
        import scanpy as sc
    except ImportError:
        return None
    views = {}
    for name, x in (("rna", rna), ("prot", prot)):
        view = anndata.AnnData(np.zeros((len(x), 1), np.float32))
        view.obsm["X_pca"] = x
        sc.pp.neighbors(view, n_neighbors=K, use_rep="X_pca", method="gauss", transformer="sklearn")
        views[name] = view
    mdata = muon.MuData(views)
    # muon's default 200 candidates per modality crash pynndescent where a file holds 200 cells
    candidates = min(200, len(rna) // 2)
    muon.pp.neighbors(mdata, n_neighbors=K, n_multineighbors=candidates, random_state=seed)
    lo, hi = 0.01, 5.0
    for _ in range(30):  # the resolution giving n_clusters, by bisection
        res = (lo + hi) / 2
        sc.tl.leiden(
            mdata,
            resolution=res,
            random_state=seed,
            key_added="wnn",
            flavor="igraph",
            n_iterations=-1,
        )
        found = mdata.obs["wnn"].nunique()
        if found == n_clusters:
            break
        lo, hi = (res, hi) if found < n_clusters else (lo, res)
    return np.asarray(mdata.obs["wnn"].astype(str))


def finetune(run_dir: Path, pretrained: Path, data: Path, modality: str, seed: int, mod_input):
    if (run_dir / "model.safetensors").exists():
        return run_dir
    cmd = ["scgpt-train", "finetune", "multiomic", "--from", str(pretrained), "--data", str(data)]
    cmd += ["--modalities", f"rna,{modality}", "--out", str(run_dir), "--seed", str(seed)]
    cmd += ["--overwrite", "--json"] + (["--mod-input"] if mod_input else [])
    run(cmd, run_dir.with_suffix(".json"))
    return run_dir


def evaluate_file(key: str, out: Path, seeds: list[int]) -> dict:
    name, modality = FILES[key]
    path = DATA / name
    protein, names = read_modality(path, modality)
    labels = gate(protein, names)
    gating = clr(protein)[:, [names.index(g) for g in GATING]]
    rest = [i for i, n in enumerate(names) if n not in GATING]
    clean = without_gating(path, modality, out / f"{key}.without-gating.h5mu")
    n_labels = len({v for v in labels if v is not None})
    methods: dict[str, list[np.ndarray]] = {}
    views: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    rna = rna_pca(path)
    prot = pca(clr(protein[:, rest]), min(20, len(rest) - 1))
    methods["RNA PCA"] = [rna]
    methods["RNA PCA + CLR protein PCA"] = [np.hstack([unit(rna), unit(prot)])]
    views["RNA PCA vs protein PCA"] = [(rna, prot)]
    for seed in seeds:
        pre = pretrain(PRETRAINED, seed)  # where tools/eval_genes.py has not already
        model, info = load_run(pre)
        rna_cells = load_cells([str(DATA / name)], info.vocab, info.tokens)  # rna modality
        methods.setdefault("scGPT RNA only (zero-shot)", []).append(embed(model, rna_cells.tokens))
        for label, mod_input in (("scGPT joint", False), ("scGPT joint + mod input", True)):
            tag = f"{key}-{'modinput' if mod_input else 'joint'}-seed{seed}"
            ft = finetune(out / tag, pre, clean, modality, seed, mod_input)
            m, i = load_run(ft)
            cells, _ = load_multiomic_cells([str(clean)], i.vocab, i.tokens, i.modalities)
            methods.setdefault(label, []).append(embed(m, cells.tokens))
            views.setdefault(label, []).append(
                (embed(m, view(cells.tokens, 0)), embed(m, view(cells.tokens, 1)))
            )
    rows = {}
    for label, embeddings in methods.items():  # one embedding, or one per pretraining seed
        per_seed = [(s, embeddings[i % len(embeddings)]) for i, s in enumerate(seeds)]
        scores = [bio(x, labels, s) for s, x in per_seed]
        spear = [float(np.mean(protein_spearman(x, gating, s))) for s, x in per_seed]
        rows[label] = {**_mean_sd(scores), "protein_spearman": stat(spear)}
    for label, pairs in views.items():
        rows.setdefault(label, {})["views"] = {
            "knn_overlap": stat([knn_overlap(a, b) for a, b in pairs]),
            "foscttm": None if "PCA" in label else stat([foscttm(a, b) for a, b in pairs]),
        }
    wnn = [wnn_clusters(rna, prot, n_labels, s) for s in seeds]
    if wnn[0] is not None:
        assigned = labels != None  # noqa: E711
        y = labels[assigned].astype(str)
        scores = [{"nmi": nmi(y, c[assigned]), "ari": ari(y, c[assigned])} for c in wnn]
        rows["WNN (muon)"] = _mean_sd(scores)
    counts = {k: int((labels == k).sum()) for k in sorted({v for v in labels if v is not None})}
    return {
        "file": name,
        "n_cells": len(labels),
        "proteins_in_input": [names[i] for i in rest],
        "pseudo_labels": counts,
        "unassigned": int((labels == None).sum()),  # noqa: E711
        "methods": rows,
    }


def _mean_sd(scores: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: stat([s[k] for s in scores]) for k in scores[0]}


def tables(results: dict) -> str:
    """The results as the markdown tables of docs/results.md (mean ± sd over the seeds)."""

    def cell(x: dict | None) -> str:
        return "-" if not x else f"{x['mean']:.3f} ± {x['sd']:.3f}"

    lines = []
    for key in FILES:
        r = results[key]
        lines += [
            f"{r['file']}: {r['n_cells']} cells, {r['unassigned']} unassigned, "
            f"labels {r['pseudo_labels']}, {len(r['proteins_in_input'])} proteins in input",
            "",
            "| method | NMI | ARI | ASW | AvgBIO | protein Spearman | kNN overlap | FOSCTTM |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in r["methods"].items():
            v = m.get("views", {})
            row = [m.get(k) for k in ("nmi", "ari", "asw", "avg_bio", "protein_spearman")]
            row += [v.get("knn_overlap"), v.get("foscttm")]
            lines.append(f"| {name} | " + " | ".join(cell(x) for x in row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/multiomics"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tables", action="store_true", help="Redo OUT/multiomics.md only.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tables:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "multiomics.md").write_text(tables(results))
        return
    t0 = time.perf_counter()
    seeds = list(range(args.seeds))
    results = {key: evaluate_file(key, args.out, seeds) for key in FILES}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "multiomics.md").write_text(tables(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
