"""Reference mapping: the exact search against brute force, votes and ties, reference files,
annotate --reference through the CLI and the API (shards, batches, bad inputs). No torch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import scgpt_runtime.knn as knn
from scgpt_runtime import Model
from scgpt_runtime import reference as reference_files
from scgpt_runtime.cli import cli
from scgpt_runtime.errors import BundleError
from scgpt_runtime.results import Result

N_CELLS = 200  # conftest.kang_small


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def brute_force(query: np.ndarray, reference: np.ndarray, k: int):
    """Every pair scored the way the search defines it, ranked by score then index."""
    scores = knn.exact_scores(query, reference)
    order = np.lexsort((np.broadcast_to(np.arange(len(reference)), scores.shape), -scores), axis=1)
    return order[:, :k], np.take_along_axis(scores, order[:, :k], 1)


@pytest.mark.parametrize("blocks", [(1024, 16384, 64), (7, 50, 3)])
def test_search_equals_brute_force_exactly(monkeypatch, blocks):
    """Random cells with duplicates and exact ties: the same neighbours in the same order,
    whatever the block sizes."""
    monkeypatch.setattr(knn, "QUERY_BLOCK", blocks[0])
    monkeypatch.setattr(knn, "REFERENCE_BLOCK", blocks[1])
    monkeypatch.setattr(knn, "RERANK_BLOCK", blocks[2])
    rng = np.random.default_rng(0)
    ref = knn.l2_normalize(rng.normal(size=(700, 24)))
    ref[100:130] = ref[5]  # 31 copies of one cell: more ties than k + MARGIN candidates
    query = knn.l2_normalize(rng.normal(size=(90, 24)))
    query[:3] = ref[5]
    idx, dist = knn.search(query, ref, 10)
    want, scores = brute_force(query, ref, 10)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(dist, np.sqrt(np.maximum(0, 2 - 2 * scores)))
    assert idx[0].tolist() == [5, *range(100, 109)]  # ties go to the lower index
    assert (dist[:3, :10] == 0).all()


def test_votes_and_ties():
    neighbours = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [4, 4, 4, 4], [0, 1, 2, 3]])
    distances = np.array([[1.0, 1, 2, 2], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2]])
    codes = np.array([1, 1, 0, 0, -1])  # cell 4 has no label
    shares = knn.vote(neighbours, distances, codes, 2, "majority")
    np.testing.assert_array_equal(shares, [[0.5, 0.5], [0.5, 0.5], [0, 0], [0.5, 0.5]])
    weighed = knn.vote(neighbours, distances, codes, 2, "distance")
    np.testing.assert_allclose(weighed[0], [1 / 3, 2 / 3])
    np.testing.assert_array_equal(weighed[1], [0, 1])  # an exact match takes the whole vote
    result = Result(np.array(list("abcd")), np.ones(4), np.zeros((4, 1)), ["x", "y"], shares)
    result.decide(unknown_below=0.0)
    assert result.predicted_labels.tolist() == ["x", "x", "Unknown", "x"]  # ties: first class
    result.decide(unknown_below=0.6, too_far=np.array([False, False, False, True]))
    assert result.predicted_labels.tolist() == ["Unknown"] * 4


@pytest.fixture(scope="module")
def ref_file(served_bundle, kang_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "kang.scref"
    ok(
        "reference",
        "build",
        kang_small,
        "--model",
        served_bundle,
        "--label-key",
        "cell_type",
        "--label-key",
        "condition",
        "--out",
        out,
        "--device",
        "cpu",
    )
    return out


def test_reference_file_holds_the_embeddings_labels_and_bundle(ref_file, served_bundle, kang_small):
    ref = reference_files.load(ref_file)
    model = Model.load(served_bundle, device="cpu")
    np.testing.assert_array_equal(ref.embeddings, model.embed(kang_small))
    assert ref.obs_names == list(ad.read_h5ad(kang_small).obs_names)
    assert ref.label_keys == ["cell_type", "condition"]
    classes, codes = ref.labels["cell_type"]
    truth = ad.read_h5ad(kang_small).obs["cell_type"].astype(str).to_numpy()
    np.testing.assert_array_equal(np.asarray(classes)[codes], truth)
    assert ref.bundle_sha256 == model.bundle_sha256
    assert len(ref.nn_distances) == N_CELLS
    assert (ref.nn_distances >= 0).all()
    tensors = load_file(ref_file)  # plain safetensors: names and dtypes are the format
    assert sorted(tensors) == sorted(
        [
            "embeddings",
            "nn_distances",
            "obs_names.bytes",
            "obs_names.offsets",
            "labels.0.bytes",
            "labels.0.offsets",
            "labels.0.codes",
            "labels.1.bytes",
            "labels.1.offsets",
            "labels.1.codes",
        ]
    )
    info = json.loads(ok("reference", "info", ref_file, "--json").stdout)
    conditions = ad.read_h5ad(kang_small).obs["condition"].value_counts().to_dict()
    assert info["labels"]["condition"] == conditions
    assert info["n_cells"] == N_CELLS


def test_annotate_with_a_reference_equals_the_api_and_a_brute_force_vote(
    ref_file, served_bundle, kang_small, tmp_path
):
    out = tmp_path / "mapped.csv"
    ok(
        "annotate",
        kang_small,
        "--model",
        served_bundle,
        "--reference",
        ref_file,
        "--out",
        out,
        "--device",
        "cpu",
        "--unknown-below",
        "0",
    )
    got = rows(out)
    assert list(got[0]) == ["cell", "predicted_labels", "conf_score", "n_genes", "knn_distance"]
    model = Model.load(served_bundle, device="cpu")
    api = model.annotate(kang_small, reference=ref_file, unknown_below=0.0)
    assert [r["predicted_labels"] for r in got] == api.predicted_labels.tolist()
    ref = reference_files.load(ref_file)
    idx, _ = brute_force(model.embed(kang_small), ref.embeddings, 10)
    classes, codes = ref.labels["cell_type"]
    counts = np.stack([(codes[idx] == c).sum(1) for c in range(len(classes))], 1)
    np.testing.assert_allclose(api.class_probs, counts / 10)
    np.testing.assert_array_equal(api.predicted_labels, np.asarray(classes)[counts.argmax(1)])
    # every cell is in the reference: its nearest reference cell is itself
    assert max(float(r["knn_distance"]) for r in got) < 1e-6
    condition = model.annotate(kang_small, reference=ref_file, label_key="condition")
    assert condition.labels == ["control", "stimulated"]
    assert set(condition.predicted_labels) <= {"control", "stimulated", "Unknown"}


def test_reference_results_do_not_depend_on_shards_or_batches(
    ref_file, served_bundle, kang_small, tmp_path
):
    common = ["--model", served_bundle, "--reference", ref_file, "--device", "cpu"]
    ok("annotate", kang_small, *common, "--out", tmp_path / "whole.csv", "--batch-size", 1)
    for i in (1, 2):
        ok(
            "annotate",
            kang_small,
            *common,
            "--shard",
            f"{i}/2",
            "--out",
            tmp_path / f"{i}.part",
            "--batch-size",
            7,
            "--block-size",
            33,
        )
    ok("merge", tmp_path / "1.part", tmp_path / "2.part", "--out", tmp_path / "merged.csv")
    assert (tmp_path / "merged.csv").read_text() == (tmp_path / "whole.csv").read_text()
    ok("merge", tmp_path / "1.part", tmp_path / "2.part", "--out", tmp_path / "merged.h5ad")
    obs = ad.read_h5ad(tmp_path / "merged.h5ad").obs
    assert obs["scgpt_predicted_labels"].astype(str).tolist() == [
        r["predicted_labels"] for r in rows(tmp_path / "whole.csv")
    ]
    assert "scgpt_knn_distance" in obs


def test_far_cells_are_unknown(ref_file, served_bundle, liao_small):
    """Lung-lavage cells are far from a PBMC reference: with the distance quantile at 0 every
    cell farther than the closest reference pair is Unknown; at 1 the check is off."""
    model = Model.load(served_bundle, device="cpu")
    off = model.annotate(
        liao_small,
        reference=ref_file,
        distance_quantile=1.0,
        unknown_below=0,
        min_gene_fraction=0.1,
    )
    strict = model.annotate(
        liao_small,
        reference=ref_file,
        distance_quantile=0.0,
        unknown_below=0,
        min_gene_fraction=0.1,
    )
    assert "Unknown" not in off.predicted_labels
    ref = reference_files.load(ref_file)
    expected = off.knn_distance > ref.nn_distances.min()
    np.testing.assert_array_equal(strict.predicted_labels == "Unknown", expected)
    assert expected.mean() > 0.5


def test_a_reference_of_another_bundle_is_refused(ref_file, kang_small, tmp_path):
    result = run("annotate", kang_small, "--reference", ref_file, "--out", tmp_path / "x.csv")
    assert result.exit_code == 5  # the default model did not build it
    assert "the reference was built with another model bundle" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-100], "not a readable reference file"),
        (lambda b: b[:-5] + bytes(5), "checksum mismatch"),
        (lambda b: b"\x00" * 8 + b[8:], "not a readable reference file"),
    ],
)
def test_a_damaged_reference_is_refused(
    ref_file, served_bundle, kang_small, tmp_path, damage, message
):
    bad = tmp_path / "bad.scref"
    bad.write_bytes(damage(ref_file.read_bytes()))
    result = run("annotate", kang_small, "--model", served_bundle, "--reference", bad)
    assert result.exit_code == 5
    assert message in result.stderr
    with pytest.raises(BundleError, match=message):
        reference_files.load(bad)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--label-key", "cell_type", "--out", "ref.h5"], 2, "a reference file ends in .scref"),
        (["--label-key", "nope", "--out", "r.scref"], 3, "has no obs column 'nope'"),
        (
            ["--label-key", "cell_type", "--where", "condition=x", "--out", "r.scref"],
            3,
            "no cell has condition == 'x'",
        ),
        (["--label-key", "cell_type", "--out", "r.scref", "--shard", "1/2"], 2, "drop --shard"),
    ],
)
def test_reference_build_bad_input(served_bundle, kang_small, tmp_path, args, code, message):
    args = [str(tmp_path / a) if a.endswith((".scref", ".h5")) else a for a in args]
    result = run("reference", "build", kang_small, "--model", served_bundle, *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr


def test_annotate_with_an_unknown_label_key_or_missing_reference(
    ref_file, served_bundle, kang_small
):
    result = run(
        "annotate",
        kang_small,
        "--model",
        served_bundle,
        "--reference",
        ref_file,
        "--label-key",
        "tissue",
    )
    assert result.exit_code == 3
    assert "no label key 'tissue' (it has cell_type, condition)" in result.stderr
    missing = run("annotate", kang_small, "--model", served_bundle, "--reference", "no.scref")
    assert missing.exit_code == 5
    assert "no such reference file" in missing.stderr


def test_faiss_candidates_give_the_same_neighbours():
    pytest.importorskip("faiss")  # the optional extra [faiss]; the test extra installs it
    rng = np.random.default_rng(1)
    ref = knn.l2_normalize(rng.normal(size=(3000, 32)))
    ref[200:240] = ref[7]
    query = knn.l2_normalize(rng.normal(size=(300, 32)))
    query[:2] = ref[7]
    numpy_result = knn.search(query, ref, 15, backend="numpy")
    faiss_result = knn.search(query, ref, 15, backend="faiss")
    for a, b in zip(numpy_result, faiss_result, strict=True):
        np.testing.assert_array_equal(a, b)
