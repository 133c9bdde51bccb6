"""Named random streams: every random choice of a run comes from ``(seed, stream name, keys)``.

One run seed fans out into independent streams by name (numpy's ``SeedSequence`` with the name's CRC as
a spawn key), so adding a draw to one stream never shifts another, and a resumed run or another rank
asks for exactly the stream it needs. The streams, and what each decides:
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

STREAMS = {
    "encoders": "initial encoder weights (the same on every rank, so DDP starts in agreement)",
    "clips": "training clips: start, crop, flip and gain of sample (epoch, index); the dataset adds those keys",
    "heldout": "which videos are clustered but held out of training (the learning signal, plateau mode)",
    "kmeans": "k-means of round r: initial centroids of each restart and the splits of empty clusters",
    "heads": "fresh classifier heads of round r (cluster ids permute between rounds, so heads restart)",
    "sampler": "order of the balanced draws of epoch e, whatever the world size (key 0; key 1: the padding). "
               "Key 0 is the stream a single process always drew from, so one-process runs draw as they did",
    "audio_shift": "pretraining: the mel shift of each training clip in epoch e (key 0, as for the sampler)",
    "colour_jitter": "pretraining: the colour change of each training clip in epoch e (key 0)",
    "split": "stratified train/test split of a dataset without official splits",
    "order": "finetuning: order of the training clips of epoch e",
    "shards": "clip_order shards: the order of the clip shards in epoch e, and of the draws within each",
    "probe": "linear probe: the logistic regression's solver",
}
__doc__ += "\n" + "\n".join(f"    {name:<9} {what}" for name, what in STREAMS.items()) + "\n"


def seed_for(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit integer seed for ``stream`` of run ``seed``, further split by ``keys`` (round, epoch, rank)."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; add it to xdc_fast.seeds.STREAMS with what it decides")
    sequence = np.random.SeedSequence(int(seed) & ((1 << 63) - 1),
                                      spawn_key=(zlib.crc32(stream.encode()), *(int(k) for k in keys)))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(seed_for(seed, stream, *keys))


def torch_generator(seed: int, stream: str, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, stream, *keys))
