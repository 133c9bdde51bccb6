import numpy as np
import pytest

from xdc_fast.seeds import STREAMS, numpy_rng, seed_for, torch_generator


def test_streams_are_reproducible_and_independent():
    assert seed_for(0, "kmeans", 3, 1) == seed_for(0, "kmeans", 3, 1)
    drawn = {seed_for(0, name) for name in STREAMS} | {seed_for(1, name) for name in STREAMS}
    assert len(drawn) == 2 * len(STREAMS)  # no two streams (or seeds) share a seed
    assert seed_for(0, "sampler", 1, 0) != seed_for(0, "sampler", 0, 1)  # keys are ordered
    assert np.array_equal(numpy_rng(5, "split").permutation(10), numpy_rng(5, "split").permutation(10))
    assert torch_generator(5, "heads", 2).initial_seed() == seed_for(5, "heads", 2) < 2**63


def test_an_undocumented_stream_is_refused():
    with pytest.raises(KeyError, match="add it to xdc_fast.seeds.STREAMS"):
        seed_for(0, "misc")
