"""Each evaluation protocol against an independent computation."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, top_k_accuracy_score

from xdc_fast import protocols

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome


def unit(*angles_deg):
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_knn_hand_made_weighted_vote():
    # Query at 0 degrees. Neighbours: class 0 at 10 deg, class 1 at 20 and 25 deg, class 0 at 170 deg (far).
    train = unit(10, 20, 25, 170) * np.array([[3.0], [0.5], [1.0], [2.0]])  # scale must not matter
    train_y = np.array([0, 1, 1, 0])
    test = unit(0)
    t = 0.07
    w = np.exp(np.cos(np.radians([10, 20, 25])) / t)
    # k=3: class 0 gets w[0], class 1 gets w[1] + w[2]; at T=0.07 the closer single neighbour outweighs the pair
    assert w[0] > w[1] + w[2]
    assert protocols.knn(train, train_y, test, [0], k=3, temperature=t)["scores"]["top1"] == 1.0
    # a very high temperature makes it a plain majority vote: class 1
    assert protocols.knn(train, train_y, test, [1], k=3, temperature=100.0)["scores"]["top1"] == 1.0
    # k=1: only the nearest (class 0); k=4 at high T: a 2-2 tie, broken towards the lower class index
    assert protocols.knn(train, train_y, test, [0], k=1, temperature=100.0)["scores"]["top1"] == 1.0
    assert protocols.knn(train, train_y, test, [0], k=2, temperature=100.0)["scores"]["top5"] == 1.0


def test_knn_matches_sklearn_top_k_on_random_features():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    train_y, test_y = rng.integers(0, 7, 60), rng.integers(0, 7, 25)
    k, t = 10, 0.1
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = test / np.linalg.norm(test, axis=1, keepdims=True)
    votes = np.zeros((25, 7))
    for i, q in enumerate(qn):
        sims = tn @ q
        for j in np.argsort(-sims)[:k]:
            votes[i, train_y[j]] += np.exp(sims[j] / t)
    result = protocols.knn(train, train_y, test, test_y, k=k, temperature=t, num_classes=7)
    assert result["scores"]["top1"] == pytest.approx(top_k_accuracy_score(test_y, votes, k=1, labels=range(7)))
    assert result["scores"]["top5"] == pytest.approx(top_k_accuracy_score(test_y, votes, k=5, labels=range(7)))
    assert result["params"] == {**result["params"], "k": 10, "temperature": 0.1}


def test_retrieval_recall_known_by_construction():
    # Training items on the unit circle, classes by position; query i is built so that its first
    # same-class training item is at rank r_i (1-based). Recall@k = share of queries with r_i <= k.
    n_train = 60
    angles = np.arange(n_train) * 3.0  # 0..177 degrees: distinct, increasing away from a query at -1 deg
    train = unit(*angles)
    ranks = [1, 2, 5, 7, 12, 30, 55]
    recalls = {k: [] for k in (1, 5, 10, 20, 50)}
    for r in ranks:
        train_y = np.full(n_train, 1)
        train_y[r - 1] = 0  # the only class-0 item is the r-th nearest to a query at -1 degree
        got = protocols.retrieval(train, train_y, unit(-1.0), [0])["scores"]
        for k in recalls:
            assert got[f"recall@{k}"] == float(r <= k)
            recalls[k].append(r <= k)
    # all queries at once: each query class c has its single same-class item at rank r_c
    train_y = np.full(n_train, 99)
    for c, r in enumerate(ranks):
        train_y[r - 1] = c
    got = protocols.retrieval(train, train_y, unit(*[-1.0] * len(ranks)), list(range(len(ranks))))["scores"]
    for k, hits in recalls.items():
        assert got[f"recall@{k}"] == pytest.approx(np.mean(hits))
    assert got["num_queries"] == len(ranks)


def test_clustering_scores_equal_sklearn_on_the_same_assignment():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 5
    y = np.repeat(np.arange(4), 15)
    x = centres[y] + rng.normal(size=(60, 16))
    result = protocols.clustering(x, y, seed=3)
    assert result["params"]["k"] == 4 and result["params"]["nredo"] == 5
    # recompute the assignment independently of the protocol's scoring
    import torch
    from xdc_fast.cluster import KMeans
    points = torch.from_numpy(protocols.l2_normalise(x).astype(np.float32))
    labels = KMeans(16, 4, niter=20, nredo=5, seed=3).fit(points).labels.numpy()
    assert result["scores"]["nmi"] == pytest.approx(normalized_mutual_info_score(y, labels))
    assert result["scores"]["ari"] == pytest.approx(adjusted_rand_score(y, labels))
    assert result["scores"]["nmi"] > 0.9  # well-separated blobs are found


def test_svm_model_selection_never_sees_a_test_item(monkeypatch):
    rng = np.random.default_rng(2)
    videos, clips = 24, 3
    video_y = np.arange(videos) % 3
    centres = rng.normal(size=(3, 10)) * 3
    x = centres[np.repeat(video_y, clips)] + rng.normal(size=(videos * clips, 10))
    test_videos = np.arange(videos) % 4 == 0
    clip_video = np.repeat(np.arange(videos), clips)
    train_rows, test_rows = ~test_videos[clip_video], test_videos[clip_video]
    test_ids = np.flatnonzero(test_videos)
    test_video_of_clip = np.searchsorted(test_ids, clip_video[test_rows])

    seen = []
    real_fit = protocols._fit_svm

    def spy(xs, ys, c, seed):
        seen.append(xs.copy())
        return real_fit(xs, ys, c, seed)

    monkeypatch.setattr(protocols, "_fit_svm", spy)
    result = protocols.svm(x[train_rows], video_y[clip_video[train_rows]], clip_video[train_rows], x[test_rows],
                           video_y[test_ids], test_video_of_clip)
    assert len(seen) == 1 + 3 * len(protocols.SVM_CS)  # every CV fit and the final fit went through the spy
    test_set = {row.tobytes() for row in x[test_rows]}
    train_set = {row.tobytes() for row in x[train_rows]}
    for fitted in seen:
        rows = {row.tobytes() for row in fitted}
        assert not rows & test_set
        assert rows <= train_set
    assert result["selected"]["C"] in protocols.SVM_CS and "C" not in result["params"]
    assert result["scores"]["video_acc"] > 0.8


def test_svm_folds_keep_a_videos_clips_together(monkeypatch):
    from sklearn import model_selection

    real = model_selection.GroupKFold.split
    folds = []

    def spy(self, x, y=None, groups=None):
        for fit_rows, held_rows in real(self, x, y, groups):
            folds.append((set(groups[fit_rows]), set(groups[held_rows])))
            yield fit_rows, held_rows

    monkeypatch.setattr(model_selection.GroupKFold, "split", spy)
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(12), 4)
    y = groups % 2
    x = rng.normal(size=(48, 5)) + y[:, None]
    protocols.select_c(x, y, groups, cs=(1.0,), folds=3)
    assert len(folds) == 3
    assert all(not (fit & held) for fit, held in folds)


def test_linear_is_the_probe():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 10)
    x = rng.normal(size=(30, 6)) + 4 * np.eye(3, 6)[y]
    result = protocols.linear(x, y, x, y, np.arange(30), num_classes=3)
    assert result["scores"]["video_acc"] == 1.0 and result["scores"]["clip_acc"] == 1.0
    assert "confusion" not in result["scores"] and result["params"]["C"] == 1.0


def test_multilabel_linear_equals_sklearn_one_vs_rest_and_average_precision():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(5)
    classes, clips = 5, 3
    train_videos, test_videos = 40, 16
    directions = rng.normal(size=(classes, 8))

    def videos(n):
        truth = rng.random((n, classes)) < 0.35
        truth[:, 4] = False  # a class no test (or training) video carries: it must not enter the mean
        features = truth.astype(float) @ directions
        x = np.repeat(features, clips, axis=0) + rng.normal(size=(n * clips, 8))
        return x, truth, np.repeat(np.arange(n), clips)

    train_x, train_truth, train_video = videos(train_videos)
    test_x, test_truth, test_video = videos(test_videos)
    result = protocols.multilabel_linear(train_x, train_truth[train_video], test_x, test_truth, test_video, c=0.5)

    present = test_truth.any(axis=0)
    oracle = OneVsRestClassifier(make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000)))
    oracle.fit(train_x, train_truth[train_video][:, present])
    clip_probability = oracle.predict_proba(test_x)
    video_probability = np.stack([clip_probability[test_video == v].mean(axis=0) for v in range(test_videos)])
    expected = average_precision_score(test_truth[:, present], video_probability, average="macro")
    assert result["scores"]["map"] == pytest.approx(expected, abs=1e-6)
    assert result["scores"]["clip_map"] == pytest.approx(
        average_precision_score(test_truth[test_video][:, present], clip_probability, average="macro"), abs=1e-6)
    assert result["scores"]["num_classes_scored"] == int(present.sum()) < classes
    assert result["scores"]["map"] > 0.8  # the classes are linearly readable from these features
    assert protocols.headline("linear", result["scores"]) == "map"


def test_multilabel_linear_never_fits_on_a_test_item(monkeypatch):
    from sklearn.linear_model import LogisticRegression

    seen = []
    real_fit = LogisticRegression.fit

    def spy(self, x, y, *args, **kwargs):
        seen.append(np.asarray(x).copy())
        return real_fit(self, x, y, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    rng = np.random.default_rng(6)
    train_x, test_x = rng.normal(size=(30, 4)), rng.normal(size=(12, 4)) + 50.0  # far apart, easy to tell
    train_y, test_y = rng.random((30, 3)) < 0.5, rng.random((6, 3)) < 0.5
    test_y[0] = True
    protocols.multilabel_linear(train_x, train_y, test_x, test_y, np.repeat(np.arange(6), 2))
    assert seen and all(np.abs(fitted).max() < 10 for fitted in seen)  # standardised training rows only


def test_retrieval_on_label_sets_counts_a_shared_class_as_a_hit():
    train = unit(10, 20, 30, 40)  # ranked by distance from a query at 0 degrees
    train_y = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    queries = unit(0, 0, 0)
    query_y = np.array([[0, 0, 1],    # first shared class at rank 3
                        [1, 1, 0],    # rank 1
                        [0, 1, 0]], dtype=bool)  # rank 2
    got = protocols.retrieval(train, train_y, queries, query_y, ks=(1, 2, 3))["scores"]
    assert (got["recall@1"], got["recall@2"], got["recall@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
