"""Two gloo processes on this machine against one process holding all the data."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xdc_fast import KMeans, pca_whiten
from xdc_fast.pseudo_labels import DatasetPermutationInit

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3000, 12, generator=gen)
    init = x[:, :20].clone()
    return x, init


def _worker(rank, world_size, workdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        x, init = _data()
        shard = x.chunk(world_size, dim=1)[rank]
        given = KMeans(12, 20, niter=8, seed=1).fit(shard, init_centroids=init)
        drawn = KMeans(12, 20, niter=5, seed=None).fit(shard)
        white = pca_whiten(shard, dim=6)
        torch.save({"given": given.centroids, "labels": given.labels, "obj": torch.from_numpy(given.obj),
                    "drawn": drawn.centroids, "white": white}, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, init = _data()
    single = KMeans(12, 20, niter=8, seed=1).fit(x, init_centroids=init)

    for r in ranks:
        # All-reduced float sums differ from one process's only in summation order.
        torch.testing.assert_close(r["given"], single.centroids, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["obj"], torch.from_numpy(single.obj), rtol=1e-6, atol=1e-6)
    # Each rank keeps its own shard's labels.
    assert torch.equal(torch.cat([ranks[0]["labels"], ranks[1]["labels"]], dim=1), single.labels)
    # With a drawn seed and init, every rank still ends with identical centroids.
    assert torch.equal(ranks[0]["drawn"], ranks[1]["drawn"])
    # PCA statistics are global: the shards' whitened rows equal the whole set's.
    torch.testing.assert_close(torch.cat([ranks[0]["white"], ranks[1]["white"]], dim=1), pca_whiten(x, dim=6),
                               rtol=1e-4, atol=1e-4)


def _streamed_worker(rank, world_size, workdir):
    import numpy as np

    from xdc_fast.features import RowFile, fit_streamed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous2", rank=rank, world_size=world_size)
    try:
        x = _data()[0][0].half().numpy()
        ids = np.arange(rank, len(x), world_size)  # interleaved: the sample must not care how points are shared
        f = RowFile.create(os.path.join(workdir, f"x{rank}.npy"), len(ids), x.shape[1])
        f.write(0, x[ids])
        fit = fit_streamed([f], ids, 20, niter=6, seed=4, max_points_per_centroid=30, chunk_rows=500,
                           init=DatasetPermutationInit)
        torch.save({"centroids": fit.centroids, "labels": torch.from_numpy(fit.labels), "ids": torch.from_numpy(ids),
                    "sample": fit.sample_size}, os.path.join(workdir, f"streamed{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_on_the_same_sample_and_stream_like_one_process(tmp_path):
    """The sample is drawn by point id, so two ranks holding alternate points train on the points one process
    trains on and, from pretraining's initial centroids (clips drawn from the whole sample), end with its
    centroids and labels."""
    import numpy as np

    from xdc_fast.features import RowFile, fit_streamed

    mp.spawn(_streamed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"streamed{r}.pt") for r in range(2)]
    x = _data()[0][0].half().numpy()
    f = RowFile.create(tmp_path / "all.npy", *x.shape)
    f.write(0, x)
    single = fit_streamed([f], np.arange(len(x)), 20, niter=6, seed=4, max_points_per_centroid=30, chunk_rows=700,
                          init=DatasetPermutationInit)
    assert ranks[0]["sample"] == ranks[1]["sample"] == single.sample_size < len(x)
    for r in ranks:
        torch.testing.assert_close(r["centroids"], single.centroids, rtol=1e-5, atol=1e-5)
        assert torch.equal(r["labels"][0], torch.from_numpy(single.labels[0][r["ids"].numpy()]))
