"""Evaluation metrics against scikit-learn on known inputs, hand-computed integration scores,
and kNN label transfer."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.neighbors import KNeighborsClassifier

from scgpt_train.metrics import (
    accuracy,
    annotation_metrics,
    ari,
    batch_asw,
    confusion,
    decide,
    f1_per_class,
    graph_connectivity,
    integration_metrics,
    kmeans,
    knn_probe,
    knn_transfer,
    l2_normalize,
    macro_f1,
    nmi,
    silhouette,
    silhouette_samples,
)


@pytest.fixture
def blobs():
    """300 cells in 4 labelled blobs (5 dims), partly overlapping, and noisy predictions."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    x = rng.normal(size=(300, 5))
    x[:, 0] += 2.0 * labels
    pred = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 5, 300))  # a 5th class too
    names = np.array(["B", "NK", "T", "mono", "DC"])
    return x, names[labels], names[pred]


def test_annotation_metrics_match_sklearn(blobs):
    _, truth, pred = blobs
    assert accuracy(truth, pred) == pytest.approx(skm.accuracy_score(truth, pred))
    assert macro_f1(truth, pred) == pytest.approx(skm.f1_score(truth, pred, average="macro"))
    np.testing.assert_allclose(f1_per_class(truth, pred), skm.f1_score(truth, pred, average=None))
    np.testing.assert_array_equal(confusion(truth, pred), skm.confusion_matrix(truth, pred))
    order = ["T", "B", "NK"]  # a given label order; other cells left out, as sklearn
    np.testing.assert_array_equal(
        confusion(truth, pred, order), skm.confusion_matrix(truth, pred, labels=order)
    )
    m = annotation_metrics(truth, pred)
    assert m["labels"] == ["B", "DC", "NK", "T", "mono"]
    assert m["per_class_f1"]["DC"] == 0.0  # predicted, never true
    assert m["macro_f1"] == pytest.approx(skm.f1_score(truth, pred, average="macro"), abs=1e-4)
    assert sum(map(sum, m["confusion"])) == 300
    labels = m["labels"]
    for key, score in (
        ("per_class_precision", skm.precision_score),
        ("per_class_recall", skm.recall_score),
    ):
        expected = score(truth, pred, labels=labels, average=None, zero_division=0)
        np.testing.assert_allclose([m[key][c] for c in labels], expected, atol=5e-5)
    assert list(m["support"].values()) == [int((truth == c).sum()) for c in labels]


def test_f1_by_hand():
    truth = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    # a: tp 2 fp 0 fn 1 -> 0.8; b: tp 1 fp 1 fn 1 -> 0.5; c: tp 1 fp 1 fn 0 -> 2/3
    np.testing.assert_allclose(f1_per_class(truth, pred), [0.8, 0.5, 2 / 3])
    assert macro_f1(truth, pred) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert accuracy(truth, pred) == pytest.approx(4 / 6)


def test_clustering_scores_match_sklearn(blobs):
    x, truth, pred = blobs
    assert silhouette(x, truth) == pytest.approx(skm.silhouette_score(x, truth), abs=1e-9)
    np.testing.assert_allclose(silhouette_samples(x, truth), skm.silhouette_samples(x, truth))
    assert nmi(truth, pred) == pytest.approx(skm.normalized_mutual_info_score(truth, pred))
    assert ari(truth, pred) == pytest.approx(skm.adjusted_rand_score(truth, pred))
    # edge cases
    assert nmi([0, 0, 0], [1, 1, 1]) == skm.normalized_mutual_info_score([0, 0, 0], [1, 1, 1])
    assert ari([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert ari([0, 1, 2, 3], [0, 0, 1, 1]) == pytest.approx(
        skm.adjusted_rand_score([0, 1, 2, 3], [0, 0, 1, 1])
    )
    singleton = np.array([0, 0, 0, 1, 2, 2])  # label 1 has one cell: silhouette 0 there
    xs = np.arange(12, dtype=float).reshape(6, 2)
    np.testing.assert_allclose(
        silhouette_samples(xs, singleton), skm.silhouette_samples(xs, singleton)
    )


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0], [10, 0], [0, 10]])
    labels = np.repeat([0, 1, 2], 50)
    x = centers[labels] + rng.normal(size=(150, 2))
    clusters = kmeans(x, 3, seed=0)
    assert ari(labels, clusters) == 1.0
    np.testing.assert_array_equal(kmeans(x, 3, seed=0), clusters)  # seeded


def test_graph_connectivity_by_hand():
    # label a: two groups of 5 far apart (each group connected) -> 5/10; label b: one group
    rng = np.random.default_rng(2)
    a1 = rng.normal(size=(5, 2)) * 0.1
    a2 = a1 + 100.0
    b = rng.normal(size=(10, 2)) * 0.1 + [0.0, 50.0]
    x = np.vstack([a1, a2, b])
    labels = np.array(["a"] * 10 + ["b"] * 10)
    assert graph_connectivity(x, labels, k=3) == pytest.approx((0.5 + 1.0) / 2)


def test_batch_asw_mixed_vs_separated():
    rng = np.random.default_rng(3)
    labels = np.repeat(["t1", "t2"], 100)
    batches = np.tile(["b1", "b2"], 100)
    x = rng.normal(size=(200, 3)) + 10.0 * (labels == "t2")[:, None]
    mixed = batch_asw(x, labels, batches)
    separated = batch_asw(x + 20.0 * (batches == "b2")[:, None], labels, batches)
    assert mixed > 0.9
    assert separated < 0.1
    # hand formula: per label, mean of 1 - |s| over its cells, then the mean over labels
    s = [
        1 - np.abs(skm.silhouette_samples(x[labels == t], batches[labels == t]))
        for t in ["t1", "t2"]
    ]
    assert mixed == pytest.approx(np.mean([v.mean() for v in s]))


