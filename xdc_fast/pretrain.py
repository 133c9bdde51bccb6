"""``xdc-fast pretrain``: self-supervised pretraining by deep clustering, in rounds.

One round: extract features of fixed clips -> PCA-whitening + L2 -> one batched k-means for both
modalities -> targets by variant -> fresh heads -> train on augmented clips drawn class-balanced
over non-empty clusters -> metrics -> checkpoint. Variants (who learns what):

    xdc        video learns the audio clusters, audio learns the video clusters
    mdc        each encoder has two heads: its own modality's clusters and the other's
    cdc        both learn the clusters of the concatenated features [f_v ; f_a]
    sdc-video  the video encoder learns its own clusters (sdc-audio: the audio encoder)
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed as xdist
from .config import dataclass_from_dict
from . import metrics
from .checkpoint import is_ours, own_encoder_state, read_checkpoint, save_atomic, torchvision_video_state
from .cluster import KMeans, pca_whiten

VARIANTS = ("xdc", "mdc", "cdc", "sdc-video", "sdc-audio")


@dataclass
class PretrainConfig:
    variant: str = "xdc"
    arch: str = "tiny"  # r2plus1d_18 for the paper's encoders (a GPU job)
    clusters: int = 8  # k; the XDC lineage uses 64-1024 on Kinetics-size data
    epochs: int = 4
    epochs_per_round: int = 1  # re-cluster after this many epochs (DeepCluster: 1)
    clips_per_video: int = 2  # fixed clips per video whose features are clustered
    pca_dim: int = 32  # PCA-whitening dimension before k-means (0 = off; DeepCluster: 256)
    kmeans_niter: int = 20
    kmeans_nredo: int = 1  # k-means restarts from different clips; each modality keeps its lowest objective
    batch_size: int = 8
    lr: float = 0.01  # SGD; 0.01 suits the tiny encoders, lower it if the loss does not decrease
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0  # linear warm-up from 0, then cosine decay to 0 at the last step
    schedule: str = "cosine"  # or "constant"
    init_checkpoint: str | None = None  # start the encoders from this checkpoint (ours, or video weights)
    labels_from: str | None = None  # train on these saved assignments (RUN/clusters/round_NNN.pt) instead
    checkpoint_every: int = 50  # steps between mid-epoch checkpoints (0: only at the end of a round)
    recluster: str = "epochs"  # "epochs": every epochs_per_round epochs; "plateau": when the held-out
    #   pseudo-label loss stops improving for `patience` epochs (epochs_per_round then caps a round)
    heldout_fraction: float = 0.1  # plateau mode: share of videos kept out of training to watch the loss
    patience: int = 1
    frames: int = 8
    stride: int = 2
    resize_short: int = 64
    crop: int = 56
    audio_seconds: float = 1.0
    n_mels: int = 40
    workers: int = 0
    device: str = "auto"
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        return dataclass_from_dict(cls, values, ConfigError)


class ConfigError(ValueError):
    """A configuration that cannot run (reported before any work starts)."""


def modalities_for(variant: str) -> tuple[str, ...]:
    return {"sdc-video": ("video",), "sdc-audio": ("audio",)}.get(variant, ("video", "audio"))


def targets_for_variant(variant: str, y_v, y_a, y_c=None) -> dict[str, list]:
    """The pseudo-label sets each encoder's heads learn (DESIGN.md's table)."""
    if variant == "xdc":
        return {"video": [y_a], "audio": [y_v]}
    if variant == "mdc":
        return {"video": [y_v, y_a], "audio": [y_a, y_v]}
    if variant == "cdc":
        return {"video": [y_c], "audio": [y_c]}
    if variant == "sdc-video":
        return {"video": [y_v]}
    if variant == "sdc-audio":
        return {"audio": [y_a]}
    raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def check_config(config: PretrainConfig, items: list[dict]) -> None:
    if config.variant not in VARIANTS:
        raise ConfigError(f"unknown variant {config.variant!r}; choose one of {', '.join(VARIANTS)}")
    clips = len(items) * config.clips_per_video
    if not 2 <= config.clusters <= clips:
        raise ConfigError(f"--clusters {config.clusters} must lie between 2 and the {clips} clips clustered "
                          f"({len(items)} videos x {config.clips_per_video} clips)")
    if "audio" in modalities_for(config.variant):
        silent = [r["id"] for r in items if not r.get("has_audio")]
        if silent:
            raise ConfigError(f"variant {config.variant} learns from audio, but {len(silent)} item(s) have none "
                              f"(e.g. {silent[0]}); use sdc-video or drop them")
    if config.epochs < 1 or config.epochs_per_round < 1:
        raise ConfigError("--epochs and epochs_per_round must be at least 1")
    if config.recluster not in ("epochs", "plateau"):
        raise ConfigError(f"recluster should be 'epochs' or 'plateau', got {config.recluster!r}")
    if config.recluster == "plateau" and not 0 < config.heldout_fraction < 1:
        raise ConfigError("recluster 'plateau' needs a heldout_fraction between 0 and 1")


def balanced_indices(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """DeepCluster's sampler: each draw picks a non-empty cluster uniformly, then one of its items."""
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    which = rng.integers(0, len(members), size=count)
    return np.array([members[c][rng.integers(0, len(members[c]))] for c in which], dtype=np.int64)


