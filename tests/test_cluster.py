import re

import numpy as np
import pytest
import torch

from xdc_fast import KMeans, pca_whiten
from xdc_fast.cluster import SPLIT_EPS, imbalance_factor, split_empty_clusters

from .oracle import squared_distances64

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome


def blobs(n=4000, d=16, centers=20, spread=0.3, seed=0, batch=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch else ()
    means = torch.randn(*shape, centers, d, generator=gen) * 3
    which = torch.randint(0, centers, (*shape, n), generator=gen)
    if batch:
        x = torch.gather(means, 1, which[..., None].expand(-1, -1, d))
    else:
        x = means[which]
    return x + spread * torch.randn(x.shape, generator=gen)


def test_objective_never_increases():
    x = torch.randn(5000, 8)  # no structure: many iterations of real movement
    km = KMeans(8, 32, niter=25, seed=3).fit(x)
    assert km.obj.shape == (25,)
    assert np.all(np.diff(km.obj) <= 1e-6 * km.obj[0])
    assert km.stats[-1]["obj"] == pytest.approx(km.obj[-1])
    assert all(s["nsplit"] == 0 for s in km.stats)


def test_spherical_objective_never_decreases_and_centroids_are_unit():
    x = torch.nn.functional.normalize(torch.randn(3000, 12), dim=-1)
    km = KMeans(12, 16, niter=15, spherical=True, seed=1).fit(x)
    assert np.all(np.diff(km.obj) >= -1e-6 * abs(km.obj[0]))
    torch.testing.assert_close(km.centroids.norm(dim=-1), torch.ones(16))


def test_more_centroids_quantise_better():
    x = torch.randn(6000, 10)
    obj32 = KMeans(10, 32, niter=20, seed=0).fit(x).assign(x)[1].sum()
    obj64 = KMeans(10, 64, niter=20, seed=0).fit(x).assign(x)[1].sum()
    assert obj64 < obj32


def test_matches_scikit_learn_lloyd_from_the_same_start():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = blobs(n=6000, d=16, centers=25, spread=1.0)
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(5))[:25]].clone()
    ours = KMeans(16, 25, niter=10).fit(x, init_centroids=init)
    theirs = sklearn_cluster.KMeans(25, init=init.numpy(), n_init=1, max_iter=10, tol=0.0, algorithm="lloyd").fit(
        x.numpy()
    )
    assert all(s["nsplit"] == 0 for s in ours.stats)  # empty-cluster policies differ; keep them out of it
    agreement = float((ours.labels == torch.from_numpy(theirs.labels_).long()).double().mean())
    assert agreement >= 0.999
    ours_obj = float(ours.assign(x)[1].double().sum())
    assert ours_obj == pytest.approx(theirs.inertia_, rel=1e-4)
    np.testing.assert_allclose(ours.centroids.numpy(), theirs.cluster_centers_, rtol=1e-3, atol=1e-4)


def test_five_distinct_points_with_ten_centroids():
    points = torch.randn(5, 4)
    x = points.repeat(40, 1)  # 200 points, 5 distinct positions
    km = KMeans(4, 10, niter=10, seed=0).fit(x)
    assert torch.isfinite(km.centroids).all()
    assert sum(s["nsplit"] for s in km.stats) > 0  # the duplicates leave clusters empty at first
    # Every distinct point ends on (a perturbation of) itself.
    assert float(km.assign(x)[1].max()) < 1e-4 * float(points.pow(2).sum(1).max())
    assert int(km.labels.min()) >= 0 and int(km.labels.max()) < 10


def test_batch_equals_separate_problems():
    x = blobs(n=3000, d=8, centers=10, batch=3, spread=0.8)
    init = torch.stack([x[b, torch.randperm(3000)[:12]] for b in range(3)])
    batched = KMeans(8, 12, niter=12, seed=4).fit(x, init_centroids=init)
    assert batched.centroids.shape == (3, 12, 8) and batched.labels.shape == (3, 3000)
    assert batched.obj.shape == (12, 3)
    for b in range(3):
        single = KMeans(8, 12, niter=12, seed=4).fit(x[b], init_centroids=init[b])
        torch.testing.assert_close(batched.centroids[b], single.centroids, rtol=1e-5, atol=1e-5)
        assert torch.equal(batched.labels[b], single.labels)
        np.testing.assert_allclose(batched.obj[:, b], single.obj, rtol=1e-6)


def test_nredo_keeps_the_best_run():
    x = torch.randn(3000, 6)
    finals = [KMeans(6, 20, niter=8, seed=10 + r).fit(x).obj[-1] for r in range(3)]
    best = KMeans(6, 20, niter=8, nredo=3, seed=10).fit(x)
    assert best.obj[-1] == pytest.approx(min(finals))


def test_seed_makes_runs_deterministic():
    x = torch.randn(2000, 5)
    for init in ("random", "kmeans++"):
        a = KMeans(5, 15, niter=5, seed=7, init=init).fit(x)
        b = KMeans(5, 15, niter=5, seed=7, init=init).fit(x)
        assert torch.equal(a.centroids, b.centroids)


