"""`scgpt-run genes`: the gene embeddings a bundle carries, as a table, an array or an .h5ad."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ..bundle import Bundle, load_bundle
from ..genes import read_gene_list
from ..io.atomic import atomic_path
from ..io.write import write_dense_h5ad, write_tsv
from ..outputs import check_output, save_npy
from ..served import bundle_or_default, gene_embeddings

SUFFIXES = (".tsv", ".npy", ".h5ad")
NAMES_SUFFIX = ".genes.txt"  # beside a .npy: the gene of each row


def _check_suffix(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """A click callback: an output format other than SUFFIXES is a usage error (exit 2)."""
    if value.suffix not in SUFFIXES:
        raise click.BadParameter(
            f"{value}: genes writes {', '.join(SUFFIXES)} files, "
            f"not {value.suffix or 'files without a suffix'}"
        )
    return value


@click.command(
    epilog="""\b
Examples:
  scgpt-run genes bundles/human --out genes.tsv
  scgpt-run genes bundles/human --out markers.h5ad --genes markers.txt
  scgpt-run genes bundles/human --out genes.npy --json   # and genes.genes.txt"""
)
@click.argument("bundle", required=False, type=click.Path(path_type=str))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_check_suffix,
    help="GENES.tsv (gene, then dim0..), GENES.h5ad (obs_names = genes) or GENES.npy (the "
    f"matrix; GENES{NAMES_SUFFIX} beside it names its rows, one gene per line).",
)
@click.option(
    "--genes",
    "genes_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Only these genes, in this order: a text file, one gene per line [default: every "
    "gene of the vocabulary, in vocabulary order]",
)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def genes(
    bundle: str | None, out: Path, genes_file: Path | None, overwrite: bool, as_json: bool
) -> None:
    """Write the gene embeddings of the model bundle BUNDLE (default: the default model): the
    gene encoder output of each gene (LayerNorm of its embedding row), float32, as the export
    stored them. No model runs and no PyTorch is needed. A gene of --genes not in the
    vocabulary is an error (exit 4); a bundle exported without gene embeddings is exit 5."""
    names = None if genes_file is None else read_gene_list(genes_file)
    targets = [out, out.with_suffix(NAMES_SUFFIX)] if out.suffix == ".npy" else [out]
    for target in targets:
        check_output(target, overwrite=overwrite)
    b = load_bundle(bundle_or_default(bundle))
    names, x = gene_embeddings(b, names)
    _write(targets, names, x, b, overwrite)
    summary = {
        "command": "genes",
        "bundle": str(b.path),
        "bundle_sha256": b.sha256,
        "output": [str(t) for t in targets],
        "n_genes": len(names),
        "d_model": int(x.shape[1]),
    }
    if as_json:
        click.echo(json.dumps(summary))
    written = ", ".join(summary["output"])
    click.echo(f"wrote {written}: {len(names)} genes x {x.shape[1]} dimensions", err=True)


def _write(
    targets: list[Path], names: list[str], x: np.ndarray, b: Bundle, overwrite: bool
) -> None:
    """The output of the suffix of targets[0], each file atomically."""
    out = targets[0]
    if out.suffix == ".tsv":
        _write_tsv(out, names, x)
    elif out.suffix == ".npy":
        with atomic_path(targets[1]) as tmp:
            tmp.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        with atomic_path(out) as tmp, tmp.open("wb") as f:
            save_npy(f, x)
    else:
        dims = np.array([f"dim{i}" for i in range(x.shape[1])])
        record = {"bundle": str(b.path), "bundle_sha256": b.sha256}
        uns = {"scgpt_genes": {**record, "embedding": b.config["genes"]["embedding"]}}
        write_dense_h5ad(out, x, np.array(names), dims, uns=uns, overwrite=overwrite)


def _write_tsv(out: Path, names: list[str], x: np.ndarray) -> None:
    """9 significant digits: the float32 values exactly."""
    header = ["gene", *(f"dim{i}" for i in range(x.shape[1]))]
    write_tsv(out, header, ([n, *row] for n, row in zip(names, x.tolist(), strict=True)), digits=9)
