"""``xdc-fast prepare``: index a folder of media, extract each audio track once, record what is unusable.

Output, under DATASET:
  manifest.jsonl   one JSON object per usable item (fields in MANIFEST_FIELDS); ``path`` is absolute;
                   items of a multi-label format also carry ``labels`` (``label`` is the first of them)
  rejects.jsonl    one {"id", "path", "reason"} per file that could not be used
  audio/<name>.wav the item's audio (``audio_name(id)``): mono by channel mean, resampled, 16-bit PCM
  classes.json     class names in label order
Every file is probed in a worker process; results are appended (and flushed to disk) as they come,
audio files are written to a temporary name and renamed before their record is appended, so an
interrupted run loses nothing it had finished and a re-run skips every id already in the manifest or
the rejects. A file that cannot be used is a reject; a failure to *write* into DATASET (full disk,
quota, file-size limit, read-only or failing disk) is not the file's fault, so it stops the run with
nothing recorded for that file, and the same command resumes once the cause is fixed.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import sys
import threading
import time
import wave
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .formats import Item, list_dataset
from ..errors import PrepareError
from ..progress import Progress
from ..files import WRITE_ADVICE, RunLock, atomic_path, temporaries_of

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ("id", "path", "label", "label_name", "split", "duration_s", "fps", "num_frames", "width",
                   "height", "video_codec", "has_audio", "audio", "audio_samples", "sample_rate")
RESUME_HINT = "run the same command again to resume (everything finished so far is kept)"


@dataclass
class PrepareSummary:
    kept: int
    rejected: int
    skipped: int  # already done by an earlier run
    out: Path

    def __str__(self) -> str:
        return (f"{self.kept} usable, {self.rejected} rejected (see {self.out / 'rejects.jsonl'}), "
                f"{self.skipped} already done earlier; manifest: {self.out / 'manifest.jsonl'}")


# ---- writing into --out -------------------------------------------------------------------------------

_WRITE_ADVICE = {**WRITE_ADVICE, errno.EIO: "the disk reported an I/O error: check the disk, or choose another --out"}


def output_error(error: OSError, path: Path | str, item: Path | str | None = None) -> PrepareError:
    """The user's message for a failed write into --out: the cause, then the way out."""
    cause = error.strerror or str(error)
    advice = _WRITE_ADVICE.get(error.errno, "check that --out is writable")
    for_item = f" (nothing was recorded for {item})" if item is not None else ""
    return PrepareError(f"cannot write {path}: {cause}{for_item}; {advice}, then {RESUME_HINT}")


def write_atomic(path: Path, chunks: Iterable[bytes], item: Path | str | None = None) -> None:
    """``path`` holds either its old content or all of ``chunks``, whatever happens (kill, power loss,
    full disk); on failure the temporary file is removed and a :class:`PrepareError` raised."""
    try:
        with atomic_path(path, translate=False) as tmp, tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
    except OSError as error:
        raise output_error(error, path, item) from None


def _lines(records: Iterable[dict]) -> Iterator[bytes]:
    return ((json.dumps(r) + "\n").encode() for r in records)


# ---- reading and appending JSON lines ---------------------------------------------------------------

