"""Gene embeddings, attention networks and gene programs on Kang (docs/results.md, "Genes"):
scGPT pretrained and random-initialised against co-expression and controls, 3 seeds.

    python tools/eval_genes.py --out build/genes [--seeds 0 1 2] [--tables]

Pretrained runs OUT/pretrained-seed{S}: the small preset, tools/recipe.py's pretraining on the
unlabelled files with the Kang vocabulary, 2,000 steps (pretrained first where missing). The
random-initialised model of seed S is the same configuration, initialised with seed S and never
trained. Every score is computed in one run on the same cells (all Kang cells, log1p(CP10k)):
  pairs     gene encoder cosine, contextual cosine (mean transformer output over the cells;
            a gene never a token scores 0), attention ((A[i,j] + A[j,i]) / 2), Pearson and
            Spearman co-expression, cosine of 50-PC gene loadings (scaled by the singular
            values), a random 64-d embedding, a degree-only control (leave-one-out)
  truths    GO-CC complex and Hallmark co-membership vs degree-matched random pairs (seeded);
            CollecTRI TF -> target per TF (median over TFs with >= 10 targets; evaluation only,
            never shipped)
  universes every gene of Kang in the vocabulary expressed in >= 10 cells (no attention), and
            the 1,000 most variable genes (attention included; 300 cells averaged)
  programs  the `genes programs` pipeline on the 1,200 most variable genes with encoder
            embeddings, the same pipeline on co-expression (gene vectors = z-scored values:
            cosine = Pearson), random programs of the same sizes; Leiden resolution chosen per
            method on Reactome (validation gene sets) among RESOLUTIONS: the one with the most
            programs at a BH q < 0.05, ties to the higher; then the share and number of
            programs with a BH q < 0.05 set in GO BP and Hallmark reported.
Results: OUT/results.json and OUT/genes.md (--programs redoes the programs part only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scgpt_runtime.vocab import SPECIALS
from scgpt_train.cells import load_cells
from scgpt_train.checkpoint import load_run
from scgpt_train.gene_attention import attention_network
from scgpt_train.gene_data import load_gene_cells
from scgpt_train.gene_embeddings import contextual_embeddings, encoder_embeddings
from scgpt_train.gene_evaluation import (
    co_member_pairs,
    degree_matched_negatives,
    in_degree_control,
    leave_one_out_degree,
    pair_task,
    tf_task,
)
from scgpt_train.gene_programs import (
    Programs,
    cosine_matrix,
    enriched,
    enrichment,
    find_programs,
    read_gmt,
    zscores,
)
from scgpt_train.model import ScGPT

sys.path.insert(0, str(Path(__file__).parent))
from recipe import PRETRAIN_FILES
from recipe import pretrain as recipe

DATA = Path(os.environ.get("SCGPT_DATA", "../shared/data"))
KANG = DATA / "labelled/kang2018_pbmc_counts.h5ad"
SETS = DATA / "wave2/genesets"
GMT = {
    "go_cc": SETS / "GO_CC_complexes_direct_noIEA_3-200.gmt",
    "hallmark": SETS / "h.all.v7.5.1.symbols.gmt",
    "go_bp": SETS / "GO_BP_noIEA_propagated_5-500_orgHsEgDb3.16.gmt",
    "reactome": SETS / "reactome_from_c2.cp.v7.5.1.gmt",
}
COLLECTRI = SETS / "collectri_human_43k.tsv"
MIN_CELLS, N_ATTENTION, ATTENTION_CELLS, N_PROGRAM_GENES = 10, 1000, 300, 1200
RESOLUTIONS = (0.5, 1.0, 2.0, 5.0, 10.0)
PAIR_METHODS = (
    "encoder",
    "contextual",
    "attention",
    "pearson",
    "spearman",
    "pca50",
    "random",
    "degree",
)


def pretrain(work: Path, seed: int) -> Path:
    files = [DATA / f for f in PRETRAIN_FILES]
    return recipe(work / f"pretrained-seed{seed}", files, KANG, seed=seed)


def collectri(genes: list[str]) -> dict[int, set[int]]:
    """TF index -> target indices among `genes` (signs ignored)."""
    index = {g: i for i, g in enumerate(genes)}
    edges: dict[int, set[int]] = {}
    for line in COLLECTRI.read_text().splitlines()[1:]:
        tf, target = line.split("\t")[:2]
        if tf in index and target in index and tf != target:
            edges.setdefault(index[tf], set()).add(index[target])
    return edges


def baselines(x: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Gene x gene similarities from the cells alone."""
    _, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    return {
        "pearson": np.corrcoef(x, rowvar=False),
        "spearman": np.corrcoef(_average_ranks(x), rowvar=False),
        "pca50": cosine_matrix(vt[:50].T * s[:50]),
        "random": cosine_matrix(rng.standard_normal((x.shape[1], 64))),
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Spearman ranks per column: tied values (most are zeros) get their average rank."""
    out = np.empty(x.shape)
    for j in range(x.shape[1]):
        _, inverse, counts = np.unique(x[:, j], return_inverse=True, return_counts=True)
        out[:, j] = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return out


def model_similarities(model: ScGPT, info, universe_ids: np.ndarray) -> dict:
    """Encoder and contextual cosine over the universe (vocabulary ids)."""
    kang = load_cells([str(KANG)], info.vocab, info.tokens)
    contextual, seen = contextual_embeddings(model, kang.tokens, len(info.vocab))
    return {
        "encoder": cosine_matrix(encoder_embeddings(model, universe_ids)),
        "contextual": cosine_matrix(np.nan_to_num(contextual[universe_ids])),
        "seen": int((seen[universe_ids] > 0).sum()),
    }


def score_universe(sims: dict, genes: list[str], seed: int) -> dict:
    """Every task for every similarity of `sims` over `genes`."""
    rng = np.random.default_rng(seed)
    directed = {m: v for m, v in sims.items() if m != "attention"}
    if "attention_directed" in sims:
        sims = {m: v for m, v in sims.items() if m != "attention_directed"}
        directed["attention"] = directed.pop("attention_directed")
    out = {}
    for name in ("go_cc", "hallmark"):
        positives = co_member_pairs(read_gmt(GMT[name]).values(), genes)
        negatives = degree_matched_negatives(positives, rng)
        sims_all = {**sims, "degree": leave_one_out_degree(len(genes), positives)}
        out[name] = {m: pair_task(s, positives, negatives) for m, s in sims_all.items()}
    edges = collectri(genes)
    directed["degree"] = in_degree_control(len(genes), edges)
    out["collectri"] = {m: tf_task(v, edges) for m, v in directed.items()}
    return out


def programs_share(genes, vectors, rng_seed, sizes=None) -> dict:
    """Share and number of programs enriched (BH q < 0.05) per gene-set file; the resolution
    is the one with the most Reactome-enriched programs, ties to the higher (the share alone
    favours a few huge programs)."""
    sets = {k: read_gmt(GMT[k]) for k in ("reactome", "go_bp", "hallmark")}
    if sizes is not None:  # random programs of the given sizes
        order = np.random.default_rng(rng_seed).permutation(len(genes))
        bounds = np.cumsum([0, *sizes])
        progs = Programs(genes, [order[a:b].tolist() for a, b in itertools.pairwise(bounds)])
        return {"resolution": None, **_shares(progs, sets), "sizes": list(sizes)}
    best = None
    for r in RESOLUTIONS:
        progs = find_programs(genes, vectors, resolution=r, seed=rng_seed)
        hits = _shares(progs, {"reactome": sets["reactome"]})["reactome_programs"]
        if best is None or hits >= best[0]:  # ties: the finer programs
            best = (hits, r, progs)
    _, r, progs = best
    return {
        "resolution": r,
        **_shares(progs, sets),
        "sizes": [len(m) for m in progs.members],
        "examples": _examples(progs, sets),
    }


def _shares(progs: Programs, sets: dict) -> dict:
    out = {}
    for name, gene_sets in sets.items():
        hits = enriched(enrichment(progs, gene_sets, name)).get(name, set())
        out[name] = len(hits) / max(len(progs.members), 1)
        out[f"{name}_programs"] = len(hits)
    return out


def _examples(progs: Programs, sets: dict) -> list[dict]:
    """The two programs with the smallest GO BP / Hallmark q, with their top terms."""
    rows = [r for k in ("go_bp", "hallmark") for r in enrichment(progs, sets[k], k)]
    best = sorted(rows, key=lambda r: r["q"])
    chosen, out = [], []
    for r in best:
        if r["program"] not in chosen:
            chosen.append(r["program"])
        if len(chosen) == 2:
            break
    names = progs.names()
    for p in chosen:
        terms = [(r["gene_set"], r["q"]) for r in best if r["program"] == p][:3]
        genes = progs.gene_lists()[names.index(p)]
        out.append({"program": p, "genes": genes, "terms": terms})
    return out


def models(work: Path, seed: int) -> tuple[ScGPT, ScGPT, Any]:
    """The pretrained run of a seed, and the same configuration initialised with that seed."""
    trained, info = load_run(str(pretrain(work, seed)))
    torch.manual_seed(seed)
    return trained, ScGPT(info.model).eval(), info


def evaluate_seed(work: Path, seed: int) -> dict:
    trained, random_init, info = models(work, seed)
    kang = load_gene_cells(
        KANG, info.vocab, info.tokens, genes=_kang_genes(info.vocab), with_bins=False
    )
    keep = (kang.expression > 0).sum(axis=0) >= MIN_CELLS
    genes = [g for g, k in zip(kang.genes, keep, strict=True) if k]
    ids, x = kang.gene_ids[keep], kang.expression[:, keep].astype(np.float64)
    base = baselines(x, np.random.default_rng(seed))
    hvg = load_gene_cells(KANG, info.vocab, info.tokens, n_top=N_ATTENTION, with_bins=False)
    expressed = set(genes)  # rare variable genes out: the same universe as the other scores
    hvg = load_gene_cells(
        KANG, info.vocab, info.tokens, genes=[g for g in hvg.genes if g in expressed]
    )
    hvg_index = [genes.index(g) for g in hvg.genes]
    cells = np.sort(np.random.default_rng(seed).choice(len(hvg.rows), ATTENTION_CELLS, False))
    result: dict = {"seed": seed, "n_genes": len(genes), "n_attention_genes": len(hvg.genes)}
    for name, model in (("pretrained", trained), ("random_init", random_init)):
        sims = model_similarities(model, info, ids)
        result[f"{name}_contextual_genes_seen"] = sims.pop("seen")
        result[name] = {"all": score_universe({**sims, **base}, genes, seed)}
        a = attention_network(model, hvg, cells, info.vocab.cls_id, info.tokens.cls_value)
        sub = {k: v[np.ix_(hvg_index, hvg_index)] for k, v in {**sims, **base}.items()}
        sub.update(attention=(a + a.T) / 2, attention_directed=a)
        result[name]["hvg"] = score_universe(sub, hvg.genes, seed)
        print(f"seed {seed} {name}: done", file=sys.stderr, flush=True)
    result["programs"] = evaluate_programs(trained, random_init, info, seed)
    return result


def evaluate_programs(trained: ScGPT, random_init: ScGPT, info, seed: int) -> dict:
    """Programs of the pretrained and random-initialised encoder embeddings, of
    co-expression, and random programs of the pretrained ones' sizes."""
    program_cells = load_gene_cells(
        KANG, info.vocab, info.tokens, n_top=N_PROGRAM_GENES, with_bins=False
    )
    z = zscores(program_cells.expression)
    progs = {
        "pretrained": programs_share(
            program_cells.genes, encoder_embeddings(trained, program_cells.gene_ids), seed
        ),
        "random_init": programs_share(
            program_cells.genes, encoder_embeddings(random_init, program_cells.gene_ids), seed
        ),
        "coexpression": programs_share(program_cells.genes, z.T, seed),
    }
    progs["random_programs"] = programs_share(
        program_cells.genes, None, seed, sizes=progs["pretrained"]["sizes"]
    )
    return progs


def _kang_genes(vocab) -> list[str]:
    return [g for g in vocab.names if g not in SPECIALS]


def descriptions() -> dict[str, str]:
    """Gene-set name -> its GMT description, where that is a title (GO ids have one)."""
    out = {}
    for path in GMT.values():
        for line in path.read_text().splitlines():
            name, description = line.split("\t")[:2]
            if not description.startswith("http"):
                out[name] = f"{name} {description}"
    return out


def mean_sd(values: list[float]) -> str:
    v = np.array([x for x in values if x is not None and not np.isnan(x)])
    return "n/a" if not len(v) else f"{v.mean():.3f} ± {v.std():.3f}"


def markdown(results: list[dict]) -> str:
    lines = []
    r0 = results[0]
    for universe, title in (
        ("all", f"all {r0['n_genes']} expressed genes"),
        ("hvg", f"{r0['n_attention_genes']} most variable genes"),
    ):
        lines += [f"\nGene pairs, {title} (AUROC / AUPRC, mean ± sd over {len(results)} seeds):\n"]
        tasks = ("go_cc", "hallmark", "collectri")
        header = "| method | " + " | ".join(f"{t} AUROC | {t} AUPRC" for t in tasks) + " |"
        lines += [header, "|" + "---|" * (1 + 2 * len(tasks))]
        for model in ("pretrained", "random_init"):
            for m in PAIR_METHODS:
                if m not in r0[model][universe]["go_cc"]:
                    continue
                if model == "random_init" and m not in ("encoder", "contextual", "attention"):
                    continue
                label = f"scGPT {model} {m}" if m in ("encoder", "contextual", "attention") else m
                cells = []
                for t in tasks:
                    for k in ("auroc", "auprc"):
                        cells.append(
                            mean_sd(
                                [r[model][universe][t].get(m, {}).get(k, np.nan) for r in results]
                            )
                        )
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        rates = [
            f"{t}: positive rate {r0['pretrained'][universe][t]['pearson']['positive_rate']:.3f}"
            for t in tasks
        ]
        n_tfs = r0["pretrained"][universe]["collectri"]["pearson"]["n_tfs"]
        lines.append(f"\n{'; '.join(rates)} (CollecTRI: median over {n_tfs} TFs)")
    lines += [
        "\nGene programs (share and number with a BH q < 0.05 set; resolution: the most "
        "Reactome-enriched programs):\n",
        "| method | resolution | programs | share GO BP | share Hallmark | share Reactome "
        "(chosen on) | GO BP-enriched | Hallmark-enriched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("pretrained", "random_init", "coexpression", "random_programs"):
        p = [r["programs"][name] for r in results]
        res = ", ".join(str(x["resolution"]) for x in p)
        n = mean_sd([len(x["sizes"]) for x in p])
        keys = ("go_bp", "hallmark", "reactome", "go_bp_programs", "hallmark_programs")
        shares = [mean_sd([x[k] for x in p]) for k in keys]
        lines.append(f"| {name} | {res} | {n} | " + " | ".join(shares) + " |")
    titles = descriptions()
    for ex in r0["programs"]["pretrained"]["examples"]:
        terms = "; ".join(f"{titles.get(t, t)} (q {q:.2g})" for t, q in ex["terms"])
        lines.append(
            f"\n- {ex['program']} ({len(ex['genes'])} genes: "
            f"{', '.join(ex['genes'][:10])}): {terms}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/genes"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tables", action="store_true", help="only redo OUT/genes.md")
    ap.add_argument("--programs", action="store_true", help="only redo the programs part")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    if args.programs:
        results = json.loads(path.read_text())
        for r in results:
            r["programs"] = evaluate_programs(*models(args.out, r["seed"]), r["seed"])
        path.write_text(json.dumps(results, indent=1, default=float))
    elif not args.tables:
        results = [evaluate_seed(args.out, s) for s in args.seeds]
        path.write_text(json.dumps(results, indent=1, default=float))
    results = json.loads(path.read_text())
    (args.out / "genes.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
