"""``xdc-fast bench loader``: clips/s of each decoding backend and worker count, against decoding each
file from its start, which is what a first attempt at clip loading does."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..data.clips import ClipConfig
from ..data.dataset import ClipDataset
from ..data.shards import ShardReader
from ..engine import make_loader
from ..errors import LoaderError
from .timing import synchronize


@dataclass
class LoaderRow:
    name: str
    workers: int
    clips: int
    seconds: float
    skipped: int = 0

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds


def _naive_clip(record: dict, plan, sample_rate: int, audio_seconds: float):
    """What a first attempt does: decode video and audio from the start of the file up to the clip."""
    import av

    wanted = set(plan.frame_indices)
    frames = []
    with av.open(record["path"]) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                frames.append(frame.to_ndarray(format="rgb24", width=plan.size[0], height=plan.size[1]))
            if index >= max(wanted):
                break
    end = plan.audio_start + audio_seconds
    audio = []
    with av.open(record["path"]) as container:
        if container.streams.audio:
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=sample_rate)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    audio.append(out.to_ndarray()[0])
                if frame.pts is not None and float(frame.pts * frame.time_base) > end:
                    break
    return frames, audio


def _time_loader(loader, device: str = "cpu") -> tuple[float, int]:
    """Seconds to draw every batch, and the samples that failed to decode."""
    t0 = time.perf_counter()
    skipped = sum(batch["skipped"] for batch in loader)
    synchronize(torch.device(device))  # DALI's GPU graph may still be working on the last batch
    return time.perf_counter() - t0, int(skipped)


def bench_loader(dataset: str | None = None, workers: tuple[int, ...] = (0, 2), clips: int = 48, seed: int = 0,
                 codec: str = "h264", progress: Callable[[str], None] | None = None,
                 config: ClipConfig | None = None,
                 dali_pipelines: tuple[int | str, ...] = ("auto",)) -> list[LoaderRow]:
    """Clips/s of each available backend and worker count, and of decoding from the file's start; where
    the dataset has clip shards (``prepare --shards``), PyAV from the shards too, on the same clips.

    Without ``dataset``, a synthetic one (320x240, 10 s videos in ``codec``) is written to a temporary
    folder and removed afterwards."""
    say = progress or (lambda _msg: None)
    config = config or ClipConfig(frames=16, stride=1, resize_short=128, crop=112)
    workdir = None
    if dataset is None:
        from ..data.synthetic import SyntheticSpec, prepare_synthetic

        workdir = tempfile.TemporaryDirectory(prefix="xdc-fast-loader-")
        say(f"writing a synthetic dataset ({codec}, 320x240, 10 s videos)")
        dataset = str(prepare_synthetic(f"{workdir.name}/media", f"{workdir.name}/dataset",
                                        SyntheticSpec(classes=4, videos_per_class=2, seconds=10.0, fps=25, width=320,
                                                      height=240, seed=seed, codec=codec)))
    try:
        data = ClipDataset(dataset, config, seed=seed, media="files")
        sharded = ClipDataset(dataset, config, seed=seed) if ShardReader.open(dataset) is not None else None
        order = [i % len(data) for i in range(clips)]
        rows = []
        # Files and shards take turns per worker count, so a slow spell of a shared machine hits both.
        for count in workers:
            for name, view in (("pyav (seek + WAV window)", data), ("pyav from clip shards", sharded)):
                if view is None:
                    continue
                say(f"{name}, {count} worker(s)")
                seconds, skipped = _time_loader(make_loader(view, 8, loader="pyav", workers=count, device="cpu",
                                                            indices=order))
                rows.append(LoaderRow(name, count, clips, seconds, skipped))
        say("naive baseline: decode from the start")
        t0 = time.perf_counter()
        for i in order:
            record, plan = data.plan(i)
            _naive_clip(record, plan, config.sample_rate, config.audio_seconds)
        rows.append(LoaderRow("naive (decode from start)", 0, clips, time.perf_counter() - t0))
        rows += _dali_rows((("from files", data), ("from clip shards", sharded)), order, say, dali_pipelines)
        return rows
    finally:
        if workdir is not None:
            workdir.cleanup()


def _dali_rows(views, order: list[int], say, pipelines: tuple[int | str, ...] = ("auto",)) -> list[LoaderRow]:
    """DALI's rows for each (name, dataset view) and pipeline count, or a row that says why it could not
    take part (clips=0, so the table shows dashes)."""
    from ..data.dali_backend import check_cpu_codecs, dali_available, default_pipelines

    if not dali_available():
        return [LoaderRow("dali: not installed (pip install nvidia-dali-cuda130)", 0, 0, float("nan"))]
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    rows = []
    for name, view in views:
        if view is None:
            continue
        if not gpu:
            try:
                check_cpu_codecs(view.items, view.shards)
            except LoaderError:
                codec = {"h264": "H.264"}.get(view.shards.video_codec, view.shards.video_codec) \
                    if view.shards is not None else "H.264"
                rows.append(LoaderRow(f"dali {name}: {codec} needs NVDEC on a GPU (DALI's CPU decoder reads "
                                      "VP8/VP9/MJPEG)", 0, 0, float("nan")))
                continue
        for count in pipelines:
            resolved = default_pipelines("gpu" if gpu else "cpu", 0) if count == "auto" else int(count)
            label = f"dali {name} ({'NVDEC + GPU' if gpu else 'CPU graph'}, {resolved} pipeline(s))"
            say(label)
            seconds, skipped = _time_loader(make_loader(view, 8, loader="dali", workers=2, device=device,
                                                        indices=order, dali_pipelines=resolved), device)
            rows.append(LoaderRow(label, 2, len(order), seconds, skipped))
    return rows


def format_loader_table(rows: list[LoaderRow]) -> str:
    naive = next(r for r in rows if r.name.startswith("naive"))
    lines = ["| loader | workers | clips | clips/s | vs naive |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if not r.clips:
            lines.append(f"| {r.name} | – | – | – | – |")
            continue
        lines.append(f"| {r.name} | {r.workers} | {r.clips} | {r.clips_per_second:.1f} | "
                     f"{r.clips_per_second / naive.clips_per_second:.2f}x |")
    lines.append("")
    lines.append("Clips of 16 frames (stride 1) resized to a 128 short side and cropped to 112, plus 1 s of "
                 "audio as a log-mel; 'vs naive' is clips/s over the naive baseline's.")
    return "\n".join(lines)


def loader_json(rows: list[LoaderRow]) -> list[dict]:
    """The rows as JSON-ready dicts; a row that did not run has ``clips_per_second`` None."""
    return [{**asdict(r), "clips_per_second": r.clips_per_second if r.clips else None} for r in rows]
