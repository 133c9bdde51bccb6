"""``xdc-fast prepare``: index a folder of media, extract each audio track once, record what is unusable.

Output, under DATASET:
  manifest.jsonl   one JSON object per usable item (fields in MANIFEST_FIELDS)
  rejects.jsonl    one {"path", "reason"} per file that could not be used
  audio/<id>.wav   the item's audio: mono by channel mean, resampled, 16-bit PCM
  classes.json     class names in label order
Every file is probed in a worker process; results are appended (and flushed to disk) as they come,
audio files are written to a temporary name and renamed, so an interrupted run loses nothing it had
finished and a re-run skips every file already in the manifest or the rejects.
"""

from __future__ import annotations

import json
import os
import wave
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import Item, list_dataset
from ..errors import XdcError

MANIFEST_FIELDS = ("id", "path", "label", "label_name", "split", "duration_s", "fps", "num_frames", "width",
                   "height", "video_codec", "has_audio", "audio", "audio_samples", "sample_rate")


class PrepareError(XdcError):
    """A problem with the command's input as a whole (reported to the user without a traceback)."""


@dataclass
class PrepareSummary:
    kept: int
    rejected: int
    skipped: int  # already done by an earlier run
    out: Path

    def __str__(self) -> str:
        return (f"{self.kept} usable, {self.rejected} rejected (see {self.out / 'rejects.jsonl'}), "
                f"{self.skipped} already done earlier; manifest: {self.out / 'manifest.jsonl'}")


# ---- reading and appending JSON lines ---------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (an interrupted append) is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().split("\n"):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Appender:
    """Appends one JSON object per line and pushes it to disk before returning."""

    def __init__(self, path: Path):
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# ---- one file ---------------------------------------------------------------------------------------

def audio_name(item_id: str) -> str:
    return item_id.replace("/", "__") + ".wav"


def process_item(item: Item, out: str, sample_rate: int, min_seconds: float, audio_only: bool) -> dict:
    """Probe one file and extract its audio. Returns {"record": ...} or {"reject": ...}; never raises."""
    path = item.path
    reject = lambda reason: {"reject": {"path": str(path), "reason": reason}}  # noqa: E731
    if item.missing:
        return reject("missing: listed by the dataset's metadata but not found on disk")
    try:
        size = path.stat().st_size
    except OSError as error:
        return reject(f"unreadable: {error.strerror or error}")
    if size == 0:
        return reject("zero bytes")
    if not os.access(path, os.R_OK):
        return reject("unreadable: permission denied")
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency
        return reject("PyAV is not installed")
    try:
        container = av.open(str(path))
    except (av.error.InvalidDataError, av.error.EOFError) as error:
        return reject(f"not media: {error}")
    except av.FFmpegError as error:
        return reject(f"unreadable or corrupt: {error}")
    except OSError as error:
        return reject(f"unreadable: {error}")
    try:
        with container:
            record = {"id": item.id, "path": str(path), "label": item.label, "label_name": item.label_name,
                      "split": item.split}
            if audio_only:
                record.update(duration_s=None, fps=None, num_frames=None, width=None, height=None,
                              video_codec=None)
            else:
                if not container.streams.video:
                    return reject("no video stream")
                problem = _probe_video(container, record)
                if problem:
                    return reject(problem)
            audio_problem = _extract_audio(path, Path(out), item.id, sample_rate, record)
            if audio_only and not record["has_audio"]:
                return reject(audio_problem or "no audio stream")
            if audio_only:
                record["duration_s"] = record["audio_samples"] / sample_rate
            if record["duration_s"] is None or record["duration_s"] < min_seconds:
                return reject(f"shorter than one clip: {record['duration_s'] or 0:.2f} s < {min_seconds:.2f} s")
            if audio_problem:
                record["audio_error"] = audio_problem
            return {"record": record}
    except Exception as error:  # noqa: BLE001 - one bad file must never stop the run
        return reject(f"truncated or corrupt: {type(error).__name__}: {error}")


def _probe_video(container, record: dict) -> str | None:
    import av

    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        return "truncated or corrupt: no frame rate"
    fps = float(rate)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        return "truncated or corrupt: unknown duration"
    # Decode the first frame, then the last second: a cut-off file either fails here or ends early.
    try:
        first = next(container.decode(stream), None)
        if first is None:
            return "truncated or corrupt: no decodable frame"
        start_time = float(first.pts * stream.time_base) if first.pts is not None else 0.0
        container.seek(int(max(0.0, duration - 1.0) / stream.time_base) + (stream.start_time or 0),
                       stream=stream, backward=True)
        last = None
        for frame in container.decode(stream):
            last = frame
    except av.FFmpegError as error:
        return f"truncated or corrupt: {error}"
    if last is None or last.pts is None:
        return "truncated or corrupt: the end does not decode"
    end_time = float(last.pts * stream.time_base) - start_time + 1.0 / fps
    if end_time < duration - max(0.5, 3.0 / fps):
        return f"truncated: decodes to {end_time:.2f} s of a stated {duration:.2f} s"
    record.update(
        duration_s=round(min(duration, end_time), 4),
        fps=fps,
        num_frames=int(stream.frames) if stream.frames else int(round(min(duration, end_time) * fps)),
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        video_codec=stream.codec_context.name,
    )
    return None


