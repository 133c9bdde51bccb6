"""``prepare`` under real faults: a file-size limit while writing --out, SIGKILL of a run with workers,
and kills at random moments followed by resumes. Every run here is a real process (a subprocess of
the CLI, or a spawned interpreter running the CLI)."""

import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from xdc_fast.data import prepare as prepare_module
from xdc_fast.data.prepare import PrepareError, load_manifest, prepare, read_jsonl
from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset, write_media

from .conftest import place

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses RLIMIT_FSIZE")

CLI = "from xdc_fast.cli import main; main()"


def _cli(*args):
    return [sys.executable, "-c", CLI, "prepare", *map(str, args)]


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited orphan may wait a while to be reaped, but does nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if _running(p)]


def _kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- 1: a write failure into --out stops the run; nothing is recorded for the file; a re-run indexes it --

def _video_with_audio(path, audio_seconds):
    rng = np.random.default_rng(len(str(path)))
    frames = rng.integers(0, 255, size=(30, 32, 32, 3), dtype=np.uint8)
    write_media(path, frames, 15, rng.normal(0, 0.1, size=(1, int(16000 * audio_seconds))).astype(np.float32), 16000)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_size_limit_stops_the_run_and_a_rerun_indexes_the_file(tmp_path, workers):
    # v1's WAV (2 s, 64 kB) passes the limit, the others' (0.2 s, 6.4 kB) fit under it.
    for name, seconds in (("v0", 0.2), ("v1", 2.0), ("v2", 0.2)):
        _video_with_audio(tmp_path / "root" / "c" / f"{name}.mp4", seconds)
    limit = 32 * 1024

    def limited():
        # Ignored, SIGXFSZ turns into EFBIG from write(), as a full disk gives ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    run = subprocess.run(_cli(tmp_path / "root", "--out", out, "--workers", workers), preexec_fn=limited,
                         capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if "Error:" in line]
    assert run.returncode == 2, run.stderr
    assert len(errors) == 1 and "Traceback" not in run.stderr
    assert "File too large" in errors[0] and "v1.mp4" in errors[0] and "run the same command again" in errors[0]
    recorded = [r["id"] for r in read_jsonl(out / "manifest.jsonl")]
    assert "c/v1" not in recorded and read_jsonl(out / "rejects.jsonl") == []
    if workers == 0:
        assert recorded == ["c/v0"]  # stopped at v1: v2 never started
    assert not [p.name for p in out.rglob("*.tmp")] and not (out / "audio" / "c__v1.wav").exists()

    summary = prepare(tmp_path / "root", out, workers=workers, progress=False)  # space "freed"
    assert (summary.kept + summary.skipped, summary.rejected) == (3, 0)
    records = {r["id"]: r for r in load_manifest(out)}
    assert sorted(records) == ["c/v0", "c/v1", "c/v2"]
    with wave.open(str(out / records["c/v1"]["audio"])) as w:
        assert w.getnframes() == records["c/v1"]["audio_samples"] == pytest.approx(32000, abs=1600)


def _append_under_limit(path, limit, queue):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    appender = prepare_module._Appender(path)
    try:
        appender.write({"id": "long", "pad": "x" * 500}, "the/file.mp4")
        queue.put("no error")
    except PrepareError as error:
        queue.put(str(error))


def test_a_failed_append_leaves_no_half_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a"}\n' * 10)
    before = path.read_bytes()
    # spawn, not fork: a fork of the test process inherits its threads' locks and can hang on them.
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_append_under_limit, args=(path, len(before) + 100, queue))
    child.start()
    message = queue.get(timeout=30)
    child.join(30)
    assert "File too large" in message and "nothing was recorded for the/file.mp4" in message
    assert path.read_bytes() == before  # the 100 bytes that fitted were cut back off


# ---- 6: workers end with their parent ------------------------------------------------------------------

