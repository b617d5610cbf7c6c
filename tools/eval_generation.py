"""Pseudo-cell generation and gene completion on Kang (docs/results.md, "Generation"):
scGPT (pretrained and from scratch; the generative path and the GEPC decoder) beside simple
generators, on held-out cells, 3 sampling seeds.

    python tools/eval_generation.py --out build/generation [--seeds 0 1 2] [--tables]

Split: Kang's cells 80/20, stratified by cell type, seed 0 (OUT/kang_train.h5ad,
OUT/kang_test.h5ad). Runs (2,000 steps, small preset, tools/recipe.py's pretraining, seed 0):
"pretrained" on the unlabelled Liao and PBMC files plus the training cells (never the test
cells; the unlabelled Kang file is left out since it may hold them), "scratch" on the training
cells alone. Genes: the 1,000 most variable of the training cells; values log1p(CP10k).
Generation: as many cells per type as the test set has, prompted by the mean embedding of the
type's training cells (`scgpt_train.generate`). Baselines in the same run: per-type mean counts
with Poisson sampling, resampled training cells (memorises by construction), a per-type
Gaussian in the 50-PC space of the training cells.
Metrics against the test cells: Pearson of per-type means; Pearson of marker log fold changes
(each type's 20 top genes by mean difference to the other types in training, generated vs test
fold changes); RBF-MMD^2 on 50 PCs (bandwidth: median distance among test cells), mean over
types; a real-vs-generated logistic-regression AUC (5-fold, 0.5 is ideal); the median per-gene
variance ratio; the zero fraction; accuracy of a logistic regression fit on training cells
when it labels the generated ones; median distance to the nearest training cell (PC space),
generated against test cells'.
Completion: for each test cell, 30% of its expressed genes (seeded) are hidden and predicted
from the rest (`generate --complete`); Spearman per cell over the hidden genes against the
truth, beside the training mean of each gene and a 10-NN average (cosine on the cell's
observed genes). Results: OUT/results.json and OUT/generation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from scgpt_runtime.csr import CsrBlock
from scgpt_runtime.tokens import tokenize
from scgpt_train.cells import load_cells
from scgpt_train.checkpoint import load_run
from scgpt_train.gene_data import load_gene_cells
from scgpt_train.generate import Reference, complete, generate, token_expression
from scgpt_train.inference import embed

sys.path.insert(0, str(Path(__file__).parent))
from recipe import KANG_UNLABELLED, PRETRAIN_FILES, pretrain

DATA = Path(os.environ.get("SCGPT_DATA", "../shared/data"))
KANG = DATA / "labelled/kang2018_pbmc_counts.h5ad"
N_HVG, N_PCS, N_MARKERS, HIDE = 1000, 50, 20, 0.3
METHODS = (
    "pretrained gen",
    "pretrained gepc",
    "scratch gen",
    "scratch gepc",
    "poisson mean",
    "resampled training",
    "gaussian pca",
)
METRICS = (
    "mean_corr",
    "lfc_corr",
    "mmd",
    "auc",
    "var_ratio",
    "zero_frac",
    "lr_accuracy",
    "nn_distance",
)


def split(work: Path) -> tuple[Path, Path]:
    train, test = work / "kang_train.h5ad", work / "kang_test.h5ad"
    if not train.exists():
        a = ad.read_h5ad(KANG)
        rng = np.random.default_rng(0)
        is_test = np.zeros(a.n_obs, bool)
        for t in np.unique(a.obs["cell_type"]):
            rows = np.flatnonzero(a.obs["cell_type"].to_numpy() == t)
            is_test[rng.choice(rows, round(0.2 * len(rows)), replace=False)] = True
        a[~is_test].copy().write_h5ad(train)
        a[is_test].copy().write_h5ad(test)
    return train, test


def log_cp10k(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Dense counts, log1p(CP10k), labels and gene names of a file."""
    a = ad.read_h5ad(path)
    x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    x = x.astype(np.float64)
    return (
        x,
        np.log1p(x / x.sum(1, keepdims=True) * 1e4),
        a.obs["cell_type"].to_numpy(),
        list(a.var_names),
    )


