"""xdc-fast submit: SLURM's absence is one Error line; submitit's local executor requeues a job at its time
limit until it is done, and the requeued job ends with the weights of the same run left alone."""

import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from tests.test_launch import _config_file, _torchrun, _weights, dataset  # noqa: F401 - the fixture
from xdc_fast.cli import main
from xdc_fast.submit import minutes_of

pytestmark = pytest.mark.training_outcome


def test_without_sbatch_submit_says_to_use_local(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    result = CliRunner().invoke(main, ["submit", "--time", "00:10:00", "--folder", str(tmp_path / "jobs"), "--",
                                       "pretrain", "--data", "D", "--out", "RUN"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "sbatch" in errors[0] and "--local" in errors[0], result.output
    assert "Traceback" not in result.output


def test_time_limits_read_as_slurm_writes_them():
    assert minutes_of("01:30:00") == 90 and minutes_of("2-00:00:00") == 2 * 24 * 60 and minutes_of("00:00:15") == 0.25
    bad = CliRunner().invoke(main, ["submit", "--local", "--time", "90 minutes", "--", "pretrain"])
    assert bad.exit_code == 2 and "should read HH:MM:SS" in bad.output


def _task_pid(jobs, rank: int) -> int | None:
    """The process of task ``rank`` of the local job whose files are in ``jobs``."""
    for entry in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(jobs).encode() in cmdline and f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in environ:
            return int(entry)
    return None


def test_a_requeued_local_job_ends_with_the_weights_of_an_uninterrupted_run(dataset, tmp_path):  # noqa: F811
    """A 2-task local job is signalled as SLURM signals a preemption (USR2 to the tasks) once it has
    written its first checkpoint, so mid-way whatever the machine's speed; its 20 s time limit (signalled
    4 s early) requeues it again wherever a run of it is slower. It must end as the same run left alone."""
    import signal
    import time

    config = _config_file(tmp_path, epochs=8, checkpoint_every=1)
    common = ["pretrain", "--data", str(dataset), "--config", str(config), "--device", "cpu"]
    straight = _torchrun(tmp_path, [*common[:-2], "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    jobs, run = tmp_path / "jobs", tmp_path / "requeued"
    command = [sys.executable, "-m", "xdc_fast.cli", "submit", "--local", "--gpus-per-node", "0", "--tasks-per-node",
               "2", "--time", "00:00:20", "--signal-delay-s", "4", "--max-requeues", "30", "--folder", str(jobs), "--",
               *common, "--out", str(run)]
    with open(tmp_path / "submit.log", "w") as output:
        process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=output,
                                   stderr=subprocess.STDOUT)
        signalled = False
        while process.poll() is None:
            pid = None if signalled or not (run / "checkpoints" / "last.pt").exists() else _task_pid(jobs, 0)
            if pid is not None:
                os.kill(pid, signal.SIGUSR2)
                signalled = True
            time.sleep(0.05)
    logs = "".join(p.read_text() for p in sorted(jobs.glob("*_0_log.*")))
    assert process.returncode == 0, (tmp_path / "submit.log").read_text() + logs[-3000:]
    resumed_at = [int(r) for r in re.findall(r"resuming (?:after )?round (\d+)", logs)]
    # It was stopped before its last round, requeued, and went on from its checkpoint.
    assert signalled and "Requeued job" in logs and resumed_at and resumed_at[0] < 7, logs[-3000:]
    a, b = _weights(tmp_path / "straight"), _weights(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key
