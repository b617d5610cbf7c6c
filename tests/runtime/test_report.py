"""HTML reports of annotate and embed (--report): self-contained, every section, the numbers
of --json, usage errors without the extra; the report module's parts on their own."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from scgpt_runtime.cli import cli
from scgpt_runtime.report.document import Report
from scgpt_runtime.report.embedding_map import map_cells


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def annotated(kang, tmp_path_factory):
    """All Kang cells annotated by the default model, with a report coloured by condition."""
    tmp = tmp_path_factory.mktemp("report")
    r = run(
        "annotate", kang, "--out", tmp / "k.csv", "--report", tmp / "k.html",
        "--color-by", "condition", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), tmp / "k.html"


def test_annotate_report_holds_every_section_and_the_json_numbers(annotated, read_report):
    summary, path = annotated
    assert summary["report"] == str(path)
    page = read_report(path)
    page.check_self_contained()
    assert page.sections == ["run", "genes", "labels", "confidence", "graphs", "map"]
    counts = {r[0]: int(r[1]) for r in page.tables["label-counts"][1:]}
    assert counts == summary["label_counts"]
    assert list(counts) == list(summary["label_counts"])  # most frequent first, as --json
    shares = [float(r[2]) for r in page.tables["label-counts"][1:]]
    assert shares == [round(v / summary["n_cells"], 4) for v in counts.values()]
    graphs = {r[0]: int(r[1]) for r in page.tables["graphs"][1:]}
    assert graphs == summary["graphs"]
    genes = page.rows("gene-match")
    match = summary["gene_match"]
    assert genes["gene column"] == match["gene_column"]
    assert int(genes["genes matched"]) == match["n_matched"]
    assert int(genes["genes in the file"]) == match["n_genes"]
    facts = page.rows("run-facts")
    assert int(facts["cells"]) == summary["n_cells"] == 1975
    assert facts["bundle sha256"] == json_sha(summary)
    assert int(page.rows("unknown")["Unknown cells"]) == summary["n_unknown"]
    assert len(page.images["map"]) == 2  # by predicted label, by obs condition
    assert len(page.images["confidence"]) == 1


def json_sha(summary):
    from scgpt_runtime.bundle import load_bundle

    return load_bundle(summary["bundle"]).sha256


def test_embed_report_has_no_label_sections(kang_small, tmp_path, read_report):
    r = run("embed", kang_small, "--out", tmp_path / "e.npy", "--report", tmp_path / "e.html")
    assert r.exit_code == 0, r.output
    page = read_report(tmp_path / "e.html")
    page.check_self_contained()
    assert page.sections == ["run", "genes", "graphs", "map"]
    assert len(page.images["map"]) == 1  # coloured by genes the model saw


@pytest.mark.parametrize(
    ("extra", "code", "says"),
    [
        (["--color-by", "condition"], 2, "--color-by colours the map of --report"),
        (["--report", "r.txt"], 2, "a report is an .html file"),
        (["--report", "r.html", "--color-by", "nope"], 3, "no obs column 'nope'"),
    ],
)
def test_report_options_are_checked_before_any_work(kang_small, tmp_path, extra, code, says):
    out = tmp_path / "a.csv"
    r = run("annotate", kang_small, "--out", out, *[tmp_path / e if "." in e else e for e in extra])
    assert (r.exit_code, "Traceback" in r.output) == (code, False), r.output
    assert says in r.stderr
    assert not out.exists()


def test_report_without_the_extra_is_a_usage_error_naming_it(kang_small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    out = tmp_path / "a.csv"
    r = run("annotate", kang_small, "--out", out, "--report", tmp_path / "r.html")
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1
    assert "pip install 'scgpt-deploy[report]'" in r.stderr
    assert not out.exists()
    assert not (tmp_path / "r.html").exists()


def test_map_is_deterministic_and_subsampled_above_the_limit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    a, b = map_cells(x, seed=3, max_cells=200), map_cells(x, seed=3, max_cells=200)
    np.testing.assert_array_equal(a.xy, b.xy)
    assert (len(a.rows), a.n_cells) == (200, 500)
    assert np.all(np.diff(a.rows) > 0)
    assert not np.array_equal(map_cells(x, seed=4, max_cells=200).rows, a.rows)
    full = map_cells(x, method="pca")
    assert (full.method, len(full.rows)) == ("PCA", 500)
    centred = x - x.mean(0)
    top = np.linalg.svd(centred.astype(np.float64), full_matrices=False)[2][0]
    # PCA's first axis carries the most variance: equal to SVD's, up to float32 rounding
    assert np.var(full.xy[:, 0]) == pytest.approx(np.var(centred @ top), rel=1e-4)


def test_report_escapes_names_and_formats_numbers(tmp_path, read_report):
    page = Report("<title>")
    page.section("A & B", "a")
    page.table(["name", "n", "x"], [("<b>CD4</b>", np.int64(3), 0.00012345)], id="t")
    page.write(tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text()
    assert "<b>CD4</b>" not in text
    assert "&lt;b&gt;CD4&lt;/b&gt;" in text
    assert read_report(tmp_path / "r.html").tables["t"][1] == ["<b>CD4</b>", "3", "0.00012345"]
