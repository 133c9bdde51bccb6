"""Clip shards: every usable video transcoded once to the clip geometry and packed, with its audio and
its manifest record, into WebDataset tar files (``DATASET/shards/shard-NNNNN.tar``).

Why: footage as it is collected (640x360 to 720p, H.264 with keyframes seconds apart and B-frames)
makes every random clip decode from the previous keyframe, ~90 full-size frames for the 16 a clip
spans. Transcoded to a 128-pixel short side with a keyframe every clip span and no B-frames, a seek
lands at most one clip span before the clip, each decoded frame is ~8x smaller, and x264's fastdecode
tune halves the work per frame again (benchmarks/results/loader_cpu.md: 7x the clips/s of the files).

Layout and guarantees:

- ``shards/plan.json``: the settings (short side, GOP, codec, CRF) and the number of shards. An item
  belongs to shard ``stable_hash(id) % shards``, so any process can find an item's shard, and ranks
  (``rank``/``world``) split the shards between them without talking to each other.
- A shard is written under a temporary name and renamed when complete; its sidecar
  ``shard-NNNNN.json`` (member ids, keys, bytes) is written after it and marks it done. A killed run
  leaves no partial shard; a re-run transcodes only the shards without a sidecar.
- Members: ``{key}.mp4`` (H.264, or VP9 for DALI's CPU decoder; constant frame rate at the source's
  rate, so frame n of the shard is frame n of the source), ``{key}.wav`` (the audio prepare extracted, byte for byte) and ``{key}.json``
  (the manifest record). Keys are hashes of the ids: ids may hold dots and slashes, keys may not.
- A video that fails to transcode goes to ``shards/rejects.jsonl`` with the reason, never into a shard.

Reading uses wids' memory-mapped tar index (no tar reader of our own): :class:`ShardReader`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import ShardError

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
PLAN_FILE = "plan.json"
# What one second of a transcoded video costs on disk, to size shards before any is written: H.264 at
# a 128-pixel short side and CRF 23 (~15 kB/s measured on synthetic and long-GOP 640x360 footage),
# plus 16 kHz 16-bit mono WAV (32 kB/s).
ESTIMATED_BYTES_PER_SECOND = 50_000


@dataclass(frozen=True)
class ShardPlan:
    short_side: int = 128  # the paper preset's resize, so clips are cropped without resizing up
    gop: int = 16  # the clip span in source frames (8 frames, stride 2): one keyframe per clip
    crf: int = 23
    codec: str = "libx264"
    # x264's tune for decoding speed (CAVLC, no deblocking, no weighted prediction): half the decoding
    # time of a clip at ~10% more bytes, measured on long-GOP 640x360 footage brought to 228x128.
    tune: str = "fastdecode"
    shards: int = 1

    def shard_of(self, item_id: str) -> int:
        return stable_hash(item_id) % self.shards


def stable_hash(text: str) -> int:
    """A hash that every process and every run agrees on (Python's ``hash`` of a str does not)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogateescape")).digest()[:8], "big")


def key_of(item_id: str) -> str:
    return hashlib.sha1(item_id.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _x264_options(gop: int, crf: int, tune: str) -> dict:
    options = {"crf": str(crf), "preset": "veryfast",
               "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
    return {**options, "tune": tune} if tune else options


def _vp9_options(gop: int, crf: int, tune: str) -> dict:
    # No alternate reference frames and no look-ahead: every frame is shown, in decode order.
    return {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1",
            "g": str(gop), "keyint_min": str(gop), "auto-alt-ref": "0", "lag-in-frames": "0"}


# Encoder -> (the codec name a manifest or DALI uses, its options from (gop, crf, tune), help).
SHARD_CODECS = {
    "libx264": ("h264", _x264_options, "H.264, the fastest to decode with PyAV and on NVDEC (the default)"),
    "libvpx-vp9": ("vp9", _vp9_options, "VP9, which DALI's CPU decoder reads, for DALI without a GPU "
                                         "(slower to encode and to decode; CRF on VP9's 0-63 scale)"),
}
SHARD_CODEC_HELP = {name: help for name, (_, _, help) in SHARD_CODECS.items()}


def plan_shards(records: list[dict], short_side: int, gop: int, crf: int, shard_mb: float,
                codec: str = "libx264") -> ShardPlan:
    seconds = sum(float(r.get("duration_s") or 0.0) for r in records)
    count = max(1, math.ceil(seconds * ESTIMATED_BYTES_PER_SECOND / (shard_mb * 1e6)))
    return ShardPlan(short_side=short_side, gop=gop, crf=crf, codec=codec,
                     tune=ShardPlan.tune if codec == "libx264" else "", shards=count)


# ---- writing ------------------------------------------------------------------------------------------

def transcode(path: str | Path, short_side: int, gop: int, crf: int = 23, codec: str = "libx264",
              tune: str = "fastdecode") -> bytes:
    """The video of ``path`` as an MP4 whose short side is ``short_side`` (never scaled up), at the
    source's frame rate with one frame per source frame index (gaps of a variable-rate source repeat
    the frame shown, as a player would), a keyframe every ``gop`` frames and no B-frames."""
    import av

    with av.open(str(path)) as source:
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        rate = Fraction(stream.average_rate or stream.guessed_rate).limit_denominator(1001 * 1000)
        width, height = stream.codec_context.width, stream.codec_context.height
        scale = min(1.0, short_side / min(width, height))
        out_w, out_h = (max(2, int(round(side * scale / 2)) * 2) for side in (width, height))
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as target:
            video = target.add_stream(codec, rate=rate)
            video.width, video.height, video.pix_fmt = out_w, out_h, "yuv420p"
            video.codec_context.time_base = 1 / rate
            video.options = SHARD_CODECS[codec][1](gop, crf, tune)
            base = stream.start_time or 0
            written, previous = 0, None

            def emit(frame):
                nonlocal written
                out = frame.reformat(width=out_w, height=out_h, format="yuv420p")
                out.pts, out.time_base = written, video.codec_context.time_base
                for packet in video.encode(out):
                    target.mux(packet)
                written += 1

            for frame in source.decode(stream):
                if frame.pts is None:
                    continue
                index = int(round(float((frame.pts - base) * stream.time_base * rate)))
                while previous is not None and written < index:
                    emit(previous)  # a gap in the source: the frame shown until now
                if written <= index:
                    emit(frame)
                previous = frame
            if written == 0:
                raise ValueError("no frame decodes")
            for packet in video.encode(None):
                target.mux(packet)
        return buffer.getvalue()


def _write_shard(dataset: str, index: int, members: list[dict], plan: ShardPlan) -> dict:
    """Transcode and pack one shard (in a worker process); returns its sidecar and the failures."""
    import webdataset as wds

    folder = Path(dataset) / SHARDS_DIR
    final = folder / f"{shard_name(index)}.tar"
    temporary = folder / f".{shard_name(index)}.tar.{os.getpid()}.tmp"
    kept, failed, size = [], [], 0
    try:
        with open(temporary, "wb") as stream:
            writer = wds.TarWriter(stream)
            for record in members:
                try:
                    mp4 = transcode(record["path"], plan.short_side, plan.gop, plan.crf, plan.codec, plan.tune)
                    sample = {"__key__": key_of(record["id"]), "mp4": mp4, "json": record}
                    if record.get("audio"):
                        sample["wav"] = (Path(dataset) / record["audio"]).read_bytes()
                except Exception as error:  # noqa: BLE001 - one bad video never stops the shard
                    failed.append({"id": record["id"], "path": record["path"],
                                   "reason": f"transcode failed: {type(error).__name__}: {error}"})
                    continue
                writer.write(sample)
                kept.append(record["id"])
                size += len(mp4) + len(sample.get("wav", b""))
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            temporary.unlink()
    return {"shard": index, "ids": kept, "bytes": size, "failed": failed}


def write_shards(dataset: str | Path, *, short_side: int = 128, gop: int = 16, crf: int = 23,
                 codec: str = "libx264", shard_mb: float = 512.0, rank: int = 0, world: int = 1, workers: int = 0,
                 progress: bool = True) -> dict:
    """Transcode the usable videos of a prepared dataset into shards (this process's ``rank`` of
    ``world``); resumes, and refuses a folder sharded with other settings. Returns a summary."""
    from ..progress import Progress
    from .prepare import _Appender, load_manifest, read_jsonl, write_atomic

    dataset = Path(dataset)
    records = [r for r in load_manifest(dataset) if r.get("fps")]
    if not records:
        raise ShardError(f"{dataset} holds no video: shards hold transcoded video, audio-only datasets need none")
    folder = dataset / SHARDS_DIR
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise ShardError(f"cannot write {folder}: {error.strerror}") from None
    if codec not in SHARD_CODECS:
        raise ShardError(f"no shard codec {codec!r}: choose one of {', '.join(SHARD_CODECS)}")
    plan = plan_shards(records, short_side, gop, crf, shard_mb, codec)
    saved = read_plan(dataset)
    if saved is not None:
        wanted = {"short_side": short_side, "gop": gop, "crf": crf, "codec": codec}
        differ = {k: (getattr(saved, k), v) for k, v in wanted.items() if getattr(saved, k) != v}
        if differ:
            listed = ", ".join(f"{k} {old} (asked {new})" for k, (old, new) in differ.items())
            raise ShardError(f"{folder} was sharded with other settings: {listed}; use those, or delete {folder}")
        plan = saved
    elif rank == 0 or world == 1:
        write_atomic(folder / PLAN_FILE, [(json.dumps(asdict(plan), indent=1) + "\n").encode()])
    members: dict[int, list[dict]] = {}
    for record in records:
        members.setdefault(plan.shard_of(record["id"]), []).append(record)
    # Every planned shard is written, empty ones too, so that a reader knows the set is complete; a done
    # shard is written again when the manifest has gained a video that belongs to it.
    failed_before = {r["id"] for r in read_jsonl(folder / "rejects.jsonl")}

    def done(s: int) -> bool:
        sidecar = folder / f"{shard_name(s)}.json"
        if not sidecar.exists() or not (folder / f"{shard_name(s)}.tar").exists():
            return False
        held = set(json.loads(sidecar.read_text())["ids"]) | failed_before
        return all(r["id"] in held for r in members.get(s, []))

    mine = [s for s in range(plan.shards) if s % world == rank and not done(s)]
    # What a killed run of this rank left: only this rank writes these shards, so their temporaries are
    # its own leftovers whatever machine the other ranks run on.
    for leftover in folder.glob(".shard-*.tar.*.tmp"):
        if int(leftover.name.split(".")[1].removeprefix("shard-")) % world == rank:
            leftover.unlink(missing_ok=True)
    done_before = sum(1 for s in range(plan.shards) if s % world == rank) - len(mine)

    bar = Progress(sum(len(members.get(s, [])) for s in mine), "shards", "video", enabled=progress)
    rejects = _Appender(folder / "rejects.jsonl")
    written = failed = 0

    def finish(result: dict) -> None:
        nonlocal written, failed
        for reject in result["failed"]:
            rejects.write(reject, reject["path"])
        sidecar = {k: result[k] for k in ("shard", "ids", "bytes")}
        sidecar["keys"] = [key_of(i) for i in result["ids"]]
        write_atomic(folder / f"{shard_name(result['shard'])}.json", [(json.dumps(sidecar) + "\n").encode()])
        written += len(result["ids"])
        failed += len(result["failed"])
        bar.update(len(result["ids"]) + len(result["failed"]))

    try:
        if workers <= 1:
            for s in mine:
                finish(_write_shard(str(dataset), s, members.get(s, []), plan))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_write_shard, str(dataset), s, members.get(s, []), plan) for s in mine]
                for future in as_completed(futures):
                    finish(future.result())
    finally:
        bar.close()
        rejects.close()
    return {"shards": len(mine), "shards_done_before": done_before, "videos": written, "failed": failed,
            "plan": asdict(plan), "folder": str(folder)}


def read_plan(dataset: str | Path) -> ShardPlan | None:
    path = Path(dataset) / SHARDS_DIR / PLAN_FILE
    if not path.exists():
        return None
    try:
        # Shards of earlier versions carry no tune: they were encoded without one.
        return ShardPlan(**{"tune": "", **json.loads(path.read_text())})
    except (ValueError, TypeError) as error:
        raise ShardError(f"{path} is damaged ({error}); delete {path.parent} and shard again") from None


# ---- reading ------------------------------------------------------------------------------------------

class ShardReader:
    """Random access to the members of a dataset's complete shards, by item id.

    Tar files are memory-mapped and indexed by wids when first used, once per process (a DataLoader
    worker opens its own), so nothing but file names crosses a fork.
    """

    def __init__(self, dataset: str | Path, plan: ShardPlan, ids: set[str]):
        self.folder = Path(dataset) / SHARDS_DIR
        self.plan = plan
        self.ids = ids
        self._open: dict[int, object] = {}
        self._sizes: dict[int, dict[str, int]] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, dataset: str | Path) -> "ShardReader | None":
        """The reader of a dataset whose every planned shard is complete; None when it has no shards.
        Shards still being written are not read: the original files serve until they are all done."""
        plan = read_plan(dataset)
        if plan is None:
            return None
        folder = Path(dataset) / SHARDS_DIR
        ids: set[str] = set()
        complete = 0
        for index in range(plan.shards):
            sidecar = folder / f"{shard_name(index)}.json"
            if sidecar.exists() and (folder / f"{shard_name(index)}.tar").exists():
                ids.update(json.loads(sidecar.read_text())["ids"])
                complete += 1
        if complete < plan.shards and ids:
            log.warning("%s holds %d of %d shards: reading the original files until `xdc-fast prepare --shards` "
                        "finishes the rest", folder, complete, plan.shards)
            return None
        if complete < plan.shards:
            return None
        return cls(dataset, plan, ids)

    def __getstate__(self):
        return {**self.__dict__, "_open": {}, "_sizes": {}}

    def _tar(self, index: int):
        if self._pid != os.getpid():  # forked into a worker: the parent's maps are not ours to use
            self._open, self._sizes, self._pid = {}, {}, os.getpid()
        if index not in self._open:
            from wids.wids_mmtar import MMIndexedTar

            self._open[index] = MMIndexedTar(str(self.folder / f"{shard_name(index)}.tar"), verbose=False)
        return self._open[index]

    def member(self, item_id: str, extension: str) -> "MemberFile":
        """``{key}.{extension}`` of the item's sample as a file object (``mp4``, ``wav`` or ``json``),
        read in place from the memory map: a clip reads a few of a video's packets and a second of its
        audio, and copying whole members cost more than decoding them (1.9 of 17 ms per clip)."""
        index = self.plan.shard_of(item_id)
        tar = self._tar(index)
        name = f"{key_of(item_id)}.{extension}"
        offset = tar.by_name.get(name)
        if offset is None:
            raise KeyError(f"{item_id}: no {extension} in {self.folder / shard_name(index)}.tar")
        if index not in self._sizes:
            self._sizes[index] = {entry_name: size for entry_name, _, size in tar.by_index}
        start = offset + 512  # a tar member's data follows its one 512-byte header block
        return MemberFile(memoryview(tar.mmapped_file)[start:start + self._sizes[index][name]])

    def member_array(self, item_id: str, extension: str) -> np.ndarray:
        """The member's bytes as a uint8 array over the memory map (no copy), as DALI takes them."""
        return np.frombuffer(self.member(item_id, extension).view(), dtype=np.uint8)

    @property
    def video_codec(self) -> str:
        """The codec of the shards' video, as a manifest names it."""
        return SHARD_CODECS[self.plan.codec][0]


class MemberFile(io.RawIOBase):
    """A read-only, seekable file over bytes in memory that copies only what is read."""

    def __init__(self, data: memoryview):
        super().__init__()
        self._data = data
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._data[self._position:self._position + len(buffer)]
        buffer[:len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._data)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def getvalue(self) -> bytes:
        return self._data.tobytes()

    def view(self) -> memoryview:
        return self._data
