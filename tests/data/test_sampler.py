from collections import Counter

import numpy as np
import pytest

from xdc_fast.data.sampler import global_order, share_by_shard, share_of_rank


def epoch(count=103, world=4, seed=0):
    draw = lambda n, rng: rng.integers(0, 60, size=n)  # noqa: E731 - draws repeat, as balanced draws do
    return global_order(draw, count, world, np.random.default_rng(seed), np.random.default_rng(seed + 1))


# Shards of very different sizes: one holds half of the samples.
SHARD_OF = np.array([0] * 30 + [1] * 3 + [2] * 12 + [3] * 9 + [4] * 6)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_read_the_same_draws_in_equal_parts_shard_after_shard(world):
    order = epoch(world=world)
    parts = [share_by_shard(order, SHARD_OF, r, world, np.random.default_rng(7)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1 and sum(len(p) for p in parts) == len(order)
    # The epoch's clips as a multiset are the global order's: what changes is who reads them, and when.
    assert Counter(np.concatenate(parts).tolist()) == Counter(order.tolist())
    assert Counter(np.concatenate([share_of_rank(order, r, world) for r in range(world)]).tolist()) == \
        Counter(order.tolist())
    # Read in sequence, the ranks' parts visit each shard once: one run per shard over the whole epoch.
    shards_read = SHARD_OF[np.concatenate(parts)]
    runs = [s for i, s in enumerate(shards_read) if i == 0 or s != shards_read[i - 1]]
    assert len(runs) == len(set(runs))


def test_the_order_of_shards_and_within_them_comes_from_the_stream():
    order = epoch(world=2)
    again = share_by_shard(order, SHARD_OF, 0, 2, np.random.default_rng(7))
    assert np.array_equal(again, share_by_shard(order, SHARD_OF, 0, 2, np.random.default_rng(7)))
    other = [share_by_shard(order, SHARD_OF, 0, 2, np.random.default_rng(s)) for s in range(8, 14)]
    assert any(not np.array_equal(again, o) for o in other)
    firsts = {int(SHARD_OF[share_by_shard(order, SHARD_OF, 0, 1, np.random.default_rng(s))[0]]) for s in range(40)}
    assert len(firsts) > 2  # each epoch's stream starts with another shard


def test_pretraining_reads_the_same_clips_by_shard_and_refuses_a_dataset_without_shards(tmp_path):
    """One process: regrouping by shard changes only the order, so each epoch's fingerprint of the clips
    trained on (clips_digest) is the global order's (one round: later rounds' clusters would follow the
    weights, which the order of the steps moves)."""
    import json
    import shutil

    from tests.conftest import prepared_synthetic
    from xdc_fast.config import ConfigError, PretrainConfig
    from xdc_fast.data.shards import write_shards
    from xdc_fast.pretrain import pretrain

    dataset = prepared_synthetic(tmp_path, classes=3, videos_per_class=4, seconds=2.0, fps=12, width=48, height=48,
                                 seed=4)
    fast = dict(arch="tiny", clusters=3, epochs=2, epochs_per_round=2, kmeans_nredo=1, batch_size=2, pca_dim=8,
                clip=dict(frames=4, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20))
    with pytest.raises(ConfigError, match="no complete clip shards"):
        pretrain(dataset, tmp_path / "refused", PretrainConfig(clip_order="shards", **fast), log=lambda *_: None)
    sharded = tmp_path / "sharded"
    shutil.copytree(dataset, sharded)
    write_shards(sharded, short_side=48, gop=8, shard_mb=0.001, progress=False)  # many small shards
    assert json.loads((sharded / "shards" / "plan.json").read_text())["shards"] > 3
    digests = {}
    for order in ("global", "shards"):
        pretrain(sharded, tmp_path / order, PretrainConfig(clip_order=order, **fast), log=lambda *_: None)
        records = [json.loads(line) for line in (tmp_path / order / "metrics.jsonl").read_text().splitlines()]
        digests[order] = [(r["clips"], r["clips_digest"]) for r in records]
    assert digests["global"] == digests["shards"] and len(digests["shards"]) == 2
