"""``xdc-fast pretrain``: self-supervised pretraining by deep clustering, in rounds.

One round: encode fixed clips -> PCA-whitening + L2 -> one batched k-means for both modalities ->
targets by variant -> fresh heads -> train on augmented clips drawn class-balanced over non-empty
clusters -> metrics -> checkpoint. The variants are the table in :mod:`xdc_fast.pseudo_labels`.

The same command runs alone or under torchrun: ranks share out the videos, cluster together (the
k-means is distributed) and train one DDP model; only rank 0 writes. A run killed at any point resumes
with ``--resume`` and ends as an uninterrupted one would: a mid-epoch checkpoint holds everything the
rest of that epoch needs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed as xdist, engine, learning, metrics
from .checkpoint import load_encoders_from, read_checkpoint
from .errors import CheckpointError, XdcError
from .files import RunLock, append_text, make_folder, save_atomic, write_text_atomic
from .progress import progress
from .config import AUTO, ConfigError, PretrainConfig, resolve_auto
from .data.clips import geometry
from .data.sampler import clip_sums, digest_text, global_order, share_by_shard, share_of_rank
from .data.splits import check_modality, check_sample_rate
from .pseudo_labels import ClusteringSpec, balanced_indices, cluster_sizes, gather_by_video, video_labels
from .rounds import checkpoint_path, load_saved_labels, metrics_path, round_checkpoints, round_file
from .variants import Variant, variant as variant_named
from .seeds import numpy_rng, seed_for, torch_generator


class Interrupted(RuntimeError):
    """Raised by the ``stop_after_steps`` test hook, as a kill would end the process."""


@dataclass
class RunState:
    """Where a run is: everything a resumed process needs besides the weights and optimizer."""

    round: int = 0  # the round in progress, or the next one
    next_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # one metrics record per finished epoch
    previous: dict[str, np.ndarray] | None = None  # the last finished round's per-video labels
    mid_epoch: dict | None = None  # set while an epoch is in progress: its round, epoch, step, heads...


@dataclass
class RunData:
    """The run's videos and the datasets that decode them, with this rank's shares."""

    items: list[dict]
    true_labels: np.ndarray  # -1 where unlabelled
    train_set: object  # random augmented clips of this rank's training videos
    fixed_clips: object  # the clips whose features are clustered (all videos; encode_clips shards them)
    heldout_set: object  # >= 4 fixed clips of each held-out video (encode_clips shards them)
    shard: np.ndarray  # global indices of this rank's videos (for encoding the fixed clips)
    training: np.ndarray  # global indices of every training video (ranks share out each epoch's draws)
    heldout: np.ndarray  # global indices of every held-out video
    samples_per_rank: int  # the same number of steps on every rank


@dataclass
class RoundLabels:
    all_videos: dict[str, np.ndarray]  # per-video labels of every clustering, all videos
    k: int
    seconds: tuple[float, float]  # extracting, clustering


def pretrain(dataset: str | Path, out: str | Path, config: PretrainConfig, resume: bool = False,
             log=print, max_rounds: int | None = None, stop_after_steps: int | None = None) -> list[dict]:
    """Run the rounds; returns the metrics lines written to ``out/metrics.jsonl``.

    ``max_rounds`` stops after that many rounds of this call; ``stop_after_steps`` raises
    ``Interrupted`` right after the mid-epoch checkpoint of that step (both stand in for a killed
    process in tests); ``resume`` then continues the run from its last checkpoint, mid-epoch included."""
    from .data.prepare import load_manifest

    # ===== checking the configuration =====
    variant = variant_named(config.variant)
    items = load_manifest(dataset)
    out = Path(out)
    device = xdist.setup_device(config.device, config.dist_timeout_s)
    writer = xdist.is_main_process()
    if len(items) - heldout_count(config, len(items)) < 1:
        raise ConfigError(f"heldout_fraction {config.heldout_fraction} holds out all {len(items)} videos, leaving none "
                          "to train on; lower it")
    config, why = _resolve_auto(config, items, out, resume, device.type)
    if config.arch == AUTO:
        config = replace(config, arch=config.resolved_arch(device.type))
        (log if writer else lambda *_: None)(
            f"arch: {config.arch} (auto: the device is {device.type}" + (")" if device.type == "cuda" else
                                                                        "; on a GPU it would be r2plus1d_18)"))
    check_config(config, variant, items, dataset)
    for name, reason in why.items():
        (log if writer else lambda *_: None)(f"auto: {name} = {getattr(config, name)} ({reason})")
    with RunLock(out) if writer else contextlib.nullcontext():
        if not resume and metrics_path(out).exists():
            raise ConfigError(f"{out} already holds a run; continue it with --resume or choose another --out")
        last = checkpoint_path(out)
        saved = _read_resumable(last, config) if resume and last.exists() else None
        if resume and saved is None:
            _start_over(out, last, log if writer else lambda *_: None, writer)
        return _run(dataset, out, config, variant, items, device, saved, log if writer else lambda *_: None,
                    max_rounds, stop_after_steps, why)


def _start_over(out: Path, last: Path, log, writer: bool) -> None:
    """--resume without a checkpoint: a run stopped before its first one keeps nothing, so it starts again,
    saying so, and the epochs it had logged are dropped from metrics.jsonl (they will be logged again)."""
    rounds = round_checkpoints(out)
    if rounds:  # the disk filled between a round's file and last.pt: that round is not lost
        raise CheckpointError(f"cannot resume: {last} does not exist, but {rounds[-1]} (the last finished round) does; "
                              "copy it over last.pt and resume")
    if not metrics_path(out).exists():
        log(f"--resume: {out} holds no run yet; starting one")
        return
    log(f"--resume: {last} does not exist (the run stopped before its first checkpoint); starting from the beginning, "
        "with metrics.jsonl begun again")
    if writer:
        write_text_atomic(metrics_path(out), "")


def _resolve_auto(config: PretrainConfig, items: list[dict], out: Path, resume: bool, device_type: str):
    """``auto`` fields resolved from the data, except on ``--resume``: there they take the values the run
    used (its config.yaml), so a run started under other rules, or on data that changed size, goes on as
    it began."""
    if resume and (out / "config.yaml").exists():
        import yaml

        used = yaml.safe_load((out / "config.yaml").read_text()) or {}
        used.setdefault("video_input", "rgb")  # a run begun before the choice existed fed its encoder frames
        used.setdefault("audio_input", "logmel")  # and its audio encoder the plain log-mel
        used.setdefault("head", "linear")  # and trained them through linear heads
        kept = {f.name: used[f.name] for f in fields(config) if getattr(config, f.name) == AUTO and f.name in used}
        config = replace(config, **kept)
    return resolve_auto(config, len(items), epoch_steps(config, len(items)), device_type)


def samples_per_rank(config: PretrainConfig, videos: int) -> int:
    """Clips each rank draws per epoch: the training videos (the held-out ones excluded) shared over the
    ranks, the same number on every rank."""
    return math.ceil((videos - heldout_count(config, videos)) / xdist.world_size())


def epoch_steps(config: PretrainConfig, videos: int) -> int:
    """Optimisation steps per epoch on each rank."""
    return math.ceil(samples_per_rank(config, videos) / config.batch_size)


def heldout_count(config: PretrainConfig, videos: int) -> int:
    """Videos kept out of training: the fraction asked for, rounded down (none on a handful of videos)."""
    return int(config.heldout_fraction * videos + 1e-9)


def _run(dataset, out: Path, config: PretrainConfig, variant: Variant, items: list[dict], device, saved: dict | None,
         log, max_rounds: int | None, stop_after_steps: int | None, auto_reasons: dict[str, str]) -> list[dict]:
    writer = xdist.is_main_process()
    for folder in (checkpoint_path(out).parent, round_file(out, 0).parent):
        make_folder(folder)
    clustered = len(items) * config.clips_per_video
    if config.pca_dim and clustered < 10 * config.pca_dim:
        log(f"note: PCA-whitening {clustered} clips to {config.pca_dim} dimensions gives noise the weight of "
            "signal; with fewer than 10 clips per dimension a smaller pca_dim (or 0: L2 only) clusters better")
    if writer:
        _write_config(out, dataset, config, auto_reasons)

    # ===== preparing data =====
    data = prepare_run_data(dataset, config, variant)
    store = _plan_rounds(config, variant, len(items), device, log) if config.labels_from is None else "memory"

    # ===== building networks =====
    torch.manual_seed(seed_for(config.seed, "encoders"))  # identical initial encoders on every rank
    encoders = build_encoders(variant, config.arch, config.video_input, config.audio_input).to(device)
    if config.init_checkpoint and saved is None:
        loaded = load_encoders_from(encoders, config.init_checkpoint, config.arch, config.video_input,
                                    config.audio_input)
        log(f"encoders from {config.init_checkpoint}: {', '.join(loaded)}")
    engine.compile_encoders(encoders, config.compile)
    if writer and saved is None:
        # Round 0 clusters the features of these encoders; `xdc-fast assign` needs them to map new videos
        # to its clusters (later rounds use checkpoints/round_{N-1}.pt). Weights only, no optimizer.
        save_atomic({"encoders": encoders.state_dict(), "round": -1, "config": asdict(config),
                     "clip": geometry(config.clip_config())}, checkpoint_path(out, "init"))
    optimizer = torch.optim.SGD(engine.modality_groups(encoders, config.lr, config.audio_lr), lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = epoch_steps(config, len(data.items))
    rates = engine.lr_schedule(config.lr, config.epochs, steps_per_epoch, config.warmup_epochs, config.schedule)
    transferred = load_saved_labels(config.labels_from, data.items.strings("id")) if config.labels_from else None

    # ===== resuming =====
    state = _resume(saved, encoders, optimizer, log) if saved is not None else RunState()
    if writer and saved is not None:
        # A kill or a full disk may have torn the last line: the checkpoint's history is the truth.
        write_text_atomic(metrics_path(out), "".join(json.dumps(r) + "\n" for r in state.history))

    rounds_run = 0
    while state.next_epoch < config.epochs and (max_rounds is None or rounds_run < max_rounds):
        resuming = state.mid_epoch is not None and state.mid_epoch["round"] == state.round

        # ===== the round's pseudo-labels =====
        if resuming:
            saved_labels = state.mid_epoch.get("all_videos", state.mid_epoch.get("everyone"))  # earlier versions' key
            labels = RoundLabels({m: v.numpy() for m, v in saved_labels.items()},
                                 state.mid_epoch["k"], tuple(state.mid_epoch["seconds"]))
        elif transferred is not None:  # cluster transfer: the saved assignments are every round's targets
            labels = RoundLabels(transferred, 1 + max(int(v.max()) for v in transferred.values()), (0.0, 0.0))
        else:
            with xdist.phase(f"extracting and clustering the features of round {state.round}"):
                labels = _cluster(encoders, data, config, variant, state.round, device, out, writer, log, store)

        # ===== fresh heads (cluster ids permute between rounds, so old heads mean nothing) =====
        generator = torch_generator(config.seed, "heads", state.round)
        heads = nn.ModuleDict({m: nn.ModuleList(engine.new_head(encoders[m].feature_dim, labels.k, generator,
                                                                config.head)
                                                for _ in sources) for m, sources in variant.learns.items()})
        heads.to(device)
        head_optimizer = torch.optim.SGD(engine.modality_groups(heads, config.lr, config.audio_lr), lr=config.lr,
                                         momentum=config.momentum)
        if resuming:
            heads.load_state_dict(state.mid_epoch["heads"])
            head_optimizer.load_state_dict(state.mid_epoch["head_optimizer"])

        # ===== training =====
        _train_round(state, labels, encoders, heads, [optimizer, head_optimizer], data, config, variant, rates,
                     steps_per_epoch, device, out, log, stop_after_steps)
        # The steps this round really ran: a last round cut short by epochs has fewer than a full one.
        epochs_run = sum(1 for record in state.history if record["round"] == state.round)
        for line in learning.describe_round(state.history[-1], steps_per_epoch * epochs_run, config.lr,
                                            first_agreement=state.history[0].get("nmi_video_audio"),
                                            warn_nuisance=variant.warns_of_nuisance):
            log(line)

        # ===== checkpoint =====
        state.previous, state.mid_epoch = labels.all_videos, None
        if writer:
            checkpoint = _checkpoint(state, encoders, optimizer, config)
            save_atomic(checkpoint, checkpoint_path(out, state.round))
            save_atomic(checkpoint, checkpoint_path(out))
        with xdist.phase(f"waiting for rank 0 to write the checkpoint of round {state.round}"):
            xdist.barrier()  # nobody resumes from, or reads, a checkpoint that is still being written
        state.round, rounds_run = state.round + 1, rounds_run + 1
    if state.next_epoch >= config.epochs:
        log(learning.run_summary(state.history, warn_nuisance=variant.warns_of_nuisance))
    return state.history


def check_config(config: PretrainConfig, variant: Variant, items: list[dict], dataset="the dataset") -> None:
    """What the fields cannot check alone: the configuration against this dataset."""
    clips = len(items) * config.clips_per_video
    if not 2 <= config.clusters <= clips:
        raise ConfigError(f"--clusters {config.clusters} must lie between 2 and the {clips} clips clustered "
                          f"({len(items)} videos x {config.clips_per_video} clips)")
    for modality in variant.modalities:
        other = "sdc-video or drop them" if modality == "audio" else "sdc-audio"
        check_modality(items, modality, f"variant {variant.name} learns from {modality}", f"use {other}")
    if "audio" in variant.modalities:
        check_sample_rate(items, config.clip_config().sample_rate, dataset, "run's")
    if "video" in variant.modalities and config.video_input == "residual" and config.clip_config().frames < 2:
        raise ConfigError("video_input residual feeds the differences of consecutive frames: a clip of "
                          f"{config.clip_config().frames} frame has none; give clips at least 2 frames or use rgb")
    if config.recluster == "plateau" and not (heldout_count(config, len(items)) and config.heldout_fraction < 1):
        raise ConfigError(f"recluster 'plateau' needs held-out videos: heldout_fraction {config.heldout_fraction} of "
                          f"{len(items)} videos holds out {heldout_count(config, len(items))}; raise it (below 1)")


# ---- phases ------------------------------------------------------------------------------------------

def _write_config(out: Path, dataset, config: PretrainConfig, auto_reasons: dict[str, str]) -> None:
    """The settings used, ``auto`` ones as resolved for this data; ``resolved_from_auto`` says which and why."""
    import yaml

    from . import __version__

    values = {**asdict(config), "clip_used": geometry(config.clip_config()), "code_version": __version__,
              "world_size": xdist.world_size(), "dataset": str(Path(dataset).resolve()),
              "resolved_from_auto": auto_reasons}
    write_text_atomic(out / "config.yaml", yaml.safe_dump(values, sort_keys=False))


def prepare_run_data(dataset, config: PretrainConfig, variant: Variant) -> RunData:
    from .data.dataset import ClipDataset

    rank, world = xdist.rank(), xdist.world_size()
    clip = replace(config.clip_config(), eval_clips=config.clips_per_video)
    train_set = ClipDataset(dataset, clip, train=True, seed=seed_for(config.seed, "clips"),
                            modalities=variant.modalities)
    if config.clip_order == "shards" and train_set.shards is None:
        raise ConfigError(f"clip_order shards reads clips shard by shard, and {dataset} has no complete clip shards: "
                          f"run `xdc-fast prepare ROOT --out {dataset} --shards` first, or use clip_order global")
    items = train_set.items
    fixed_clips = ClipDataset(dataset, clip, train=False, modalities=variant.modalities)
    # At least 4 clips per held-out video: on small data there are few of them, and each clip is a sample.
    heldout_set = ClipDataset(dataset, replace(clip, eval_clips=max(4, config.clips_per_video)), train=False,
                              modalities=variant.modalities)
    shard = np.arange(rank, len(items), world)
    # Videos clustered but never trained on: whether the heads fit their targets beyond memorising them,
    # and in plateau mode when to re-cluster.
    held = np.zeros(len(items), dtype=bool)
    held[numpy_rng(config.seed, "heldout").permutation(len(items))[: heldout_count(config, len(items))]] = True
    training = np.flatnonzero(~held)
    train_set.items = items.take(training)
    heldout_set.items = items.take(np.flatnonzero(held))
    return RunData(items=items, true_labels=np.nan_to_num(items.field("label"), nan=-1).astype(np.int64),
                   train_set=train_set, fixed_clips=fixed_clips, heldout_set=heldout_set, shard=shard,
                   training=training, heldout=np.flatnonzero(held),
                   samples_per_rank=samples_per_rank(config, len(items)))


def _plan_rounds(config: PretrainConfig, variant: Variant, videos: int, device, log) -> str:
    """Print what a clustering round will cost (xdc-fast plan), choose where a round keeps its features
    (``round_features``: auto takes memory where it fits, else disk) and refuse a run whose rounds would
    not fit this machine's memory, before any work is done. Returns "memory" or "disk"."""
    import os

    from .planner import check_fits, plan_round

    def plan(streamed: bool):
        return plan_round(videos, config.clips_per_video, xdist.world_size(), arch=config.arch,
                          pca_dim=config.pca_dim, clusters=config.clusters, niter=config.kmeans_niter,
                          modalities=len(variant.modalities), concat="concat" in variant.clusterings,
                          max_points_per_centroid=config.kmeans_max_points_per_centroid or None,
                          ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device=device.type,
                          streamed=streamed)

    store, chose = config.round_features, None
    if store == "auto":
        try:
            check_fits(plan(False))
            store = "memory"
        except XdcError:
            store, chose = "disk", "  the features do not fit in memory: each rank writes them to the run folder " \
                                   "(round_features disk)"
    figures = plan(store == "disk")
    for line in figures.lines() + ([chose] if chose else []):
        log(line)
    check_fits(figures)
    return store


