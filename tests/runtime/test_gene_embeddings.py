"""Gene embeddings in a bundle: genes.safetensors written and checked, read only when asked
for, served by name (`Model.gene_embeddings`, `scgpt-run genes`); bundles without them (format
1, format 2 exported before them) still load. The graphs are stand-in bytes: nothing here runs a
model (tests/export/ compares the stored rows with PyTorch's)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from scgpt_runtime import Model
from scgpt_runtime.bundle import Variant, load_bundle, load_gene_embeddings, write_bundle
from scgpt_runtime.cli import cli
from scgpt_runtime.errors import BundleError, GeneMatchError
from scgpt_runtime.served import gene_embeddings
from scgpt_runtime.tokens import TokenConfig
from scgpt_runtime.vocab import Vocab

# Genes, the special tokens, then a protein of a gene's name: only the genes are gene embeddings
NAMES = ["CD3E", "LYZ", "CD4", "MS4A1", "NKG7", "GNLY", "<pad>", "<cls>", "<eoc>", "CD4"]
NAMESPACES = ["gene"] * 9 + ["protein"]
GENES = NAMES[:6]
D = 8
MODEL = {"vocab_size": len(NAMES), "pad_id": 6, "d_model": D, "n_cls": 0}
NO_GENES = "has no gene embeddings (exported before they were added); export it again with "
TABLE = np.random.default_rng(0).standard_normal((len(NAMES), D)).astype(np.float32)


def make(tmp_path: Path, table=TABLE, name: str = "bundle") -> Path:
    graph = tmp_path / f"{name}.bin"
    graph.write_bytes(b"graph fp32")
    return write_bundle(
        tmp_path / name,
        model=MODEL,
        tokens=TokenConfig(max_seq_len=16),
        vocab=Vocab(NAMES, NAMESPACES),
        variants=[Variant("fp32", 16, graph)],
        gene_embeddings=table,
    )


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def read_tsv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with path.open(newline="") as f:
        header, *rows = list(csv.reader(f, delimiter="\t"))
    return header, [r[0] for r in rows], np.array([r[1:] for r in rows], dtype=np.float32)


def test_every_gene_in_vocabulary_order_and_rows_unchanged(tmp_path):
    b = load_bundle(make(tmp_path, table=TABLE.astype(np.float64)))
    names, x = gene_embeddings(b)
    assert names == GENES, "no special token, no protein"
    assert x.dtype == np.float32
    assert np.array_equal(x, TABLE[:6])
    names, x = gene_embeddings(b, ["NKG7", "CD3E", "NKG7"])
    assert names == ["NKG7", "CD3E", "NKG7"]
    assert np.array_equal(x, TABLE[[4, 0, 4]])
    assert gene_embeddings(b, [])[1].shape == (0, D)


def test_the_file_and_its_record(tmp_path):
    out = make(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["genes"] == {
        "file": "genes.safetensors",
        "embedding": "gene encoder output (LayerNorm of the embedding row)",
        "shape": [len(NAMES), D],
        "dtype": "float32",
    }
    assert list(config)[-2:] == ["genes", "files"]
    assert "genes.safetensors" in config["files"]
    tensors = load_file(out / "genes.safetensors")
    assert list(tensors) == ["gene_embeddings"]
    assert np.array_equal(tensors["gene_embeddings"], TABLE), "row i is vocabulary id i"


def test_embeddings_are_read_only_when_asked_for(tmp_path):
    """load_bundle(verify=False) checks sizes only: a damaged file is found when it is read."""
    out = make(tmp_path)
    file = out / "genes.safetensors"
    file.write_bytes(b"x" * file.stat().st_size)
    b = load_bundle(out, verify=False)
    assert b.gene_embeddings_file == file
    with pytest.raises(BundleError, match=r"genes\.safetensors: not a readable safetensors file"):
        load_gene_embeddings(b)


def test_a_damaged_file_fails_the_checksum(tmp_path):
    out = make(tmp_path)
    data = bytearray((out / "genes.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "genes.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"genes\.safetensors: checksum mismatch") as e:
        load_bundle(out)
    assert e.value.exit_code == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["genes"].update(shape=[len(NAMES), D + 1]), "invalid bundle config"),
        (lambda c: c["genes"].update(dtype="float16"), "invalid bundle config"),
        (lambda c: c["files"].pop("genes.safetensors"), "not listed in config.json files"),
    ],
)
def test_a_wrong_record_is_a_bundle_error(tmp_path, change, message):
    out = make(tmp_path)
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=message):
        load_bundle(out)


@pytest.mark.parametrize(
    "table", [TABLE[:-1], TABLE[:, :-1], TABLE.astype(np.int64), np.full_like(TABLE, np.nan)]
)
def test_wrong_embeddings_write_nothing(tmp_path, table):
    with pytest.raises(ValueError, match=r"gene_embeddings must be finite floats of shape"):
        make(tmp_path, table=table)
    assert not (tmp_path / "bundle").exists()


def test_unknown_genes_are_one_gene_match_error(tmp_path):
    b = load_bundle(make(tmp_path))
    asked = ["CD3E", "cd3e", "<pad>", "X1", "X2", "X3", "X4", "LYZ"]
    with pytest.raises(GeneMatchError) as e:
        gene_embeddings(b, asked)
    assert str(e.value) == (
        f"{b.path}: 6 of 8 genes are not in the model vocabulary: cd3e, <pad>, X1, X2, X3 and "
        "1 more (names are exact and case-sensitive)"
    )
    assert e.value.exit_code == 4


def test_bundles_without_embeddings_load_and_say_so(served_bundle, v1_bundle, tmp_path):
    for path in (served_bundle, v1_bundle):
        b = load_bundle(path)
        assert b.gene_embeddings_file is None
        with pytest.raises(BundleError) as e:
            gene_embeddings(b)
        assert str(e.value) == f"{path}: {NO_GENES}scgpt-train export"
    with (
        Model.load(served_bundle, device="cpu") as model,
        pytest.raises(BundleError, match=re.escape(NO_GENES)),
    ):
        model.gene_embeddings(["CD3E"])
    result = run("genes", v1_bundle, "--out", tmp_path / "g.tsv")
    assert result.exit_code == 5
    assert result.stderr == f"Error: {v1_bundle}: {NO_GENES}scgpt-train export\n"
    assert not list(tmp_path.iterdir())


def test_cli_writes_tsv_npy_and_h5ad_that_read_back_equal(tmp_path):
    bundle = make(tmp_path)
    result = run("genes", bundle, "--out", tmp_path / "g.tsv")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr == f"wrote {tmp_path / 'g.tsv'}: 6 genes x {D} dimensions\n"
    header, names, x = read_tsv(tmp_path / "g.tsv")
    assert header == ["gene", *(f"dim{i}" for i in range(D))]
    assert names == GENES
    assert np.array_equal(x, TABLE[:6]), "9 significant digits: float32 exactly"

    result = run("genes", bundle, "--out", tmp_path / "g.npy", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == {
        "command": "genes",
        "bundle": str(bundle),
        "bundle_sha256": load_bundle(bundle).sha256,
        "output": [str(tmp_path / "g.npy"), str(tmp_path / "g.genes.txt")],
        "n_genes": 6,
        "d_model": D,
    }
    assert np.array_equal(np.load(tmp_path / "g.npy"), TABLE[:6])
    assert (tmp_path / "g.genes.txt").read_text() == "".join(f"{g}\n" for g in GENES)

    (tmp_path / "some.txt").write_text("GNLY\n\n  CD3E \n")
    result = run("genes", bundle, "--out", tmp_path / "g.h5ad", "--genes", tmp_path / "some.txt")
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(tmp_path / "g.h5ad")
    assert list(adata.obs_names) == ["GNLY", "CD3E"]
    assert list(adata.var_names) == [f"dim{i}" for i in range(D)]
    assert adata.X.dtype == np.float32
    assert np.array_equal(adata.X, TABLE[[5, 0]])
    assert adata.uns["scgpt_genes"]["bundle_sha256"] == summary["bundle_sha256"]


def test_cli_refusals_are_one_line(tmp_path):
    bundle = make(tmp_path)
    out = tmp_path / "g.npy"
    (tmp_path / "g.genes.txt").write_text("mine")
    result = run("genes", bundle, "--out", out)
    assert result.exit_code == 6
    assert (
        result.stderr
        == f"Error: {tmp_path / 'g.genes.txt'}: exists; pass --overwrite to replace it\n"
    )
    assert not out.exists()
    assert run("genes", bundle, "--out", out, "--overwrite").exit_code == 0
    assert (tmp_path / "g.genes.txt").read_text().splitlines() == GENES

    (tmp_path / "bad.txt").write_text("CD3E\nNOPE\n")
    result = run("genes", bundle, "--out", tmp_path / "b.tsv", "--genes", tmp_path / "bad.txt")
    assert result.exit_code == 4
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1, "one line, no traceback"
    assert "1 of 2 genes are not in the model vocabulary: NOPE" in result.stderr
    assert not (tmp_path / "b.tsv").exists()

    (tmp_path / "empty.txt").write_text("\n")
    result = run("genes", bundle, "--out", tmp_path / "b.tsv", "--genes", tmp_path / "empty.txt")
    assert result.exit_code == 3
    assert (
        result.stderr
        == f"Error: {tmp_path / 'empty.txt'}: lists no genes; give one gene name per line\n"
    )

    result = run("genes", bundle, "--out", tmp_path / "b.csv")
    assert result.exit_code == 2
    assert "genes writes .tsv, .npy, .h5ad files, not .csv" in result.stderr


def test_cli_help_has_examples():
    result = run("genes", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    assert "scgpt-run genes bundles/human --out genes.tsv" in result.stdout


def test_genes_command_runs_without_torch(tmp_path):
    bundle, out = make(tmp_path), tmp_path / "g.tsv"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from scgpt_runtime.cli import cli\n"
        f"cli(['genes', {str(bundle)!r}, '--out', {str(out)!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert read_tsv(out)[1] == GENES