def video_labels(clip_labels: np.ndarray, clips_per_video: int) -> np.ndarray:
    """One label per video: the most frequent over its clips (the lowest on a tie)."""
    per_video = clip_labels.reshape(-1, clips_per_video)
    return np.array([np.bincount(row).argmax() for row in per_video], dtype=np.int64)


def new_head(dim: int, k: int, generator: torch.Generator) -> nn.Linear:
    # Fresh every round: cluster ids permute between clusterings, so old heads mean nothing. Drawn
    # from the round's own generator, so a resumed run draws the same heads whatever else ran before.
    head = nn.Linear(dim, k)
    nn.init.normal_(head.weight, 0, 0.01, generator=generator)
    nn.init.zeros_(head.bias)
    return head


def lr_schedule(config: PretrainConfig, steps_per_epoch: int) -> np.ndarray:
    """Learning rate of every step of the run, precomputed (DINO's habit): warm-up, then cosine."""
    total = config.epochs * steps_per_epoch
    steps = np.arange(total, dtype=np.float64)
    if config.schedule == "constant":
        rates = np.full(total, config.lr)
    else:
        rates = 0.5 * config.lr * (1 + np.cos(np.pi * steps / max(total, 1)))
    warm = int(round(config.warmup_epochs * steps_per_epoch))
    if warm > 0:
        rates[:warm] = config.lr * (steps[:warm] + 1) / warm
    return rates


def load_init_checkpoint(encoders: nn.ModuleDict, path: str | Path) -> list[str]:
    """Encoders from another run's checkpoint, or video weights in torchvision's layout (a torchvision
    or official XDC file). Returns what was loaded."""
    from .models import load_video_weights

    state = read_checkpoint(path)
    if is_ours(state):
        for m in encoders:
            encoders[m].load_state_dict(own_encoder_state(state, m, path), strict=True)
        return list(encoders)
    if "video" not in encoders:
        raise ConfigError(f"{path} holds video weights only, and this variant trains no video encoder")
    load_video_weights(encoders["video"], torchvision_video_state(state))
    return ["video"]


