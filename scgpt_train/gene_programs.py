"""Gene programs: communities of a kNN graph of gene embeddings, their per-cell scores and
their enrichment in gene sets (`scgpt-train genes programs`, docs/genes.md).

As the official gene-network tutorial: a kNN graph on the cosine of the genes' embeddings
(k = 15, scanpy's default), symmetrised (an edge where either gene is among the other's
neighbours, weighed by their cosine), then Leiden communities (igraph + leidenalg: the
tutorial's method, connected communities, seeded and deterministic). A program is a
community of at least `min_size` genes. A cell's program score is the mean over the program's
genes of their z-scored log1p(CP10k) (z over the cells scored). Enrichment: a one-sided
hypergeometric test of each program against each gene set, the universe being the genes
clustered, Benjamini-Hochberg over every test of one gene-set file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scgpt_runtime.errors import InputError
from scgpt_runtime.genes import read_gene_list
from scgpt_runtime.io import open_counts
from scgpt_runtime.io.write import add_to_h5ad, extensible, write_new_h5ad, write_tsv
from scgpt_runtime.outputs import check_output

from .checkpoint import load_run
from .gene_data import N_HVG, GeneCells, load_gene_cells
from .gene_embeddings import encoder_embeddings

K_NEIGHBOURS = 15  # scanpy's default n_neighbors, which the tutorial keeps
RESOLUTION = 10.0  # Leiden resolution: chosen on Reactome enrichment of Kang (docs/results.md)
MIN_SIZE = 5  # the tutorial's smallest program
ALPHA = 0.05  # a program is enriched in a set at BH q below this
EXTRA = "pip install 'scgpt-deploy[genes]'"  # igraph, leidenalg, scipy


@dataclass
class Programs:
    """Gene programs, largest first; each program's genes most central first."""

    genes: list[str]  # the genes clustered (the universe)
    members: list[list[int]]  # per program, indices into genes

    def names(self) -> list[str]:
        return [f"P{i + 1}" for i in range(len(self.members))]

    def gene_lists(self) -> list[list[str]]:
        return [[self.genes[i] for i in m] for m in self.members]


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """(n, n) float64 cosine similarity of the rows (a zero row: cosine 0 with every row)."""
    x = np.asarray(embeddings, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def knn_edges(cosine: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """((E, 2) int64 gene pairs i < j, (E,) float64 weights): the symmetrised kNN graph of a
    cosine matrix; weights are the cosines, clipped at 0 (an opposite neighbour adds no pull)."""
    cosine = cosine.copy()
    np.fill_diagonal(cosine, -np.inf)
    k = min(k, len(cosine) - 1)
    # stable argsort: ties go to the lower index, so the graph is deterministic
    neighbours = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    i = np.repeat(np.arange(len(cosine)), k)
    pairs = np.unique(np.sort(np.stack([i, neighbours.ravel()], axis=1), axis=1), axis=0)
    return pairs, np.maximum(cosine[pairs[:, 0], pairs[:, 1]], 0.0)


def leiden(n: int, pairs: np.ndarray, weights: np.ndarray, resolution: float, seed: int):
    """(n,) community of every node: Leiden on the weighted graph (RB configuration model)."""
    try:
        import igraph
        import leidenalg
    except ImportError as e:
        raise InputError(f"gene programs need igraph and leidenalg: {EXTRA}") from e
    graph = igraph.Graph(n=n, edges=pairs.tolist())
    partition = leidenalg.find_partition(
        graph,
        leidenalg.RBConfigurationVertexPartition,
        weights=weights.tolist(),
        resolution_parameter=resolution,
        seed=seed,
        n_iterations=-1,  # until stable: the result does not depend on an iteration budget
    )
    return np.asarray(partition.membership, dtype=np.int64)


def find_programs(
    genes: list[str],
    embeddings: np.ndarray,
    *,
    resolution: float = RESOLUTION,
    min_size: int = MIN_SIZE,
    k: int = K_NEIGHBOURS,
    seed: int = 0,
) -> Programs:
    """Programs of at least `min_size` genes among `genes` (rows of `embeddings`)."""
    if len(genes) < 2:
        raise InputError(f"gene programs need at least 2 genes, got {len(genes)}")
    cosine = cosine_matrix(embeddings)
    pairs, weights = knn_edges(cosine, k)
    membership = leiden(len(genes), pairs, weights, resolution, seed)
    groups = [np.flatnonzero(membership == c) for c in np.unique(membership)]
    groups = sorted((g for g in groups if len(g) >= min_size), key=lambda g: (-len(g), g[0]))
    # each program's genes by their mean cosine to the others: its most central genes first
    central = [g[np.argsort(-cosine[np.ix_(g, g)].mean(axis=1), kind="stable")] for g in groups]
    return Programs(list(genes), [g.tolist() for g in central])


def zscores(expression: np.ndarray) -> np.ndarray:
    """(cells, genes) float64 values z-scored per gene over the cells (a constant gene: 0)."""
    x = np.asarray(expression, np.float64)
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def program_scores(expression: np.ndarray, members: list[list[int]]) -> np.ndarray:
    """(cells, programs) float32: the mean z-scored log1p(CP10k) of each program's genes."""
    z = zscores(expression)
    return np.stack([z[:, m].mean(axis=1) for m in members], axis=1).astype(np.float32)


def read_gmt(path: str | Path) -> dict[str, set[str]]:
    """Gene sets of a GMT file: name, description, then genes, tab-separated."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the gene-set file ({e})") from e
    sets = {}
    for n, line in enumerate(lines, 1):
        fields = line.rstrip("\n").split("\t")
        if not line.strip():
            continue
        if len(fields) < 3:
            raise InputError(f"{path}:{n}: not a GMT line (name, description, genes, by tabs)")
        sets[fields[0]] = {g for g in fields[2:] if g}
    if not sets:
        raise InputError(f"{path}: holds no gene set")
    return sets


def sets_within(gene_sets: dict[str, set[str]], universe: set[str], source: str) -> dict:
    """The gene sets cut to the universe, those left empty dropped; InputError if none is left."""
    sets = {name: genes & universe for name, genes in gene_sets.items()}
    sets = {name: genes for name, genes in sets.items() if genes}
    if not sets:
        raise InputError(f"{source}: no gene set shares a gene with the {len(universe)} genes")
    return sets


def enrichment(programs: Programs, gene_sets: dict[str, set[str]], source: str) -> list[dict]:
    """One row per program and gene set sharing a gene: overlap, sizes, hypergeometric p and
    its BH q over the rows of this file; InputError where no set shares a gene with the
    universe."""
    try:
        from scipy.stats import false_discovery_control, hypergeom
    except ImportError as e:
        raise InputError(f"enrichment needs scipy: {EXTRA}") from e

    universe = set(programs.genes)
    sets = sets_within(gene_sets, universe, source)
    rows: list[dict] = []
    if not programs.members:
        return rows
    for program, genes in zip(programs.names(), programs.gene_lists(), strict=True):
        for name, members in sets.items():
            overlap = sorted(members.intersection(genes))
            if not overlap:
                continue
            p = hypergeom.sf(len(overlap) - 1, len(universe), len(members), len(genes))
            rows.append(
                {
                    "program": program,
                    "gene_set": name,
                    "source": source,
                    "overlap": len(overlap),
                    "set_size": len(members),
                    "program_size": len(genes),
                    "p": float(p),
                    "genes": ",".join(overlap),
                }
            )
    # the family is every program x set test; those sharing no gene have p = 1
    n_tests = len(programs.members) * len(sets)
    p_all = [r["p"] for r in rows] + [1.0] * (n_tests - len(rows))
    for r, q in zip(rows, false_discovery_control(p_all, method="bh"), strict=False):
        r["q"] = float(q)
    order = {name: i for i, name in enumerate(programs.names())}
    return sorted(rows, key=lambda r: (order[r["program"]], r["p"], r["gene_set"]))


def write_programs(
    run: str,
    data: str,
    out: Path,
    *,
    genes_file: str | None = None,
    n_top: int = N_HVG,
    resolution: float = RESOLUTION,
    min_size: int = MIN_SIZE,
    seed: int = 0,
    where: tuple[str, ...] = (),
    gene_column: str | None = None,
    label_key: str | None = None,
    score_out: Path | None = None,
    enrich: tuple[str, ...] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """PROGRAMS.tsv (program, size, gene), with `label_key` PROGRAMS.by_label.tsv (mean
    score per label), with `enrich` PROGRAMS.enrichment.tsv, with `score_out` a copy of the
    data with obs program_P1, ... (NaN for cells outside --where). Returns a summary."""
    targets = [out, *([sibling(out, "by_label")] if label_key else [])]
    targets += [sibling(out, "enrichment")] if enrich else []
    for path in [*targets, *([score_out] if score_out else [])]:
        check_output(path, overwrite=overwrite, source=Path(data))
    gene_sets = {Path(g).name: read_gmt(g) for g in enrich}  # bad files fail before any work
    model, info = load_run(run)
    genes = read_gene_list(genes_file) if genes_file else None
    cells = load_gene_cells(
        data,
        info.vocab,
        info.tokens,
        genes=genes,
        n_top=n_top,
        where=where,
        gene_column=gene_column,
        label_key=label_key,
        with_bins=False,  # programs use embeddings and values, not model inputs
    )
    for name, sets in gene_sets.items():
        sets_within(sets, set(cells.genes), name)  # before the work: a file that cannot hit
    embeddings = encoder_embeddings(model, cells.gene_ids)
    programs = find_programs(
        cells.genes, embeddings, resolution=resolution, min_size=min_size, seed=seed
    )
    if not programs.members:
        raise InputError(
            f"{data}: no program of {min_size} or more genes among "
            f"{len(cells.genes)}; lower --resolution or --min-size"
        )
    names, lists = programs.names(), programs.gene_lists()
    rows = [(p, len(g), gene) for p, g in zip(names, lists, strict=True) for gene in g]
    write_tsv(out, ["program", "size", "gene"], rows)
    scores = program_scores(cells.expression, programs.members)
    summary: dict[str, Any] = {
        "out": str(out),
        "genes": len(cells.genes),
        "cells": len(cells.rows),
        "programs": len(names),
        "genes_in_programs": len(rows),
        "sizes": [len(g) for g in lists],
        "resolution": resolution,
        "seed": seed,
    }
    if label_key:
        summary["by_label"] = _write_by_label(targets[1], names, scores, cells.labels)
    if enrich:
        table = [r for name, sets in gene_sets.items() for r in enrichment(programs, sets, name)]
        _write_enrichment(targets[-1], table)
        summary["enriched"] = _enriched_share(names, table)
    if score_out:
        _write_scores(data, score_out, names, scores, cells, run, overwrite)
        summary["score_out"] = str(score_out)
    return summary


def sibling(out: Path, what: str) -> Path:
    """PROGRAMS.tsv -> PROGRAMS.{what}.tsv."""
    return out.with_name(f"{out.stem}.{what}.tsv")


def _write_by_label(path: Path, names: list[str], scores: np.ndarray, labels) -> dict:
    """Mean score of each program per label; returns {program: its top label}."""
    known = sorted({v for v in labels.tolist() if v is not None})
    means = np.stack([scores[labels == v].mean(axis=0) for v in known])  # (labels, programs)
    counts = [int((labels == v).sum()) for v in known]
    write_tsv(
        path,
        ["label", "n_cells", *names],
        [(v, n, *map(float, m)) for v, n, m in zip(known, counts, means, strict=True)],
    )
    return {p: known[int(i)] for p, i in zip(names, means.argmax(axis=0), strict=True)}


def _write_enrichment(path: Path, table: list[dict]) -> None:
    header = [
        "program",
        "gene_set",
        "source",
        "overlap",
        "set_size",
        "program_size",
        "p",
        "q",
        "genes",
    ]
    write_tsv(path, header, ([r[h] for h in header] for r in table))


def enriched(table: list[dict]) -> dict[str, set[str]]:
    """Per gene-set file of an enrichment table, the programs with a set at BH q < ALPHA."""
    hits: dict[str, set[str]] = {r["source"]: set() for r in table}
    for r in table:
        if r["q"] < ALPHA:
            hits[r["source"]].add(r["program"])
    return hits


def _enriched_share(names: list[str], table: list[dict]) -> dict[str, float]:
    """Per gene-set file, the share of programs with a set at BH q < ALPHA."""
    return {s: round(len(p) / len(names), 4) for s, p in sorted(enriched(table).items())}


def _write_scores(data: str, dst: Path, names, scores, cells: GeneCells, run, overwrite) -> None:
    """A copy of the data with obs program_P1, ... (NaN outside the scored cells)."""
    full = np.full((cells.n_file_cells, len(names)), np.nan, dtype=np.float32)
    full[cells.rows] = scores
    obs = {f"program_{p}": full[:, i] for i, p in enumerate(names)}
    uns = {"scgpt_programs": {"run": str(run), "score": "mean z-scored log1p(CP10k)"}}
    if extensible(Path(data)):
        add_to_h5ad(Path(data), dst, obs=obs, uns=uns, overwrite=overwrite)
        return
    with open_counts(data) as counts:
        write_new_h5ad(dst, counts, obs=obs, uns=uns, overwrite=overwrite)