def test_kmeanspp_seeds_spread_out_centroids():
    x = blobs(n=5000, d=4, centers=8, spread=0.05, seed=2)
    # On well-separated blobs, k-means++ seeds nearly always hit every blob; random picks often miss.
    km = KMeans(4, 8, niter=0, init="kmeans++", seed=0).fit(x)
    blob_of = torch.cdist(km.centroids, x).argmin(1)
    true_centres = x[blob_of]
    assert len(torch.unique(torch.round(true_centres, decimals=0), dim=0)) == 8


def test_max_points_per_centroid_trains_on_a_subset_and_labels_everything(capsys):
    x = blobs(n=20000, d=6, centers=10)
    km = KMeans(6, 10, niter=5, seed=0, max_points_per_centroid=50, verbose=True).fit(x)
    assert "sampling 500 of 20000 points" in capsys.readouterr().out
    assert km.labels.shape == (20000,)
    assert torch.equal(km.labels, km.assign(x)[0])  # labels cover every point, not just the subset


def test_split_follows_faiss_rule():
    centroids = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    counts = torch.tensor([[9, 0, 1]])
    nsplit = split_empty_clusters(centroids, counts, torch.Generator().manual_seed(0))
    assert nsplit.tolist() == [1]
    # The only donor with a point to spare is cluster 0 (size - 1 = 8; cluster 2 has weight 0).
    donor = torch.tensor([1.0, 2.0, 3.0])
    sign = torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(centroids[0, 1], donor * (1 + sign * SPLIT_EPS))
    torch.testing.assert_close(centroids[0, 0], donor * (1 - sign * SPLIT_EPS))
    torch.testing.assert_close(centroids[0, 2], torch.tensor([5.0, 5.0, 5.0]))


def test_imbalance_factor():
    assert float(imbalance_factor(torch.tensor([5, 5, 5, 5]))) == pytest.approx(1.0)
    assert float(imbalance_factor(torch.tensor([20, 0, 0, 0]))) == pytest.approx(4.0)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"k": 0}, "k should be at least 1"), ({"init": "best"}, "init should be 'random' or 'kmeans++'"),
     ({"nredo": 0}, "nredo should be at least 1"), ({"max_points_per_centroid": 0}, "at least 1")],
)
def test_bad_parameters(kwargs, message):
    args = {"d": 4, "k": 3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        KMeans(**args)


def test_bad_inputs():
    with pytest.raises(ValueError, match="10 clusters need at least 10 points, got 4"):
        KMeans(3, 10).fit(torch.randn(4, 3))
    with pytest.raises(ValueError, match="d = 3 columns, got 5"):
        KMeans(3, 2).fit(torch.randn(10, 5))
    with pytest.raises(ValueError, match=r"init_centroids should have shape \[2, 3\]"):
        KMeans(3, 2).fit(torch.randn(10, 3), init_centroids=torch.randn(3, 3))
    x = torch.randn(10, 3)
    x[2, 2] = float("nan")
    with pytest.raises(ValueError, match="should be finite"):
        KMeans(3, 2).fit(x)
    with pytest.raises(RuntimeError, match="call fit first"):
        KMeans(3, 2).assign(torch.randn(4, 3))


def test_fit_refuses_features_whose_squares_overflow_float32():
    # Finite but huge features: in float32 every squared norm was Inf and every label 0, silently.
    x = blobs(n=2000, d=8, centers=6) * 1e30
    with pytest.raises(ValueError, match=r"KMeans\.fit: x overflows float32 when squared: the largest row norm is "
                                         r"[\d.]+e\+3\d, above 9\.2e\+18 .* scale the features down or L2-normalise"):
        KMeans(8, 6, niter=5, seed=1).fit(x)
    # Scaled down as the message says, the same points cluster, with float64's labels for the result.
    km = KMeans(8, 6, niter=5, seed=1).fit(x / 1e30)
    d64 = squared_distances64(x[None], km.centroids[None] * 1e30)[0]
    assert float((km.labels == d64.argmin(1)).double().mean()) > 0.999
    assert len(torch.unique(km.labels)) == 6
    with pytest.raises(ValueError, match="kmeans_assign: x overflows float32 when squared"):
        km.assign(x)


def test_pca_whiten_whitens_and_normalises():
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(20, 20, generator=gen)
    x = torch.randn(5000, 20, generator=gen) @ mixing + 4.0
    white = pca_whiten(x, dim=8, eps=0.0, l2_normalize=False)
    assert white.shape == (5000, 8)
    cov = torch.cov(white.double().T)
    torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=0)
    # Components come in decreasing order of variance: the first one spans the top eigenvector.
    top = torch.linalg.eigh(torch.cov(x.double().T))[1][:, -1]
    corr = torch.corrcoef(torch.stack([white[:, 0].double(), (x.double() - x.double().mean(0)) @ top]))[0, 1]
    assert abs(float(corr)) > 0.999
    unit = pca_whiten(torch.stack([x, x * 2]), dim=8)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2, 5000))
    assert pca_whiten(x, dim=0).shape == (5000, 20)
    assert pca_whiten(x, dim=999, l2_normalize=False).shape == (5000, 20)


