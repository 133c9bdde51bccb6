"""Restarted jobs: --resume auto, torchrun's elastic restarts, and a clip order that ignores the world size.

Every test holds a restarted or resized run to an uninterrupted one of the same settings."""

import json
import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast.cli import main
from xdc_fast.config import PretrainConfig
from xdc_fast.launch import resolve_resume
from xdc_fast.pretrain import pretrain

pytestmark = pytest.mark.training_outcome

FAST = dict(clusters=3, epochs=2, epochs_per_round=1, kmeans_nredo=1, batch_size=1, pca_dim=8, workers=0,
            clip=dict(frames=4, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20))
QUIET = dict(log=lambda *_: None)

# Runs the CLI; on the first attempt, rank KILL_RANK SIGKILLs itself as it begins optimisation step KILL_AT_STEP.
WORKER = textwrap.dedent("""
    import os, signal, sys
    from xdc_fast import engine
    from xdc_fast.cli import main

    if os.environ["RANK"] == os.environ.get("KILL_RANK") and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        step, calls = engine.supervised_step, [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(os.environ["KILL_AT_STEP"]):
                print(f"SIGKILL to rank {os.environ['RANK']} at step {calls[0]}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return step(*args, **kwargs)

        engine.supervised_step = dying
    main(sys.argv[1:], prog_name="xdc-fast")
""")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    return prepared_synthetic(root, classes=3, videos_per_class=2, seconds=2.0, fps=12, width=48, height=48, seed=2)


def _config_file(tmp_path, **changes):
    import yaml

    path = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**FAST, **changes}))
    return path


def _torchrun(tmp_path, args, nproc=2, max_restarts=0, env=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", str(max_restarts),
               str(worker), *args, "--device", "cpu"]
    return subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), capture_output=True,
                          text=True, timeout=int(os.environ.get("XDC_TEST_TIMEOUT", "600")))


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["encoders"]


def test_resume_auto_says_yes_only_under_a_launcher():
    assert resolve_resume("auto", {}) == (False, None)
    assert resolve_resume("auto", {"TORCHELASTIC_RUN_ID": "x"}) == (True, "torchrun")
    assert resolve_resume("auto", {"SLURM_JOB_ID": "42"}) == (True, "SLURM")
    assert resolve_resume("auto", {"SUBMITIT_EXECUTOR": "local"}) == (True, "xdc-fast submit")
    assert resolve_resume("no", {"SLURM_JOB_ID": "42"}) == (False, None)
    assert resolve_resume("yes", {}) == (True, None)


