"""``xdc-fast finetune``: how good is an encoder? Transfer it to a labelled dataset and score it.

Two modes (REFERENCE §3):

    full    encoder + a new linear layer, trained end to end on random clips of the training videos
    linear  the encoder frozen; features of uniformly spaced clips cached once, then a logistic regression

Both report, on the test split at the **final** epoch, clip accuracy (each clip on its own) and video
accuracy (the softmax averaged over ``test_clips`` uniformly spaced clips per video), top-1 and top-5,
with a confusion matrix. Splits come from the manifest (UCF101/HMDB51 1-3, ESC-50 folds 1-5); a
dataset without them gets a seeded stratified split whose test ids are written down.
"""

from __future__ import annotations

import copy
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
from .checkpoint import CheckpointError, load_encoder, save_atomic

MODES = ("full", "linear")
# Clip geometry when neither the checkpoint nor the user says: small for tiny (CPU), the R(2+1)D input otherwise.
GEOMETRY = {"tiny": {"frames": 8, "stride": 2, "resize_short": 64, "crop": 56},
            "r2plus1d_18": {"frames": 8, "stride": 2, "resize_short": 128, "crop": 112}}


class FinetuneError(ValueError):
    """A configuration or dataset that cannot be finetuned on (reported before any work starts)."""


@dataclass
class FinetuneConfig:
    checkpoint: str = "random"  # a path (ours, torchvision or official XDC video weights) or "random"
    modality: str = "video"
    mode: str = "full"
    arch: str | None = None  # default: the checkpoint's (tiny for random)
    split: int = 1  # UCF101/HMDB51: 1-3; ESC-50: the test fold, 1-5
    epochs: int = 8  # full mode
    batch_size: int = 8
    lr: float = 0.01  # full mode: SGD, cosine to 0 after warm-up
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    clips_per_video: int = 1  # full mode: random clips per training video per epoch
    train_clips: int = 10  # linear mode: uniformly spaced clips per training video, features cached
    test_clips: int = 10  # uniformly spaced clips per test video (video accuracy averages their softmax)
    linear_c: float = 1.0  # linear mode: inverse L2 strength of the logistic regression (standardised features)
    eval_every: int = 0  # full mode: also score the test split every N epochs (the best is labelled as test-selected)
    test_fraction: float = 0.3  # datasets without splits: share of each class held out for testing
    frames: int | None = None  # clip geometry; default: the pretraining checkpoint's, else by arch
    stride: int | None = None
    resize_short: int | None = None
    crop: int | None = None
    audio_seconds: float | None = None
    n_mels: int | None = None
    bn_eps: float = 1e-5  # 1e-3 for the official XDC video weights
    workers: int = 0
    device: str = "auto"
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneConfig":
        return dataclass_from_dict(cls, values, FinetuneError)


@dataclass
class Split:
    """Which videos train and which test, and how that was decided (written to metrics.json)."""

    train: list[dict]
    test: list[dict]
    description: dict


def clip_geometry(source: dict, overrides) -> dict:
    """ClipConfig fields: the arch's defaults, then the pretraining checkpoint's, then ``overrides``'
    attributes that are set (not None)."""
    geometry = {**GEOMETRY[source["arch"]], "audio_seconds": 1.0, "n_mels": 40}
    geometry.update({k: v for k, v in source.get("config", {}).items() if k in geometry and v is not None})
    geometry.update({k: getattr(overrides, k) for k in geometry if getattr(overrides, k, None) is not None})
    return geometry


def check_modality(items: list[dict], modality: str) -> None:
    """Every item must carry ``modality``: audio-only datasets have no frames, silent videos no sound."""
    if modality == "audio" and any(not r.get("has_audio") for r in items):
        raise FinetuneError("--modality audio, but some items have no audio track")
    if modality == "video" and any(r.get("fps") is None for r in items):
        raise FinetuneError("--modality video, but this dataset holds audio-only items; use --modality audio")