def test_integration_metrics_avg_bio_is_the_mean(blobs):
    x, truth, _ = blobs
    batches = np.tile(["b1", "b2", "b3"], 100)
    m = integration_metrics(x, truth, batches)
    assert set(m) == {
        "nmi",
        "ari",
        "asw_label",
        "asw_batch",
        "graph_connectivity",
        "avg_bio",
        "avg_batch",
    }
    assert m["avg_bio"] == pytest.approx((m["nmi"] + m["ari"] + m["asw_label"]) / 3, abs=2e-4)
    assert m["asw_label"] == pytest.approx((skm.silhouette_score(x, truth) + 1) / 2, abs=1e-4)
    single = integration_metrics(x, truth, np.full(300, "b1"))
    assert single["asw_batch"] is None  # undefined with one batch: None, not NaN
    assert single["avg_batch"] is None


@pytest.mark.parametrize(("vote", "weights"), [("majority", "uniform"), ("distance", "distance")])
def test_knn_transfer_matches_sklearn_on_normalised_embeddings(vote, weights):
    rng = np.random.default_rng(4)
    ref, query = rng.normal(size=(120, 6)), rng.normal(size=(40, 6))
    ref_labels = np.array(["x", "y", "z"])[rng.integers(0, 3, 120)]
    res = knn_transfer(ref, ref_labels, query, k=7, vote=vote)
    sk = KNeighborsClassifier(7, weights=weights).fit(l2_normalize(ref), ref_labels)
    np.testing.assert_allclose(res.probabilities, sk.predict_proba(l2_normalize(query)))
    np.testing.assert_array_equal(res.predicted_labels, sk.predict(l2_normalize(query)))
    np.testing.assert_allclose(res.conf_score, res.probabilities.max(1))
    assert res.classes == ["x", "y", "z"]


def test_knn_transfer_toy_set_and_unknown_threshold():
    ref = np.array([[1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1]], dtype=float)
    labels = np.array(["T", "T", "T", "B", "B"])
    query = np.array([[5, 0.2], [0.1, 3], [1, 1.05]])  # scale does not matter: cosine
    res = knn_transfer(ref, labels, query, k=3)
    assert res.predicted_labels.tolist() == ["T", "B", "B"]
    np.testing.assert_allclose(res.probabilities, [[0, 1], [2 / 3, 1 / 3], [2 / 3, 1 / 3]])
    cut = knn_transfer(ref, labels, query, k=3, unknown_threshold=0.9)
    assert cut.predicted_labels.tolist() == ["T", "unknown", "unknown"]
    with pytest.raises(ValueError, match="vote"):
        knn_transfer(ref, labels, query, vote="mean")


def test_decide_confidence_and_threshold():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    p = decide(["a", "b", "c"], probs)
    assert p.predicted_labels.tolist() == ["a", "a"]
    np.testing.assert_allclose(p.conf_score, [0.7, 0.4])
    assert decide(["a", "b", "c"], probs, 0.5).predicted_labels.tolist() == ["a", "unknown"]


def test_baselines_learn_separable_types_and_are_deterministic(tmp_path):
    """Three types with their own marker genes: both baselines recover them on other cells."""
    import anndata as ad
    import pandas as pd

    from scgpt_runtime.vocab import Vocab
    from scgpt_train.baselines import NAMES, baseline_predictions

    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate((150, 90)):
        types = np.arange(n) % 3
        rate = np.ones((n, 30))
        for t in range(3):
            rate[types == t, 10 * t : 10 * t + 4] = 15.0
        obs = pd.DataFrame({"cell_type": np.array(["A", "B", "C"])[types]})
        obs.index = [f"f{i}c{j}" for j in range(n)]
        var = pd.DataFrame(index=[f"G{g}" for g in range(30)])
        paths.append(tmp_path / f"{i}.h5ad")
        ad.AnnData(rng.poisson(rate).astype(np.float32), obs=obs, var=var).write_h5ad(paths[-1])
    vocab = Vocab.from_genes([f"G{g}" for g in range(30)])
    truth = np.array(["A", "B", "C"])[np.arange(90) % 3]
    first = baseline_predictions(([paths[0]], ()), ([paths[1]], ()), "cell_type", vocab)
    assert list(first) == list(NAMES)
    for pred in first.values():
        assert (pred == truth).mean() > 0.95
    again = baseline_predictions(([paths[0]], ()), ([paths[1]], ()), "cell_type", vocab)
    for name in NAMES:
        np.testing.assert_array_equal(first[name], again[name])


def test_knn_probe_by_brute_force(blobs):
    """Leave-one-out 10-NN and the mean off-diagonal cosine, computed the slow way."""
    x, truth, _ = blobs
    x = np.vstack([x, x[:3]])  # duplicates: a cell's twin may come before it
    truth = np.concatenate([truth, truth[:3]])
    got = knn_probe(x, truth, k=10)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    classes = sorted(set(truth))
    pred = []
    for row in np.argsort(d, axis=1, kind="stable")[:, :10]:
        votes = [list(truth[row]).count(c) for c in classes]
        pred.append(classes[int(np.argmax(votes))])  # ties: the first class in sorted order
    cos = z @ z.T
    off = (cos.sum() - np.trace(cos)) / (len(z) * (len(z) - 1))
    assert got["probe_knn_macro_f1"] == pytest.approx(
        skm.f1_score(truth, pred, average="macro"), abs=5e-5
    )
    assert got["probe_knn_accuracy"] == pytest.approx(skm.accuracy_score(truth, pred), abs=5e-5)
    assert got["probe_mean_cosine"] == pytest.approx(off, abs=5e-5)
