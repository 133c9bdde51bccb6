import numpy as np
import pytest
import torch

from xdc_fast.pseudo_labels import ClusteringSpec, balanced_indices, fit_round, video_labels
from xdc_fast.variants import VARIANTS


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
        fit = fit_round(features, VARIANTS["xdc"], spec, 0, 0, np.arange(40))
        labels, centroids = fit.labels, fit.centroids
        results[nredo] = [objective(labels[m], centroids[0][i].numpy(), points[m]) for i, m in enumerate(("video", "audio"))]
    assert all(many <= one + 1e-4 for many, one in zip(results[4], results[1]))
    assert any(many < one - 1e-3 for many, one in zip(results[4], results[1]))  # the restarts found something better


def test_cdc_also_clusters_the_concatenation():
    rng = np.random.default_rng(1)
    features = {m: rng.normal(size=(12, 4)).astype(np.float32) for m in ("video", "audio")}
    spec = ClusteringSpec(clusters=3, pca_dim=0, niter=5, nredo=1, clips_per_video=1)
    fit = fit_round(features, VARIANTS["cdc"], spec, 0, 0, np.arange(12))
    labels, centroids = fit.labels, fit.centroids
    assert set(labels) == {"video", "audio", "concat"} and len(centroids) == 2
    assert centroids[1].shape == (1, 3, 8)  # the concatenation clusters in 4 + 4 dimensions


# ---- what a round keeps to reproduce itself --------------------------------------------------------------

@pytest.mark.parametrize("name,pca_dim", [("xdc", 4), ("cdc", 0)])
def test_a_rounds_transforms_reproduce_its_points_and_labels(name, pca_dim):
    """The kept transform maps the raw features to the points k-means saw (bit for bit), and each label
    is the nearest kept centroid of its point (float64)."""
    from xdc_fast.cluster import apply_whitening

    rng = np.random.default_rng(2)
    features = {m: rng.normal(size=(30, 6)).astype(np.float32) for m in ("video", "audio")}
    spec = ClusteringSpec(clusters=4, pca_dim=pca_dim, niter=10, nredo=1, clips_per_video=2)
    fit = fit_round(features, VARIANTS[name], spec, 0, 0, np.arange(30))
    assert set(fit.transforms) == set(VARIANTS[name].clusterings)
    for clustering, transform in fit.transforms.items():
        raw = torch.cat([torch.from_numpy(features[m]) for m in transform["inputs"]], dim=1)
        points = apply_whitening(raw, transform["whitening"])
        assert torch.equal(points, fit.points[clustering])
        d64 = ((points.double()[:, None] - transform["centroids"].double()[None]) ** 2).sum(-1)
        assert np.array_equal(d64.argmin(1).numpy(), fit.labels[clustering])
    assert transforms_inputs(fit) == ({"video": ["video"], "audio": ["audio"]} if name == "xdc" else
                                      {"video": ["video"], "audio": ["audio"], "concat": ["video", "audio"]})


def transforms_inputs(fit):
    return {name: t["inputs"] for name, t in fit.transforms.items()}