def load_saved_labels(path: str | Path, ids: list[str]) -> dict[str, np.ndarray]:
    """Per-video assignments saved by a round, reordered to ``ids``; every id must be there."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    position = {item: i for i, item in enumerate(saved["ids"])}
    missing = [item for item in ids if item not in position]
    if missing:
        raise ConfigError(f"{path} has no assignment for {len(missing)} item(s) of this dataset (e.g. {missing[0]})")
    order = np.array([position[item] for item in ids])
    return {key[: -len("_video_labels")]: value.numpy()[order] for key, value in saved.items()
            if key.endswith("_video_labels")}


class Interrupted(RuntimeError):
    """Raised by the ``stop_after_steps`` test hook, as a kill would end the process."""


def pretrain(dataset: str | Path, out: str | Path, config: PretrainConfig, resume: bool = False,
             log=print, max_rounds: int | None = None, stop_after_steps: int | None = None) -> list[dict]:
    """Run the rounds; returns the metrics lines written to ``out/metrics.jsonl``.

    ``max_rounds`` stops after that many rounds of this call; ``stop_after_steps`` raises
    ``Interrupted`` right after the mid-epoch checkpoint of that step (both stand in for a killed
    process in tests); ``resume`` then continues the run from its last checkpoint, mid-epoch included."""
    from .data.clips import ClipConfig
    from .data.dataset import ClipDataset, collate_clips
    from .data.prepare import load_manifest
    from .models import build_audio_encoder, build_video_encoder

    # ===== checking the configuration =====
    items = load_manifest(dataset)
    check_config(config, items)
    out = Path(out)
    if not resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; continue it with --resume or choose another --out")
    for sub in ("checkpoints", "clusters"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # The same command line runs alone or under torchrun: ranks shard the videos, cluster together
    # and train one DDP model; only rank 0 writes.
    device = xdist.setup_device(config.device)
    rank, world = xdist.rank(), xdist.world_size()
    writer = rank == 0
    if not writer:
        log = lambda *_: None  # noqa: E731
    clustered = len(items) * config.clips_per_video
    if config.pca_dim and clustered < 10 * config.pca_dim:
        log(f"note: PCA-whitening {clustered} clips to {config.pca_dim} dimensions gives noise the weight of "
            "signal; with fewer than 10 clips per dimension a smaller pca_dim (or 0: L2 only) clusters better")
    torch.manual_seed(config.seed)  # identical initial encoders on every rank
    modalities = modalities_for(config.variant)
    from . import __version__

    if writer:
        (out / "config.yaml").write_text(_yaml({**asdict(config), "code_version": __version__, "world_size": world,
                                                 "dataset": str(Path(dataset).resolve())}))

    # ===== preparing data =====
    clip = ClipConfig(frames=config.frames, stride=config.stride, resize_short=config.resize_short, crop=config.crop,
                      audio_seconds=config.audio_seconds, n_mels=config.n_mels, eval_clips=config.clips_per_video)
    train_set = ClipDataset(dataset, clip, train=True, seed=config.seed, modalities=modalities)
    fixed_clips = ClipDataset(dataset, clip, train=False, modalities=modalities)
    all_items = train_set.items
    true_labels = np.array([-1 if r["label"] is None else r["label"] for r in all_items])
    shard = np.arange(rank, len(all_items), world)  # this rank's videos (global indices)
    fixed_clips.items = [all_items[i] for i in shard]
    held = np.zeros(len(all_items), dtype=bool)  # plateau mode: videos that only measure the loss
    if config.recluster == "plateau":
        count = max(1, int(round(config.heldout_fraction * len(all_items))))
        held[np.random.default_rng([config.seed, 99]).permutation(len(all_items))[:count]] = True
    train_shard = shard[~held[shard]]
    train_set.items = [all_items[i] for i in train_shard]
    heldout_shard = np.flatnonzero(held)[rank::world]
    heldout_set = ClipDataset(dataset, ClipConfig(**{**clip.__dict__, "eval_clips": 1}), train=False,
                              modalities=modalities)
    heldout_set.items = [all_items[i] for i in heldout_shard]
    samples_per_rank = math.ceil(int((~held).sum()) / world)  # the same step count on every rank

    # ===== building networks =====
    encoders = nn.ModuleDict()
    if "video" in modalities:
        encoders["video"] = build_video_encoder(config.arch)
    if "audio" in modalities:
        encoders["audio"] = build_audio_encoder(config.arch)
    encoders.to(device)
    if config.init_checkpoint and not resume:
        log(f"encoders from {config.init_checkpoint}: {', '.join(load_init_checkpoint(encoders, config.init_checkpoint))}")
    optimizer = torch.optim.SGD(encoders.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(samples_per_rank / config.batch_size)
    schedule = lr_schedule(config, steps_per_epoch)
    transferred = load_saved_labels(config.labels_from, [r["id"] for r in all_items]) \
        if config.labels_from else None
    round_index, next_epoch, history, previous, inside = 0, 0, [], None, None
    last = out / "checkpoints" / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location=device, weights_only=True)
        encoders.load_state_dict(state["encoders"])
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
        previous = {m: v.numpy() for m, v in state["previous_labels"].items()} if state["previous_labels"] else None
        torch.set_rng_state(state["torch_rng"])
        if state.get("inside") is not None:  # killed mid-epoch: finish that epoch from its next step
            inside = state["inside"]
            round_index, next_epoch = state["round"], inside["epoch"]
            log(f"resuming round {state['round']} at epoch {inside['epoch']}, step {inside['step']}")
        else:
            round_index, next_epoch = state["round"] + 1, state["next_epoch"]
            log(f"resuming after round {state['round']}")

    rounds_run = 0
    while next_epoch < config.epochs and (max_rounds is None or rounds_run < max_rounds):
        resuming = inside is not None and inside["round"] == round_index
        if resuming:
            # ===== the round's clusters, as the interrupted process had them =====
            everyone = {m: v.numpy() for m, v in inside["everyone"].items()}
            per_video = {m: v[shard] for m, v in everyone.items()}
            t_extract, t_cluster = inside["seconds"]
        elif transferred is None:
            # ===== extracting features =====
            t0 = time.perf_counter()
            features = _extract(encoders, fixed_clips, config, device, collate_clips)
            t_extract = time.perf_counter() - t0

            # ===== clustering =====
            t0 = time.perf_counter()
            clip_labels, centroids = _cluster(features, config, round_index, shard, len(all_items))
            t_cluster = time.perf_counter() - t0
            per_video = {m: video_labels(v, config.clips_per_video) for m, v in clip_labels.items()}
            everyone = _gather_by_video(shard, per_video, len(all_items), 1)
            everyone_clips = _gather_by_video(shard, clip_labels, len(all_items), config.clips_per_video)
            if writer:
                torch.save({"ids": [r["id"] for r in all_items], "clips_per_video": config.clips_per_video,
                            "centroids": centroids,
                            **{f"{m}_clip_labels": torch.from_numpy(v) for m, v in everyone_clips.items()},
                            **{f"{m}_video_labels": torch.from_numpy(v) for m, v in everyone.items()}},
                           out / "clusters" / f"round_{round_index:03d}.pt")
        else:
            # ===== cluster transfer: the saved assignments are the targets of every round =====
            everyone, t_extract, t_cluster = transferred, 0.0, 0.0
            per_video = {m: v[shard] for m, v in transferred.items()}
        per_video = {m: everyone[m][train_shard] for m in everyone}  # the videos this rank trains on
        targets = targets_for_variant(config.variant, per_video.get("video"), per_video.get("audio"),
                                      per_video.get("concat"))
        heldout_targets = targets_for_variant(config.variant, *(everyone[m][heldout_shard] if m in everyone else None
                                                                for m in ("video", "audio", "concat")))
        k = config.clusters if transferred is None else 1 + max(int(v.max()) for v in everyone.values())

        # ===== fresh heads and their optimizer =====
        head_generator = torch.Generator().manual_seed(config.seed * 7919 + round_index)
        heads = nn.ModuleDict({m: nn.ModuleList([new_head(encoders[m].feature_dim, k, head_generator)
                                                 for _ in targets[m]]) for m in modalities}).to(device)
        head_optimizer = torch.optim.SGD(heads.parameters(), lr=config.lr, momentum=config.momentum)
        if resuming:
            heads.load_state_dict(inside["heads"])
            head_optimizer.load_state_dict(inside["head_optimizer"])

        # ===== training =====
        balance_on = targets[modalities[0]][0]
        best, stale, in_round = (inside["plateau"] if resuming else (float("inf"), 0, 0))
        while next_epoch < config.epochs and in_round < config.epochs_per_round:
            epoch = next_epoch
            start_step, running = 0, None
            if resuming and epoch == inside["epoch"]:
                start_step, running = inside["step"], inside["running"][rank]

            def checkpoint_inside(step: int, local_running: dict, epoch=epoch) -> None:
                # Everything an interrupted process needs to finish this epoch as if nothing happened.
                state = {"encoders": encoders.state_dict(), "optimizer": optimizer.state_dict(),
                         "round": round_index, "history": history, "config": asdict(config),
                         "torch_rng": torch.get_rng_state(),
                         "previous_labels": {m: torch.from_numpy(v) for m, v in (previous or {}).items()},
                         "inside": {"round": round_index, "epoch": epoch, "step": step, "heads": heads.state_dict(),
                                    "head_optimizer": head_optimizer.state_dict(),
                                    "running": xdist.all_gather_objects(local_running),
                                    "everyone": {m: torch.from_numpy(v) for m, v in everyone.items()},
                                    "seconds": [t_extract, t_cluster], "plateau": [best, stale, in_round]}}
                if writer:
                    save_atomic(state, last)
                xdist.barrier()
                if stop_after_steps is not None and step >= stop_after_steps:
                    raise Interrupted(f"stopped after step {step} (test hook)")

            t0 = time.perf_counter()
            stats = _train_one_epoch(encoders, heads, targets, train_set, balance_on, optimizer, head_optimizer,
                                     config, epoch, device, collate_clips,
                                     schedule[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch],
                                     samples_per_rank, start_step, running, checkpoint_inside)
            t_train = time.perf_counter() - t0
            if config.recluster == "plateau":
                stats["heldout_loss"] = _heldout_loss(encoders, heads, heldout_targets, heldout_set, config, device,
                                                      collate_clips)

            # ===== writing logs =====
            record = {"round": round_index, "epoch": epoch, **stats, "clusters": _cluster_stats(everyone, config),
                      "seconds": {"extract": t_extract, "cluster": t_cluster, "train": t_train},
                      "clips_per_s": stats["clips"] / t_train if t_train else None}
            if previous is not None:
                record["nmi_to_previous"] = {m: metrics.nmi(everyone[m], previous[m]) for m in everyone
                                             if m in previous}
            if "video" in everyone and "audio" in everyone:
                record["nmi_video_audio"] = metrics.nmi(everyone["video"], everyone["audio"])
            if (true_labels >= 0).all():
                record["vs_true_labels"] = {m: metrics.cluster_quality(v, true_labels) for m, v in everyone.items()}
            history.append(record)
            if writer:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                _tensorboard(out, record)
            log(_summary(record))
            next_epoch, in_round = next_epoch + 1, in_round + 1
            if config.recluster == "plateau":
                # Re-cluster once the held-out loss has stopped improving for `patience` epochs.
                if stats["heldout_loss"] < best - 1e-4:
                    best, stale = stats["heldout_loss"], 0
                else:
                    stale += 1
                if stale >= config.patience:
                    break
        previous, inside = everyone, None

        # ===== checkpoint =====
        state = {"encoders": encoders.state_dict(), "optimizer": optimizer.state_dict(), "round": round_index,
                 "next_epoch": next_epoch, "history": history, "config": asdict(config),
                 "torch_rng": torch.get_rng_state(),
                 "previous_labels": {m: torch.from_numpy(v) for m, v in previous.items()}}
        if writer:
            save_atomic(state, out / "checkpoints" / f"round_{round_index:03d}.pt")
            save_atomic(state, last)
        xdist.barrier()  # nobody resumes from, or reads, a checkpoint that is still being written
        round_index, rounds_run = round_index + 1, rounds_run + 1
    return history


def _heldout_loss(encoders, heads, targets, heldout_set, config, device, collate) -> float:
    """Mean pseudo-label cross-entropy, summed over heads, on the held-out videos of every rank."""
    loader = torch.utils.data.DataLoader(heldout_set, batch_size=config.batch_size, collate_fn=collate)
    encoders.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            if "index" not in batch:
                continue
            index = batch["index"].numpy()
            for m in heads:
                feature = encoders[m](batch[m].to(device)).float()
                for h, head in enumerate(heads[m]):
                    target = torch.from_numpy(targets[m][h][index]).to(device)
                    total[0] += float(nn.functional.cross_entropy(head(feature), target, reduction="sum"))
            total[1] += len(index)
    total = xdist.all_reduce_sum(total)
    return float(total[0] / max(float(total[1]), 1.0))


def _tensorboard(out: Path, record: dict) -> None:
    """TensorBoard scalars of an epoch, when tensorboard is installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    with SummaryWriter(str(out / "tensorboard")) as board:
        step = record["epoch"]
        for key, value in record["loss"].items():
            if value is not None:
                board.add_scalar(f"loss/{key}", value, step)
        for key, value in record["pseudo_label_acc"].items():
            board.add_scalar(f"pseudo_label_acc/{key}", value, step)
        for name, value in record.get("nmi_to_previous", {}).items():
            board.add_scalar(f"nmi_to_previous/{name}", value, step)
        if "nmi_video_audio" in record:
            board.add_scalar("nmi_video_audio", record["nmi_video_audio"], step)
        for name, quality in record.get("vs_true_labels", {}).items():
            for key, value in quality.items():
                board.add_scalar(f"vs_true_labels/{name}/{key}", value, step)


