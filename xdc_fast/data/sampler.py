"""The order of an epoch's training clips, one global sequence that ranks share out.

An epoch draws from one sequence fixed by (seed, epoch) and the labels, never by the number of ranks:
its first ``count`` draws (one per training video) are the same on 1 or 64 ranks, so a run resumed on
another world size (an elastic shrink, 8 -> 16 GPUs) goes on with the clips the first one would have
seen. Ranks take the sequence in turn (rank r the draws r, r + W, r + 2W, ...), so each step consumes a
contiguous block of ``batch_size * W`` draws; fewer than W draws are added at the end so that every
rank takes as many steps, and those come from a stream of their own (the first ``count`` stay put).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def global_order(draw: Callable[[int, np.random.Generator], np.ndarray], count: int, world: int,
                 rng: np.random.Generator, padding_rng: np.random.Generator) -> np.ndarray:
    """``draw(n, rng)`` gives n sample indices; returns the epoch's ``world * ceil(count / world)`` draws:
    ``count`` from ``rng``, then the padding from ``padding_rng``."""
    order = draw(count, rng)
    extra = world * math.ceil(count / world) - count
    if extra:
        order = np.concatenate([order, draw(extra, padding_rng)])
    return order


def share_of_rank(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The draws rank ``rank`` of ``world`` trains on, in order."""
    return order[rank::world]


def share_by_shard(order: np.ndarray, shard_of: np.ndarray, rank: int, world: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """Rank ``rank``'s part of an epoch's draws when clips are read shard by shard (``clip_order: shards``):
    the same draws as :func:`share_of_rank` hands out, regrouped so that each rank reads a run of whole
    shards one after another, each shard's draws in a random order, instead of every shard every step.

    The shards' order comes from ``rng`` (a named stream of the seed and epoch), and so does the order
    within each shard; the regrouped sequence is cut into ``world`` equal contiguous parts, so every rank
    takes as many steps however uneven the shards are (``len(order)`` is a multiple of ``world``, as
    :func:`global_order` makes it). Unlike the global order, what a rank reads depends on the world size.
    ``shard_of`` maps each sample index to its shard."""
    order = np.asarray(order)
    shard_of = np.asarray(shard_of)
    shards = int(shard_of.max(initial=-1)) + 1
    position = np.empty(shards, dtype=np.int64)
    position[rng.permutation(shards)] = np.arange(shards)
    within = rng.random(len(order))
    regrouped = order[np.lexsort((within, position[shard_of[order]]))]
    part = len(order) // world
    return regrouped[rank * part:(rank + 1) * part]


_PRIME = (1 << 31) - 1


def clip_sums(indices, starts=None, into=(0, 0)) -> list[int]:
    """``into`` plus two sums (mod 2^31 - 1) of a hash of each clip seen, (dataset index, start); summed
    again over ranks they fingerprint the multiset of clips an epoch trained on, in O(1) communication."""
    import hashlib

    starts = [None] * len(indices) if starts is None else starts
    sums = np.array(into, dtype=np.int64)
    for index, start in zip(indices, starts):
        key = f"{int(index)}:{'' if start is None else f'{float(start):.4f}'}".encode()
        h = hashlib.blake2b(key, digest_size=8).digest()
        sums += (int.from_bytes(h[:4], "little") % _PRIME, int.from_bytes(h[4:], "little") % _PRIME)
    return (sums % _PRIME).tolist()


def digest_text(sums) -> str:
    """The fingerprint of summed ``clip_sums``."""
    a, b = (int(v) % _PRIME for v in sums)
    return f"{a:08x}{b:08x}"
