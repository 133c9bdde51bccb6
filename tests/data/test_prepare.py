import json
import shutil
from pathlib import Path

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


# ---- resume keeps labels, paths, ids and the manifest itself consistent --------------------------------

def _labels_match_classes(dataset):
    classes = json.loads((dataset / "classes.json").read_text())
    return all(classes[r["label"]] == r["label_name"] for r in load_manifest(dataset))


def test_a_changed_class_set_is_refused_and_names_the_change(tmp_path, small_video):
    place(small_video, tmp_path / "root" / "b" / "x.mp4")
    place(small_video, tmp_path / "root" / "c" / "y.mp4")
    prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    files = [tmp_path / "out" / name for name in ("manifest.jsonl", "classes.json")]
    before = [f.read_text() for f in files]
    # "a" sorts first: accepted, it would renumber b and c while their records keep 0 and 1.
    place(small_video, tmp_path / "root" / "a" / "z.mp4")
    with pytest.raises(PrepareError, match=r"added: a\b.*new --out"):
        prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert [f.read_text() for f in files] == before
    assert _labels_match_classes(tmp_path / "out")
    shutil.rmtree(tmp_path / "root" / "b")
    with pytest.raises(PrepareError, match=r"added: a; removed: b\b"):
        prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    # The way out the message names: a new --out holds the new numbering, consistently.
    prepare(tmp_path / "root", tmp_path / "new", workers=1, progress=False)
    assert json.loads((tmp_path / "new" / "classes.json").read_text()) == ["a", "c"]
    assert _labels_match_classes(tmp_path / "new")


def test_more_files_in_known_classes_resume_with_the_same_numbers(tmp_path, small_video):
    place(small_video, tmp_path / "root" / "b" / "x.mp4")
    place(small_video, tmp_path / "root" / "c" / "y.mp4")
    prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    place(small_video, tmp_path / "root" / "c" / "w.mp4")
    summary = prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert (summary.kept, summary.skipped) == (1, 2)
    assert {r["id"]: r["label"] for r in load_manifest(tmp_path / "out")} == {"b/x": 0, "c/y": 1, "c/w": 1}
    assert _labels_match_classes(tmp_path / "out")


def test_out_inside_root_is_never_read_as_input(tmp_path, small_video):
    place(small_video, tmp_path / "root" / "b" / "x.mp4")
    place(small_video, tmp_path / "root" / "c" / "y.mp4")
    for _ in range(2):  # the second run finds audio/*.wav under ROOT/ds: outputs, not a class "ds"
        summary = prepare(tmp_path / "root", tmp_path / "root" / "ds", workers=1, progress=False)
    assert (summary.kept, summary.rejected, summary.skipped) == (0, 0, 2)
    assert json.loads((tmp_path / "root" / "ds" / "classes.json").read_text()) == ["b", "c"]
    assert sorted(r["id"] for r in load_manifest(tmp_path / "root" / "ds")) == ["b/x", "c/y"]
    with pytest.raises(PrepareError, match="ROOT itself"):
        prepare(tmp_path / "root", tmp_path / "root", workers=1, progress=False)


def test_paths_open_from_any_directory_and_an_absolute_root_resumes_by_id(tmp_path, small_video, monkeypatch):
    for i in range(3):
        place(small_video, tmp_path / "work" / "media" / "c" / f"v{i}.mp4")
    monkeypatch.chdir(tmp_path / "work")
    prepare("media", "ds", workers=1, progress=False)  # both typed relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    records = load_manifest(tmp_path / "work" / "ds")
    assert all(Path(r["path"]).is_absolute() for r in records)
    assert decode_frames(records[0]["path"], np.array([0.0])).shape[0] == 1  # opens from here
    summary = prepare(tmp_path / "work" / "media", tmp_path / "work" / "ds", workers=1, progress=False)
    assert (summary.kept, summary.skipped) == (0, 3)
    assert len(read_jsonl(tmp_path / "work" / "ds" / "manifest.jsonl")) == 3