def build_encoders(variant: Variant, arch: str, video_input: str | None = None,
                   audio_input: str | None = None) -> nn.ModuleDict:
    from .models import build_audio_encoder, build_video_encoder

    build = {"video": lambda a: build_video_encoder(a, video_input=video_input),
             "audio": lambda a: build_audio_encoder(a, audio_input)}
    return nn.ModuleDict({m: build[m](arch) for m in variant.modalities})


# Settings a resumed run may change: how long it goes on, and where and how fast it runs (both loaders
# decode the same clip plans, so a resumed run sees the same clips).
RESUMABLE_CHANGES = {"epochs", "device", "loader", "workers", "checkpoint_every", "init_checkpoint", "dist_timeout_s",
                     "max_unreadable"}


def _read_resumable(last: Path, config: PretrainConfig) -> dict:
    """The checkpoint to resume from, refused when it is unreadable or was made with other settings."""
    rounds = round_checkpoints(last.parent.parent)
    try:
        saved = read_checkpoint(last)
    except CheckpointError as error:
        way_out = (f"copy {rounds[-1]} (the last finished round) over it and resume" if rounds else
                   "start again in a new --out")
        raise CheckpointError(f"cannot resume: {error}; {way_out}") from None
    differs = [f"{key}: {saved['config'].get(key)!r} in the run, {value!r} now"
               for key, value in asdict(config).items()
               if key not in RESUMABLE_CHANGES and saved["config"].get(key, value) != value]
    if differs:
        raise ConfigError(f"--resume with other settings than the run's ({'; '.join(differs)}); resume with the "
                          "run's settings (its config.yaml) or start a new --out")
    return saved


