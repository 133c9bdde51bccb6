import numpy as np
import pytest
import torch

from xdc_fast.config import PretrainConfig
from xdc_fast.pseudo_labels import (VARIANTS, ClusteringSpec, balanced_indices, cluster_round, variant,
                                    video_labels)


def test_who_learns_what():
    y = {"video": np.array([0, 1]), "audio": np.array([1, 0]), "concat": np.array([2, 2])}
    xdc = VARIANTS["xdc"].targets(y)
    assert xdc["video"][0] is y["audio"] and xdc["audio"][0] is y["video"]  # cross-modal: the other's clusters
    mdc = VARIANTS["mdc"].targets(y)
    assert mdc["video"][0] is y["video"] and mdc["video"][1] is y["audio"]
    assert mdc["audio"][0] is y["audio"] and mdc["audio"][1] is y["video"]
    cdc = VARIANTS["cdc"].targets(y)
    assert cdc["video"][0] is y["concat"] and cdc["audio"][0] is y["concat"]
    assert VARIANTS["sdc-video"].targets(y) == {"video": [y["video"]]}
    assert VARIANTS["sdc-audio"].targets(y) == {"audio": [y["audio"]]}


def test_modalities_and_clusterings_follow_from_the_table():
    assert VARIANTS["xdc"].modalities == ("video", "audio") and VARIANTS["xdc"].clusterings == ("video", "audio")
    assert VARIANTS["cdc"].clusterings == ("video", "audio", "concat")
    assert VARIANTS["sdc-audio"].modalities == ("audio",)
    with pytest.raises(ValueError, match="unknown variant 'sdc'"):
        variant("sdc")


def test_the_cli_offers_exactly_the_table():
    from xdc_fast.cli import pretrain as command

    choices = next(p for p in command.params if p.name == "variant").type.choices
    assert tuple(choices) == tuple(VARIANTS)


def test_balanced_sampler_draws_non_empty_clusters_evenly():
    labels = np.array([0] * 90 + [1] * 9 + [3] * 1)
    drawn = labels[balanced_indices(labels, 3000, np.random.default_rng(0))]
    shares = np.bincount(drawn, minlength=4) / 3000
    assert shares[2] == 0 and all(abs(shares[c] - 1 / 3) < 0.04 for c in (0, 1, 3))


def test_video_label_is_the_mode_of_its_clips():
    assert video_labels(np.array([2, 2, 1, 0, 1, 0]), 2).tolist() == [2, 0, 0]


def test_kmeans_restarts_keep_each_modalitys_lowest_objective():
    rng = np.random.default_rng(0)
    features = {m: rng.normal(size=(40, 6)).astype(np.float32) for m in ("video", "audio")}

    def objective(labels, centroids, points):
        return float(((points - centroids[labels]) ** 2).sum())

    points = {m: torch.nn.functional.normalize(torch.from_numpy(v), dim=1).numpy() for m, v in features.items()}
    results = {}
    for nredo in (1, 4):
        spec = ClusteringSpec(clusters=5, pca_dim=0, niter=20, nredo=nredo, clips_per_video=2)
        labels, centroids = cluster_round(features, VARIANTS["xdc"], spec, 0, 0, np.arange(40))
        results[nredo] = [objective(labels[m], centroids[0][i].numpy(), points[m]) for i, m in enumerate(("video", "audio"))]
    assert all(many <= one + 1e-4 for many, one in zip(results[4], results[1]))
    assert any(many < one - 1e-3 for many, one in zip(results[4], results[1]))  # the restarts found something better


def test_cdc_also_clusters_the_concatenation():
    rng = np.random.default_rng(1)
    features = {m: rng.normal(size=(12, 4)).astype(np.float32) for m in ("video", "audio")}
    spec = ClusteringSpec(clusters=3, pca_dim=0, niter=5, nredo=1, clips_per_video=1)
    labels, centroids = cluster_round(features, VARIANTS["cdc"], spec, 0, 0, np.arange(12))
    assert set(labels) == {"video", "audio", "concat"} and len(centroids) == 2
    assert centroids[1].shape == (1, 3, 8)  # the concatenation clusters in 4 + 4 dimensions