def test_a_manifest_of_an_older_version_is_refused_then_repaired_by_a_rerun(tmp_path, small_video, monkeypatch):
    for i in range(2):
        place(small_video, tmp_path / "media" / "c" / f"v{i}.mp4")
    prepare(tmp_path / "media", tmp_path / "ds", workers=1, progress=False)
    # What older versions wrote after a relative run, then an absolute one: paths as typed, each id twice.
    records = read_jsonl(tmp_path / "ds" / "manifest.jsonl")
    relative = [{**r, "path": f"media/c/{Path(r['path']).name}"} for r in records]
    (tmp_path / "ds" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in relative + records))
    with pytest.raises(PrepareError, match="more than once.*run `xdc-fast prepare"):
        load_manifest(tmp_path / "ds")
    (tmp_path / "ds" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in relative))
    monkeypatch.chdir(tmp_path / "ds")  # where media/... does not resolve
    with pytest.raises(PrepareError, match="relative to the folder prepare ran in"):
        load_manifest(tmp_path / "ds")
    summary = prepare(tmp_path / "media", tmp_path / "ds", workers=1, progress=False)
    assert (summary.kept, summary.skipped) == (0, 2)  # nothing decoded again
    assert load_manifest(tmp_path / "ds") == sorted(records, key=lambda r: r["id"])


@pytest.mark.parametrize("names", [("cls/v.mp4", "cls/v.mov"), ("cls__v.mp4", "cls/v.mp4")])
def test_two_files_that_would_share_an_id_or_a_wav_are_refused_with_a_list(tmp_path, small_video, names):
    for name in names:
        place(small_video, tmp_path / "root" / name)
    place(small_video, tmp_path / "root" / "cls" / "fine.mp4")
    with pytest.raises(PrepareError, match="share one id or one audio file") as caught:
        prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert all(name in str(caught.value) for name in names) and "fine.mp4" not in str(caught.value)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_a_new_file_that_would_overwrite_a_prepared_wav_is_refused(tmp_path, small_video):
    place(small_video, tmp_path / "root" / "cls" / "v.mp4")
    place(small_video, tmp_path / "root" / "cls" / "w.mp4")
    prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    (tmp_path / "root" / "cls" / "v.mp4").unlink()
    place(small_video, tmp_path / "root" / "cls__v.mp4")  # its WAV name is that of the prepared cls/v
    wav = (tmp_path / "out" / "audio" / "cls__v.wav").read_bytes()
    with pytest.raises(PrepareError, match="belongs to the prepared item 'cls/v'"):
        prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert (tmp_path / "out" / "audio" / "cls__v.wav").read_bytes() == wav


def test_a_torn_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path, small_video):
    for i in range(3):
        place(small_video, tmp_path / "root" / "c" / f"v{i}.mp4")
    prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    manifest = tmp_path / "out" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], lines[1][:25], lines[2]]) + "\n")
    for load in (lambda: load_manifest(tmp_path / "out"),
                 lambda: prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)):
        with pytest.raises(PrepareError, match=rf"{manifest}, line 2: not a JSON record"):
            load()
    assert manifest.read_text().splitlines()[1] == lines[1][:25]  # left for the user to see and fix


def test_a_torn_last_line_is_dropped_with_a_warning_and_redone(tmp_path, small_video, caplog):
    for i in range(3):
        place(small_video, tmp_path / "root" / "c" / f"v{i}.mp4")
    prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    manifest = tmp_path / "out" / "manifest.jsonl"
    text = manifest.read_text()
    manifest.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 20])  # the last record cut mid-line
    with caplog.at_level("WARNING"):
        assert len(load_manifest(tmp_path / "out")) == 2
    assert f"{manifest}, line 3: cut off" in caplog.text
    summary = prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert (summary.kept, summary.skipped) == (1, 2)
    assert manifest.read_text() == text


def test_a_second_prepare_into_the_same_out_is_refused_naming_the_holder(tmp_path, small_video):
    import fcntl

    place(small_video, tmp_path / "root" / "c" / "v.mp4")
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".prepare.lock", "w") as held:  # as a running prepare holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        with pytest.raises(PrepareError, match=r"another prepare \(pid 4242\) is writing to"):
            prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    assert prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False).kept == 1