# Each mechanism alone must end the workers: the other one disabled in the CLI's process, which the
# workers inherit.
ONLY = {
    "death-signal": "import xdc_fast.data.prepare as p\np._watch_parent = lambda *args: None\n",
    # torch loads its libraries through ctypes: it is imported before ctypes is taken away.
    "watchdog": "import torch\nimport ctypes\n"
                "def unavailable(*args, **kwargs):\n    raise OSError('no prctl on this platform')\n"
                "ctypes.CDLL = unavailable\n",
}


@pytest.mark.parametrize("mode", sorted(ONLY))
def test_killing_the_parent_ends_its_workers(tmp_path, small_video, mode):
    for i in range(60):
        place(small_video, tmp_path / "root" / "c" / f"v{i:02d}.mp4")
    code = "from xdc_fast.cli import main\n" + ONLY[mode] + "main()"
    out = tmp_path / "out"
    parent = subprocess.Popen([sys.executable, "-c", code, "prepare", str(tmp_path / "root"), "--out", str(out),
                               "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and parent.poll() is None:
            workers = _children(parent.pid)
            manifest = out / "manifest.jsonl"
            if len(workers) >= 2 and manifest.exists() and manifest.read_text().count("\n") >= 2:
                break
            time.sleep(0.01)
        assert parent.poll() is None, "the run ended before it could be killed mid-way: give it more media"
        assert len(workers) == 2 and all(_running(p) for p in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        alive = _wait_gone(workers, 5.0)
        assert not alive, f"workers {alive} outlived their parent ({mode})"
    finally:
        parent.kill()
        _kill_all(workers)
    # And the run resumes where it stopped.
    summary = prepare(tmp_path / "root", out, workers=2, progress=False)
    assert summary.skipped >= 2 and summary.kept + summary.skipped == 60


# ---- 7: kills at random moments, then resumes: nothing lost, duplicated or mislabelled ----------------------

def _run_cli_here(args, log):
    """A spawned child that runs the CLI; output to ``log`` (pytest's capture is not ours to write)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    from xdc_fast.cli import main

    main(["prepare", *map(str, args)], prog_name="xdc-fast")


def _start(root, out, workers, log):
    # spawn, not fork: a fork of the test process (torch's and earlier tests' threads inside) can deadlock
    # on a lock some thread held at the fork; a fresh interpreter costs a few seconds but never hangs.
    child = multiprocessing.get_context("spawn").Process(
        target=_run_cli_here, args=([root, "--out", out, "--workers", workers], log))
    child.start()
    return child


def _state(out: Path):
    records = read_jsonl(out / "manifest.jsonl", strict=True)
    rejects = read_jsonl(out / "rejects.jsonl", strict=True)
    return records, rejects


def _check_consistent(out: Path, before: set, where: str) -> set:
    """What must hold at any moment, even right after a kill; returns the ids recorded."""
    records, rejects = _state(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"{where}: a record is duplicated"
    assert before <= set(ids), f"{where}: records lost: {sorted(before - set(ids))}"
    reject_ids = [r["id"] for r in rejects]
    assert len(reject_ids) == len(set(reject_ids)) and not set(reject_ids) & set(ids), f"{where}: rejects"
    labelled = [r for r in records if r["label"] is not None]
    if labelled:
        classes = json.loads((out / "classes.json").read_text())
        wrong = [r["id"] for r in labelled if classes[r["label"]] != r["label_name"]]
        assert not wrong, f"{where}: labels that disagree with classes.json: {wrong}"
    audio = [r["audio"] for r in records if r["audio"]]
    assert len(audio) == len(set(audio)), f"{where}: two records share a WAV"
    for name, record in ((r["audio"], r) for r in records if r["audio"]):
        with wave.open(str(out / name)) as w:  # exists, whole
            assert w.getnframes() == record["audio_samples"], f"{where}: {name} is not the recorded length"
    return set(ids)


def _check_complete(out: Path, reference: Path, where: str) -> None:
    records, rejects = _state(out)
    expected, expected_rejects = _state(reference)
    assert {r["id"]: r for r in records} == {r["id"]: r for r in expected}, f"{where}: manifest differs"
    assert len(records) == len(expected), f"{where}: a record is duplicated"
    assert {r["id"]: r["reason"] for r in rejects} == {r["id"]: r["reason"] for r in expected_rejects}, where
    assert len(rejects) == len(expected_rejects), f"{where}: a reject is duplicated"
    assert (out / "classes.json").read_text() == (reference / "classes.json").read_text(), where
    wavs = {p.name for p in (out / "audio").iterdir()}
    assert wavs == {Path(r["audio"]).name for r in records if r["audio"]}, f"{where}: WAVs without a record"
    assert not list(out.rglob("*.tmp")), f"{where}: temporary files left"


def test_random_kills_and_resumes_lose_nothing(tmp_path):
    seed = int(os.environ.get("XDC_FAULT_SEED", "11"))
    rng = random.Random(seed)
    root = tmp_path / "media"
    make_synthetic_dataset(root, SyntheticSpec(classes=4, videos_per_class=6, seconds=1.2, fps=8, width=32,
                                               height=32, seed=seed))
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("not a video\n" * 20)
    shutil.copyfile(next(root.glob("*/*.mp4")), root / "unlabelled.mp4")
    log = tmp_path / "runs.log"

    durations = {}
    for workers in (0, 2):  # the uninterrupted runs: what every resumed one must end up equal to
        start = time.monotonic()
        child = _start(root, tmp_path / f"reference{workers}", workers, log)
        child.join(120)
        durations[workers] = time.monotonic() - start
        assert child.exitcode == 0, log.read_text()[-2000:]
    _check_complete(tmp_path / "reference2", tmp_path / "reference0", "worker and serial runs")
    total = len(read_jsonl(tmp_path / "reference0" / "manifest.jsonl"))

    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        recorded: set = set()
        for kill in range(2):  # a run killed, then its resume killed too
            workers = rng.choice((0, 2))
            # Within the time the work left takes, so that kills land in the middle of it.
            delay = rng.uniform(0.0, 0.05 + durations[workers] * (1 - len(recorded) / total))
            where = f"seed {seed}, trial {trial}, kill {kill} (workers {workers}, after {delay:.2f} s)"
            child = _start(root, out, workers, log)
            time.sleep(delay)
            workers_seen = _children(child.pid)
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
            assert not _wait_gone(workers_seen, 5.0), f"{where}: workers outlived the run"
            if (out / "manifest.jsonl").exists():
                recorded = _check_consistent(out, recorded, where)
        where = f"seed {seed}, trial {trial}, resumed"
        child = _start(root, out, rng.choice((0, 2)), log)
        child.join(120)
        assert child.exitcode == 0, f"{where}: {log.read_text()[-2000:]}"
        _check_consistent(out, recorded, where)
        _check_complete(out, tmp_path / "reference0", where)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where root may mount one: a real full disk (ENOSPC), not a per-process limit."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the RLIMIT_FSIZE test covers the same path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_full_disk_stops_the_run_and_freeing_space_lets_a_rerun_finish(tmp_path, small_disk, workers):
    from click.testing import CliRunner

    from xdc_fast.cli import main

    for i in range(4):
        _video_with_audio(tmp_path / "root" / "c" / f"v{i}.mp4", 2.0)  # 64 kB of WAV each
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 150 * 1024))  # room for about two WAVs
    out = small_disk / "out"
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "root"), "--out", str(out),
                                       "--workers", str(workers)])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "No space left on device" in error[0] and "the disk holding it is full" in error[0]
    recorded = {r["id"] for r in read_jsonl(out / "manifest.jsonl")}
    assert len(recorded) < 4 and read_jsonl(out / "rejects.jsonl") == []
    if workers == 0:
        assert recorded == {"c/v0", "c/v1"}  # the two that fitted are kept; the run stopped at the third
    assert not list(out.rglob("*.tmp"))
    filler.unlink()
    summary = prepare(tmp_path / "root", out, workers=workers, progress=False)
    assert (summary.kept + summary.skipped, summary.rejected) == (4, 0)
    assert sorted(r["id"] for r in load_manifest(out)) == [f"c/v{i}" for i in range(4)]
    assert {p.name for p in (out / "audio").iterdir()} == {f"c__v{i}.wav" for i in range(4)}