def _gather_by_video(shard: np.ndarray, labels: dict[str, np.ndarray], n_videos: int, per_video: int) -> dict:
    """Every rank's labels, placed at their global positions (``per_video`` rows per video)."""
    full = {m: np.zeros(n_videos * per_video, dtype=np.int64) for m in labels}
    for other_shard, other in xdist.all_gather_objects((shard, labels)):
        rows = (np.asarray(other_shard)[:, None] * per_video + np.arange(per_video)).ravel()
        for m, v in other.items():
            full[m][rows] = v
    return full


def _extract(encoders, fixed_clips, config, device, collate) -> dict[str, np.ndarray]:
    loader = torch.utils.data.DataLoader(fixed_clips, batch_size=config.batch_size, num_workers=config.workers,
                                         collate_fn=collate)
    encoders.eval()
    chunks: dict[str, list] = {m: [] for m in encoders}
    with torch.no_grad():
        for batch in loader:
            if batch["skipped"]:
                raise RuntimeError("a fixed clip failed to decode; every clip must be clustered")
            for m in encoders:
                chunks[m].append(encoders[m](batch[m].to(device)).float().cpu())
    return {m: torch.cat(v).numpy() for m, v in chunks.items()}


def _cluster(features: dict[str, np.ndarray], config, round_index: int, shard: np.ndarray,
             n_videos: int) -> tuple[dict[str, np.ndarray], list[torch.Tensor]]:
    """Both modalities in one batched k-means call (same dimension after PCA), plus the concatenation
    for CDC. Initial centroids are clips drawn from the whole dataset by a seeded permutation, each
    contributed by the rank holding it, so sharded and single-process runs start (and end) alike."""
    seed = config.seed * 1000 + round_index  # a fresh seed every round
    clip_rows = (shard[:, None] * config.clips_per_video + np.arange(config.clips_per_video)).ravel()
    position = {int(g): i for i, g in enumerate(clip_rows)}

    def fit(points: torch.Tensor) -> torch.Tensor:
        best_obj = best_labels = best_centroids = None
        for redo in range(config.kmeans_nredo):
            # Objectives are all-reduced, so every rank keeps the same restart of each problem.
            chosen = torch.randperm(n_videos * config.clips_per_video,
                                    generator=torch.Generator().manual_seed(seed + 7919 * redo))[: config.clusters]
            init = torch.zeros(points.shape[0], config.clusters, points.shape[-1])
            for j, g in enumerate(chosen.tolist()):
                if g in position:
                    init[:, j] = points[:, position[g]]
            init = xdist.all_reduce_sum(init)
            km = KMeans(points.shape[-1], config.clusters, niter=config.kmeans_niter, seed=seed + redo)
            km.fit(points, init_centroids=init)
            final = torch.from_numpy(np.atleast_2d(km.obj)[-1].copy())
            if best_obj is None:
                best_obj, best_labels, best_centroids = final, km.labels.clone(), km.centroids.clone()
            else:
                better = final < best_obj
                best_obj = torch.where(better, final, best_obj)
                best_labels[better] = km.labels[better]
                best_centroids[better] = km.centroids[better]
        centroids.append(best_centroids)
        return best_labels

    centroids: list[torch.Tensor] = []
    names = [m for m in ("video", "audio") if m in features]
    white = pca_whiten(torch.stack([torch.from_numpy(features[m]) for m in names]), config.pca_dim)
    stacked = fit(white)
    labels = {m: stacked[i].numpy() for i, m in enumerate(names)}
    if config.variant == "cdc":
        joint = pca_whiten(torch.cat([torch.from_numpy(features[m]) for m in names], dim=1), config.pca_dim)
        labels["concat"] = fit(joint[None])[0].numpy()
    return labels, centroids


