"""`scgpt-train genes`: a run's gene embeddings, gene programs and attention networks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from scgpt_runtime.cli.common import EXIT_CODES, check_where, progress_bar

from ..gene_attention import MAX_CELLS, TOP, write_attention
from ..gene_attention import N_HVG as ATTENTION_HVG
from ..gene_data import N_HVG
from ..gene_embeddings import embed_genes
from ..gene_programs import MIN_SIZE, RESOLUTION, write_programs
from .common import echo_summary, expand_data


@click.group(epilog=EXIT_CODES)
def genes() -> None:
    """Gene embeddings, gene programs and attention networks of a run."""


@genes.command(
    epilog="""\b
Examples:
  scgpt-train genes embed --from runs/pre --out genes.h5ad
  scgpt-train genes embed --from runs/pre --data kang.h5ad --contextual \\
      --where condition=control --out kang-genes.h5ad --json"""
)
@click.option("--from", "run", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="GENES.h5ad to write.")
@click.option(
    "--data",
    multiple=True,
    help="Cells: embed only their genes (those in the vocabulary); repeatable.",
)
@click.option(
    "--contextual",
    is_flag=True,
    help="Also the mean transformer output of each gene over the cells (obsm X_contextual).",
)
@click.option("--where", multiple=True, callback=check_where, help="COL=VALUE filter of --data.")
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def embed(run: str, out: str, data: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Write one row per gene: obs_names = gene names, X = the gene encoder output.

    Without --data: every gene of the run's vocabulary; with it, the data's genes in the
    vocabulary (in vocabulary order). --contextual adds each gene's mean transformer output
    over the cells where it is a token (obsm X_contextual; NaN for a gene never seen) and the
    number of those cells (obs n_cells).
    """
    files = expand_data(data) if data else None
    summary = embed_genes(run, Path(out), data=files, **options)
    echo_summary(summary, as_json, f"{out}: {summary['genes']} genes x {summary['dim']}")


@genes.command(
    epilog="""\b
Examples:
  scgpt-train genes programs --from runs/pre --data kang.h5ad --out programs.tsv
  scgpt-train genes programs --from runs/pre --data kang.h5ad --out programs.tsv \\
      --label-key cell_type --score-out kang_scored.h5ad \\
      --enrich h.all.v7.5.1.symbols.gmt --enrich go_bp.gmt --json"""
)
@click.option("--from", "run", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="PROGRAMS.tsv to write."
)
@click.option(
    "--genes",
    "genes_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Genes to cluster, one per line [default: the data's highly variable genes].",
)
@click.option("--n-top", default=N_HVG, show_default=True, help="Highly variable genes to cluster.")
@click.option(
    "--resolution",
    default=RESOLUTION,
    show_default=True,
    help="Leiden resolution: higher gives more, smaller programs.",
)
@click.option("--min-size", default=MIN_SIZE, show_default=True, help="Smallest program kept.")
@click.option("--seed", default=0, show_default=True, help="Seed of the Leiden optimisation.")
@click.option("--label-key", help="obs column: also write PROGRAMS.by_label.tsv (mean scores).")
@click.option(
    "--score-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A copy of the data with obs program_P1, ... (per-cell scores).",
)
@click.option(
    "--enrich",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="GMT gene sets: also write PROGRAMS.enrichment.tsv; repeatable.",
)
@click.option("--where", multiple=True, callback=check_where, help="COL=VALUE filter of the cells.")
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def programs(out: str, as_json: bool, **options: Any) -> None:
    """Gene programs: Leiden communities of the kNN graph of gene embeddings.

    The genes are the data's most variable genes in the run's vocabulary (or --genes); each
    gene's embedding is the run's gene encoder output; the graph joins each gene to its 15
    nearest by cosine. PROGRAMS.tsv has one row per gene of a program (program, size, gene),
    most central genes first. A cell's score for a program is the mean z-scored log1p(CP10k)
    of its genes. Enrichment: hypergeometric, universe = the genes clustered, BH q per file.
    Needs igraph and leidenalg: pip install 'scgpt-deploy[genes]'.
    """
    summary = write_programs(options.pop("run"), options.pop("data"), Path(out), **options)
    echo_summary(
        summary,
        as_json,
        f"{out}: {summary['programs']} programs of "
        f"{summary['genes_in_programs']} of {summary['genes']} genes",
    )


@genes.command(
    epilog="""\b
Examples:
  scgpt-train genes attention --from runs/pre --data kang.h5ad --out edges.tsv
  scgpt-train genes attention --from runs/pre --data kang.h5ad --where cell_type=B \\
      --tf IRF1 --tf STAT1 --out b_tf_edges.tsv
  scgpt-train genes attention --from runs/pre --data kang.h5ad \\
      --contrast condition=stimulated:control --tf STAT1 --out stat1_change.tsv"""
)
@click.option("--from", "run", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="EDGES.tsv to write.")
@click.option(
    "--tf",
    "tfs",
    multiple=True,
    help="Write this TF's targets (every gene, best first); repeatable.",
)
@click.option(
    "--genes",
    "genes_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Genes of the network, one per line [default: the most variable].",
)
@click.option(
    "--n-top",
    default=ATTENTION_HVG,
    show_default=True,
    help="Highly variable genes of the network (cost: genes^2 per cell).",
)
@click.option("--where", multiple=True, callback=check_where, help="COL=VALUE filter of the cells.")
@click.option("--contrast", help="COL=A:B: the network of cells A minus that of cells B.")
@click.option(
    "--max-cells",
    default=MAX_CELLS,
    show_default=True,
    help="Cells averaged per network (a seeded sample where more).",
)
@click.option("--top", default=TOP, show_default=True, help="Edges written without --tf.")
@click.option("--seed", default=0, show_default=True, help="Seed of the cell sample.")
@click.option("--gene-column", help="var column with gene names [default: best match]")
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def attention(out: str, tfs: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Gene -> gene scores from the last layer's attention (the official tutorial's).

    Each cell's input is <cls> and every gene of the network with its bins, zeros included.
    Per head, the last layer's q k^T is rank-normalised by rows then by columns; the result is
    averaged over heads and cells. TF -> target scores how strongly the target attends to
    the TF. Output: source, target, score (tab-separated).
    """
    with progress_bar("Attention") as progress:
        summary = write_attention(
            options.pop("run"),
            options.pop("data"),
            Path(out),
            tfs=tfs,
            progress=progress,
            **options,
        )
    echo_summary(
        summary, as_json, f"{out}: {summary['edges']} edges among {summary['genes']} genes"
    )
