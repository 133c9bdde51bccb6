"""``xdc-fast bench train``: clips/s of one training step per encoder and arch, and the share of a
pretraining round that each phase takes.

The step is ``engine.supervised_step`` on ``engine.EncodersWithHeads``, the very step pretraining and
fine-tuning run, so the figure moves with them. The round itself belongs to the ``pretrain`` command,
which a benchmark may not import: the caller hands it in as ``round_runner``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from .. import engine
from ..data.clips import ClipConfig
from ..models import build_audio_encoder, build_video_encoder
from .timing import interleaved_best_times

RoundRunner = Callable[[str, str], dict]
"""``runner(dataset_dir, run_dir)``: runs one pretraining round and returns its metrics record, whose
``"seconds"`` maps each phase to the seconds it took."""


@dataclass
class TrainRow:
    arch: str
    modality: str
    batch_size: int
    seconds_per_step: float

    @property
    def clips_per_second(self) -> float:
        return self.batch_size / self.seconds_per_step


def _step_seconds(arch: str, modality: str, batch_size: int, steps: int, dev: torch.device) -> float:
    clip = ClipConfig()
    encoder = build_video_encoder(arch) if modality == "video" else build_audio_encoder(arch)
    model = engine.EncodersWithHeads({modality: encoder}, {modality: [engine.new_head(encoder.feature_dim, 256)]})
    model = model.to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if modality == "video":
        shape = (batch_size, 3, clip.frames, clip.crop, clip.crop)
    else:
        shape = (batch_size, 1, clip.n_mels, int(clip.audio_seconds * 1000 / clip.hop_ms) + 1)
    inputs = {modality: torch.randn(shape, device=dev)}
    targets = {modality: [torch.randint(0, 256, (batch_size,), device=dev)]}
    return interleaved_best_times({"step": lambda: engine.supervised_step(model, [optimizer], inputs, targets)},
                                  steps, dev)["step"]


def phase_shares(record: dict) -> dict[str, float]:
    """Each phase's share of a round, from a metrics record's ``"seconds"``."""
    seconds = record["seconds"]
    total = sum(seconds.values())
    return {phase: s / total for phase, s in seconds.items()} if total > 0 else {}


def _run_round(round_runner: RoundRunner, say: Callable[[str], None]) -> dict:
    from ..data.prepare import prepare
    from ..data.synthetic import SyntheticSpec, make_synthetic_dataset

    say("one tiny pretraining round on synthetic data")
    with tempfile.TemporaryDirectory(prefix="xdc-fast-train-") as work:
        make_synthetic_dataset(f"{work}/media", SyntheticSpec(classes=4, videos_per_class=4, seconds=3.0))
        prepare(f"{work}/media", f"{work}/ds", workers=2, progress=False)
        return round_runner(f"{work}/ds", f"{work}/run")


def bench_train(device: str = "cpu", archs: tuple[str, ...] = ("tiny",), batch_size: int = 4, steps: int = 3,
                round_runner: RoundRunner | None = None, progress: Callable[[str], None] | None = None
                ) -> tuple[list[TrainRow], dict[str, float]]:
    """Clips/s of one SGD step (forward, backward, update) per encoder and arch on ``device``, and the
    share of one tiny pretraining round on synthetic data that each phase takes.

    ``round_runner(dataset_dir, run_dir) -> record`` runs that round (see ``RoundRunner``); without one
    the shares come back empty."""
    say = progress or (lambda _msg: None)
    dev = torch.device(device)
    rows = []
    for arch in archs:
        for modality in ("video", "audio"):
            say(f"{arch} {modality} encoder")
            rows.append(TrainRow(arch, modality, batch_size, _step_seconds(arch, modality, batch_size, steps, dev)))
    if round_runner is None:
        return rows, {}
    return rows, phase_shares(_run_round(round_runner, say))


def format_train_table(rows: list[TrainRow], shares: dict, device: str) -> str:
    lines = [f"training step on {device} (forward + backward + SGD, bf16 autocast on CUDA)", "",
             "| arch | encoder | batch | s/step | clips/s |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.arch} | {r.modality} | {r.batch_size} | {r.seconds_per_step:.3f} | {r.clips_per_second:.1f} |")
    if shares:
        lines += ["", "share of one tiny pretraining round: " +
                  ", ".join(f"{phase} {100 * share:.0f}%" for phase, share in shares.items())]
    return "\n".join(lines)
