"""``xdc-fast extract``: an encoder's features for every item of a dataset, saved with the manifest ids.

For retrieval, clustering analysis or another tool. Each item contributes ``clips_per_video`` uniformly
spaced clips (centre crop); ``aggregate="mean"`` keeps their average (one row per item), ``"all"`` keeps
every clip (``[items, clips, dim]``). A clip that fails to decode is left out of its item's mean (NaN in
``all``); an item with no clip at all gets a NaN row and is listed in ``failed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import distributed as xdist, engine
from .checkpoint import load_encoder
from .files import atomic_path, output_lock, save_atomic
from .config import ConfigError, ExtractConfig, clip_config
from .data.clips import geometry
from .data.splits import check_modality
from .metrics import mean_per_video


def extract(dataset: str | Path, out: str | Path, config: ExtractConfig, log=print) -> dict:
    """Write ``out`` (``.pt``, or ``.npz`` for tools without torch) and return what it holds:
    ``ids``, ``labels`` (-1 when unlabelled), ``features``, ``failed``, ``checkpoint``, ``clip``."""
    with output_lock(out):
        return _extract(dataset, out, config, log)


def _extract(dataset, out, config: ExtractConfig, log) -> dict:
    from .data.dataset import ClipDataset
    from .data.prepare import load_manifest

    # ===== checking the configuration =====
    out = Path(out)
    if out.suffix not in (".pt", ".npz"):
        raise ConfigError(f"--out should end in .pt or .npz, got {out.name}")
    if out.exists():  # as finetune and evaluate refuse to replace their results
        raise ConfigError(f"{out} already exists; choose another --out (or delete it)")
    items = load_manifest(dataset)
    check_modality(items, config.modality)
    device = xdist.setup_device(config.device, config.dist_timeout_s)

    # ===== building the encoder =====
    encoder, source = load_encoder(config.checkpoint, config.modality, config.arch, config.bn_eps, config.seed,
                                   config.video_input, config.audio_input)
    encoder.to(device)
    clip = clip_config(source["arch"], source.get("clip"), config.clip, eval_clips=config.clips_per_video)

    # ===== encoding =====
    clips = ClipDataset(dataset, clip, train=False, modalities=(config.modality,))
    log(f"{config.modality} features of {len(items)} items x {config.clips_per_video} clips "
        f"({source['source']} {source['arch']} encoder)")
    features, position = engine.encode_clips({config.modality: encoder}, clips, config.batch_size, device,
                                             workers=config.workers, loader=config.loader, description="extracting")
    features, video_of_clip = features[config.modality], position // config.clips_per_video
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

    # ===== writing =====
    saved = {"ids": [r["id"] for r in items], "labels": [-1 if r.get("label") is None else r["label"] for r in items],
             "features": result, "failed": failed, "aggregate": config.aggregate, "modality": config.modality,
             "checkpoint": str(config.checkpoint), "encoder": source["source"], "arch": source["arch"],
             "clip": geometry(clip)}
    if xdist.is_main_process():
        if out.suffix == ".npz":
            with atomic_path(out) as tmp:
                np.savez(tmp, **{k: np.asarray(v) if not isinstance(v, dict) else np.asarray(str(v))
                                 for k, v in saved.items()})
        else:
            save_atomic({**saved, "features": torch.from_numpy(result), "labels": torch.tensor(saved["labels"])}, out)
    if failed:
        log(f"{len(failed)} item(s) gave no clip (NaN rows), e.g. {failed[0]}")
    log(f"wrote {out}: features {list(result.shape)}")
    return saved
