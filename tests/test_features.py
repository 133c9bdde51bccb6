"""Features out of core: row files, whitening from moments, the sampled fit and the streamed assignment,
held to the in-memory functions (and a float64 reference) on the same points."""

import numpy as np
import pytest
import torch

from xdc_fast import KMeans
from xdc_fast.cluster import apply_whitening, fit_whitening, sample_by_id
from xdc_fast.features import RowFile, assign_stream, fit_streamed, fit_whitening_files, whiten_files
from xdc_fast.pseudo_labels import video_labels


def _points(n=3000, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(12, d, generator=gen)
    return (centres[torch.randint(12, (n,), generator=gen)] + torch.randn(n, d, generator=gen)).half().numpy()


def test_row_file_round_trip_by_chunks(tmp_path):
    x = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float16)
    f = RowFile.create(tmp_path / "x.npy", 1000, 7)
    for start in (600, 0, 300):  # any order
        f.write(start, x[start : start + 300] if start < 600 else x[600:])
    assert np.array_equal(np.load(tmp_path / "x.npy"), x)  # a plain .npy file
    again = RowFile.open(tmp_path / "x.npy")
    assert np.array_equal(np.concatenate([block for _, block in again.chunks(128)]), x)
    with pytest.raises(ValueError, match="do not fit"):
        f.write(990, x[:20])


def test_whitening_from_file_moments_equals_the_in_memory_fit(tmp_path):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((2500, 6)) @ rng.standard_normal((6, 6))).astype(np.float32)
    b = (rng.standard_normal((2500, 5)) * 3 + 1).astype(np.float32)
    fa, fb = RowFile.create(tmp_path / "a.npy", 2500, 6, np.float32), RowFile.create(tmp_path / "b.npy", 2500, 5,
                                                                                     np.float32)
    fa.write(0, a)
    fb.write(0, b)
    joined = torch.from_numpy(np.concatenate([a, b], axis=1))
    want = fit_whitening(joined, 4)
    got = fit_whitening_files([fa, fb], 4, chunk_rows=333)
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-10, atol=1e-10)
    # Eigenvectors are defined up to sign: compare the whitened points' absolute values.
    white = whiten_files([fa, fb], got, tmp_path / "w.npy", chunk_rows=333)
    expected = apply_whitening(joined, want).numpy()
    assert white.cols == 4 and np.allclose(np.abs(np.load(tmp_path / "w.npy").astype(np.float32)), np.abs(expected),
                                           atol=2e-3)


def test_sample_by_id_does_not_depend_on_the_sharding():
    ids = np.arange(200_000)
    whole = sample_by_id(ids, len(ids), 5000, seed=3)
    parts = np.concatenate([sample_by_id(ids[r::3], len(ids), 5000, seed=3) for r in range(3)])
    assert np.array_equal(np.sort(ids[whole]), np.sort(np.concatenate([ids[r::3] for r in range(3)])[parts]))
    assert abs(whole.sum() - 5000) < 5 * np.sqrt(5000)  # Bernoulli: about sqrt(size) either way
    assert not np.array_equal(whole, sample_by_id(ids, len(ids), 5000, seed=4))
    assert sample_by_id(ids[:10], 10, 20, seed=0).all()  # data smaller than the sample: everything


def test_streamed_fit_equals_the_in_memory_sampled_fit(tmp_path):
    x = _points()
    f = RowFile.create(tmp_path / "x.npy", *x.shape)
    f.write(0, x)
    ids = np.arange(len(x)) * 7 + 5  # global numbers need not be positions
    streamed = fit_streamed([f], ids, 12, niter=6, seed=11, max_points_per_centroid=40, chunk_rows=256)
    memory = KMeans(8, 12, niter=6, seed=11, max_points_per_centroid=40).fit(torch.from_numpy(x)[None],
                                                                              ids=ids)
    assert streamed.sample_size < len(x)  # the sample was taken
    assert torch.equal(streamed.centroids, memory.centroids)
    assert np.array_equal(streamed.labels, memory.labels.numpy())
    # Distances and margins against a float64 reference.
    x64, c64 = torch.from_numpy(x).double(), streamed.centroids[0].double()
    d2 = torch.cdist(x64, c64).pow(2)
    two = d2.topk(2, largest=False)
    assert np.array_equal(streamed.labels[0], two.indices[:, 0].numpy())
    np.testing.assert_allclose(streamed.distance[0], two.values[:, 0].numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(streamed.margin[0], (two.values[:, 1] - two.values[:, 0]).numpy(), rtol=1e-3,
                               atol=2e-3)


def test_without_sampling_the_streamed_fit_is_the_full_fit(tmp_path):
    x = _points(n=800)
    f = RowFile.create(tmp_path / "x.npy", *x.shape)
    f.write(0, x)
    streamed = fit_streamed([f], np.arange(800), 12, niter=5, seed=2, max_points_per_centroid=256)
    full = KMeans(8, 12, niter=5, seed=2).fit(torch.from_numpy(x).float()[None])
    assert streamed.sample_size == 800
    assert torch.equal(streamed.centroids, full.centroids)
    assert np.array_equal(streamed.labels, full.labels.numpy())
    labels, _, _ = assign_stream([f], full.centroids, margins=False, chunk_rows=100)
    assert np.array_equal(labels, full.labels.numpy())


@pytest.mark.training_outcome
def test_small_scale_simulation_meets_the_bars(tmp_path):
    """The scale benchmark at 40k points: sampled + streamed on 2 gloo ranks against the full in-memory fit
    from the same initial centroids, and each rank's peak resident memory against the planner."""
    from xdc_fast.bench.scale import simulate

    result = simulate(tmp_path, n=40_000, d=32, k=32, mppc=256, niter=10, spread=0.5, chunk_rows=4096,
                      log=lambda *_: None)
    assert result["sample_size"] < result["n"] / 4
    assert abs(result["objective_gap"]) <= 0.01, result["objective_gap"]
    assert result["nmi"] >= 0.95, result["nmi"]
    for ratio in result["rss_over_plan"]:
        assert 0.9 <= ratio <= 1.1, result["ranks"]


def test_video_labels_is_the_mode_of_each_videos_decoded_clips():
    rng = np.random.default_rng(5)
    for clips in (1, 2, 5):
        labels = rng.integers(-1, 4, size=300 * clips)

        def oracle(row):
            kept = row[row >= 0]
            return np.bincount(kept).argmax() if len(kept) else -1

        want = [oracle(row) for row in labels.reshape(-1, clips)]
        assert video_labels(labels, clips).tolist() == want
