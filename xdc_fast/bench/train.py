"""``xdc-fast bench train``: clips/s of one training step per encoder and arch, the model FLOPs of that
step and the FLOP/s they come to against a GEMM ceiling measured in the same run (MFU on CUDA), the same
step fed by each loader with real clips (and which bound holds), and the share of a pretraining round
that each phase takes.

The step is ``engine.supervised_step`` on ``engine.EncodersWithHeads``, the very step pretraining and
fine-tuning run, so the figure moves with them. The round itself belongs to the ``pretrain`` command,
which a benchmark may not import: the caller hands it in as ``round_runner``.

Model FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts over one whole step (forward and
backward): matrix products and convolutions, 2 FLOPs a multiply-add, the usual MFU convention.
Normalisation, activations, the loss and the SGD update are not counted.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import engine
from ..data.clips import ClipConfig
from ..errors import LoaderError
from ..models import build_audio_encoder, build_video_encoder
from .timing import synchronize, interleaved_best_times

RoundRunner = Callable[[str, str], dict]
"""``runner(dataset_dir, run_dir)``: runs one pretraining round and returns its metrics record, whose
``"seconds"`` maps each phase to the seconds it took."""

_clock = time.perf_counter  # a test replaces it to check the arithmetic of the loader-fed rows

LOADER_BOUND = 0.8
"""Loader-fed clips/s under this share of the compute-only figure: the loader bounds training."""


@dataclass
class TrainRow:
    arch: str
    modality: str
    batch_size: int
    seconds_per_step: float
    flops_per_clip: float | None = None
    loader: str | None = None  # None: synthetic tensors already on the device (compute only)
    workers: int | None = None
    bound: str | None = None  # loader rows: "loader" or "compute"
    note: str = ""  # a loader that could not run says why here (seconds_per_step is then nan)
    media: str = "files"  # loader rows: what the loader decoded, the original files or the clip shards
    pipelines: int | None = None  # DALI rows: pipelines taking the batches in turn

    @property
    def fed_by(self) -> str:
        if self.loader is None:
            return "synthetic tensors"
        pipelines = f", {self.pipelines} pipeline(s)" if self.pipelines else ""
        return f"{self.loader} from {self.media} ({self.workers} workers{pipelines})"

    @property
    def clips_per_second(self) -> float:
        return self.batch_size / self.seconds_per_step

    @property
    def measured(self) -> bool:
        return self.seconds_per_step == self.seconds_per_step and self.seconds_per_step > 0

    def flops_per_second(self) -> float | None:
        return self.flops_per_clip * self.clips_per_second if self.flops_per_clip and self.measured else None


# The step XDC pretraining runs: both encoders and their heads, one SGD step on the summed losses.
JOINT = "video+audio"


def _model(arch: str, modality: str, dev: torch.device):
    """Encoders (``modality``: "video", "audio" or JOINT) with a 256-way head each, and their SGD."""
    build = {"video": build_video_encoder, "audio": build_audio_encoder}
    nets = {m: build[m](arch) for m in modality.split("+")}
    model = engine.EncodersWithHeads(nets, {m: [engine.new_head(net.feature_dim, 256)] for m, net in nets.items()})
    model = model.to(dev)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _synthetic(modality: str, batch_size: int, dev: torch.device, clip: ClipConfig = ClipConfig()):
    inputs, targets = {}, {}
    for m in modality.split("+"):
        if m == "video":
            shape = (batch_size, 3, clip.frames, clip.crop, clip.crop)
        else:
            shape = (batch_size, 1, clip.n_mels, int(clip.audio_seconds * 1000 / clip.hop_ms) + 1)
        inputs[m] = engine.device_layout(torch.randn(shape, device=dev))
        targets[m] = [torch.randint(0, 256, (batch_size,), device=dev)]
    return inputs, targets


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs ``FlopCounterMode`` counts while ``fn()`` runs (matmuls and convolutions, forward and
    backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def step_flops_per_clip(model, optimizers, inputs, targets, batch_size: int) -> float:
    """Model FLOPs of one ``supervised_step`` (forward + backward), per clip of the batch."""
    return count_flops(lambda: engine.supervised_step(model, optimizers, inputs, targets)) / batch_size


def _compute_row(arch: str, modality: str, batch_size: int, steps: int, dev: torch.device) -> TrainRow:
    model, optimizer = _model(arch, modality, dev)
    inputs, targets = _synthetic(modality, batch_size, dev)
    flops = step_flops_per_clip(model, [optimizer], inputs, targets, batch_size)
    seconds = interleaved_best_times({"step": lambda: engine.supervised_step(model, [optimizer], inputs, targets)},
                                     steps, dev)["step"]
    return TrainRow(arch, modality, batch_size, seconds, flops)


def _loader_row(arch: str, modality: str, batch_size: int, steps: int, dev: torch.device, dataset_dir: str,
                loader: str, workers: int, flops: float | None, media: str = "files",
                pipelines: int | None = None) -> TrainRow:
    """The same step fed by ``loader`` decoding real clips (from the original files or the clip shards):
    the first batch (worker start-up, pipeline build) is a warm-up, then ``steps`` batches are timed end
    to end, loading included."""
    from ..data.dataset import ClipDataset

    data = ClipDataset(dataset_dir, ClipConfig(), modalities=(modality,), media=media)
    order = [i % len(data) for i in range(batch_size * (steps + 1))]
    row = TrainRow(arch, modality, batch_size, float("nan"), flops, loader, workers, media=media,
                   pipelines=pipelines)
    try:
        batches = iter(engine.make_loader(data, batch_size, loader=loader, workers=workers, device=dev,
                                          indices=order, dali_pipelines=pipelines or "auto"))
    except LoaderError as error:
        row.note = str(error)
        return row
    model, optimizer = _model(arch, modality, dev)

    def one_step() -> int:
        batch = next(batches)
        inputs = engine.to_device(batch, (modality,), dev)
        n = inputs[modality].shape[0]
        targets = {modality: [torch.randint(0, 256, (n,), device=dev)]}
        engine.supervised_step(model, [optimizer], inputs, targets)
        return n

    one_step()
    synchronize(dev)
    t0 = _clock()
    clips = sum(one_step() for _ in range(steps))
    synchronize(dev)
    # Per full batch: a batch short of clips that failed to decode must not make the step look faster.
    row.seconds_per_step = (_clock() - t0) / max(clips, 1) * batch_size
    return row


def _write_dataset(work: str, codec: str, say) -> str:
    from ..data.synthetic import SyntheticSpec, prepare_synthetic

    say(f"writing a small synthetic dataset ({codec}) for the loader-fed steps")
    spec = SyntheticSpec(classes=2, videos_per_class=2, seconds=3.0, width=160, height=128, codec=codec)
    return str(prepare_synthetic(f"{work}/media", f"{work}/ds", spec))


def phase_shares(record: dict) -> dict[str, float]:
    """Each phase's share of a round, from a metrics record's ``"seconds"``."""
    seconds = record["seconds"]
    total = sum(seconds.values())
    return {phase: s / total for phase, s in seconds.items()} if total > 0 else {}


def _run_round(round_runner: RoundRunner, say: Callable[[str], None]) -> dict:
    from ..data.synthetic import SyntheticSpec, prepare_synthetic

    say("one tiny pretraining round on synthetic data")
    with tempfile.TemporaryDirectory(prefix="xdc-fast-train-") as work:
        prepare_synthetic(f"{work}/media", f"{work}/ds", SyntheticSpec(classes=4, videos_per_class=4, seconds=3.0))
        return round_runner(f"{work}/ds", f"{work}/run")


def bench_train(device: str = "cpu", archs: tuple[str, ...] = ("tiny",), batch_size: int = 4, steps: int = 3,
                round_runner: RoundRunner | None = None, progress: Callable[[str], None] | None = None,
                loaders: tuple[str, ...] = (), workers: int = 2, shards: bool = False,
                dali_pipelines: tuple[int | str, ...] = ("auto",), joint: bool = True
                ) -> tuple[list[TrainRow], dict[str, float]]:
    """Clips/s and model FLOPs per clip of one SGD step (forward, backward, update) per encoder and arch on
    ``device``, and with ``joint`` of the step XDC pretraining runs (both encoders and their heads, the
    row "video+audio"); for each of ``loaders`` (pyav, dali) the same step fed by that loader with real clips, and
    the bound that holds; and the share of one tiny pretraining round on synthetic data that each phase
    takes.

    The loader-fed steps read a small synthetic dataset written to a temporary folder: H.264, or VP9 when
    DALI is asked for on the CPU (its CPU graph does not decode H.264). With ``shards``, that dataset is
    also sharded (``prepare --shards``, same codec) and every loader is timed from the files and from the
    shards; DALI once per entry of ``dali_pipelines``. ``round_runner(dataset_dir, run_dir) -> record``
    runs the round (see ``RoundRunner``); without one the shares come back empty."""
    say = progress or (lambda _msg: None)
    dev = torch.device(device)
    rows = []
    computed = {}
    for arch in archs:
        for modality in ("video", "audio") + ((JOINT,) if joint else ()):
            say(f"{arch} {modality} encoder{'s' if modality == JOINT else ''}, synthetic tensors")
            computed[arch, modality] = _compute_row(arch, modality, batch_size, steps, dev)
            rows.append(computed[arch, modality])
    if loaders and archs:
        codec = "vp9" if "dali" in loaders and dev.type != "cuda" else "h264"
        with tempfile.TemporaryDirectory(prefix="xdc-fast-train-loader-") as work:
            dataset_dir = _write_dataset(work, codec, say)
            media = ("files",)
            if shards:
                from ..data.shards import write_shards

                say("sharding it (prepare --shards)")
                write_shards(dataset_dir, codec="libvpx-vp9" if codec == "vp9" else "libx264", progress=False)
                media = ("files", "shards")
            for arch in archs:
                for modality in ("video", "audio"):
                    base = computed[arch, modality]
                    for source in media:
                        for loader in loaders:
                            for pipelines in (_resolve_pipelines(dali_pipelines, dev) if loader == "dali" else (None,)):
                                row = _loader_row(arch, modality, batch_size, steps, dev, dataset_dir, loader,
                                                  workers, base.flops_per_clip, source, pipelines)
                                say(f"{arch} {modality} encoder fed by {row.fed_by}")
                                if row.measured:
                                    row.bound = ("loader" if row.clips_per_second < LOADER_BOUND * base.clips_per_second
                                                 else "compute")
                                rows.append(row)
    if round_runner is None:
        return rows, {}
    return rows, phase_shares(_run_round(round_runner, say))


def _resolve_pipelines(counts: tuple[int | str, ...], dev: torch.device) -> tuple[int, ...]:
    from ..data.dali_backend import default_pipelines

    gpu = dev.type == "cuda"
    return tuple(default_pipelines("gpu" if gpu else "cpu", dev.index if gpu else None) if c == "auto" else int(c)
                 for c in counts)


def _mfu(row: TrainRow, ceiling: dict | None) -> float | None:
    """Model FLOP/s over the measured bf16 GEMM rate (CUDA); None without a bf16 ceiling."""
    achieved = row.flops_per_second()
    if achieved is None or not ceiling or ceiling.get("dtype") != "bfloat16":
        return None
    return achieved / ceiling["flops_per_s"]


def _fmt(value: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "–" if value is None else format(value / scale, spec)


def format_train_table(rows: list[TrainRow], shares: dict, device: str, ceiling: dict | None = None) -> str:
    lines = [f"training step on {device} (forward + backward + SGD, bf16 autocast on CUDA)", ""]
    if ceiling:
        label = "BF16" if ceiling["dtype"] == "bfloat16" else ceiling["dtype"]
        lines += [f"GEMM ceiling measured in this run: {label} {ceiling['size']}³ torch.mm = "
                  f"{ceiling['flops_per_s'] / 1e12:.3f} TFLOP/s" +
                  ("" if label == "BF16" else " (no bf16 on this device: MFU is left out; "
                   "'of GEMM' is against this rate)"), ""]
    lines += ["| arch | encoder | fed by | batch | s/step | clips/s | GFLOP/clip | TFLOP/s | MFU | of GEMM | bound |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        fed = r.fed_by
        if not r.measured:
            lines.append(f"| {r.arch} | {r.modality} | {fed} | {r.batch_size} | – | – | "
                         f"{_fmt(r.flops_per_clip, 1e9, '.2f')} | – | – | – | {r.note or 'not run'} |")
            continue
        achieved = r.flops_per_second()
        mfu = _mfu(r, ceiling)
        of_gemm = achieved / ceiling["flops_per_s"] if achieved is not None and ceiling else None
        lines.append(f"| {r.arch} | {r.modality} | {fed} | {r.batch_size} | {r.seconds_per_step:.3f} | "
                     f"{r.clips_per_second:.1f} | {_fmt(r.flops_per_clip, 1e9, '.2f')} | "
                     f"{_fmt(achieved, 1e12, '.3f')} | {_fmt(mfu and 100 * mfu, 1, '.1f')}{'%' if mfu else ''} | "
                     f"{_fmt(of_gemm and 100 * of_gemm, 1, '.1f')}{'%' if of_gemm else ''} | {r.bound or ''} |")
    if any(r.loader for r in rows):
        lines += ["", f"bound: 'loader' where the loader-fed clips/s is under {LOADER_BOUND:.0%} of the compute-only "
                      "figure, else 'compute'."]
    if shares:
        lines += ["", "share of one tiny pretraining round: " +
                  ", ".join(f"{phase} {100 * share:.0f}%" for phase, share in shares.items())]
    return "\n".join(lines)


def train_json(rows: list[TrainRow], shares: dict, device: str, ceiling: dict | None = None,
               machine: str | None = None) -> dict:
    """Everything the run measured, JSON-ready: the GEMM ceiling (with its dtype; ``bf16_tflops`` when it
    is bf16), and per encoder, arch and loader: clips_per_s, flops_per_clip, mfu (None off CUDA) and bound."""
    out = {"device": device, "machine": machine, "gemm_ceiling": ceiling,
           "bf16_tflops": ceiling["flops_per_s"] / 1e12 if ceiling and ceiling["dtype"] == "bfloat16" else None,
           "rows": [], "round_shares": shares}
    for r in rows:
        achieved = r.flops_per_second()
        out["rows"].append({
            "arch": r.arch, "encoder": r.modality, "loader": r.loader, "workers": r.workers,
            "media": r.media if r.loader else None, "pipelines": r.pipelines,
            "batch_size": r.batch_size, "seconds_per_step": r.seconds_per_step if r.measured else None,
            "clips_per_s": r.clips_per_second if r.measured else None, "flops_per_clip": r.flops_per_clip,
            "flops_per_s": achieved, "mfu": _mfu(r, ceiling),
            "of_gemm": achieved / ceiling["flops_per_s"] if achieved is not None and ceiling else None,
            "bound": r.bound, "note": r.note})
    return out
