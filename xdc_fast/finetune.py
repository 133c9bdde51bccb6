"""``xdc-fast finetune --mode full``: transfer an encoder to a labelled dataset by training it end to end.

The encoder and a new linear layer are trained with SGD (warm-up, cosine) on random clips of the
training videos, then scored on the test split at the final epoch. The training loop is
:func:`xdc_fast.transfer.train_full`, which ``evaluate --protocol finetune`` runs too; this command adds
the checks of one run and its files. ``--mode linear`` (a frozen encoder and a logistic regression) is
:mod:`xdc_fast.probe`.
"""

from __future__ import annotations

from pathlib import Path

from . import distributed as xdist
from .config import ConfigError, FinetuneConfig
from .files import output_lock
from .transfer import Transfer, start_transfer, train_full, write_results

# The state of a finetuning after its last finished epoch, what a resumed run goes on from.
EPOCH_CHECKPOINT = "epoch.pt"


def finetune(dataset: str | Path, out: str | Path, config: FinetuneConfig, log=print, resume: bool = False) -> dict:
    """Train and score; writes ``out/metrics.json``, ``out/confusion.png`` and ``out/checkpoints/last.pt``.
    Returns the metrics. Each finished epoch is saved to ``out/checkpoints/epoch.pt`` (removed once the
    results are written); ``resume`` goes on from it."""
    if config.mode != "full":
        raise ConfigError(f"finetune trains the whole encoder (mode full); mode {config.mode} is "
                          "xdc_fast.probe.probe (the CLI picks it for --mode linear)")
    with output_lock(out):
        transfer = start_transfer(dataset, out, config, log)
        checkpoint = Path(out) / "checkpoints" / EPOCH_CHECKPOINT
        head, final, history = train_full(transfer, checkpoint, resume)
        result = write_results(transfer, head, final, history)
        if xdist.is_main_process():
            checkpoint.unlink(missing_ok=True)
        return result


__all__ = ["finetune", "Transfer"]