def read_jsonl(path: Path, strict: bool = False) -> list[dict]:
    """Records of a JSON-lines file.

    ``strict=False``: unreadable lines are dropped. ``strict=True`` (prepare's own files): only the last
    line may be torn, the trace of a write cut off by a kill; it is dropped with a warning, so its item
    is done again. A bad line anywhere else means the file was damaged or edited, and guessing which
    records it held would lose or invent data, so it is a :class:`PrepareError` naming file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except OSError as error:
        raise PrepareError(f"cannot read {path}: {error.strerror or error}; check the disk and its "
                           "permissions") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if not strict:
                continue
            if i == last:
                log.warning("%s, line %d: cut off by an interrupted write; ignoring it (its file is prepared "
                            "again on the next run)", path, i + 1)
                continue
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise PrepareError(f"{path}, line {i + 1}: not a JSON record ({shown!r}), and it is not the last "
                               "line, so this is damage or an edit, not an interrupted write; fix or delete that "
                               "line (prepare then redoes its file), or prepare into a new --out") from None
        records.append(record)
    return records


def _require(path: Path, records: list[dict], fields: tuple[str, ...]) -> None:
    for record in records:
        missing = [name for name in fields if record.get(name) is None]
        if missing:
            raise PrepareError(f"{path}: the record {json.dumps(record)[:80]} lacks {', '.join(missing)}; "
                               "the file was edited or written by something else: fix it, or prepare into a "
                               "new --out")


class _Appender:
    """Appends one JSON object per line and pushes it to disk before returning.

    One ``write`` of the whole line on an O_APPEND descriptor, and on failure the file is cut back to
    where it was: a full disk never leaves a half line for the next append to glue onto."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise output_error(error, path) from None

    def write(self, record: dict, item: str | None = None) -> None:
        data = (json.dumps(record) + "\n").encode()
        start = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as error:
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass  # the next run drops a torn last line
            raise output_error(error, self.path, item) from None

    def close(self) -> None:
        os.close(self.fd)


# ---- one file ---------------------------------------------------------------------------------------

def audio_name(item_id: str) -> str:
    return item_id.replace("/", "__") + ".wav"