def test_fit_then_distances_are_consistent_with_oracle():
    x = blobs(n=2000, d=8, centers=6)
    km = KMeans(8, 6, niter=10, seed=1).fit(x)
    d64 = squared_distances64(x[None], km.centroids[None])[0]
    torch.testing.assert_close(km.assign(x)[1].double(), d64.min(1).values, rtol=1e-4, atol=1e-4)


def _pca_whiten_as_released(x, dim, eps=1e-5):
    """pca_whiten as it was before the transform became data (one process), kept to prove the results
    did not move by a bit."""
    x3 = (x if x.dim() == 3 else x.unsqueeze(0)).float()
    B, N, D = x3.shape
    out = x3
    if dim > 0:
        dim = min(dim, D)
        out = torch.empty(B, N, dim)
        for b in range(B):
            block = x3[b].double()
            mean = block.sum(0) / N
            cov = (block.T @ block - N * torch.outer(mean, mean)) / (N - 1)
            evals, evecs = torch.linalg.eigh(cov)
            top = torch.arange(D - 1, D - 1 - dim, -1)
            proj = evecs[:, top] / torch.sqrt(evals[top].clamp_min(0) + eps)
            out[b] = (x3[b] - mean.float()) @ proj.float()
    out = torch.nn.functional.normalize(out, dim=-1)
    return out if x.dim() == 3 else out[0]


@pytest.mark.parametrize("shape,dim", [((300, 12), 6), ((2, 300, 12), 6), ((300, 12), 0), ((2, 300, 12), 40)])
def test_the_fitted_transform_is_pca_whiten_bit_for_bit(shape, dim):
    from xdc_fast.cluster import apply_whitening, fit_whitening

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen) @ torch.randn(12, 12, generator=gen) + 2.0
    whitening = fit_whitening(x, dim)
    assert torch.equal(apply_whitening(x, whitening), _pca_whiten_as_released(x, dim))
    assert torch.equal(pca_whiten(x, dim), _pca_whiten_as_released(x, dim))
    assert whitening.dim == (min(dim, 12) if dim else 0)


def test_the_transform_maps_new_points_with_the_fitted_statistics(tmp_path):
    """New points go through the training mean and projection, not statistics of their own; checked in
    float64 numpy, with signs of eigenvectors left out of it (inner products do not see them)."""
    from xdc_fast.cluster import Whitening, apply_whitening, fit_whitening

    gen = torch.Generator().manual_seed(4)
    mixing = torch.randn(10, 10, generator=gen)
    train = torch.randn(500, 10, generator=gen) @ mixing
    new = torch.randn(40, 10, generator=gen) @ mixing + 3.0  # shifted: its own mean would hide the shift
    whitening = fit_whitening(train, 5, eps=1e-3)
    torch.save(whitening.to_dict(), tmp_path / "w.pt")
    loaded = Whitening.from_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    mapped = apply_whitening(new, loaded).double().numpy()

    t = train.double().numpy()
    mean = t.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(t.T))
    proj = evecs[:, ::-1][:, :5] / np.sqrt(evals[::-1][:5] + 1e-3)
    expected = (new.double().numpy() - mean) @ proj
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(mapped @ mapped.T, expected @ expected.T, atol=1e-5)
    assert Whitening.from_dict(fit_whitening(train, 0).to_dict()).projection is None  # L2 only
    np.testing.assert_allclose(apply_whitening(new, fit_whitening(train, 0)).numpy(),
                               (new / new.norm(dim=1, keepdim=True)).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="fitted on unbatched points"):
        apply_whitening(new[None], whitening)


def test_nearest_other_is_the_second_nearest_centroid():
    from xdc_fast.cluster import nearest_other

    gen = torch.Generator().manual_seed(5)
    x, centroids = torch.randn(300, 6, generator=gen), torch.randn(7, 6, generator=gen)
    d64 = ((x.double()[:, None] - centroids.double()[None]) ** 2).sum(-1)
    nearest = d64.argmin(1)
    labels, dist = nearest_other(x, centroids, nearest)
    second = d64.clone()
    second[torch.arange(300), nearest] = float("inf")
    assert torch.equal(labels, second.argmin(1))
    torch.testing.assert_close(dist.double(), second.min(1).values, rtol=1e-5, atol=1e-5)
    # Excluding an arbitrary centroid, not only the nearest one.
    excluded = torch.randint(0, 7, (300,), generator=gen)
    masked = d64.clone()
    masked[torch.arange(300), excluded] = float("inf")
    assert torch.equal(nearest_other(x, centroids, excluded)[0], masked.argmin(1))
