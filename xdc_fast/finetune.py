"""``xdc-fast finetune --mode full``: transfer an encoder to a labelled dataset by training it end to end.

The encoder and a new linear layer are trained with SGD (warm-up, cosine) on random clips of the
training videos, then scored on the test split at the final epoch (see :mod:`xdc_fast.transfer`).
``--mode linear`` (a frozen encoder and a logistic regression) is :mod:`xdc_fast.probe`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import distributed as xdist
from . import engine
from .config import ConfigError, FinetuneConfig
from .errors import XdcError
from .files import output_lock
from .seeds import numpy_rng, seed_for, torch_generator
from .transfer import Transfer, start_transfer, write_results


def finetune(dataset: str | Path, out: str | Path, config: FinetuneConfig, log=print) -> dict:
    """Train and score; writes ``out/metrics.json``, ``out/confusion.png`` and ``out/checkpoints/last.pt``.
    Returns the metrics."""
    if config.mode != "full":
        raise ConfigError(f"finetune trains the whole encoder (mode full); mode {config.mode} is "
                          "xdc_fast.probe.probe (the CLI picks it for --mode linear)")
    with output_lock(out):
        return _finetune(dataset, out, config, log)


def _finetune(dataset, out, config: FinetuneConfig, log) -> dict:
    from .data.dataset import ClipDataset

    # ===== checking the configuration, building the encoder =====
    transfer = start_transfer(dataset, out, config, log)

    # ===== preparing data =====
    train_set = ClipDataset(dataset, transfer.clip, train=True, seed=seed_for(config.seed, "clips"),
                            modalities=(config.modality,))
    train_set.items = transfer.split.train * config.clips_per_video  # repeats draw different random clips
    train_labels = np.array([r["label"] for r in train_set.items])

    # ===== building the classifier =====
    head = engine.new_head(transfer.encoder.feature_dim, len(transfer.classes),
                           torch_generator(config.seed, "heads", 0))
    head.to(transfer.device)
    model = engine.distributed(engine.EncodersWithHeads({config.modality: transfer.encoder},
                                                        {config.modality: [head]}), transfer.device)
    optimizer = torch.optim.SGD(list(transfer.encoder.parameters()) + list(head.parameters()), lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    steps = math.ceil(math.ceil(len(train_set) / xdist.world_size()) / config.batch_size)
    rates = engine.lr_schedule(config.lr, config.epochs, steps, config.warmup_epochs, config.schedule)

    # ===== training, scoring at the final epoch (and every eval_every) =====
    history, final = [], None
    for epoch in range(config.epochs):
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

    # ===== writing results =====
    return write_results(transfer, head, final, history)


def train_epoch(model, optimizer, train_set, labels: np.ndarray, config: FinetuneConfig, epoch: int,
                rates: np.ndarray, device: torch.device) -> dict:
    """One pass over the training clips in a seeded order, the same number of steps on every rank."""
    order = numpy_rng(config.seed, "order", epoch).permutation(len(train_set))
    per_rank = math.ceil(len(order) / xdist.world_size())
    order = np.resize(order, per_rank * xdist.world_size())[xdist.rank() :: xdist.world_size()]
    train_set.set_epoch(epoch)
    loader = engine.make_loader(train_set, config.batch_size, loader=config.loader, workers=config.workers,
                                device=device, indices=order.tolist())
    loader = engine.progress(loader, f"epoch {epoch}", math.ceil(len(order) / config.batch_size), unit="step")
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


__all__ = ["finetune", "train_epoch", "Transfer"]
