import json

import numpy as np
import pytest

from xdc_fast.data import prepare as prepare_module
from xdc_fast.data.prepare import PrepareError, load_manifest, prepare, read_jsonl
from xdc_fast.data.pyav_backend import decode_frames, read_audio_window
from xdc_fast.data.synthetic import write_media

from .conftest import SMALL, place


def test_manifest_describes_every_file(prepared):
    records = load_manifest(prepared)
    assert len(records) == SMALL.classes * SMALL.videos_per_class
    assert read_jsonl(prepared / "rejects.jsonl") == []
    assert json.loads((prepared / "classes.json").read_text()) == sorted({r["label_name"] for r in records})
    for r in records:
        assert set(prepare_module.MANIFEST_FIELDS) <= set(r)
        assert r["fps"] == SMALL.fps and r["width"] == SMALL.width and r["height"] == SMALL.height
        assert r["num_frames"] == SMALL.fps * SMALL.seconds and r["duration_s"] == pytest.approx(SMALL.seconds)
        assert r["video_codec"] == "h264" and r["has_audio"]
        assert (prepared / r["audio"]).exists()
        assert r["audio_samples"] == pytest.approx(SMALL.seconds * 16000, abs=16000 * 0.1)


def test_audio_is_the_mean_of_the_channels(tmp_path):
    left = np.full(16000, 0.5, dtype=np.float32)
    right = np.full(16000, -0.1, dtype=np.float32)
    frames = np.zeros((24, 32, 32, 3), dtype=np.uint8)
    write_media(tmp_path / "in" / "a.mp4", frames, 12, np.stack([left, right]), 16000)
    prepare(tmp_path / "in", tmp_path / "out", workers=1, progress=False, min_seconds=0.5)
    (record,) = load_manifest(tmp_path / "out")
    middle = read_audio_window(tmp_path / "out" / record["audio"], 0.3, 0.4, 16000)
    # AAC is lossy: the mean (0.2) within a few percent, far from FFmpeg's louder mono downmix (0.28).
    assert float(np.mean(middle)) == pytest.approx(0.2, abs=0.02)


def test_flash_and_click_land_at_the_same_time(tmp_path):
    fps, sr, flash_frame = 25, 16000, 37
    frames = np.full((75, 32, 32, 3), 20, dtype=np.uint8)
    frames[flash_frame] = 255
    audio = np.zeros((1, 3 * sr), dtype=np.float32)
    click = int(flash_frame / fps * sr)
    audio[0, click : click + 80] = 0.9
    write_media(tmp_path / "in" / "flash.mp4", frames, fps, audio, sr)
    prepare(tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    (record,) = load_manifest(tmp_path / "out")
    times = np.arange(75) / fps
    brightness = decode_frames(record["path"], times).mean(axis=(1, 2, 3))
    seen = times[int(np.argmax(brightness))]
    wave = read_audio_window(tmp_path / "out" / record["audio"], 0.0, 3.0, sr)
    heard = int(np.argmax(np.abs(wave))) / sr
    assert abs(seen - flash_frame / fps) < 1e-6
    assert abs(heard - seen) < 1.0 / fps  # within one video frame (AAC priming would shift it 64 ms)


def test_every_reject_reason(tmp_path, small_video):
    root = tmp_path / "root" / "cls"
    place(small_video, root / "good.mp4")
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    data = small_video.read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 2])
    write_media(root / "sound_only.mp4", None, 15, np.zeros((1, 32000), dtype=np.float32), 16000)
    write_media(root / "short.mp4", np.zeros((6, 32, 32, 3), dtype=np.uint8), 15)
    write_media(root / "silent.mp4", np.zeros((30, 32, 32, 3), dtype=np.uint8), 15)  # kept, without audio
    summary = prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert reasons["empty.mp4"] == "zero bytes"
    assert reasons["text.mp4"].startswith("not media")
    assert reasons["cut.mp4"].startswith(("truncated", "not media", "unreadable or corrupt"))
    assert reasons["sound_only.mp4"] == "no video stream"
    assert reasons["short.mp4"].startswith("shorter than one clip")
    kept = {r["id"]: r for r in load_manifest(tmp_path / "out")}
    assert set(kept) == {"cls/good", "cls/silent"}
    assert kept["cls/silent"]["has_audio"] is False and kept["cls/silent"]["audio"] is None
    assert (summary.kept, summary.rejected) == (2, 5)


def test_cut_file_with_its_index_up_front_is_truncated(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, size=(90, 32, 32, 3), dtype=np.uint8)
    import av

    path = tmp_path / "front.mp4"
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as c:
        s = c.add_stream("libx264", rate=15)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.read_bytes()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    (reject,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["reason"].startswith("truncated")


def test_interrupted_run_resumes_without_losing_or_repeating(tmp_path, small_video, monkeypatch):
    for i in range(6):
        place(small_video, tmp_path / "root" / "c" / f"v{i}.mp4")
    real = prepare_module.process_item
    calls = []

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "process_item", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert len(read_jsonl(tmp_path / "out" / "manifest.jsonl")) == 3
    # A torn line, as a kill in the middle of an append would leave.
    with (tmp_path / "out" / "manifest.jsonl").open("a") as f:
        f.write('{"id": "c/v9", "pa')
    monkeypatch.setattr(prepare_module, "process_item", real)
    summary = prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert (summary.skipped, summary.kept) == (3, 3)
    ids = [r["id"] for r in read_jsonl(tmp_path / "out" / "manifest.jsonl")]
    assert sorted(ids) == [f"c/v{i}" for i in range(6)]
    again = prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert (again.skipped, again.kept, again.rejected) == (6, 0, 0)


def test_worker_processes_give_the_same_manifest(synthetic_root, prepared, tmp_path):
    prepare(synthetic_root, tmp_path / "parallel", workers=2, progress=False)
    serial = {r["id"]: {k: v for k, v in r.items()} for r in load_manifest(prepared)}
    parallel = {r["id"]: {k: v for k, v in r.items()} for r in load_manifest(tmp_path / "parallel")}
    assert serial == parallel


def test_bad_roots_are_clear_errors(tmp_path):
    with pytest.raises(PrepareError, match="does not exist"):
        prepare(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no media here")
    with pytest.raises(PrepareError, match="no media files"):
        prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(PrepareError, match="run `xdc-fast prepare"):
        load_manifest(tmp_path / "empty")


def test_unreadable_file_is_rejected(tmp_path, small_video, monkeypatch):
    # Tests run as root here, which reads any file: deny access the way a permission error would.
    place(small_video, tmp_path / "root" / "c" / "locked.mp4")
    monkeypatch.setattr(prepare_module.os, "access", lambda path, mode: False)
    prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    (reject,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["reason"] == "unreadable: permission denied"
