"""``xdc-fast extract``: an encoder's features for every item of a dataset, saved with the manifest ids.

For retrieval, clustering analysis or another tool. Each item contributes ``clips_per_video`` uniformly
spaced clips (centre crop); ``aggregate="mean"`` keeps their average (one row per item), ``"all"`` keeps
every clip (``[items, clips, dim]``). A clip that fails to decode is left out of its item's mean (NaN in
``all``); an item with no clip at all gets a NaN row and is listed in ``failed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as xdist
from .checkpoint import load_encoder, save_atomic
from .finetune import FinetuneError, check_modality, clip_geometry, gathered_features, mean_per_video

AGGREGATES = ("mean", "all")


@dataclass
class ExtractConfig:
    checkpoint: str = "random"
    modality: str = "video"
    clips_per_video: int = 10
    aggregate: str = "mean"
    arch: str | None = None
    bn_eps: float = 1e-5
    batch_size: int = 8
    frames: int | None = None  # clip geometry; default: the checkpoint's, else by arch
    stride: int | None = None
    resize_short: int | None = None
    crop: int | None = None
    audio_seconds: float | None = None
    n_mels: int | None = None
    workers: int = 0
    device: str = "auto"
    seed: int = 0


def extract(dataset: str | Path, out: str | Path, config: ExtractConfig, log=print) -> dict:
    """Write ``out`` (``.pt``, or ``.npz`` for tools without torch) and return what it holds:
    ``ids``, ``labels`` (-1 when unlabelled), ``features``, ``failed``, ``checkpoint``, ``clip``."""
    from .data.clips import ClipConfig
    from .data.dataset import ClipDataset
    from .data.prepare import load_manifest

    if config.aggregate not in AGGREGATES:
        raise FinetuneError(f"aggregate should be one of {', '.join(AGGREGATES)}, got {config.aggregate!r}")
    out = Path(out)
    if out.suffix not in (".pt", ".npz"):
        raise FinetuneError(f"--out should end in .pt or .npz, got {out.name}")
    items = load_manifest(dataset)
    check_modality(items, config.modality)
    device = xdist.setup_device(config.device)
    encoder, source = load_encoder(config.checkpoint, config.modality, config.arch, config.bn_eps, config.seed)
    encoder.to(device)
    geometry = clip_geometry(source, config)
    clips = ClipDataset(dataset, ClipConfig(**geometry, eval_clips=config.clips_per_video), train=False,
                        modalities=(config.modality,))
    log(f"{config.modality} features of {len(items)} items x {config.clips_per_video} clips "
        f"({source['source']} {source['arch']} encoder)")
    features, video_of_clip = gathered_features(encoder, clips, config, device, "extracting")
    means, counts = mean_per_video(features, video_of_clip, len(items))
    failed = [items[i]["id"] for i in np.flatnonzero(counts == 0)]
    if config.aggregate == "mean":
        result = means.astype(np.float32)
    else:
        # Clips come back in dataset order within each video, but a failed clip leaves a gap: place by count.
        result = np.full((len(items), config.clips_per_video, encoder.feature_dim), np.nan, dtype=np.float32)
        slot = np.zeros(len(items), dtype=np.int64)
        for row, video in zip(features, video_of_clip):
            result[video, slot[video]] = row
            slot[video] += 1
    saved = {"ids": [r["id"] for r in items], "labels": [-1 if r.get("label") is None else r["label"] for r in items],
             "features": result, "failed": failed, "aggregate": config.aggregate, "modality": config.modality,
             "checkpoint": str(config.checkpoint), "encoder": source["source"], "arch": source["arch"], "clip": geometry}
    if xdist.is_main_process():
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npz":
            np.savez(out, **{k: np.asarray(v) if not isinstance(v, dict) else np.asarray(str(v)) for k, v in saved.items()})
        else:
            save_atomic({**saved, "features": torch.from_numpy(result), "labels": torch.tensor(saved["labels"])}, out)
    if failed:
        log(f"{len(failed)} item(s) gave no clip (NaN rows), e.g. {failed[0]}")
    log(f"wrote {out}: features {list(result.shape)}")
    return saved
