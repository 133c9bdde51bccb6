"""``xdc-fast finetune --mode linear``: the linear probe of a frozen encoder.

Features of ``train_clips`` uniformly spaced clips per training video are computed once; a logistic
regression on them is folded into one ``nn.Linear``, and the test clips are scored as in full
finetuning (see :mod:`xdc_fast.transfer`). The per-video mean features of both parts are saved beside
the metrics in ``extract``'s format (``features.pt``), for clustering or retrieval without encoding again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import distributed as xdist, metrics
from .files import output_lock, save_atomic
from .config import ConfigError, FinetuneConfig
from .data.clips import geometry
from .seeds import seed_for
from .protocols import linear_classifier
from .transfer import probabilities, score_or_refuse, start_transfer, write_results


def probe(dataset: str | Path, out: str | Path, config: FinetuneConfig, log=print) -> dict:
    """Fit and score a linear probe; writes what ``finetune`` writes plus ``out/features.pt``."""
    if config.mode != "linear":
        raise ConfigError(f"probe is the linear mode; mode {config.mode} is xdc_fast.finetune.finetune")
    with output_lock(out):
        return _probe(dataset, out, config, log)


def _probe(dataset, out, config: FinetuneConfig, log) -> dict:
    # ===== checking the configuration, building the frozen encoder =====
    transfer = start_transfer(dataset, out, config, log)
    for p in transfer.encoder.parameters():
        p.requires_grad_(False)
    split = transfer.split

    # ===== features, cached once, then a convex fit =====
    features, video_of_clip = transfer.features(transfer.clips(split.train, config.train_clips), "train features")
    train_labels = np.array([r["label"] for r in split.train])[video_of_clip]
    head = linear_classifier(features, train_labels, len(transfer.classes), config.linear_c,
                             seed_for(config.seed, "probe") % (2**32)).to(transfer.device)
    test_features, test_video_of_clip = transfer.features(transfer.test_set, "test features")
    final = score_or_refuse(probabilities(head, test_features, transfer.device), test_video_of_clip,
                            transfer.test_labels, len(transfer.classes))

    # ===== writing results =====
    result = write_results(transfer, head, {**final, "epoch": None}, [])
    if xdist.is_main_process():
        means = np.concatenate([metrics.mean_per_video(features, video_of_clip, len(split.train))[0],
                                metrics.mean_per_video(test_features, test_video_of_clip, len(split.test))[0]])
        save_atomic({"ids": [r["id"] for r in split.train + split.test],
                     "labels": torch.tensor([r["label"] for r in split.train + split.test]),
                     "features": torch.from_numpy(means.astype(np.float32)), "aggregate": "mean",
                     "modality": config.modality, "checkpoint": str(config.checkpoint),
                     "clip": geometry(transfer.clip)}, Path(out) / "features.pt")
    return result


__all__ = ["probe"]