def _resume(saved: dict, encoders, optimizer, log) -> RunState:
    encoders.load_state_dict(saved["encoders"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    previous = {m: v.numpy() for m, v in saved["previous_labels"].items()} or None
    mid_epoch = saved.get("mid_epoch", saved.get("inside"))  # "inside": the key of earlier versions
    if mid_epoch is not None and len(mid_epoch["running"]) != xdist.world_size():
        # The draws are world-size independent, but an epoch's steps are not: another world size takes
        # over at the end of a round (where the next checkpoint without a step in progress is).
        raise ConfigError(f"the run stopped in the middle of epoch {mid_epoch['epoch']} on {len(mid_epoch['running'])} "
                          f"rank(s); resume it on {len(mid_epoch['running'])} (this is {xdist.world_size()}), or "
                          "copy the last checkpoints/round_NNN.pt over last.pt to go on from that round's end")
    if mid_epoch is not None:  # killed mid-epoch: finish that epoch from its next step
        log(f"resuming round {saved['round']} at epoch {mid_epoch['epoch']}, step {mid_epoch['step']}")
        return RunState(saved["round"], mid_epoch["epoch"], saved["history"], previous, mid_epoch)
    log(f"resuming after round {saved['round']}")
    return RunState(saved["round"] + 1, saved["next_epoch"], saved["history"], previous, None)


def _checkpoint(state: RunState, encoders, optimizer, config: PretrainConfig) -> dict:
    """The one checkpoint layout: at the end of a round (``mid_epoch`` None) or in the middle of an epoch."""
    from . import __version__

    return {"encoders": encoders.state_dict(), "optimizer": optimizer.state_dict(), "round": state.round,
            "next_epoch": state.next_epoch, "history": state.history, "config": asdict(config),
            "clip": geometry(config.clip_config()), "code_version": __version__,
            "torch_rng": torch.get_rng_state(),
            "previous_labels": {m: torch.from_numpy(v) for m, v in (state.previous or {}).items()},
            "mid_epoch": state.mid_epoch}


def _cluster(encoders, data: RunData, config: PretrainConfig, variant: Variant, round_index: int, device,
             out: Path, writer: bool, log, store: str = "memory") -> RoundLabels:
    """Encode this rank's fixed clips, cluster them with every rank's, and save the assignments (``writer``).
    A clip that does not decode is left out (label -1); a video none of whose clips decode sits the round
    out. ``store`` "disk" keeps the features in per-rank files under ``OUT/features`` for the round (see
    ``fit_round_files``), removed once the round is saved."""
    import shutil

    from .pseudo_labels import fit_round, fit_round_files, round_measures
    from .rounds import describe_fit, encoder_fingerprint

    cpv = config.clips_per_video
    spec = ClusteringSpec(config.clusters, config.pca_dim, config.kmeans_niter, config.kmeans_nredo, cpv,
                          config.kmeans_max_points_per_centroid or None, balanced=config.assignment == "balanced")
    folder = out / "features" / f"round_{round_index:03d}"
    t0 = time.perf_counter()
    if store == "disk":
        features, rows = engine.encode_clips_to_files(encoders, data.fixed_clips, config.batch_size, device, folder,
                                                      workers=config.workers, loader=config.loader)
    else:
        features, rows = engine.encode_clips(encoders, data.fixed_clips, config.batch_size, device,
                                             workers=config.workers, loader=config.loader, gather=False)
    t_extract = time.perf_counter() - t0
    t0 = time.perf_counter()
    _check_finite(features, round_index)
    if store == "disk":
        fit = fit_round_files(features, variant, spec, config.seed, round_index, rows, folder)
    else:
        fit = fit_round(features, variant, spec, config.seed, round_index, rows)
    clip_labels = fit.labels
    t_cluster = time.perf_counter() - t0
    # This rank's clips in shard order, -1 where a clip did not decode.
    slots = np.searchsorted(data.shard, rows // cpv) * cpv + rows % cpv
    local = {m: np.full(len(data.shard) * cpv, -1, dtype=np.int64) for m in clip_labels}
    for m, v in clip_labels.items():
        local[m][slots] = v
    per_video = {m: video_labels(v, cpv) for m, v in local.items()}
    all_videos = gather_by_video(data.shard, per_video, len(data.items), 1)
    all_clips = gather_by_video(data.shard, local, len(data.items), cpv, root_only=True)
    _check_unreadable(all_videos, data, config, round_index, log)
    measures = round_measures(fit, rows, len(data.items), cpv)  # every rank takes part
    if store == "disk":
        for path in folder.glob(f"rank{xdist.rank()}_*.npy"):
            path.unlink()
        xdist.barrier()
        if writer:
            shutil.rmtree(out / "features", ignore_errors=True)
    if writer:
        saved = describe_fit(fit, measures, ids=data.items.strings("id"), clips_per_video=cpv,
                             clip_labels=all_clips, video_labels=all_videos, variant_name=variant.name,
                             round_index=round_index, clip=geometry(config.clip_config()), pca_dim=config.pca_dim,
                             fingerprint=encoder_fingerprint(encoders.state_dict()))
        saved.save(round_file(out, round_index))
    return RoundLabels(all_videos, config.clusters, (t_extract, t_cluster))


def _check_finite(features: dict, round_index: int) -> None:
    """Features as arrays, or as row files read chunk by chunk."""
    for m, v in features.items():
        total = (float(np.abs(v).sum()) if isinstance(v, np.ndarray)
                 else sum(float(np.abs(block).sum()) for _, block in v.chunks()))
        if not torch.isfinite(xdist.all_reduce_sum(torch.tensor([total]))).all():
            raise XdcError(f"the {m} encoder gives non-finite features in round {round_index} (its weights diverged); "
                           "resume from an earlier checkpoints/round_NNN.pt copied to checkpoints/last.pt with a "
                           "lower --lr")


def _check_unreadable(all_videos: dict[str, np.ndarray], data: RunData, config: PretrainConfig, round_index: int,
                      log) -> None:
    """Videos whose fixed clips all failed sit the round out; too many of them stop the run."""
    failed = np.flatnonzero(next(iter(all_videos.values())) < 0)
    if not len(failed):
        return
    ids = [data.items[i]["id"] for i in failed]
    if len(failed) > config.max_unreadable * len(data.items):
        raise XdcError(f"{len(failed)} of {len(data.items)} videos could not be decoded in round {round_index} "
                       f"(e.g. {', '.join(ids[:3])}), more than max_unreadable = {config.max_unreadable}; see the "
                       "warnings above, and run `xdc-fast prepare` again on a fresh copy of those files")
    log(f"note: {len(failed)} video(s) could not be decoded and sit round {round_index} out: {', '.join(ids[:5])}"
        + (" ..." if len(ids) > 5 else ""))


def _train_round(state: RunState, labels: RoundLabels, encoders, heads, optimizers, data: RunData,
                 config: PretrainConfig, variant: Variant, rates, steps_per_epoch: int, device, out: Path, log,
                 stop_after_steps: int | None) -> None:
    """The epochs of one round: train, score, log; in plateau mode, stop once the held-out loss stalls."""
    targets = variant.targets({m: v[data.training] for m, v in labels.all_videos.items()})
    heldout_targets = variant.targets({m: v[data.heldout] for m, v in labels.all_videos.items()})
    model = engine.distributed(engine.EncodersWithHeads(encoders, heads), device)
    best, stale, in_round = state.mid_epoch["plateau"] if state.mid_epoch is not None else (float("inf"), 0, 0)
    while state.next_epoch < config.epochs and in_round < config.epochs_per_round:
        epoch = state.next_epoch
        resumed = state.mid_epoch if state.mid_epoch is not None and state.mid_epoch["epoch"] == epoch else None

        def save_mid_epoch(step: int, running: dict) -> None:
            # Everything an interrupted process needs to finish this epoch as if nothing had happened.
            state.mid_epoch = {"round": state.round, "epoch": epoch, "step": step, "heads": heads.state_dict(),
                            "head_optimizer": optimizers[1].state_dict(), "k": labels.k,
                            "running": xdist.all_gather_objects(running),
                            "all_videos": {m: torch.from_numpy(v) for m, v in labels.all_videos.items()},
                            "seconds": list(labels.seconds), "plateau": [best, stale, in_round]}
            if xdist.is_main_process():
                save_atomic(_checkpoint(state, encoders, optimizers[0], config), checkpoint_path(out))
            xdist.barrier()
            if stop_after_steps is not None and step >= stop_after_steps:
                raise Interrupted(f"stopped after step {step} (test hook)")

        t0 = time.perf_counter()
        with xdist.phase(f"training epoch {epoch}"), xdist.collective():
            stats = train_one_epoch(model, optimizers, targets, data, config, epoch,
                                    engine.rates_of_epoch(rates, epoch, steps_per_epoch), device,
                                    start_step=resumed["step"] if resumed else 0,
                                    running=resumed["running"][xdist.rank()] if resumed else None,
                                    save_mid_epoch=save_mid_epoch)
        t_train = time.perf_counter() - t0
        last_of_round = in_round + 1 >= config.epochs_per_round or epoch + 1 >= config.epochs
        if len(data.heldout) and (config.recluster == "plateau" or last_of_round):
            with xdist.phase(f"scoring the held-out videos after epoch {epoch}"):
                stats["heldout_loss"], stats["heldout"] = _heldout_scores(encoders, heads, heldout_targets,
                                                                          data.heldout_set, config, device)

        # ===== writing logs =====
        record = _record(state, labels, stats, epoch, t_train, data, config)
        state.history.append(record)
        if xdist.is_main_process():
            append_text(metrics_path(out), json.dumps(record) + "\n")
            _tensorboard(out, record)
        log(_summary(record))
        state.next_epoch, in_round = state.next_epoch + 1, in_round + 1
        state.mid_epoch = None
        if config.recluster == "plateau":
            if stats["heldout_loss"] < best - 1e-4:
                best, stale = stats["heldout_loss"], 0
            else:
                stale += 1
            if stale >= config.patience:
                break


def train_one_epoch(model, optimizers, targets: dict[str, list[np.ndarray]], data: RunData, config, epoch: int,
                    rates: np.ndarray, device, start_step: int = 0, running: dict | None = None,
                    save_mid_epoch=None) -> dict:
    """One epoch of balanced draws; figures summed over ranks. A resumed epoch skips the steps the
    interrupted one had done and sees the same batches after them: the epoch's order comes from
    (seed, epoch) alone, whatever the world size (:mod:`xdc_fast.data.sampler`)."""
    sampled = targets[next(iter(targets))][0]
    drawn = global_order(lambda n, rng: balanced_indices(sampled, n, rng), len(data.training), xdist.world_size(),
                         numpy_rng(config.seed, "sampler", epoch, 0), numpy_rng(config.seed, "sampler", epoch, 1))
    if config.clip_order == "shards":
        order = share_by_shard(drawn, data.train_set.shard_numbers(), xdist.rank(), xdist.world_size(),
                               numpy_rng(config.seed, "shards", epoch))
    else:
        order = share_of_rank(drawn, xdist.rank(), xdist.world_size())
    data.train_set.set_epoch(epoch)
    total_steps = epoch_steps(config, len(data.items))
    loader = engine.make_loader(data.train_set, config.batch_size, loader=config.loader, workers=config.workers,
                                device=device, indices=order[start_step * config.batch_size :].tolist())
    loader = progress(loader, f"epoch {epoch}", total_steps, start_step, unit="step")
    model.train()
    keys = [f"{m}_{h}" for m in targets for h in range(len(targets[m]))]
    run = running or {"loss_sum": {k: 0.0 for k in keys}, "loss_count": {k: 0 for k in keys},
                      "correct": {k: 0 for k in keys}, "seen": 0, "skipped": 0, "clip_sums": [0, 0]}
    # One shift per clip of the dataset and epoch, so a resumed epoch (or a batch short of a clip that
    # failed to decode) gives every clip the shift it had.
    shifts = None
    if config.audio_shift and "audio" in targets:
        shifts = torch.from_numpy(numpy_rng(config.seed, "audio_shift", epoch, 0).integers(
            -config.audio_shift, config.audio_shift + 1, size=len(data.train_set)))
    colours = None
    if config.colour_jitter and "video" in targets:
        colours = torch.from_numpy(numpy_rng(config.seed, "colour_jitter", epoch, 0).random((len(data.train_set), 4)))
    for step, batch in enumerate(loader, start=start_step):
        engine.set_lr(optimizers, float(rates[min(step, len(rates) - 1)]))
        run["skipped"] += batch["skipped"]
        if "index" not in batch:
            continue
        index = batch["index"].numpy()
        wanted = {m: [torch.from_numpy(t[index]).to(device) for t in ts] for m, ts in targets.items()}
        inputs = engine.to_device(batch, targets, device)
        if shifts is not None:
            inputs["audio"] = engine.shift_log_mel(inputs["audio"], shifts[index])
        if colours is not None:
            inputs["video"] = engine.jitter_colours(inputs["video"], colours[index].to(device), config.colour_jitter)
        figures = engine.supervised_step(model, optimizers, inputs, wanted,
                                         max_grad_norm=10.0,
                                         where=f"at epoch {epoch}; the last good checkpoint is checkpoints/last.pt "
                                               "(lower --lr and --resume)")
        for key, (loss, correct) in figures.items():
            run["loss_sum"][key] += loss
            run["loss_count"][key] += 1
            run["correct"][key] += correct
        run["seen"] += len(index)
        run["clip_sums"] = clip_sums(index, batch["start"].tolist() if "start" in batch else None,
                                     run.get("clip_sums", (0, 0)))
        done = step + 1
        if save_mid_epoch is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < total_steps:
            save_mid_epoch(done, run)
    # Every rank's figures, so the log describes the whole step, not rank 0's share.
    sums = xdist.all_reduce_sum(torch.tensor([[run["loss_sum"][k], run["loss_count"][k], run["correct"][k]]
                                              for k in keys] + [[0.0, run["seen"], run["skipped"]]],
                                             dtype=torch.float64))
    seen, skipped = int(sums[-1, 1]), int(sums[-1, 2])
    clips_digest = digest_text(xdist.all_reduce_sum(torch.tensor(run.get("clip_sums", [0, 0]), dtype=torch.int64)))
    return {"loss": {k: float(sums[i, 0] / sums[i, 1]) if sums[i, 1] else None for i, k in enumerate(keys)},
            "pseudo_label_acc": {k: float(sums[i, 2]) / max(seen, 1) for i, k in enumerate(keys)}, "clips": seen,
            "skipped": skipped, "lr": float(rates[0]) if len(rates) else None, "clips_digest": clips_digest}


def _heldout_scores(encoders, heads, targets, heldout_set, config, device) -> tuple[float, dict[str, dict]]:
    """On the fixed clips of the held-out videos of every rank: the mean pseudo-label cross-entropy summed
    over heads (plateau mode's criterion), and each head's accuracy, loss and clip count."""
    features, position = engine.encode_clips({m: encoders[m] for m in heads}, heldout_set, config.batch_size, device,
                                             workers=config.workers, loader=config.loader, gather=False)
    video = position // heldout_set.config.eval_clips
    heads_in_order = [(m, h, head) for m in heads for h, head in enumerate(heads[m])]
    sums = torch.zeros(len(heads_in_order), 4, dtype=torch.float64)  # loss, correct, clips, videos per head
    with torch.no_grad():
        for row, (m, h, head) in enumerate(heads_in_order):
            # -1: a video that sat the round out (its fixed clips did not decode).
            target = torch.from_numpy(targets[m][h][video]).to(device)
            logits, kept = head(torch.from_numpy(features[m]).to(device)), target >= 0
            sums[row, 0] = float(nn.functional.cross_entropy(logits, target, reduction="sum", ignore_index=-1))
            sums[row, 1] = float((logits.argmax(1)[kept] == target[kept]).sum())
            sums[row, 2] = float(kept.sum())
            sums[row, 3] = float(len(np.unique(video[kept.cpu().numpy()])))
    sums = xdist.all_reduce_sum(sums)
    per_head = {k: {"accuracy": float(sums[i, 1] / max(float(sums[i, 2]), 1.0)),
                    "loss": float(sums[i, 0] / max(float(sums[i, 2]), 1.0)), "clips": int(sums[i, 2]),
                    "videos": int(sums[i, 3])} for i, (m, h, _) in enumerate(heads_in_order) for k in [f"{m}_{h}"]}
    return float(sums[:, 0].sum() / max(float(sums[0, 2]), 1.0)), per_head


def _record(state: RunState, labels: RoundLabels, stats: dict, epoch: int, t_train: float, data: RunData,
            config: PretrainConfig) -> dict:
    all_videos = labels.all_videos
    record = {"round": state.round, "epoch": epoch, **stats,
              "clusters": cluster_sizes(all_videos, config.clusters if config.labels_from is None else 0),
              "seconds": {"extract": labels.seconds[0], "cluster": labels.seconds[1], "train": t_train},
              "clips_per_s": stats["clips"] / t_train if t_train else None}
    # What a constant guess scores under the sampler, for the "is it learning?" verdict (xdc_fast.learning).
    variant = variant_named(config.variant)
    training = np.ones(len(data.items), dtype=bool)
    training[data.heldout] = False
    on_training = {m: v[training] for m, v in all_videos.items()}
    sampled_by = variant.learns[next(iter(variant.learns))][0]  # the clustering balanced_indices draws over
    if sampled_by in on_training:
        record["chance"] = learning.chance_of_heads(variant.learns, on_training, on_training[sampled_by])
    if "heldout" in record:  # held-out clips are scored as they come: chance is their majority target
        held = {m: v[data.heldout] for m, v in all_videos.items()}
        for key, chance in learning.chance_of_heads(variant.learns, held, None).items():
            record["heldout"][key].update(chance_accuracy=chance["accuracy"], chance_loss=chance["loss"])
    labelled = next(iter(all_videos.values())) >= 0  # videos that took part in the round
    if not labelled.all():
        record["unreadable"] = [data.items[i]["id"] for i in np.flatnonzero(~labelled)]
    if state.previous is not None:
        record["nmi_to_previous"] = {m: metrics.nmi(all_videos[m][both], state.previous[m][both])
                                     for m in all_videos if m in state.previous
                                     for both in [labelled & (state.previous[m] >= 0)]}
    if "video" in all_videos and "audio" in all_videos:
        record["nmi_video_audio"] = metrics.nmi(all_videos["video"][labelled], all_videos["audio"][labelled])
    if (data.true_labels >= 0).all():
        record["vs_true_labels"] = {m: metrics.cluster_quality(v[labelled], data.true_labels[labelled])
                                    for m, v in all_videos.items()}
    return record


def _tensorboard(out: Path, record: dict) -> None:
    """TensorBoard scalars of an epoch, when tensorboard is installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    scalars = {f"loss/{k}": v for k, v in record["loss"].items() if v is not None}
    scalars.update({f"pseudo_label_acc/{k}": v for k, v in record["pseudo_label_acc"].items()})
    scalars.update({f"nmi_to_previous/{k}": v for k, v in record.get("nmi_to_previous", {}).items()})
    if "nmi_video_audio" in record:
        scalars["nmi_video_audio"] = record["nmi_video_audio"]
    for name, quality in record.get("vs_true_labels", {}).items():
        scalars.update({f"vs_true_labels/{name}/{k}": v for k, v in quality.items()})
    with SummaryWriter(str(out / "tensorboard")) as board:
        for tag, value in scalars.items():
            board.add_scalar(tag, value, record["epoch"])


def _summary(record: dict) -> str:
    losses = " ".join(f"{k}={v:.3f}" for k, v in record["loss"].items() if v is not None)
    line = f"round {record['round']} epoch {record['epoch']}: loss {losses}"
    if "vs_true_labels" in record:
        line += " | NMI to classes " + " ".join(f"{m}={q['nmi']:.3f}" for m, q in record["vs_true_labels"].items())
    return line