def test_resume_auto_under_slurm_continues_and_still_refuses_other_settings(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = _config_file(tmp_path, epochs=1)
    args = ["pretrain", "--data", str(dataset), "--out", str(run), "--config", str(config)]
    assert CliRunner().invoke(main, args).exit_code == 0
    refused = CliRunner().invoke(main, [*args, "--epochs", "2"])  # by hand: a folder holding a run is refused
    assert refused.exit_code == 2 and "already holds a run" in refused.output
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    resumed = CliRunner().invoke(main, [*args, "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert "launched by SLURM" in resumed.output and "resuming after round 0" in resumed.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    other = CliRunner().invoke(main, [*args, "--epochs", "3", "--clusters", "4"])
    assert other.exit_code == 2 and other.output.count("Error:") == 1 and "other settings" in other.output
    assert "Traceback" not in other.output


def test_a_worker_killed_at_a_random_step_restarts_and_ends_like_an_uninterrupted_run(dataset, tmp_path):
    """torchrun --max-restarts 1 restarts both ranks after one is SIGKILLed; --resume auto continues from
    the last checkpoint (every 2 steps, so the steps since are done again) and the weights end equal."""
    config = _config_file(tmp_path, checkpoint_every=2)
    common = ["pretrain", "--data", str(dataset), "--config", str(config)]
    straight = _torchrun(tmp_path, [*common, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    kill_at = random.Random().randint(1, 6)  # 3 steps per epoch on each rank, 2 epochs
    killed = _torchrun(tmp_path, [*common, "--out", str(tmp_path / "killed")], max_restarts=1,
                       env={"KILL_RANK": "1", "KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == 0, f"killed at step {kill_at}: " + killed.stderr[-3000:]
    # The worker died, and the agent started both ranks again (each says once how it resumes).
    assert f"SIGKILL to rank 1 at step {kill_at}" in killed.stderr, killed.stderr[-3000:]
    assert killed.stderr.count("launched by torchrun") == 4, killed.stderr[-3000:]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after a kill at step {kill_at}"
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]


def _digests(run):
    return [(r["epoch"], r["clips"], r["clips_digest"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_a_run_resumed_on_another_world_size_sees_the_clips_one_rank_sees(dataset, tmp_path):
    """Targets fixed by --labels-from, so that only the sampler decides the clips: 2 ranks then 1, and 1
    then 2, train on the clips of each epoch that 1 rank throughout does."""
    pretrain(dataset, tmp_path / "labels", PretrainConfig(**{**FAST, "epochs": 1}), **QUIET)
    labels = str(tmp_path / "labels" / "clusters" / "round_000.pt")
    one_epoch, two_epochs = _config_file(tmp_path, epochs=1, labels_from=labels), _config_file(tmp_path, labels_from=labels)
    pretrain(dataset, tmp_path / "one", PretrainConfig(**{**FAST, "labels_from": labels}), **QUIET)
    expected = _digests(tmp_path / "one")
    assert len(expected) == 2 and expected[0][2] != expected[1][2] and expected[0][1] == 6

    common = ["pretrain", "--data", str(dataset)]
    first = _torchrun(tmp_path, [*common, "--out", str(tmp_path / "two_then_one"), "--config", str(one_epoch)])
    assert first.returncode == 0, first.stderr[-3000:]
    then = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "two_then_one"), "--config", str(two_epochs),
                                     "--resume", "--device", "cpu"])
    assert then.exit_code == 0, then.output
    assert _digests(tmp_path / "two_then_one") == expected

    first = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "one_then_two"), "--config", str(one_epoch),
                                      "--device", "cpu"])
    assert first.exit_code == 0, first.output
    then = _torchrun(tmp_path, [*common, "--out", str(tmp_path / "one_then_two"), "--config", str(two_epochs)])
    assert then.returncode == 0, then.stderr[-3000:]
    assert _digests(tmp_path / "one_then_two") == expected


def test_two_ranks_on_clip_shards_cluster_as_on_the_files_and_survive_a_kill(dataset, tmp_path):
    """Under torchrun with 2 ranks, a dataset read from its clip shards: round 0 puts the clips in the
    clusters the files give (the frames differ by the re-encoding only), and a rank SIGKILLed mid-epoch
    restarts and ends with the weights of the uninterrupted run on the shards."""
    import shutil

    from xdc_fast import metrics
    from xdc_fast.data.shards import write_shards
    from xdc_fast.rounds import read_round, round_file

    sharded = tmp_path / "sharded"
    shutil.copytree(dataset, sharded)
    # Near-lossless, so that the frames are the files' and the ranks' clustering is what is compared: on
    # 6 videos of 48x48 pixels and 3 clusters, the default CRF's changes move a few clips across a border
    # (the default's fidelity is tested on larger footage in tests/data/test_shards.py).
    write_shards(sharded, short_side=48, gop=8, crf=8, progress=False)
    config = _config_file(tmp_path, checkpoint_every=2, video_input="rgb")  # why frames: tests/data/test_shards.py
    files = _torchrun(tmp_path, ["pretrain", "--data", str(dataset), "--config", str(config), "--out",
                                 str(tmp_path / "files")])
    assert files.returncode == 0, files.stderr[-3000:]
    common = ["pretrain", "--data", str(sharded), "--config", str(config)]
    straight = _torchrun(tmp_path, [*common, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    for clustering in ("video", "audio"):
        labels = [read_round(round_file(tmp_path / run, 0)).assignments[clustering]["clip_labels"]
                  for run in ("files", "straight")]
        assert metrics.nmi(*labels) >= 0.9, clustering
    kill_at = random.Random().randint(1, 6)
    killed = _torchrun(tmp_path, [*common, "--out", str(tmp_path / "killed")], max_restarts=1,
                       env={"KILL_RANK": "0", "KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == 0, f"killed at step {kill_at}: " + killed.stderr[-3000:]
    assert f"SIGKILL to rank 0 at step {kill_at}" in killed.stderr, killed.stderr[-3000:]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after a kill at step {kill_at}"


def test_two_ranks_with_their_features_on_disk_cluster_as_one_process_in_memory(dataset, tmp_path):
    """Each rank writes its own clips' features and the sampled fit reads them back; the round's clusters
    are those of one process holding every feature in memory."""
    from xdc_fast import metrics
    from xdc_fast.rounds import read_round, round_file

    config = _config_file(tmp_path, epochs=1)
    two = _torchrun(tmp_path, ["pretrain", "--data", str(dataset), "--config", str(config), "--out",
                               str(tmp_path / "disk"), "--round-features", "disk"])
    assert two.returncode == 0, two.stderr[-3000:]
    pretrain(dataset, tmp_path / "memory", PretrainConfig(**{**FAST, "epochs": 1, "round_features": "memory"}), **QUIET)
    assert not (tmp_path / "disk" / "features").exists()
    for clustering in ("video", "audio"):
        labels = [read_round(round_file(tmp_path / run, 0)).assignments[clustering]["clip_labels"]
                  for run in ("memory", "disk")]
        assert metrics.nmi(*labels) >= 0.9, clustering
