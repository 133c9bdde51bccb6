"""Datasets of audio-video clips over a prepared folder (``xdc-fast prepare``), decoded with PyAV.

Each sample is a dict ``{video [3,T,H,W], audio [1,n_mels,frames], index, label, start}``. Training
draws a random start, crop, flip and gain per (seed, epoch, index); evaluation takes
``config.eval_clips`` uniformly spaced clips per video with the centre crop. A sample whose decoding
fails is logged, counted and dropped by :func:`collate_clips`, so one bad file never ends an epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import pyav_backend
from .clips import ClipConfig, ClipPlan, LogMel, eval_starts, plan_clip, train_start, video_to_tensor
from .manifest import Manifest
from .prepare import load_manifest
from .shards import ShardError, ShardReader

log = logging.getLogger(__name__)


class ClipDataset(Dataset):
    """Clips of a prepared dataset.

    Args:
        dataset: the folder written by ``xdc-fast prepare``.
        config: clip geometry and audio features.
        train: random clips and augmentation (True) or uniformly spaced evaluation clips (False).
        seed: with the epoch (``set_epoch``) and the index, fixes every random choice of a sample.
        modalities: ("video", "audio"), or one of them.
        split: ``(split_number, "train"|"test")`` to keep only that part, or None for every item.
        media: "auto" reads the dataset's clip shards (``prepare --shards``) once all are written, else
            the original files; "files" or "shards" insists on one.
    """

    def __init__(self, dataset: str | Path, config: ClipConfig = ClipConfig(), *, train: bool = True, seed: int = 0,
                 modalities: tuple[str, ...] = ("video", "audio"), split: tuple[str, str] | None = None,
                 media: str = "auto"):
        self.root = Path(dataset)
        self.config = config
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.modalities = tuple(modalities)
        unknown = set(self.modalities) - {"video", "audio"}
        if unknown or not self.modalities:
            raise ValueError(f"modalities should be a non-empty subset of ('video', 'audio'), got {modalities}")
        items = load_manifest(self.root)
        if split is not None:
            number, part = split
            items = [r for r in items if r.get("split", {}).get(str(number)) == part]
        if "audio" in self.modalities:
            silent = [r["id"] for r in items if not r.get("has_audio")]
            if silent:
                raise ValueError(f"{len(silent)} item(s) have no audio (e.g. {silent[0]}); use modalities=('video',) "
                                 "or leave them out")
        if "video" in self.modalities and any(r.get("fps") is None for r in items):
            raise ValueError(f"{self.root} holds audio-only items; use modalities=('audio',)")
        self.shards = None if media == "files" else ShardReader.open(self.root)
        if media == "shards" and self.shards is None:
            raise ShardError(f"{self.root} has no complete clip shards: run `xdc-fast prepare ROOT --out {self.root} "
                             "--shards` first")
        if self.shards is not None:
            missing = [r["id"] for r in items if r["id"] not in self.shards.ids]
            if missing:  # videos that did not transcode (shards/rejects.jsonl says why)
                log.warning("%d video(s) are in no shard (e.g. %s); see %s", len(missing), missing[0],
                            self.shards.folder / "rejects.jsonl")
                items = [r for r in items if r["id"] in self.shards.ids]
        self.items = items
        self.log_mel = LogMel(config) if "audio" in self.modalities else None

    @property
    def items(self) -> Manifest:
        """The dataset's items, held column by column: DataLoader workers read them without copying."""
        return self._items

    @items.setter
    def items(self, records) -> None:
        self._items = Manifest.of(records)
        self._shard_numbers = None

    def shard_numbers(self) -> np.ndarray:
        """The clip shard of every sample (train: one per item; evaluation: ``eval_clips`` per item)."""
        if self.shards is None:
            raise ShardError(f"{self.root} is not read from clip shards: run `xdc-fast prepare ROOT --out "
                             f"{self.root} --shards` first")
        if self._shard_numbers is None:
            self._shard_numbers = np.array([self.shards.plan.shard_of(i) for i in self.items.strings("id")],
                                           dtype=np.int64)
        per_item = 1 if self.train else self.config.eval_clips
        return np.repeat(self._shard_numbers, per_item)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items) * (1 if self.train else self.config.eval_clips)

    def plan(self, index: int) -> tuple[dict, ClipPlan]:
        """The item and every random choice of sample ``index``: what any backend must decode."""
        if self.train:
            record = self.items[index]
            rng = np.random.default_rng([self.seed, self.epoch, index])
            start = train_start(record["duration_s"], self._clip_seconds(record), rng)
            return record, plan_clip(record, self.config, start, rng)
        per_video = self.config.eval_clips
        record = self.items[index // per_video]
        starts = eval_starts(record["duration_s"], self._clip_seconds(record), per_video)
        return record, plan_clip(record, self.config, float(starts[index % per_video]), None)

    def _clip_seconds(self, record: dict) -> float:
        if record.get("fps"):
            return self.config.clip_seconds(record["fps"])
        return self.config.audio_seconds

    def __getitem__(self, index: int) -> dict | None:
        record, plan = self.plan(index)
        try:
            sample = {"index": index, "label": -1 if record["label"] is None else record["label"], "start": plan.start}
            if "video" in self.modalities:
                video = record["path"] if self.shards is None else self.shards.member(record["id"], "mp4")
                frames = pyav_backend.decode_frame_indices(video, plan.frame_indices, plan.size)
                sample["video"] = video_to_tensor(frames, self.config.crop, plan.crop_top, plan.crop_left, plan.flip)
            if "audio" in self.modalities:
                sound = self.root / record["audio"] if self.shards is None else self.shards.member(record["id"], "wav")
                wave = pyav_backend.read_audio_window(sound, plan.audio_start,
                                                      self.config.audio_seconds, self.config.sample_rate)
                sample["audio"] = self.log_mel(torch.from_numpy(wave * np.float32(plan.gain)))
            return sample
        except Exception as error:  # noqa: BLE001 - logged, counted by the collate, never fatal
            log.warning("skipping %s (clip at %.2f s): %s: %s", record["path"], plan.start, type(error).__name__, error)
            return None


def collate_clips(samples: list[dict | None]) -> dict:
    """Stack the samples that decoded; ``skipped`` counts those that did not."""
    good = [s for s in samples if s is not None]
    batch: dict = {"skipped": len(samples) - len(good)}
    if not good:
        return batch
    for key in good[0]:
        values = [s[key] for s in good]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return batch
