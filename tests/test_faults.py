"""Runs and results under faults and bad input: each ends with a correct result or one clear error, never
with a wrong result reported as done."""

import json
import os
import re
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

def _two_ranks(script):
    """``script`` started as ranks 0 and 1 of a torchrun-like job on this machine, output merged per rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return ranks


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
    ranks = _two_ranks(script)
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


def test_a_rank_done_first_waits_for_the_others_before_leaving_the_group(tmp_path):
    """A rank that leaves while another still reads from it can abort at exit though the command succeeded;
    after success every rank waits for the slowest, then the group is torn down and each exits 0."""
    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import torch.distributed as dist
        from xdc_fast import distributed as xdist
        xdist.setup_device("cpu", 30.0)
        if xdist.rank() == 0:
            time.sleep(1.5)  # rank 0 still at work, as when it fits the probe on what the others sent
            print(f"arrived {time.time()!r}", flush=True)
        xdist.leave_together()
        print(f"left {time.time()!r} {dist.is_initialized()}", flush=True)
    """))
    ranks = _two_ranks(script)
    try:
        outputs = [process.communicate(timeout=120)[0] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert [process.returncode for process in ranks] == [0, 0], outputs
    arrived = float(re.search(r"arrived (\S+)", outputs[0]).group(1))
    left = [re.search(r"left (\S+) (\w+)", output).groups() for output in outputs]
    assert float(left[1][0]) >= arrived and [initialized for _, initialized in left] == ["False", "False"]


# ---- 14: non-finite features ----------------------------------------------------------------------------------

def test_diverged_weights_stop_with_the_modality_and_round_named(dataset, stopped_run, tmp_path):
    # Finite weights so large that the features overflow: NaN weights would be refused when loaded.
    state = torch.load(stopped_run / "checkpoints" / "last.pt", weights_only=True)
    state["encoders"] = {k: v.float().fill_(1e30) if k.startswith("audio.") and k.endswith("weight") else v
                         for k, v in state["encoders"].items()}
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(XdcError, match="the audio encoder gives non-finite features in round 0"):
        pretrain(dataset, tmp_path / "run", PretrainConfig(**FAST, init_checkpoint=str(tmp_path / "nan.pt")), **QUIET)


# ==== through the command line: one `Error:` line, exit status 2, nothing on disk changed ==================

def cli(*args, file_limit: int | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``xdc-fast ARGS`` in a child process; ``file_limit`` caps the bytes of any file it writes (as
    ``ulimit -f`` does: a full disk for that process)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "xdc_fast.cli", *map(str, args)], capture_output=True, text=True,
                          errors="backslashreplace", timeout=600, cwd=cwd, preexec_fn=limit if file_limit else None,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def refused(result: subprocess.CompletedProcess, *named: str) -> str:
    """The one `Error:` line of a refused command, checked to name each of ``named``."""
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert result.returncode == 2 and "Traceback" not in output and len(errors) == 1, output
    for name in named:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its content: what must not change."""
    from pathlib import Path

    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()
            and p.name != ".xdc-fast.lock"}


def unwritable(tmp_path):
    """A folder this process cannot create anything in: a read-only folder, or, for root (whom permissions
    do not stop), one under /sys, which refuses every new entry."""
    if os.geteuid() == 0:
        return "/sys/xdc-fast-unwritable"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out"


def fast_yaml(tmp_path, **extra):
    import yaml

    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump({**FAST, **extra}))
    return path


FINETUNE_YAML = dict(clip=FAST["clip"], train_clips=2, test_clips=2)
EVALUATE_ARGS = ("--clips-per-video", "2", "--modality", "audio", "--device", "cpu")


@pytest.fixture(scope="module")
def diverged(stopped_run, tmp_path_factory):
    """Checkpoints of the stopped run: one whose weights are NaN, one whose finite weights overflow to
    non-finite features."""
    folder = tmp_path_factory.mktemp("diverged")
    state = torch.load(stopped_run / "checkpoints" / "last.pt", weights_only=True)
    for name, change in (("nan.pt", lambda k, v: v.clone().fill_(float("nan"))),
                         ("huge.pt", lambda k, v: v.clone().fill_(1e30) if k.endswith("weight") else v)):
        torch.save({**state, "encoders": {k: change(k, v) if v.is_floating_point() else v
                                          for k, v in state["encoders"].items()}}, folder / name)
    return folder


# ---- resume without a checkpoint ------------------------------------------------------------------------

def test_a_resume_without_a_checkpoint_says_so_and_rewrites_the_log(dataset, stopped_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # What a kill before the first last.pt leaves: the settings and three logged epochs, no checkpoint.
    record = json.loads((stopped_run / "metrics.jsonl").read_text().splitlines()[0])
    (run / "metrics.jsonl").write_text("".join(json.dumps({**record, "epoch": e}) + "\n" for e in range(3)))
    shutil.copy(stopped_run / "config.yaml", run / "config.yaml")
    result = cli("pretrain", "--data", dataset, "--out", run, "--resume", "--config", fast_yaml(tmp_path),
                 "--epochs", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "does not exist (the run stopped before its first checkpoint)" in result.stdout + result.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]


def test_a_resume_that_finds_a_round_but_no_last_checkpoint_points_at_it(dataset, stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    (run / "checkpoints" / "last.pt").unlink()  # the disk filled between round_000.pt and last.pt
    before = snapshot(run)
    refused(cli("pretrain", "--data", dataset, "--out", run, "--resume", "--config", fast_yaml(tmp_path, epochs=2)),
            "round_000.pt", "last.pt")
    assert snapshot(run) == before


# ---- export only into its own folders -------------------------------------------------------------------

@pytest.mark.parametrize("target", ["dataset", "run", "foreign"])
def test_export_refuses_a_folder_it_did_not_write(dataset, stopped_run, tmp_path, target):
    out = {"dataset": dataset, "run": stopped_run, "foreign": tmp_path / "mine"}[target]
    if target == "foreign":
        out.mkdir()
        (out / "classes.json").write_text('["cat", "dog", "bird"]')
    before = snapshot(out)
    refused(cli("export", stopped_run, "--modality", "audio", "--out", out), str(out))
    assert snapshot(out) == before


# ---- non-finite numbers, huge numbers, bad config files -------------------------------------------------

@pytest.mark.parametrize("command,flags,yaml_text,field", [
    ("finetune", ["--lr", "nan"], "", "lr"),
    ("finetune", ["--lr", "1e400"], "", "lr"),
    ("pretrain", ["--lr", "inf"], "", "lr"),
    ("evaluate", ["--knn-temperature", "nan"], "", "knn_temperature"),
    ("finetune", [], "test_fraction: .nan\n", "test_fraction"),
    ("finetune", [], "linear_c: .nan\n", "linear_c"),
    ("pretrain", [], "warmup_epochs: .inf\n", "warmup_epochs"),
    ("pretrain", [], "lr: 1.0e+400\n", "lr"),
    ("evaluate", [], "linear_c: -.inf\n", "linear_c"),
    ("pretrain", [], "heldout_fraction: 1.0\n", "heldout_fraction"),
    ("pretrain", ["--epochs", "99999999999999999999"], "", "--epochs"),
    ("pretrain", [], "epochs: 99999999999999999999\n", "epochs"),
    ("finetune", [], "seed: 99999999999999999999\n", "seed"),
    ("pretrain", [], "lr: 0.1\nlr: 0.01\n", "lr"),  # a key given twice: one of them would be ignored
    ("pretrain", [], "frames: 4\nclip: {frames: 8}\n", "frames"),
    ("pretrain", [], "clip: {crop: 64, resize_short: 40}\n", "clip.crop"),
])
def test_a_value_that_cannot_run_is_refused_before_anything_is_written(dataset, tmp_path, command, flags, yaml_text,
                                                                       field):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text or "{}\n")
    refused(cli(command, "--data", dataset, "--out", tmp_path / "out", "--config", config, *flags), field)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,flag", [(["prepare", "MEDIA", "--out", "OUT", "--min-seconds", "nan"], "--min-seconds"),
                                       (["export", "RUN", "--modality", "audio", "--out", "OUT", "--min-margin", "inf"],
                                        "--min-margin")])
def test_number_flags_outside_the_configurations_refuse_non_finite_values(dataset, stopped_run, tmp_path, args, flag):
    places = {"MEDIA": dataset.parent / "media", "RUN": stopped_run, "OUT": tmp_path / "out"}
    refused(cli(*[places.get(a, a) for a in args]), flag)
    assert not (tmp_path / "out").exists()


def test_a_config_file_that_is_not_utf8_is_named(dataset, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("# réglages\nlr: 0.01\n".encode("latin-1"))
    refused(cli("pretrain", "--data", dataset, "--out", tmp_path / "out", "--config", config), "latin1.yaml", "UTF-8")
    assert not (tmp_path / "out").exists()


def test_heldout_fraction_just_below_one_that_holds_out_every_video_is_refused(dataset, tmp_path):
    refused(cli("pretrain", "--data", dataset, "--out", tmp_path / "out",
                "--config", fast_yaml(tmp_path, heldout_fraction=1 - 1e-12)), "heldout_fraction")
    assert not (tmp_path / "out").exists()


# ---- checkpoints: non-finite weights, features, unknown arch, a key diff ---------------------------------

@pytest.mark.parametrize("command", ["extract", "evaluate-knn", "evaluate-default", "probe", "pretrain"])
def test_a_checkpoint_with_non_finite_weights_is_refused_when_loaded(dataset, diverged, tmp_path, command):
    nan = diverged / "nan.pt"
    out = tmp_path / "out"
    args = {"extract": ["extract", "--data", dataset, "--out", tmp_path / "f.pt", "--checkpoint", nan],
            "evaluate-knn": ["evaluate", "--data", dataset, "--out", out, "--checkpoint", nan, "--protocol", "knn",
                             "--protocol", "retrieval", *EVALUATE_ARGS],
            "evaluate-default": ["evaluate", "--data", dataset, "--out", out, "--checkpoint", nan, *EVALUATE_ARGS],
            "probe": ["finetune", "--mode", "linear", "--data", dataset, "--out", out, "--checkpoint", nan,
                      "--modality", "audio"],
            "pretrain": ["pretrain", "--data", dataset, "--out", out, "--config", fast_yaml(tmp_path),
                         "--init-checkpoint", nan]}[command]
    refused(cli(*args), "nan.pt", "non-finite weights")
    assert not (tmp_path / "f.pt").exists() and not (out / "results.json").exists()
    assert not (out / "metrics.json").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("command", ["extract", "evaluate"])
def test_non_finite_features_are_refused_after_encoding(dataset, diverged, tmp_path, command):
    huge = diverged / "huge.pt"
    if command == "extract":
        result = cli("extract", "--data", dataset, "--out", tmp_path / "f.pt", "--checkpoint", huge, "--modality", "audio",
                     "--clips-per-video", "1")
    else:
        result = cli("evaluate", "--data", dataset, "--out", tmp_path / "out", "--checkpoint", huge, "--protocol", "knn",
                     *EVALUATE_ARGS)
    refused(result, "audio encoder", "non-finite features")
    assert not (tmp_path / "f.pt").exists() and not (tmp_path / "out" / "results.json").exists()


def test_a_checkpoint_of_an_unknown_arch_or_missing_weights_is_one_line(dataset, stopped_run, tmp_path):
    state = torch.load(stopped_run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "config": {**state["config"], "arch": "resnet50"}}, tmp_path / "arch.pt")
    refused(cli("extract", "--data", dataset, "--out", tmp_path / "a.pt", "--checkpoint", tmp_path / "arch.pt"),
            "arch.pt", "'resnet50'")
    torch.save({**state, "encoders": {k: v for k, v in state["encoders"].items() if k != "video.stem.0.weight"}},
               tmp_path / "keys.pt")
    line = refused(cli("extract", "--data", dataset, "--out", tmp_path / "k.pt", "--checkpoint", tmp_path / "keys.pt"),
                   "keys.pt", "1 weight(s) missing")
    assert "Missing key(s)" not in line  # torch's page-long key diff is not repeated
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "k.pt").exists()


# ---- outputs that cannot be written: no permission, a full disk -------------------------------------------

def _command(name: str, dataset, run, out, config) -> list:
    return {"pretrain": ["pretrain", "--data", dataset, "--out", out, "--config", config],
            "finetune": ["finetune", "--mode", "linear", "--modality", "audio", "--data", dataset, "--out", out],
            "evaluate": ["evaluate", "--data", dataset, "--out", out, "--protocol", "knn", *EVALUATE_ARGS],
            "extract": ["extract", "--data", dataset, "--out", out / "f.pt", "--modality", "audio",
                        "--clips-per-video", "1"],
            "assign": ["assign", run, "--data", dataset, "--out", out / "a.json"],
            "browse": ["browse", run, "--out", out],
            "export": ["export", run, "--modality", "audio", "--out", out],
            "report": ["report", run, "--out", out],
            "prepare": ["prepare", dataset.parent / "media", "--out", out, "--workers", "1"]}[name]


@pytest.mark.parametrize("name", ["pretrain", "finetune", "evaluate", "extract", "assign", "browse", "export", "report",
                                  "prepare"])
def test_an_unwritable_out_is_one_error_line(dataset, stopped_run, tmp_path, name):
    from pathlib import Path

    out = Path(unwritable(tmp_path))
    before = snapshot(stopped_run)
    refused(cli(*_command(name, dataset, stopped_run, out, fast_yaml(tmp_path))), str(out))
    assert snapshot(stopped_run) == before


@pytest.mark.parametrize("name,limit", [("pretrain", 20_000), ("finetune", 20_000), ("evaluate", 2_000),
                                        ("extract", 2_000), ("assign", 2_000), ("browse", 2_000), ("export", 2_000)])
def test_a_full_disk_is_one_error_line_and_leaves_no_temporary(dataset, stopped_run, tmp_path, name, limit):
    out = tmp_path / "out"
    out.mkdir()
    line = refused(cli(*_command(name, dataset, stopped_run, out, fast_yaml(tmp_path)), file_limit=limit), str(out),
                   "File too large")
    if name == "pretrain":
        assert "--resume" in line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# ---- names that are not UTF-8 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_named(dataset, tmp_path_factory):
    """A dataset one of whose files is named in Latin-1 (not UTF-8), and a one-round run on it."""
    root = tmp_path_factory.mktemp("odd")
    media = root / "media"
    shutil.copytree(dataset.parent / "media", media)
    folder = os.fsencode(next(p for p in sorted(media.iterdir()) if p.is_dir()))
    first = sorted(os.listdir(folder))[0]
    os.rename(folder + b"/" + first, folder + b"/caf\xe9-" + first)
    from xdc_fast.data.prepare import prepare

    prepare(media, root / "ds", workers=1, progress=False)
    pretrain(root / "ds", root / "run", PretrainConfig(**FAST), **QUIET)
    return root / "ds", root / "run"


def test_a_name_that_is_not_utf8_reaches_every_writer(odd_named, tmp_path):
    dataset, run = odd_named
    result = cli("assign", run, "--data", dataset, "--out", tmp_path / "a.csv", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert b"caf\xe9-" in (tmp_path / "a.csv").read_bytes()  # the id is the file's own bytes
    result = cli("browse", run, "--out", tmp_path / "site", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    pages = b"".join(p.read_bytes() for p in (tmp_path / "site").glob("*.html"))
    assert b"caf\xe9-" in pages and any("_caf_-" in p.name for p in (tmp_path / "site" / "media").iterdir())


# ---- settings checked against the dataset up front --------------------------------------------------------

def test_pretrain_refuses_clips_at_another_sample_rate_than_the_datasets(dataset, tmp_path):
    config = fast_yaml(tmp_path, clip={**FAST["clip"], "sample_rate": 8000})
    refused(cli("pretrain", "--data", dataset, "--out", tmp_path / "out", "--config", config), "8000", "16000",
            "--sample-rate")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_a_split_on_a_dataset_without_splits_is_refused(dataset, tmp_path, command):
    extra = ["--mode", "linear"] if command == "finetune" else ["--protocol", "knn", *EVALUATE_ARGS]
    refused(cli(command, "--data", dataset, "--out", tmp_path / "out", "--split", "3", *extra), "--split 3",
            "no splits")
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("command", ["extract", "assign"])
def test_an_existing_output_file_is_not_replaced(dataset, stopped_run, tmp_path, command):
    out = tmp_path / ("f.pt" if command == "extract" else "a.json")
    out.write_bytes(b"earlier results")
    args = ["extract", "--data", dataset, "--out", out] if command == "extract" else \
        ["assign", stopped_run, "--data", dataset, "--out", out]
    refused(cli(*args), str(out), "already exists")
    assert out.read_bytes() == b"earlier results"


# ---- prepare: what it lists ------------------------------------------------------------------------------

def test_prepare_lists_every_media_file_and_rejects_what_does_not_decode(dataset, tmp_path):
    from xdc_fast.data.prepare import prepare, read_jsonl

    root = tmp_path / "root" / "cls"
    root.mkdir(parents=True)
    good = next((dataset.parent / "media").rglob("*.mp4"))
    shutil.copy(good, root / "good.m4v")  # an extension FFmpeg reads
    shutil.copy(good, root / ".hidden.mp4")  # macOS's ._ files, editors' backups: not the dataset's
    (root / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (root / "cut.mp4").write_bytes(good.read_bytes()[:300])
    prepare(tmp_path / "root", tmp_path / "out", workers=1, progress=False)
    kept = [json.loads(line)["id"] for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert kept == ["cls/good"]
    assert reasons["cls/gone"].startswith("unreadable") and not reasons["cls/cut"].startswith("not media")
    assert not any("hidden" in i for i in [*kept, *reasons])