# ---- scoring ----------------------------------------------------------------------------------------

def topk_correct(probabilities: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's label is among its ``k`` highest scores (ties broken by lower class index)."""
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def mean_per_video(rows: np.ndarray, video_of_row: np.ndarray, num_videos: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each video's rows (clip softmaxes or features), ``[num_videos, dim]``, and how many rows each
    video had; a video without rows gets NaN."""
    sums = np.zeros((num_videos, rows.shape[1]))
    np.add.at(sums, video_of_row, rows)
    counts = np.bincount(video_of_row, minlength=num_videos)
    with np.errstate(invalid="ignore"):
        return sums / counts[:, None], counts


def video_accuracy(probabilities: np.ndarray, video_of_clip: np.ndarray, labels: np.ndarray) -> float:
    """Share of videos whose mean softmax over their clips peaks at their label.

    ``probabilities`` [clips, classes], ``video_of_clip`` [clips] (video index), ``labels`` [videos].
    Videos without any clip are left out."""
    return score(probabilities, video_of_clip, labels, probabilities.shape[1])["video_acc"]


def score(probabilities: np.ndarray, video_of_clip: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Clip and video top-1/top-5 and the video-level confusion matrix (rows: true, columns: predicted)."""
    clip_labels = labels[video_of_clip]
    per_video, counts = mean_per_video(probabilities, video_of_clip, len(labels))
    present = counts > 0
    per_video, video_labels = per_video[present], labels[present]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (video_labels, per_video.argmax(1)), 1)
    return {"clip_acc": float(topk_correct(probabilities, clip_labels, 1).mean()),
            "clip_top5": float(topk_correct(probabilities, clip_labels, 5).mean()),
            "video_acc": float(topk_correct(per_video, video_labels, 1).mean()),
            "video_top5": float(topk_correct(per_video, video_labels, 5).mean()),
            "num_test_videos": int(present.sum()), "num_test_clips": int(len(probabilities)),
            "confusion": confusion.tolist()}


# ---- splits -----------------------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask with ``test_fraction`` of every class (at least one), seeded."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: max(1, int(round(test_fraction * len(members))))]] = True
    return test


def choose_split(items: list[dict], split: int, test_fraction: float, seed: int) -> Split:
    """The manifest's split ``split`` when the dataset has splits, else a seeded stratified one."""
    unlabelled = [r["id"] for r in items if r.get("label") is None]
    if unlabelled:
        raise FinetuneError(f"{len(unlabelled)} item(s) have no label (e.g. {unlabelled[0]}); finetuning needs "
                            "a labelled dataset (prepare it with class folders or an official split format)")
    if any(r.get("split") for r in items):
        key = str(split)
        parts = {r["split"].get(key) for r in items} - {None}
        if not parts:
            available = sorted({k for r in items for k in r.get("split", {})})
            raise FinetuneError(f"--split {split} is not in this dataset; it has split(s) {', '.join(available)}")
        test_part = "test" if "test" in parts else "val"  # Kinetics-style CSVs name their held-out part val
        train = [r for r in items if r["split"].get(key) == "train"]
        test = [r for r in items if r["split"].get(key) == test_part]
        if not train or not test:
            raise FinetuneError(f"split {split} needs both train and {test_part} items; found {len(train)} and {len(test)}")
        return Split(train, test, {"kind": "manifest", "split": split, "test_part": test_part})
    labels = np.array([r["label"] for r in items])
    if min(np.bincount(labels)[np.unique(labels)]) < 2:
        raise FinetuneError("every class needs at least 2 videos for a stratified train/test split")
    test_mask = stratified_split(labels, test_fraction, seed)
    return Split([r for r, t in zip(items, test_mask) if not t], [r for r, t in zip(items, test_mask) if t],
                 {"kind": "stratified", "seed": seed, "test_fraction": test_fraction,
                  "test_ids": [r["id"] for r, t in zip(items, test_mask) if t]})


# ---- features and training --------------------------------------------------------------------------

def extract_features(encoder: nn.Module, dataset, batch_size: int, device: torch.device, workers: int = 0,
                     progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features of every clip of an evaluation ClipDataset that decoded, and the index of each clip's
    video in ``dataset.items`` (clips that failed to decode are missing from both)."""
    from .data.dataset import collate_clips

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_clips)
    loader = _progress(loader, progress)
    encoder.eval()
    modality = dataset.modalities[0]
    features, videos = [np.zeros((0, encoder.feature_dim), np.float32)], [np.zeros(0, np.int64)]
    with torch.no_grad():
        for batch in loader:
            if "index" not in batch:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = encoder(batch[modality].to(device))
            features.append(out.float().cpu().numpy())
            videos.append(batch["index"].numpy() // dataset.config.eval_clips)
    return np.concatenate(features), np.concatenate(videos)


def _progress(iterable, description: str | None, total: int | None = None):
    if description is None or not xdist.is_main_process() or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, unit="batch", leave=False)


def _sharded(dataset, rank: int, world: int):
    """This rank's videos of an evaluation dataset (whole videos, so no clip is scored twice)."""
    shard = copy.copy(dataset)
    shard.items = dataset.items[rank::world]
    return shard, np.arange(rank, len(dataset.items), world)


def gathered_features(encoder, dataset, config, device, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Features of every rank's share of ``dataset``, on every rank, with global video indices."""
    shard, positions = _sharded(dataset, xdist.rank(), xdist.world_size())
    features, local_video = extract_features(encoder, shard, config.batch_size, device, config.workers, progress)
    parts = xdist.all_gather_objects((features, positions[local_video]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def linear_classifier(train_features: np.ndarray, train_labels: np.ndarray, num_classes: int, c: float,
                      seed: int) -> nn.Linear:
    """A logistic regression on standardised features, folded into one ``nn.Linear`` on raw features
    (so the saved model is the encoder plus a layer, like a finetuned one)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features)
    model = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    model.fit(scaler.transform(train_features), train_labels)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # scikit-learn keeps one row for two classes: logits (0, z) give the same softmax
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = np.zeros((num_classes, train_features.shape[1]))
    bias = np.full(num_classes, -1e4)  # classes absent from training never win
    weight[model.classes_] = coef / scaler.scale_
    bias[model.classes_] = intercept - (coef * scaler.mean_ / scaler.scale_).sum(1)
    layer = nn.Linear(train_features.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def softmax_numpy(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


class Classifier(nn.Module):
    """The encoder and its new linear layer."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            feature = self.encoder(x)
        return self.head(feature.float())


def _train_epoch(model, train_set, labels: np.ndarray, optimizer, config, epoch: int, rates, device) -> dict:
    from .data.dataset import collate_clips

    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(train_set))
    per_rank = math.ceil(len(order) / xdist.world_size())
    order = np.resize(order, per_rank * xdist.world_size())[xdist.rank() :: xdist.world_size()]  # equal steps
    train_set.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, order.tolist()), batch_size=config.batch_size,
                                         num_workers=config.workers, collate_fn=collate_clips)
    loader = _progress(loader, f"epoch {epoch}", math.ceil(len(order) / config.batch_size))
    model.train()
    loss_sum, correct, seen, skipped = 0.0, 0, 0, 0
    for step, batch in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = float(rates[min(step, len(rates) - 1)])
        skipped += batch["skipped"]
        if "index" not in batch:
            continue
        target = torch.from_numpy(labels[batch["index"].numpy()]).to(device)
        logits = model(batch[train_set.modalities[0]].to(device))
        loss = nn.functional.cross_entropy(logits, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {float(loss)} at epoch {epoch}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(target)
        correct += int((logits.argmax(1) == target).sum())
        seen += len(target)
    totals = xdist.all_reduce_sum(torch.tensor([loss_sum, correct, seen, skipped], dtype=torch.float64))
    return {"epoch": epoch, "train_loss": float(totals[0] / max(totals[2], 1)),
            "train_acc": float(totals[1] / max(totals[2], 1)), "clips": int(totals[2]), "skipped": int(totals[3])}


def _probabilities(head: nn.Linear, features: np.ndarray, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        return softmax_numpy(head(torch.from_numpy(features).to(device)).float().cpu().numpy())


# ---- the command ------------------------------------------------------------------------------------

def finetune(dataset: str | Path, out: str | Path, config: FinetuneConfig, log=print) -> dict:
    """Train and score; writes ``out/metrics.json``, ``out/confusion.png`` and ``out/checkpoints/last.pt``.
    Returns the metrics."""
    from .data.clips import ClipConfig
    from .data.dataset import ClipDataset
    from .data.prepare import load_manifest

    # ===== checking the configuration =====
    if config.mode not in MODES:
        raise FinetuneError(f"mode should be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.modality not in ("video", "audio"):
        raise FinetuneError(f"modality should be video or audio, got {config.modality!r}")
    out = Path(out)
    if (out / "metrics.json").exists():
        raise FinetuneError(f"{out} already holds results (metrics.json); choose another --out")
    items = load_manifest(dataset)
    check_modality(items, config.modality)
    split = choose_split(items, config.split, config.test_fraction, config.seed)
    classes = _class_names(dataset, items)
    num_classes = len(classes)

    device = xdist.setup_device(config.device)
    writer = xdist.is_main_process()
    if not writer:
        log = lambda *_: None  # noqa: E731

    # ===== building the encoder =====
    encoder, source = load_encoder(config.checkpoint, config.modality, config.arch, config.bn_eps, config.seed)
    arch = source["arch"]
    geometry = clip_geometry(source, config)
    log(f"{config.modality} encoder: {source['source']} ({arch}); {len(split.train)} training and {len(split.test)} "
        f"test videos, {num_classes} classes; mode {config.mode}")
    if split.description["kind"] == "stratified":
        log(f"the manifest has no splits: a stratified split with {config.test_fraction:.0%} of each class for "
            f"testing (seed {config.seed}), its test ids written to metrics.json")
    encoder.to(device)
    torch.manual_seed(config.seed)
    clip = ClipConfig(**geometry, eval_clips=config.test_clips)
    test_set = ClipDataset(dataset, clip, train=False, modalities=(config.modality,))
    test_set.items = split.test
    test_labels = np.array([r["label"] for r in split.test])
    history: list[dict] = []
    t0 = time.perf_counter()

    if config.mode == "linear":
        # ===== linear probe: features cached once, then a convex fit =====
        for p in encoder.parameters():
            p.requires_grad_(False)
        train_view = ClipDataset(dataset, ClipConfig(**geometry, eval_clips=config.train_clips), train=False,
                                 modalities=(config.modality,))
        train_view.items = split.train
        features, video_of_clip = gathered_features(encoder, train_view, config, device, "train features")
        train_labels = np.array([r["label"] for r in split.train])[video_of_clip]
        head = linear_classifier(features, train_labels, num_classes, config.linear_c, config.seed).to(device)
        test_features, test_video_of_clip = gathered_features(encoder, test_set, config, device, "test features")
        final = score(_probabilities(head, test_features, device), test_video_of_clip, test_labels, num_classes)
        final["epoch"] = None
        cached = {"ids": [r["id"] for r in split.train + split.test],
                  "labels": torch.tensor([r["label"] for r in split.train + split.test]),
                  "features": torch.from_numpy(np.concatenate(
                      [mean_per_video(features, video_of_clip, len(split.train))[0],
                       mean_per_video(test_features, test_video_of_clip, len(split.test))[0]]).astype(np.float32))}
    else:
        # ===== full finetuning =====
        train_set = ClipDataset(dataset, clip, train=True, seed=config.seed, modalities=(config.modality,))
        train_set.items = split.train * config.clips_per_video  # repeated items draw different random clips
        train_labels = np.array([r["label"] for r in train_set.items])
        head = nn.Linear(encoder.feature_dim, num_classes)
        nn.init.normal_(head.weight, 0, 0.01)
        nn.init.zeros_(head.bias)
        model = Classifier(encoder, head).to(device)
        learner = model
        if xdist.is_distributed():
            learner = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        from .pretrain import lr_schedule

        steps = math.ceil(math.ceil(len(train_set) / xdist.world_size()) / config.batch_size)
        rates = lr_schedule(config, steps)
        for epoch in range(config.epochs):
            record = _train_epoch(learner, train_set, train_labels, optimizer, config, epoch,
                                  rates[epoch * steps : (epoch + 1) * steps], device)
            last = epoch == config.epochs - 1
            if last or (config.eval_every and (epoch + 1) % config.eval_every == 0):
                test_features, test_video_of_clip = gathered_features(encoder, test_set, config, device)
                scored = score(_probabilities(head, test_features, device), test_video_of_clip, test_labels,
                               num_classes)
                record.update({k: scored[k] for k in ("clip_acc", "video_acc", "clip_top5", "video_top5")})
                if last:
                    final = {**scored, "epoch": epoch}
            history.append(record)
            log(_epoch_line(record))

    # ===== writing results =====
    metrics = {k: final[k] for k in ("clip_acc", "video_acc", "clip_top5", "video_top5", "num_test_videos",
                                     "num_test_clips")}
    metrics.update({"final_epoch": final["epoch"], "num_train_videos": len(split.train), "classes": classes,
                    "split": split.description, "encoder": source.get("source"), "arch": arch,
                    "clip": geometry, "seconds": time.perf_counter() - t0, "history": history,
                    "config": asdict(config), "confusion": final["confusion"], "world_size": xdist.world_size()})
    scored_epochs = [r for r in history if "video_acc" in r]
    if len(scored_epochs) > 1:
        best = max(scored_epochs, key=lambda r: r["video_acc"])
        metrics["best_epoch_selected_on_test"] = {"epoch": best["epoch"], "clip_acc": best["clip_acc"],
                                                  "video_acc": best["video_acc"]}
    if writer:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_atomic({"encoders": {f"{config.modality}.{k}": v for k, v in encoder.state_dict().items()},
                     "head": head.state_dict(), "classes": classes,
                     "config": {**asdict(config), "arch": arch, **geometry}}, out / "checkpoints" / "last.pt")
        if config.mode == "linear":
            save_atomic({**cached, "aggregate": "mean", "modality": config.modality, "checkpoint": str(config.checkpoint),
                         "clip": geometry}, out / "features.pt")
        draw_confusion(np.array(final["confusion"]), classes, out / "confusion.png",
                       f"{config.modality} {config.mode}: video accuracy {final['video_acc']:.1%}")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"test: clip accuracy {metrics['clip_acc']:.1%}, video accuracy {metrics['video_acc']:.1%} "
        f"({metrics['num_test_videos']} videos x {config.test_clips} clips)")
    return metrics


def _epoch_line(record: dict) -> str:
    line = f"epoch {record['epoch']}: loss {record['train_loss']:.3f}, train acc {record['train_acc']:.1%}"
    if "video_acc" in record:
        line += f" | test clip acc {record['clip_acc']:.1%}, video acc {record['video_acc']:.1%}"
    return line


def _class_names(dataset: str | Path, items: list[dict]) -> list[str]:
    path = Path(dataset) / "classes.json"
    if path.exists():
        return list(json.loads(path.read_text()))
    return [str(c) for c in range(1 + max(r["label"] for r in items))]


def draw_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix; class names on the axes while they stay legible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = min(4 + 0.25 * len(classes), 20)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
        axes.set_yticks(range(len(classes)), classes, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


__all__ = ["FinetuneConfig", "FinetuneError", "CheckpointError", "finetune", "score", "video_accuracy",
           "stratified_split", "choose_split", "linear_classifier", "extract_features"]