def _extract_audio(path: Path, out: Path, item_id: str, sample_rate: int, record: dict) -> str | None:
    """Decode the first audio stream, resample each channel, average the channels, write 16-bit WAV
    whose sample 0 sits at time 0 of the file's timeline.

    Channels are averaged by us rather than by FFmpeg's mono downmix, which is 3 dB louder than the
    mean DALI uses; every backend then hears the same signal.
    """
    import av

    record.update(has_audio=False, audio=None, audio_samples=0, sample_rate=sample_rate)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            resampler = None
            chunks = []
            first_time = None
            for frame in container.decode(stream):
                if first_time is None and frame.pts is not None:
                    first_time = float(frame.pts * frame.time_base)
                if resampler is None:
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sample_rate)
                for out_frame in resampler.resample(frame):
                    chunks.append(out_frame.to_ndarray())
            if resampler is not None:
                for out_frame in resampler.resample(None):
                    chunks.append(out_frame.to_ndarray())
    except av.FFmpegError as error:
        return f"audio does not decode: {error}"
    if not chunks:
        return "audio stream holds no samples"
    mono = np.concatenate(chunks, axis=1).astype(np.float32).mean(axis=0)
    # WAV sample 0 is time 0 of the container's timeline, the clock video frames are timed on:
    # encoder priming (AAC starts before 0) is cut, a late start is padded with silence.
    offset = int(round((first_time or 0.0) * sample_rate))
    mono = mono[-offset:] if offset < 0 else np.concatenate([np.zeros(offset, np.float32), mono])
    target = out / "audio" / audio_name(item_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".wav.tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((np.clip(mono, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes())
    os.replace(tmp, target)
    record.update(has_audio=True, audio=str(target.relative_to(out)), audio_samples=int(mono.shape[0]))
    return None


# ---- the whole folder -------------------------------------------------------------------------------

def prepare(root: str | Path, out: str | Path, fmt: str = "folder", sample_rate: int = 16000,
            workers: int = 0, min_seconds: float = 1.0, csv_path: str | Path | None = None,
            progress: bool = True) -> PrepareSummary:
    root, out = Path(root), Path(out)
    if not root.exists():
        raise PrepareError(f"ROOT {root} does not exist")
    if not root.is_dir():
        raise PrepareError(f"ROOT {root} is not a folder")
    listing = list_dataset(root, fmt, Path(csv_path) if csv_path else None)
    if not listing.items:
        raise PrepareError(f"no media files under {root} (videos: mp4 avi mkv webm mov; audio: wav flac ogg mp3)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.json").write_text(json.dumps(listing.classes, indent=1) + "\n")

    manifest_path, rejects_path = out / "manifest.jsonl", out / "rejects.jsonl"
    done_records, done_rejects = read_jsonl(manifest_path), read_jsonl(rejects_path)
    # Rewrite both without any torn line an interruption left, so appends start on a clean line.
    _rewrite_jsonl(manifest_path, done_records)
    _rewrite_jsonl(rejects_path, done_rejects)
    done = {r["path"] for r in done_records} | {r["path"] for r in done_rejects}
    todo = [item for item in listing.items if str(item.path) not in done]

    kept = rejected = 0
    manifest, rejects = _Appender(manifest_path), _Appender(rejects_path)
    bar = _progress(len(todo), progress)
    try:
        def take(result: dict) -> None:
            nonlocal kept, rejected
            if "record" in result:
                manifest.write(result["record"])
                kept += 1
            else:
                rejects.write(result["reject"])
                rejected += 1
            bar.update(1)
            bar.set_postfix(kept=kept, rejected=rejected)

        args = (str(out), sample_rate, min_seconds, listing.audio_only)
        if workers <= 1:
            for item in todo:
                take(process_item(item, *args))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(process_item, item, *args) for item in todo]
                for future in as_completed(futures):
                    take(future.result())
    finally:
        bar.close()
        manifest.close()
        rejects.close()
    return PrepareSummary(kept=kept, rejected=rejected, skipped=len(listing.items) - len(todo), out=out)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="prepare", disable=not enabled, dynamic_ncols=True)


def load_manifest(dataset: str | Path) -> list[dict]:
    """The usable items of a prepared dataset, in a stable order (by id)."""
    dataset = Path(dataset)
    path = dataset / "manifest.jsonl"
    if not path.exists():
        raise PrepareError(f"{dataset} has no manifest.jsonl: run `xdc-fast prepare ROOT --out {dataset}` first")
    return sorted(read_jsonl(path), key=lambda r: r["id"])