def baselines(counts, train_y, test_counts_per_type, cols, pca, train_pc, rng) -> dict:
    """Generated cells of the simple generators: {name: (x over cols, labels)}."""
    out = {}
    labels = np.concatenate([[t] * n for t, n in test_counts_per_type.items()])
    parts = {"poisson mean": [], "resampled training": [], "gaussian pca": []}
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[:, cols]
    for t, n in test_counts_per_type.items():
        rows = np.flatnonzero(train_y == t)
        sampled = rng.poisson(counts[rows].mean(0), size=(n, counts.shape[1])).astype(np.float64)
        total = np.maximum(sampled.sum(1, keepdims=True), 1)
        parts["poisson mean"].append(np.log1p(sampled / total * 1e4)[:, cols])
        parts["resampled training"].append(lognorm[rng.choice(rows, n)])
        z = train_pc[rows]
        draw = rng.multivariate_normal(z.mean(0), np.cov(z, rowvar=False), size=n)
        parts["gaussian pca"].append(np.maximum(pca.inverse_transform(draw), 0))
    for name, p in parts.items():
        out[name] = (np.concatenate(p), labels)
    return out


def metrics(gen, gen_y, test, test_y, train, train_y, pca, lr) -> dict:
    types = sorted(set(test_y))
    pcs = {k: pca.transform(v) for k, v in (("gen", gen), ("test", test), ("train", train))}
    mean_corr, mmd, var_ratio = [], [], []
    lfc_gen, lfc_test = [], []
    for t in types:
        g, r = gen[gen_y == t], test[test_y == t]
        mean_corr.append(np.corrcoef(g.mean(0), r.mean(0))[0, 1])
        mmd.append(_mmd(pcs["gen"][gen_y == t], pcs["test"][test_y == t]))
        ok = r.var(0) > 0
        var_ratio.append(np.median(g.var(0)[ok] / r.var(0)[ok]))
        rest_train = train[train_y != t].mean(0)
        markers = np.argsort(-(train[train_y == t].mean(0) - rest_train))[:N_MARKERS]
        lfc_gen.append(g.mean(0)[markers] - gen[gen_y != t].mean(0)[markers])
        lfc_test.append(r.mean(0)[markers] - test[test_y != t].mean(0)[markers])
    both = np.concatenate([pcs["gen"], pcs["test"]])
    is_gen = np.r_[np.ones(len(gen)), np.zeros(len(test))]
    auc = cross_val_score(
        LogisticRegression(max_iter=1000), both, is_gen, cv=5, scoring="roc_auc"
    ).mean()
    return {
        "mean_corr": float(np.mean(mean_corr)),
        "lfc_corr": float(np.corrcoef(np.concatenate(lfc_gen), np.concatenate(lfc_test))[0, 1]),
        "mmd": float(np.mean(mmd)),
        "auc": float(auc),
        "var_ratio": float(np.mean(var_ratio)),
        "zero_frac": float((gen == 0).mean()),
        "lr_accuracy": float((lr.predict(gen) == gen_y).mean()),
        "nn_distance": float(np.median(_nearest(pcs["gen"], pcs["train"]))),
    }


def _mmd(a: np.ndarray, b: np.ndarray) -> float:
    """Biased RBF-MMD^2; bandwidth: the median distance among b."""
    d_bb = np.linalg.norm(b[:, None] - b[None], axis=-1)
    gamma = 1 / (2 * np.median(d_bb[d_bb > 0]) ** 2)

    def k(x, y):
        return np.exp(-gamma * ((x[:, None] - y[None]) ** 2).sum(-1)).mean()

    return float(k(a, a) + k(b, b) - 2 * k(a, b))


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1).min(axis=1))


