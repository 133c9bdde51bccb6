"""Runs and results under faults and bad input: each ends with a correct result or one clear error, never
with a wrong result reported as done."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast.checkpoint import CheckpointError
from xdc_fast.cli import main
from xdc_fast.config import ConfigError, FinetuneConfig, PretrainConfig
from xdc_fast.errors import XdcError
from xdc_fast.files import RunLock, atomic_path, write_text_atomic
from xdc_fast.pretrain import pretrain

FAST = dict(clusters=3, epochs=1, epochs_per_round=1, kmeans_nredo=1, batch_size=4, pca_dim=0,
            clip=dict(frames=4, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20))
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return prepared_synthetic(root, classes=3, videos_per_class=3, seconds=1.5, fps=8, width=32, height=32, seed=6)


def with_broken_video(dataset, where, count=1):
    """A copy of ``dataset`` whose first ``count`` videos are truncated to a few bytes after prepare."""
    copy = where / "broken_ds"
    shutil.copytree(dataset, copy)
    lines = (copy / "manifest.jsonl").read_text().splitlines()
    broken_ids = []
    for i in range(count):
        record = json.loads(lines[i])
        target = where / f"broken_{i}.mp4"
        target.write_bytes(open(record["path"], "rb").read()[:200])
        record["path"] = str(target)
        lines[i] = json.dumps(record)
        broken_ids.append(record["id"])
    (copy / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return copy, broken_ids


# ---- 7: one unreadable video ------------------------------------------------------------------------------

def test_an_unreadable_video_sits_the_round_out_and_is_listed(dataset, tmp_path):
    broken, ids = with_broken_video(dataset, tmp_path)
    lines = []
    (record,) = pretrain(broken, tmp_path / "run", PretrainConfig(**FAST, max_unreadable=0.2), log=lines.append)
    assert record["unreadable"] == ids and any("sit round 0 out" in line for line in lines)
    saved = torch.load(tmp_path / "run" / "clusters" / "round_000.pt", weights_only=True)
    position = saved["ids"].index(ids[0])
    assert saved["video_video_labels"][position] == -1 and (np.delete(saved["video_video_labels"].numpy(), position) >= 0).all()
    assert record["clips"] > 0 and np.isfinite(list(record["loss"].values())).all()


def test_too_many_unreadable_videos_stop_the_run(dataset, tmp_path):
    broken, ids = with_broken_video(dataset, tmp_path, count=2)
    with pytest.raises(XdcError, match="2 of 9 videos could not be decoded in round 0.*max_unreadable = 0.1"):
        pretrain(broken, tmp_path / "run", PretrainConfig(**FAST, max_unreadable=0.1), **QUIET)


# ---- 8: two commands into one output ----------------------------------------------------------------------

def test_a_second_run_into_the_same_out_is_refused_with_the_holders_pid(dataset, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from xdc_fast.files import RunLock
        with RunLock({str(tmp_path / 'run')!r}):
            print('locked', flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for command in (["pretrain"], ["finetune", "--mode", "linear"]):
            result = CliRunner().invoke(main, [*command, "--data", str(dataset), "--out", str(tmp_path / "run")])
            assert result.exit_code == 2 and f"in use by another xdc-fast process (pid {holder.pid})" in result.output
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its holder: the output is free again.
    with RunLock(tmp_path / "run"):
        pass


def test_atomic_writes_leave_the_old_file_on_failure_and_no_temporary():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "metrics.json"
        write_text_atomic(target, "old")
        with pytest.raises(OSError):
            with atomic_path(target) as tmp:
                tmp.write_text("half")
                raise OSError("disk full")
        assert target.read_text() == "old" and os.listdir(folder) == ["metrics.json"]
        with atomic_path(target) as tmp:
            assert str(os.getpid()) in tmp.name  # two processes never share a temporary name
            tmp.write_text("new")
        assert target.read_text() == "new"


# ---- 9: results from nothing --------------------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [({"test_fraction": 1.0}, "leaves no training video"),
                                            ({"test_clips": 0}, "test_clips: 0 is out of range"),
                                            ({"epochs": 0}, "epochs: 0 is out of range"),
                                            ({"test_fraction": 1.5}, "test_fraction: 1.5 is out of range")])
def test_finetune_refuses_settings_that_score_nothing(dataset, tmp_path, change, message):
    from xdc_fast.finetune import finetune

    with pytest.raises(XdcError, match=message):
        finetune(dataset, tmp_path / "ft", FinetuneConfig(**{**FINETUNE_FAST, **change}), **QUIET)
    assert not (tmp_path / "ft" / "metrics.json").exists()


FINETUNE_FAST = dict(clip=FAST["clip"], test_clips=2, train_clips=2, batch_size=4, epochs=1, modality="audio")


def test_finetune_refuses_to_report_when_no_training_clip_decodes(dataset, tmp_path):
    from xdc_fast.finetune import finetune

    broken, _ = with_broken_video(dataset, tmp_path, count=9)
    with pytest.raises(XdcError, match="no training clip could be decoded"):
        finetune(broken, tmp_path / "ft", FinetuneConfig(**{**FINETUNE_FAST, "modality": "video"}), **QUIET)
    assert not (tmp_path / "ft" / "metrics.json").exists()


def test_a_linear_probe_of_one_class_is_a_clear_error(tmp_path):
    from xdc_fast.probe import probe

    one_class = prepared_synthetic(tmp_path, classes=1, videos_per_class=4, seconds=1.5, fps=8, width=32, height=32)
    with pytest.raises(XdcError, match="single class"):
        probe(one_class, tmp_path / "p", FinetuneConfig(**{**FINETUNE_FAST, "mode": "linear"}), **QUIET)


# ---- 10, 11: resume ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(dataset, tmp_path_factory):
    """A two-round run stopped after its first round."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    pretrain(dataset, run, PretrainConfig(**{**FAST, "epochs": 2}), max_rounds=1, **QUIET)
    return run