# How the containers prepare reads begin: a file that starts like one but does not open was cut short
# or damaged, which says more than "not media".
_MEDIA_MAGIC = (b"RIFF", b"\x1aE\xdf\xa3", b"OggS", b"fLaC", b"ID3", b"FLV", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")


def _looks_like_media(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or head.startswith(_MEDIA_MAGIC)


def process_item(item: Item, out: str, sample_rate: int, min_seconds: float, audio_only: bool) -> dict:
    """Probe one file and extract its audio. Returns {"record": ...} or {"reject": ...}.

    Never raises for anything about the file itself; a failure to write into ``out`` raises
    :class:`PrepareError`, because recording it as a reject would skip a good file forever."""
    path = item.path
    reject = lambda reason: {"reject": {"id": item.id, "path": str(path), "reason": reason}}  # noqa: E731
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
        return reject(f"{'truncated or corrupt' if _looks_like_media(path) else 'not media'}: {error}")
    except av.FFmpegError as error:
        return reject(f"unreadable or corrupt: {error}")
    except OSError as error:
        return reject(f"unreadable: {error}")
    try:
        with container:
            record = {"id": item.id, "path": str(path), "label": item.label, "label_name": item.label_name,
                      "split": item.split}
            if item.labels is not None:
                record["labels"] = item.labels
            if audio_only:
                record.update(duration_s=None, fps=None, num_frames=None, width=None, height=None,
                              video_codec=None)
            else:
                if not container.streams.video:
                    return reject("no video stream")
                problem = _probe_video(container, record)
                if problem:
                    return reject(problem)
        mono, audio_problem = _decode_audio(path, sample_rate)
        if audio_only and mono is None:
            return reject(audio_problem or "no audio stream")
        if audio_only:
            record["duration_s"] = mono.shape[0] / sample_rate
        if record["duration_s"] is None or record["duration_s"] < min_seconds:
            return reject(f"shorter than one clip: {record['duration_s'] or 0:.2f} s < {min_seconds:.2f} s")
        wav = None if mono is None else _wav_bytes(mono, sample_rate)
    except Exception as error:  # noqa: BLE001 - one bad file must never stop the run
        return reject(f"truncated or corrupt: {type(error).__name__}: {error}")
    # Written only once the file is known to be kept, so a reject never leaves a WAV behind, and
    # outside the guard above: a failed write is --out's fault, not the file's.
    record.update(has_audio=False, audio=None, audio_samples=0, sample_rate=sample_rate)
    if wav is not None:
        record.update(has_audio=True, audio=f"audio/{audio_name(item.id)}", audio_samples=int(mono.shape[0]))
        write_atomic(Path(out) / record["audio"], [wav], path)
    if audio_problem:
        record["audio_error"] = audio_problem
    return {"record": record}


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


def _decode_audio(path: Path, sample_rate: int) -> tuple[np.ndarray | None, str | None]:
    """The first audio stream, each channel resampled, the channels averaged, sample 0 at time 0 of the
    file's timeline; or None and why not (None, None: the file has no audio stream).

    Channels are averaged by us rather than by FFmpeg's mono downmix, which is 3 dB louder than the
    mean DALI uses; every backend then hears the same signal.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None, None
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
        return None, f"audio does not decode: {error}"
    if not chunks:
        return None, "audio stream holds no samples"
    mono = np.concatenate(chunks, axis=1).astype(np.float32).mean(axis=0)
    # WAV sample 0 is time 0 of the container's timeline, the clock video frames are timed on:
    # encoder priming (AAC starts before 0) is cut, a late start is padded with silence.
    offset = int(round((first_time or 0.0) * sample_rate))
    mono = mono[-offset:] if offset < 0 else np.concatenate([np.zeros(offset, np.float32), mono])
    return mono, None


def _wav_bytes(mono: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((np.clip(mono, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes())
    return buffer.getvalue()


# ---- worker processes --------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _worker_init(parent_pid: int) -> None:
    """Ties a worker's life to the run's: a SIGKILLed parent must not leave workers blocked forever on
    a queue nobody will feed (they hold its write end themselves, so they never see end-of-file).

    Linux sends the death signal when the *thread* that started the worker ends; that thread runs the
    whole pool's life in ``_prepare_locked``, so this is the run's end."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends the worker
    if not _alive(parent_pid):
        os._exit(1)  # the parent died before the death signal was armed
    threading.Thread(target=_watch_parent, args=(parent_pid, os.getppid()), name="parent-watchdog",
                     daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_parent(parent_pid: int, start_ppid: int) -> None:
    # Re-parenting shows a dead parent at once even while it is an unreaped zombie, which os.kill(pid, 0)
    # would still find; os.kill covers start methods whose workers are children of a fork server.
    while True:
        time.sleep(0.5)
        if os.getppid() != start_ppid or not _alive(parent_pid):
            os._exit(1)


# ---- the whole folder -------------------------------------------------------------------------------

def _exclusive(out: Path) -> RunLock:
    """One prepare at a time per --out: two would append the same ids twice and delete each other's
    temporary files. The workers of a run killed a moment ago may still hold it: it waits 2 s for them."""
    return RunLock(out, name=".prepare.lock", wait_s=2.0,
                   busy=lambda holder: PrepareError(f"another prepare (pid {holder}) is writing to {out}; wait for it "
                                                    "to finish, or stop it and run this command again to resume"))


def _check_unique(items: list[Item], root: Path) -> None:
    """Refuses two files that would share one id or one WAV: one would overwrite the other's audio and
    the manifest would hold one id twice (a test video leaking into training)."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(audio_name(item.id), []).append(item)
    clashes = [group for group in groups.values() if len(group) > 1]
    if not clashes:
        return

    def shown(item: Item) -> str:
        try:
            return item.path.relative_to(root).as_posix()
        except ValueError:
            return str(item.path)

    listed = "; ".join(" and ".join(shown(i) for i in group) for group in clashes[:10])
    more = f"; and {len(clashes) - 10} more" if len(clashes) > 10 else ""
    raise PrepareError(f"{len(clashes)} group(s) of files under {root} would share one id or one audio file: "
                       f"{listed}{more}. An id is the path under ROOT without its extension (audio/ names it with "
                       "'__' for '/'); rename or move one file of each group and run the command again")


def _check_classes(out: Path, classes: list[str], records: list[dict]) -> None:
    """Labels are numbers into classes.json: a changed class list would give old records' numbers new
    meanings. Renumbering the manifest instead would silently change results already computed from it
    (finetune scores, confusion matrices, saved splits), so a changed class set is refused."""
    labelled = [r for r in records if r.get("label") is not None]
    if not labelled:
        return
    path = out / "classes.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        old = None  # a torn write of an older version: the records themselves are checked below
    if isinstance(old, list) and old != classes:
        added = [c for c in classes if c not in old]
        removed = [c for c in old if c not in classes]
        change = "; ".join(part for part in (f"added: {', '.join(added)}" if added else "",
                                             f"removed: {', '.join(removed)}" if removed else "") if part)
        raise PrepareError(f"the classes under ROOT differ from {path} ({change or 'the same names, renumbered'}); "
                           f"the labels of the {len(labelled)} records already prepared are numbers into that "
                           "list and would change meaning: prepare into a new --out (or restore the class "
                           "folders as they were)")
    wrong = [r["id"] for r in labelled
             if not 0 <= r["label"] < len(classes) or classes[r["label"]] != r.get("label_name")]
    if wrong:
        raise PrepareError(f"{len(wrong)} record(s) of {out / 'manifest.jsonl'} have labels that do not match the "
                           f"classes under ROOT (e.g. {wrong[0]}); prepare into a new --out")


def _resume_state(listing_items: list[Item], records: list[dict], rejects: list[dict]) -> tuple[dict, dict]:
    """Records and rejects of earlier runs keyed by id, with paths rewritten to this run's (absolute) ones.

    Keyed by id, not path: a ROOT typed differently (relative, absolute, moved) names the same items."""
    by_id = {item.id: item for item in listing_items}
    by_path = {str(item.path): item for item in listing_items}
    kept: dict[str, dict] = {}
    for record in records:
        if record["id"] in kept:
            continue  # a duplicate written by an older version, which resumed by path
        item = by_id.get(record["id"])
        if item is not None and not item.missing:
            record["path"] = str(item.path)
        kept[record["id"]] = record
    rejected: dict[str, dict] = {}
    for reject in rejects:
        item = by_id.get(reject["id"]) if reject.get("id") else by_path.get(str(Path(reject["path"]).resolve()))
        if item is None and reject.get("id") is None:
            continue  # an older version's reject of a file no longer listed
        rid = item.id if item is not None else reject["id"]
        if rid in kept or rid in rejected:
            continue
        if item is not None:
            if reject["reason"].startswith("missing") and not item.missing:
                continue  # the file has arrived since: prepare it now
            reject = {"id": rid, "path": str(item.path), "reason": reject["reason"]}
        rejected[rid] = reject
    return kept, rejected


def _clean_leftovers(out: Path, todo: list[Item], records: dict) -> None:
    """Removes what a killed run may have left: temporary files, and WAVs whose record was never
    appended (they are written again, or belong to a file that is now rejected)."""
    audio = out / "audio"
    used = {r["audio"]: r["id"] for r in records.values() if r.get("audio")}
    for name in ("manifest.jsonl", "rejects.jsonl", "classes.json"):
        for tmp in [*temporaries_of(out / name), *out.glob(f".{name}.*.tmp")]:  # the latter: older versions'
            tmp.unlink(missing_ok=True)
    (out / "manifest.jsonl.tmp").unlink(missing_ok=True)  # an older version's fixed temporary names
    (out / "rejects.jsonl.tmp").unlink(missing_ok=True)
    for tmp in list(audio.glob(".*.wav.*.tmp.wav")) + list(audio.glob(".*.wav.*.tmp")) + list(audio.glob("*.wav.tmp")):
        tmp.unlink(missing_ok=True)
    for item in todo:
        name = f"audio/{audio_name(item.id)}"
        if name in used:
            raise PrepareError(f"{item.path} would write {out / name}, which belongs to the prepared item "
                               f"{used[name]!r}; rename the file under ROOT, or prepare into a new --out")
        (out / name).unlink(missing_ok=True)


def prepare(root: str | Path, out: str | Path, fmt: str = "folder", sample_rate: int = 16000,
            workers: int = 0, min_seconds: float = 1.0, csv_path: str | Path | None = None,
            progress: bool = True) -> PrepareSummary:
    shown_out = Path(out)
    root, out = Path(root), Path(out)
    if not root.exists():
        raise PrepareError(f"ROOT {root} does not exist")
    if not root.is_dir():
        raise PrepareError(f"ROOT {root} is not a folder")
    # Absolute once here: the manifest's paths must open from any working directory.
    root, out = root.resolve(), out.resolve()
    if out == root:
        raise PrepareError(f"--out is ROOT itself ({root}); its audio/ would be read as input: choose another folder")
    exclude = out if root in out.parents else None
    listing = list_dataset(root, fmt, Path(csv_path) if csv_path else None, exclude=exclude)
    if not listing.items:
        raise PrepareError(f"no media files under {root} (videos: mp4 avi mkv webm mov; audio: wav flac ogg mp3)")
    _check_unique(listing.items, root)
    try:
        (out / "audio").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(error, out / "audio") from None
    with _exclusive(out):
        return _prepare_locked(listing, out, shown_out, sample_rate, workers, min_seconds, progress)


def _prepare_locked(listing, out: Path, shown_out: Path, sample_rate: int, workers: int, min_seconds: float,
                    progress: bool) -> PrepareSummary:
    manifest_path, rejects_path = out / "manifest.jsonl", out / "rejects.jsonl"
    old_records, old_rejects = read_jsonl(manifest_path, strict=True), read_jsonl(rejects_path, strict=True)
    _require(manifest_path, old_records, ("id", "path"))
    _require(rejects_path, old_rejects, ("path", "reason"))
    records, rejects = _resume_state(listing.items, old_records, old_rejects)
    _check_classes(out, listing.classes, list(records.values()))
    todo = [item for item in listing.items if item.id not in records and item.id not in rejects]
    try:
        _clean_leftovers(out, todo, records)
    except OSError as error:
        raise output_error(error, error.filename or out) from None
    write_atomic(out / "classes.json", [(json.dumps(listing.classes, indent=1) + "\n").encode()])
    # Rewritten whole: without a torn last line (so appends start on a clean line), with this run's paths.
    write_atomic(manifest_path, _lines(records.values()))
    write_atomic(rejects_path, _lines(rejects.values()))

    kept = rejected = 0
    manifest, rejects_file = _Appender(manifest_path), _Appender(rejects_path)
    bar = Progress(len(todo), "prepare", "file", enabled=progress)
    try:
        def take(result: dict) -> None:
            nonlocal kept, rejected
            if "record" in result:
                manifest.write(result["record"], result["record"]["path"])
                kept += 1
            else:
                rejects_file.write(result["reject"], result["reject"]["path"])
                rejected += 1
            bar.update(1)
            bar.note(kept=kept, rejected=rejected)

        args = (str(out), sample_rate, min_seconds, listing.audio_only)
        if workers <= 1:
            for item in todo:
                take(process_item(item, *args))
        else:
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
            try:
                futures = [pool.submit(process_item, item, *args) for item in todo]
                for future in as_completed(futures):
                    take(future.result())
            finally:
                # On an error or Ctrl-C, queued files are dropped rather than worked through first.
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
        manifest.close()
        rejects_file.close()
    return PrepareSummary(kept=kept, rejected=rejected, skipped=len(listing.items) - len(todo), out=shown_out)




def load_manifest(dataset: str | Path) -> list[dict]:
    """The usable items of a prepared dataset, in a stable order (by id), each ``path`` absolute."""
    dataset = Path(dataset)
    path = dataset / "manifest.jsonl"
    if not path.exists():
        raise PrepareError(f"{dataset} has no manifest.jsonl: run `xdc-fast prepare ROOT --out {dataset}` first")
    records = read_jsonl(path, strict=True)
    _require(path, records, ("id", "path"))
    twice = sorted(i for i, n in Counter(r["id"] for r in records).items() if n > 1)
    if twice:
        raise PrepareError(f"{path} lists {len(twice)} id(s) more than once (e.g. {twice[0]}), as "
                           "older versions did after a re-run with ROOT typed differently; run `xdc-fast prepare "
                           f"ROOT --out {dataset}` again to repair it (nothing is decoded again)")
    stale = [r for r in records if not os.path.isabs(r["path"])]
    if stale:
        # Older versions stored paths as typed, relative to wherever prepare ran.
        if not all(os.path.exists(r["path"]) for r in stale):
            raise PrepareError(f"{path} stores paths relative to the folder prepare ran in (e.g. {stale[0]['path']}), "
                               f"not found from here; run `xdc-fast prepare ROOT --out {dataset}` again to store "
                               "absolute paths (nothing is decoded again)")
        for r in stale:
            r["path"] = os.path.abspath(r["path"])
    return sorted(records, key=lambda r: r["id"])