class Learner(nn.Module):
    """Encoders and their heads as one module, so DDP sees every parameter a step uses."""

    def __init__(self, encoders: nn.ModuleDict, heads: nn.ModuleDict):
        super().__init__()
        self.encoders, self.heads = encoders, heads

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out = {}
        for m in self.heads:
            with torch.autocast(inputs[m].device.type, dtype=torch.bfloat16, enabled=inputs[m].is_cuda):
                feature = self.encoders[m](inputs[m])
            out[m] = [head(feature.float()) for head in self.heads[m]]
        return out


def _train_one_epoch(encoders, heads, targets, train_set, balance_on, optimizer, head_optimizer, config, epoch,
                     device, collate, rates: np.ndarray, samples: int, start_step: int = 0,
                     running: dict | None = None, checkpoint=None) -> dict:
    # The epoch's whole sample order comes from (seed, epoch, rank): a resumed epoch skips what the
    # interrupted one had done and sees the same batches after it.
    rng = np.random.default_rng([config.seed, epoch, xdist.rank()])
    order = balanced_indices(balance_on, samples, rng)
    train_set.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, order[start_step * config.batch_size :].tolist()),
                                         batch_size=config.batch_size, num_workers=config.workers, collate_fn=collate)
    total_steps = math.ceil(samples / config.batch_size)
    if xdist.is_main_process() and sys.stderr.isatty():  # a bar on a terminal, plain log lines otherwise
        from tqdm import tqdm

        loader = tqdm(loader, total=total_steps, initial=start_step, desc=f"epoch {epoch}", unit="step", leave=False)
    learner = Learner(encoders, heads)
    if xdist.is_distributed():
        learner = nn.parallel.DistributedDataParallel(learner, device_ids=[device.index] if device.type == "cuda" else None)
    learner.train()
    keys = [f"{m}_{h}" for m in heads for h in range(len(heads[m]))]
    run = running or {"loss_sum": {k: 0.0 for k in keys}, "loss_count": {k: 0 for k in keys},
                      "correct": {k: 0 for k in keys}, "seen": 0, "skipped": 0}
    for step, batch in enumerate(loader, start=start_step):
        for group in optimizer.param_groups + head_optimizer.param_groups:
            group["lr"] = float(rates[min(step, len(rates) - 1)])
        run["skipped"] += batch["skipped"]
        if "index" not in batch:
            continue
        index = batch["index"].numpy()
        outputs = learner({m: batch[m].to(device) for m in heads})
        total = 0.0
        for m in heads:
            for h, logits in enumerate(outputs[m]):
                target = torch.from_numpy(targets[m][h][index]).to(device)
                loss = nn.functional.cross_entropy(logits, target)
                total = total + loss
                run["loss_sum"][f"{m}_{h}"] += loss.item()
                run["loss_count"][f"{m}_{h}"] += 1
                run["correct"][f"{m}_{h}"] += int((logits.argmax(1) == target).sum())
        if not torch.isfinite(total):
            raise FloatingPointError(f"the loss became {float(total)} at epoch {epoch}; the last good checkpoint is "
                                     "in checkpoints/last.pt (lower --lr and --resume)")
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(list(encoders.parameters()) + list(heads.parameters()), 10.0)
        optimizer.step()
        head_optimizer.step()
        run["seen"] += len(index)
        done = step + 1
        if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < total_steps:
            checkpoint(done, run)
    # Every rank's figures, so the log describes the whole step, not rank 0's share.
    sums = xdist.all_reduce_sum(torch.tensor([[run["loss_sum"][k], run["loss_count"][k], run["correct"][k]]
                                              for k in keys] + [[0.0, run["seen"], run["skipped"]]],
                                             dtype=torch.float64))
    seen, skipped = int(sums[-1, 1]), int(sums[-1, 2])
    return {"loss": {k: float(sums[i, 0] / sums[i, 1]) if sums[i, 1] else None for i, k in enumerate(keys)},
            "pseudo_label_acc": {k: float(sums[i, 2]) / max(seen, 1) for i, k in enumerate(keys)}, "clips": seen,
            "skipped": skipped,
            "lr": float(rates[0]) if len(rates) else None}


def _cluster_stats(per_video: dict[str, np.ndarray], config) -> dict:
    out = {}
    for m, labels in per_video.items():
        sizes = np.bincount(labels, minlength=config.clusters if config.labels_from is None else 0)
        out[m] = {"sizes": sizes.tolist(), "empty": int((sizes == 0).sum()),
                  "imbalance_factor": float(len(sizes) * (sizes**2).sum() / max(sizes.sum(), 1) ** 2)}
    return out


def _summary(record: dict) -> str:
    losses = " ".join(f"{k}={v:.3f}" for k, v in record["loss"].items() if v is not None)
    line = f"round {record['round']} epoch {record['epoch']}: loss {losses}"
    if "vs_true_labels" in record:
        line += " | NMI to classes " + " ".join(f"{m}={q['nmi']:.3f}" for m, q in record["vs_true_labels"].items())
    return line


def _yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)