def test_resume_with_other_settings_names_what_differs(dataset, stopped_run, tmp_path):
    shutil.copytree(stopped_run, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"arch: 'tiny' in the run, 'r2plus1d_18' now; clusters: 3 in the run, 4 now"):
        pretrain(dataset, tmp_path / "run", PretrainConfig(**{**FAST, "epochs": 2, "clusters": 4,
                                                               "arch": "r2plus1d_18"}), resume=True, **QUIET)


def test_a_truncated_last_checkpoint_points_at_the_last_round(dataset, stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    data = (run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["pretrain", "--data", str(dataset), "--out", str(run), "--resume",
                                       "--epochs", "2", "--clusters", "3", "--batch-size", "4", "--config",
                                       str(_config_file(tmp_path))])
    assert result.exit_code == 2 and "cannot resume" in result.output and "round_000.pt" in result.output
    assert "Traceback" not in result.output


def test_a_torn_metrics_line_is_rebuilt_from_the_checkpoint_on_resume(dataset, stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"round": 1, "epoch": 1, "loss": {"vid')  # a kill in the middle of a write
    history = pretrain(dataset, run, PretrainConfig(**{**FAST, "epochs": 2}), resume=True, **QUIET)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] == [r["epoch"] for r in history]


def _config_file(tmp_path):
    import yaml

    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(FAST))
    return path


@pytest.mark.parametrize("kind,message", [("tiny_for_full", "holds tiny encoders, but this run builds r2plus1d_18"),
                                          ("random_state", "does not fit the tiny encoders"),
                                          ("junk", "not a readable PyTorch checkpoint")])
def test_bad_init_checkpoints_are_clear_errors(dataset, stopped_run, tmp_path, kind, message):
    path = tmp_path / "init.pt"
    if kind == "tiny_for_full":
        shutil.copy(stopped_run / "checkpoints" / "last.pt", path)
        arch = "r2plus1d_18"
    elif kind == "random_state":
        torch.save({"layer.weight": torch.zeros(3, 3)}, path)
        arch = "tiny"
    else:
        path.write_bytes(b"\x00" * 100)
        arch = "tiny"
    with pytest.raises(CheckpointError, match=message):
        pretrain(dataset, tmp_path / "run", PretrainConfig(**{**FAST, "arch": arch, "init_checkpoint": str(path)}),
                 **QUIET)


def test_a_bad_labels_from_file_is_a_clear_error(dataset, tmp_path):
    torch.save({"something": torch.zeros(2)}, tmp_path / "labels.pt")
    with pytest.raises(XdcError, match="is not a round's assignments"):
        pretrain(dataset, tmp_path / "run", PretrainConfig(**FAST, labels_from=str(tmp_path / "labels.pt")), **QUIET)


# ---- 13: a stalled rank -------------------------------------------------------------------------------------

def test_a_stalled_rank_stops_the_others_with_the_phase_named(tmp_path):
    """Two real processes form a gloo group with a 4 s timeout; rank 1 stops itself (SIGSTOP) before a
    collective. Rank 0 must give up with a message naming the phase instead of waiting out the default."""
    script = tmp_path / "stall.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, torch
        from xdc_fast import distributed as xdist
        from xdc_fast.errors import XdcError
        xdist.setup_device("cpu", 4.0)
        with xdist.phase("clustering the features of round 3"):
            if xdist.rank() == 1:
                os.kill(os.getpid(), signal.SIGSTOP)
            try:
                xdist.all_reduce_sum(torch.ones(1))
            except XdcError as error:
                print(f"Error: {error}", flush=True)
                xdist.abandon(2)  # as the CLI does: a normal exit could abort in gloo's threads
    """))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        # Without the timeout rank 0 would wait for gloo's 30 min default; communicate's limit turns that
        # hang into a failure.
        output, _ = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 2, output
        assert "while clustering the features of round 3" in output and "--resume" in output
    finally:
        for process in ranks:
            process.send_signal(signal.SIGKILL)
            process.wait()


# ---- 14: non-finite features ----------------------------------------------------------------------------------

def test_diverged_weights_stop_with_the_modality_and_round_named(dataset, stopped_run, tmp_path):
    state = torch.load(stopped_run / "checkpoints" / "last.pt", weights_only=True)
    state["encoders"] = {k: v.float().fill_(float("nan")) if k.startswith("audio.") and v.is_floating_point() else v
                         for k, v in state["encoders"].items()}
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(XdcError, match="the audio encoder gives non-finite features in round 0"):
        pretrain(dataset, tmp_path / "run", PretrainConfig(**FAST, init_checkpoint=str(tmp_path / "nan.pt")), **QUIET)