def test_assignment_measures_against_float64_by_hand():
    from xdc_fast.pseudo_labels import assignment_measures

    rng = np.random.default_rng(3)
    points = rng.normal(size=(9, 3)).astype(np.float32)
    centroids = rng.normal(size=(4, 3)).astype(np.float32)
    positions = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9])  # 5 videos x 2 clips; clip 8 did not decode
    got = assignment_measures(torch.from_numpy(points), torch.from_numpy(centroids), positions, 5, 2)

    d = ((points.astype(np.float64)[:, None] - centroids.astype(np.float64)[None]) ** 2).sum(-1)
    order = np.sort(d, axis=1)
    clip_labels = np.full(10, -1)
    clip_labels[positions] = d.argmin(1)
    assert np.array_equal(got["clip_labels"], clip_labels)
    np.testing.assert_allclose(got["clip_distance"][positions], order[:, 0], rtol=1e-5)
    np.testing.assert_allclose(got["clip_margin"][positions], order[:, 1] - order[:, 0], rtol=1e-4, atol=1e-6)
    assert np.isnan(got["clip_distance"][8])
    for v in range(5):
        mine = [i for i, p in enumerate(positions) if p // 2 == v]
        votes = np.bincount(d[mine].argmin(1), minlength=4)
        label = int(votes.argmax())  # the lowest on a tie, as training decides
        assert got["video_labels"][v] == label
        others = np.delete(d[mine], label, axis=1).min(1)
        assert got["video_distance"][v] == pytest.approx(d[mine, label].mean(), rel=1e-5)
        assert got["video_margin"][v] == pytest.approx((others - d[mine, label]).mean(), rel=1e-4, abs=1e-6)


def test_measures_read_in_chunks_of_whole_videos_equal_the_measures_in_memory(tmp_path):
    """Chunks far smaller than the data, ending where a video ends; videos whose clips partly failed."""
    from xdc_fast.features import RowFile
    from xdc_fast.pseudo_labels import _measures_in_chunks, assignment_measures

    rng = np.random.default_rng(5)
    cpv, videos = 3, 40
    positions = np.sort(rng.choice(videos * cpv, size=100, replace=False))  # some clips did not decode
    points = torch.nn.functional.normalize(torch.randn(len(positions), 8, generator=torch.Generator().manual_seed(1)))
    centroids = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(2)))
    labels = torch.cdist(points, centroids).argmin(1).numpy()
    labels[::7] = (labels[::7] + 1) % 5  # some clips held in a cluster other than their nearest
    local_videos = np.unique(positions // cpv)
    local = np.searchsorted(local_videos, positions // cpv) * cpv + positions % cpv
    stored = RowFile.create(tmp_path / "points.npy", len(points), 8, np.float32)
    stored.write(0, points.numpy())
    expected = assignment_measures(points, centroids, local, len(local_videos), cpv, labels)
    for chunk_rows in (1, 4, 7, 1000):
        got = _measures_in_chunks(stored, centroids, local, len(local_videos), cpv, labels, chunk_rows=chunk_rows)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key}, chunks of {chunk_rows}")


# ---- the balanced assignment -----------------------------------------------------------------------------

def _unbalanced_mixture(seed=0, sizes=(110, 50, 30, 10), width=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), width))
    x = np.concatenate([centres[j] + 0.4 * rng.normal(size=(n, width)) for j, n in enumerate(sizes)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    bounds = np.cumsum((0, *sizes))
    c = np.stack([x[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
    return x, c


def test_balanced_labels_are_near_the_exact_equal_size_transport():
    """Oracle: the exact assignment of the clips to K equal shares at least total squared distance
    (scipy's linear_sum_assignment over K copies of each centroid), in float64."""
    from scipy.optimize import linear_sum_assignment

    from xdc_fast.pseudo_labels import balanced_offsets, offset_labels

    x, c = _unbalanced_mixture()
    n, k = x.shape[0], c.shape[0]
    offsets = balanced_offsets(torch.from_numpy(x).float(), torch.from_numpy(c).float())
    labels = offset_labels(torch.from_numpy(x).float(), torch.from_numpy(c).float(), offsets)
    d64 = ((x[:, None] - c[None]) ** 2).sum(-1)
    _, column = linear_sum_assignment(np.repeat(d64, n // k, axis=1))
    exact = column // (n // k)
    assert np.bincount(d64.argmin(1), minlength=k).max() > 2 * n // k  # the nearest centroid is far from balanced
    sizes = np.bincount(labels, minlength=k)
    assert sizes.min() >= 0.85 * n / k and sizes.max() <= 1.15 * n / k, sizes
    assert (labels == exact).mean() >= 0.9
    assert d64[np.arange(n), labels].sum() <= 1.05 * d64[np.arange(n), exact].sum()
    # the labels follow from the offsets alone: distance plus offset, argmin, in float64
    assert np.array_equal(labels, (d64 + offsets.double().numpy()[None]).argmin(1))


def test_balanced_assignment_reads_row_files_as_it_reads_memory(tmp_path):
    from xdc_fast.features import RowFile
    from xdc_fast.pseudo_labels import _chunks_of, balanced_offsets, offset_labels

    x, c = _unbalanced_mixture(seed=1)
    points = torch.from_numpy(x.astype(np.float16).astype(np.float32))
    stored = RowFile.create(tmp_path / "points.npy", len(x), x.shape[1])
    stored.write(0, x.astype(np.float16))
    centroids = torch.from_numpy(c).float()
    in_memory = balanced_offsets(points, centroids)
    from_disk = balanced_offsets(stored, centroids)
    assert torch.allclose(in_memory, from_disk, atol=1e-5)
    assert np.array_equal(offset_labels(points, centroids, in_memory), offset_labels(stored, centroids, from_disk))
    assert sum(len(block) for block in _chunks_of(stored, rows=7)) == len(x)


def test_a_balanced_round_keeps_its_offsets_and_its_labels_follow_them():
    from xdc_fast.cluster import apply_whitening
    from xdc_fast.pseudo_labels import assignment_measures

    rng = np.random.default_rng(4)
    features = {m: np.concatenate([rng.normal(size=(90, 6)), rng.normal(size=(10, 6)) + 4]).astype(np.float32)
                for m in ("video", "audio")}
    spec = ClusteringSpec(clusters=4, pca_dim=0, niter=10, nredo=1, clips_per_video=2, balanced=True)
    fit = fit_round(features, VARIANTS["xdc"], spec, 0, 0, np.arange(100))
    for name, transform in fit.transforms.items():
        sizes = np.bincount(fit.labels[name], minlength=4)
        assert sizes.min() >= 20 and sizes.max() <= 30, sizes
        points = apply_whitening(torch.from_numpy(features[name]), transform["whitening"])
        again = assignment_measures(points, transform["centroids"], np.arange(100), 50, 2,
                                    offsets=transform["offsets"])
        assert np.array_equal(again["clip_labels"], fit.labels[name])