def completion(run: Path, test_counts, test_log, genes, train_log, seed: int) -> dict:
    """Spearman per test cell over its hidden genes: scGPT, gene mean, 10-NN."""
    model, info = load_run(str(run))
    model.eval()
    ids = np.array(info.vocab.lookup(genes))
    rng = np.random.default_rng(seed)
    gene_mean = train_log.mean(0)
    scores = {"scGPT": [], "gene mean": [], "10-NN": []}
    for i in range(len(test_counts)):
        expressed = np.flatnonzero(test_counts[i] > 0)
        hidden = rng.choice(expressed, max(1, int(HIDE * len(expressed))), replace=False)
        seen = test_counts[i].copy()
        seen[hidden] = 0
        tok = tokenize(
            CsrBlock.from_dense(seen[None]), ids, info.tokens, info.vocab.cls_id, info.vocab.pad_id
        ).trim()
        observed = np.log1p(seen / seen.sum() * 1e4)[None]
        values = token_expression(tok, ids, observed)
        pred = complete(model, tok, values, ids[hidden], info.tokens.n_bins)[0]
        q = observed[0]
        ref = train_log.copy()
        ref[:, hidden] = 0
        cos = ref @ q / (np.linalg.norm(ref, axis=1) * np.linalg.norm(q) + 1e-12)
        knn = train_log[np.argsort(-cos)[:10]][:, hidden].mean(0)
        truth = test_log[i, hidden]
        for name, p in (("scGPT", pred), ("gene mean", gene_mean[hidden]), ("10-NN", knn)):
            rho = spearmanr(p, truth)[0] if len(hidden) > 2 else np.nan
            scores[name].append(rho)
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def evaluate(work: Path, seeds: list[int]) -> dict:
    train_path, test_path = split(work)
    runs = {
        "pretrained": pretrain(
            work / "pretrained",
            [*(DATA / f for f in PRETRAIN_FILES if f != KANG_UNLABELLED), train_path],
            KANG,
        ),
        "scratch": pretrain(work / "scratch", [train_path], KANG),
    }
    counts, train_all, train_y, names = log_cp10k(train_path)
    test_counts, test_all, test_y, _ = log_cp10k(test_path)
    _, info = load_run(str(runs["pretrained"]))
    hvg = load_gene_cells(train_path, info.vocab, info.tokens, n_top=N_HVG, with_bins=False)
    cols = np.array([names.index(g) for g in hvg.genes])
    train, test = train_all[:, cols], test_all[:, cols]
    pca = PCA(N_PCS, random_state=0).fit(train)
    train_pc = pca.transform(train)
    lr = LogisticRegression(max_iter=2000).fit(train, train_y)
    per_type = {t: int((test_y == t).sum()) for t in sorted(set(test_y))}
    results: dict = {
        "n_train": len(train),
        "n_test": len(test),
        "genes": len(cols),
        "per_type": per_type,
        "generation": {},
        "completion": {},
    }
    real = metrics(test, test_y, test, test_y, train, train_y, pca, lr)
    results["test_cells_themselves"] = real
    for seed in seeds:
        rng = np.random.default_rng(seed)
        made = baselines(counts, train_y, per_type, cols, pca, train_pc, rng)
        for name, run in runs.items():
            model, info = load_run(str(run))
            cells = load_gene_cells(
                train_path, info.vocab, info.tokens, genes=hvg.genes, label_key="cell_type"
            )
            tokens = load_cells([str(train_path)], info.vocab, info.tokens).tokens
            ref = Reference(cells, embed(model, tokens))
            for decoder in ("gen", "gepc"):
                made[f"{name} {decoder}"] = generate(
                    model,
                    ref,
                    per_type,
                    decoder=decoder,
                    prompt="mean",
                    cls=(info.vocab.cls_id, info.tokens.cls_value),
                    n_bins=info.tokens.n_bins,
                    seed=seed,
                )
        for method, (x, y) in made.items():
            m = metrics(x, y, test, test_y, train, train_y, pca, lr)
            results["generation"].setdefault(method, []).append(m)
            print(f"seed {seed} {method}: {m}", file=sys.stderr, flush=True)
        for name, run in runs.items():
            c = completion(run, test_counts, test_all, names, train_all, seed)
            results["completion"].setdefault(name, []).append(c)
    return results


def mean_sd(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std():.3f}"


def markdown(r: dict) -> str:
    lines = [
        f"\nGeneration, {r['n_test']} test cells vs {r['n_train']} training cells, "
        f"{r['genes']} HVGs (mean ± sd over seeds):\n",
        "| method | " + " | ".join(METRICS) + " |",
        "|" + "---|" * (1 + len(METRICS)),
    ]
    real = r["test_cells_themselves"]
    lines.append(
        "| test cells themselves | " + " | ".join(f"{real[k]:.3f}" for k in METRICS) + " |"
    )
    for method in METHODS:
        rows = r["generation"][method]
        lines.append(
            f"| {method} | " + " | ".join(mean_sd([x[k] for x in rows]) for k in METRICS) + " |"
        )
    lines += [
        "\nCompletion (Spearman per cell over the 30% hidden expressed genes):\n",
        "| model | scGPT | gene mean | 10-NN |",
        "|---|---|---|---|",
    ]
    for name, rows in r["completion"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(mean_sd([x[k] for x in rows]) for k in ("scGPT", "gene mean", "10-NN"))
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/generation"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tables", action="store_true", help="only redo OUT/generation.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    if not args.tables:
        path.write_text(json.dumps(evaluate(args.out, args.seeds), indent=1, default=float))
    results = json.loads(path.read_text())
    (args.out / "generation.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
