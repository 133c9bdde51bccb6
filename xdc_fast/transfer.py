"""What the two ways of scoring an encoder on a labelled dataset share: choosing the split, loading the
encoder with its clip geometry, the test clips, the logistic regression of the linear probe, and writing
the results (``metrics.json``, ``confusion.png``, ``checkpoints/last.pt``); and the training loop of full
finetuning (:func:`train_full`), which ``finetune --mode full`` and ``evaluate --protocol finetune`` both
run, so the two give the same numbers for the same settings.

Both report, on the test split at the **final** epoch, clip accuracy (each clip on its own) and video
accuracy (the softmax averaged over ``test_clips`` uniformly spaced clips per video), top-1 and top-5,
with a confusion matrix.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed as xdist, engine, metrics
from .checkpoint import load_encoder, read_checkpoint
from .files import atomic_path, make_folder, save_atomic, write_text_atomic
from .progress import progress
from .config import ConfigError, FinetuneConfig, clip_config
from .errors import XdcError
from .data.clips import ClipConfig, geometry
from .data.sampler import share_by_shard
from .data.splits import Split, check_modality, choose_split, class_names, refuse_multilabel
from .seeds import numpy_rng, seed_for, torch_generator


@dataclass
class Transfer:
    """An encoder about to be scored on a split of a labelled dataset."""

    dataset: Path
    out: Path
    config: FinetuneConfig
    split: Split
    classes: list[str]
    device: torch.device
    encoder: nn.Module
    source: dict  # what load_encoder loaded
    clip: ClipConfig
    test_set: object  # test_clips uniformly spaced clips of every test video
    log: object
    started: float = field(default_factory=time.perf_counter)

    @property
    def test_labels(self) -> np.ndarray:
        return np.array([r["label"] for r in self.split.test])

    def clips(self, items: list[dict], eval_clips: int):
        """Uniformly spaced evaluation clips of ``items``."""
        from .data.dataset import ClipDataset

        view = ClipDataset(self.dataset, replace(self.clip, eval_clips=eval_clips), train=False,
                           modalities=(self.config.modality,))
        view.items = items
        return view

    def features(self, view, description: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's clip features of ``view`` and each clip's video position, on every rank."""
        features, position = engine.encode_clips({self.config.modality: self.encoder}, view,
                                                 self.config.batch_size, self.device, workers=self.config.workers,
                                                 loader=self.config.loader, description=description)
        return features[self.config.modality], position // view.config.eval_clips

    def test_scores(self, head: nn.Linear) -> dict:
        features, video_of_clip = self.features(self.test_set, "test features")
        return score_or_refuse(probabilities(head, features, self.device), video_of_clip, self.test_labels,
                               len(self.classes))


def score_or_refuse(probabilities_: np.ndarray, video_of_clip: np.ndarray, labels: np.ndarray, classes: int) -> dict:
    """The scores, or an error when no test clip decoded: a result that scored nothing is never written."""
    if len(probabilities_) == 0:
        raise XdcError("no test clip could be decoded (see the warnings above), so there is nothing to score; "
                       "check the test videos (run `xdc-fast prepare` again on them)")
    return metrics.score(probabilities_, video_of_clip, labels, classes)


def start_transfer(dataset: str | Path, out: str | Path, config: FinetuneConfig, log=print) -> Transfer:
    """Check everything before any work: the output folder, the dataset's modality and split, the
    checkpoint; then load the encoder on the device (joining torchrun's group when launched by it)."""
    from .data.prepare import load_manifest

    out = Path(out)
    if (out / "metrics.json").exists():
        raise ConfigError(f"{out} already holds results (metrics.json); choose another --out")
    items = load_manifest(dataset)
    if not items:
        raise XdcError(f"{dataset} holds no usable item (see its rejects.jsonl)")
    check_modality(items, config.modality)
    refuse_multilabel(items, f"finetune --mode {config.mode}")
    split = choose_split(items, config.split, config.test_fraction, numpy_rng(config.seed, "split"), config.seed)
    classes = class_names(dataset, items)
    device = xdist.setup_device(config.device, config.dist_timeout_s)
    if not xdist.is_main_process():
        log = lambda *_: None  # noqa: E731
    encoder, source = load_encoder(config.checkpoint, config.modality, config.arch, config.bn_eps, config.seed,
                                   config.video_input, config.audio_input)
    log(f"{config.modality} encoder: {source['source']} ({source['arch']}); {len(split.train)} training and "
        f"{len(split.test)} test videos, {len(classes)} classes; mode {config.mode}")
    if split.description["kind"] == "stratified":
        log(f"the manifest has no splits: a stratified split with {config.test_fraction:.0%} of each class for "
            f"testing (seed {config.seed}), its test ids written to metrics.json")
    return open_transfer(dataset, out, config, split, classes, device, encoder, source, log)


def open_transfer(dataset: str | Path, out: str | Path, config: FinetuneConfig, split: Split, classes: list[str],
                  device: torch.device, encoder: nn.Module, source: dict, log=print) -> Transfer:
    """A Transfer of an encoder already loaded, on a split already chosen (nothing is checked here:
    :func:`start_transfer` checks for ``finetune``, ``evaluate`` checks once for all its splits)."""
    from .data.dataset import ClipDataset

    clip = clip_config(source["arch"], source.get("clip"), config.clip, eval_clips=config.test_clips)
    test_set = ClipDataset(dataset, clip, train=False, modalities=(config.modality,))
    test_set.items = split.test
    return Transfer(Path(dataset), Path(out), config, split, classes, device, encoder.to(device), source, clip,
                    test_set, log)


def probabilities(head: nn.Linear, features: np.ndarray, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        return metrics.softmax(head(torch.from_numpy(features).to(device)).float().cpu().numpy())


def write_results(transfer: Transfer, head: nn.Linear, final: dict, history: list[dict]) -> dict:
    """``metrics.json`` (final-epoch scores, the split, the protocol), ``confusion.png`` and
    ``checkpoints/last.pt`` (encoder + head); returns the metrics."""
    config = transfer.config
    result = {k: final[k] for k in ("clip_acc", "video_acc", "clip_top5", "video_top5", "num_test_videos",
                                    "num_test_clips")}
    result.update({"final_epoch": final["epoch"], "num_train_videos": len(transfer.split.train),
                   "classes": transfer.classes, "split": transfer.split.description,
                   "encoder": transfer.source.get("source"), "arch": transfer.source["arch"],
                   "clip": geometry(transfer.clip), "seconds": time.perf_counter() - transfer.started,
                   "history": history, "config": asdict(config), "confusion": final["confusion"],
                   "world_size": xdist.world_size()})
    scored_epochs = [r for r in history if "video_acc" in r]
    if len(scored_epochs) > 1:
        best = max(scored_epochs, key=lambda r: r["video_acc"])
        result["best_epoch_selected_on_test"] = {"epoch": best["epoch"], "clip_acc": best["clip_acc"],
                                                 "video_acc": best["video_acc"]}
    if xdist.is_main_process():
        from .report import draw_confusion

        out = transfer.out
        make_folder(out / "checkpoints")
        save_atomic({"encoders": {f"{config.modality}.{k}": v for k, v in transfer.encoder.state_dict().items()},
                     "head": head.state_dict(), "classes": transfer.classes, "clip": geometry(transfer.clip),
                     "config": {**asdict(config), "arch": transfer.source["arch"]}}, out / "checkpoints" / "last.pt")
        with atomic_path(out / "confusion.png") as tmp:
            draw_confusion(np.array(final["confusion"]), transfer.classes, tmp,
                           f"{config.modality} {config.mode}: video accuracy {final['video_acc']:.1%}")
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    transfer.log(f"test: clip accuracy {result['clip_acc']:.1%}, video accuracy {result['video_acc']:.1%} "
                 f"({result['num_test_videos']} videos x {config.test_clips} clips)")
    return result


# ===== full finetuning =====

def train_full(transfer: Transfer, checkpoint: Path | None = None, resume: bool = False
               ) -> tuple[nn.Linear, dict, list[dict]]:
    """Train ``transfer.encoder`` and a new linear layer end to end with SGD (warm-up, then the schedule)
    on ``clips_per_video`` random clips of every training video per epoch; score the test split at the
    final epoch (and every ``eval_every`` epochs). Returns the layer, the final scores (with their epoch)
    and one record per epoch.

    With ``checkpoint``, the encoder, the layer, the optimizer and the records are saved there after
    every epoch, and ``resume`` goes on after the epoch saved (refusing one made with other settings):
    every epoch's clips and order come from the seed and the epoch, so the resumed run ends as the
    uninterrupted one would."""
    from .data.dataset import ClipDataset
    from .launch import settings_differ

    config = transfer.config
    train_set = ClipDataset(transfer.dataset, transfer.clip, train=True, seed=seed_for(config.seed, "clips"),
                            modalities=(config.modality,))
    if config.clip_order == "shards" and train_set.shards is None:
        raise ConfigError(f"clip_order shards reads clips shard by shard, and {transfer.dataset} has no complete clip "
                          f"shards: run `xdc-fast prepare ROOT --out {transfer.dataset} --shards` first, or use "
                          "clip_order global")
    train_set.items = transfer.split.train * config.clips_per_video  # repeats draw different random clips
    train_labels = np.array([r["label"] for r in train_set.items])

    head = engine.new_head(transfer.encoder.feature_dim, len(transfer.classes),
                           torch_generator(config.seed, "heads", 0))
    head.to(transfer.device)
    optimizer = torch.optim.SGD(list(transfer.encoder.parameters()) + list(head.parameters()), lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    history, final, first_epoch = [], None, 0
    if checkpoint is not None and resume and checkpoint.exists():
        saved = read_checkpoint(checkpoint)
        differs = settings_differ(saved["config"], asdict(config))
        if differs:
            raise ConfigError(f"--resume into {transfer.out}, whose finetuning was made with other settings "
                              f"({'; '.join(differs)}); choose another --out, or --resume no to start over")
        transfer.encoder.load_state_dict(saved["encoder"])
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        history, first_epoch = list(saved["history"]), int(saved["epoch"]) + 1
        transfer.log(f"resuming after epoch {saved['epoch']} ({checkpoint})")
    engine.compile_encoders({config.modality: transfer.encoder}, config.compile)
    model = engine.distributed(engine.EncodersWithHeads({config.modality: transfer.encoder},
                                                        {config.modality: [head]}), transfer.device)
    steps = math.ceil(math.ceil(len(train_set) / xdist.world_size()) / config.batch_size)
    rates = engine.lr_schedule(config.lr, config.epochs, steps, config.warmup_epochs, config.schedule)

    if first_epoch >= config.epochs:  # stopped after its last epoch, before the results were written
        final = {**transfer.test_scores(head), "epoch": config.epochs - 1}
    for epoch in range(first_epoch, config.epochs):
        record = train_epoch(model, optimizer, train_set, train_labels, config, epoch,
                             engine.rates_of_epoch(rates, epoch, steps), transfer.device)
        if record["clips"] == 0:
            raise XdcError(f"no training clip could be decoded in epoch {epoch} (see the warnings above); nothing "
                           "was learnt, so no result is written")
        last = epoch == config.epochs - 1
        if last or (config.eval_every and (epoch + 1) % config.eval_every == 0):
            scored = transfer.test_scores(head)
            record.update({k: scored[k] for k in ("clip_acc", "video_acc", "clip_top5", "video_top5")})
            if last:
                final = {**scored, "epoch": epoch}
        history.append(record)
        transfer.log(_epoch_line(record))
        if checkpoint is not None and xdist.is_main_process():
            make_folder(checkpoint.parent)
            save_atomic({"encoder": transfer.encoder.state_dict(), "head": head.state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                         "config": asdict(config)}, checkpoint)
    return head, final, history


def train_epoch(model, optimizer, train_set, labels: np.ndarray, config: FinetuneConfig, epoch: int,
                rates: np.ndarray, device: torch.device) -> dict:
    """One pass over the training clips in a seeded order, the same number of steps on every rank."""
    order = numpy_rng(config.seed, "order", epoch).permutation(len(train_set))
    per_rank = math.ceil(len(order) / xdist.world_size())
    order = np.resize(order, per_rank * xdist.world_size())
    if config.clip_order == "shards":
        order = share_by_shard(order, train_set.shard_numbers(), xdist.rank(), xdist.world_size(),
                               numpy_rng(config.seed, "shards", epoch))
    else:
        order = order[xdist.rank() :: xdist.world_size()]
    train_set.set_epoch(epoch)
    loader = engine.make_loader(train_set, config.batch_size, loader=config.loader, workers=config.workers,
                                device=device, indices=order.tolist())
    loader = progress(loader, f"epoch {epoch}", math.ceil(len(order) / config.batch_size), unit="step")
    model.train()
    loss_sum, correct, seen, skipped = 0.0, 0, 0, 0
    for step, batch in enumerate(loader):
        engine.set_lr([optimizer], float(rates[min(step, len(rates) - 1)]))
        skipped += batch["skipped"]
        if "index" not in batch:
            continue
        target = torch.from_numpy(labels[batch["index"].numpy()]).to(device)
        ((loss, hits),) = engine.supervised_step(model, [optimizer], engine.to_device(batch, [config.modality], device),
                                                 {config.modality: [target]},
                                                 where=f"at epoch {epoch}; lower --lr").values()
        loss_sum += loss * len(target)
        correct += hits
        seen += len(target)
    totals = xdist.all_reduce_sum(torch.tensor([loss_sum, correct, seen, skipped], dtype=torch.float64))
    return {"epoch": epoch, "train_loss": float(totals[0] / max(totals[2], 1)),
            "train_acc": float(totals[1] / max(totals[2], 1)), "clips": int(totals[2]), "skipped": int(totals[3])}


def _epoch_line(record: dict) -> str:
    line = f"epoch {record['epoch']}: loss {record['train_loss']:.3f}, train acc {record['train_acc']:.1%}"
    if "video_acc" in record:
        line += f" | test clip acc {record['clip_acc']:.1%}, video acc {record['video_acc']:.1%}"
    return line
