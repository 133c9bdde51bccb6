import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast.checkpoint import load_encoder
from xdc_fast.cli import main
from xdc_fast.config import ConfigError, PretrainConfig
from xdc_fast.errors import DatasetError
from xdc_fast.pretrain import pretrain

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome

FAST = dict(clusters=3, epochs=1, epochs_per_round=1, kmeans_nredo=1, batch_size=4, pca_dim=8,
            clip=dict(frames=4, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return prepared_synthetic(root, classes=3, videos_per_class=2, seconds=2.0, fps=12, width=48, height=48, seed=2)


@pytest.mark.parametrize("variant", ["xdc", "mdc", "cdc", "sdc-video", "sdc-audio"])
def test_each_variant_runs_a_round(dataset, tmp_path, variant):
    history = pretrain(dataset, tmp_path / "run", PretrainConfig(variant=variant, **FAST), log=lambda *_: None)
    (record,) = history
    heads = {"xdc": 2, "mdc": 4, "cdc": 2, "sdc-video": 1, "sdc-audio": 1}[variant]
    assert len(record["loss"]) == heads and all(np.isfinite(v) for v in record["loss"].values())
    assert record["clips"] == 6 and "vs_true_labels" in record
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["round"] == 0
    saved = torch.load(tmp_path / "run" / "clusters" / "round_000.pt", weights_only=True)
    assert len(saved["ids"]) == 6
    assert all(c.shape[-2] == 3 for c in saved["centroids"])  # k = 3 centroids per problem
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["round"] == 0 and state["config"]["variant"] == variant


def test_resume_continues_where_an_interrupted_run_stopped(dataset, tmp_path):
    config = PretrainConfig(variant="xdc", **{**FAST, "epochs": 2})
    straight = pretrain(dataset, tmp_path / "a", config, log=lambda *_: None)
    pretrain(dataset, tmp_path / "b", config, log=lambda *_: None, max_rounds=1)  # stopped after round 0
    resumed = pretrain(dataset, tmp_path / "b", config, resume=True, log=lambda *_: None)
    assert len(resumed) == 2
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("change,message", [({"variant": "sdc"}, "'sdc' is not one of xdc, mdc"),
                                            ({"clusters": 99}, "must lie between 2 and the 12 clips"),
                                            ({"clip": {**FAST["clip"], "frames": 1}, "video_input": "residual"},
                                             "a clip of 1 frame has none")])
def test_bad_configuration_fails_before_work(dataset, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        pretrain(dataset, tmp_path / "run", PretrainConfig(**{**FAST, **change}), log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_init_checkpoint_and_cluster_transfer(dataset, tmp_path):
    from xdc_fast.models import build_video_encoder
    from xdc_fast.checkpoint import load_encoders_from as load_init_checkpoint
    from xdc_fast.errors import XdcError
    from xdc_fast.rounds import load_saved_labels

    pretrain(dataset, tmp_path / "a", PretrainConfig(**FAST), log=lambda *_: None)
    # Encoders start from run a's: the weights match exactly before any training.
    encoders = torch.nn.ModuleDict({"video": build_video_encoder("tiny")})
    assert load_init_checkpoint(encoders, tmp_path / "a" / "checkpoints" / "last.pt", "tiny") == ["video"]
    saved = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["encoders"]
    assert torch.equal(encoders["video"].stem[0].weight, saved["video.stem.0.weight"])
    # Torchvision-layout video weights load too.
    video_weights = {k[len("video."):]: v for k, v in saved.items() if k.startswith("video.")}
    torch.save(video_weights, tmp_path / "video.pt")
    assert load_init_checkpoint(torch.nn.ModuleDict({"video": build_video_encoder("tiny")}), tmp_path / "video.pt", "tiny") == ["video"]
    # Cluster transfer: run b trains on run a's saved assignments and clusters nothing itself.
    clusters = tmp_path / "a" / "clusters" / "round_000.pt"
    history = pretrain(dataset, tmp_path / "b", PretrainConfig(**FAST, labels_from=str(clusters),
                                                               init_checkpoint=str(tmp_path / "a" / "checkpoints" / "last.pt")),
                       log=lambda *_: None)
    assert history[0]["seconds"]["cluster"] == 0.0 and not list((tmp_path / "b" / "clusters").iterdir())
    ids = sorted(r for r in torch.load(clusters, weights_only=True)["ids"])
    labels = load_saved_labels(clusters, ids)
    assert set(labels) == {"video", "audio"} and len(labels["video"]) == len(ids)
    with pytest.raises(XdcError, match="no assignment"):
        load_saved_labels(clusters, ids + ["someone/else"])


def test_an_existing_run_is_not_overwritten(dataset, tmp_path):
    pretrain(dataset, tmp_path / "run", PretrainConfig(**FAST), log=lambda *_: None)
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain(dataset, tmp_path / "run", PretrainConfig(**FAST), log=lambda *_: None)


def test_cli_pretrain(dataset, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("\n".join(f"{k}: {v}" for k, v in FAST.items()) + "\n")
    result = CliRunner().invoke(main, ["pretrain", "--variant", "xdc", "--data", str(dataset), "--out",
                                       str(tmp_path / "run"), "--config", str(config), "--video-input", "residual"])
    assert result.exit_code == 0, result.output
    assert "round 0 epoch 0" in result.output
    # The encoders round 0 clustered and the trained ones were both fed frame differences, and say so.
    for name in ("init.pt", "last.pt"):
        encoder, _ = load_encoder(tmp_path / "run" / "checkpoints" / name, "video")
        assert encoder.video_input == "residual"
    bad = CliRunner().invoke(main, ["pretrain", "--data", str(dataset), "--out", str(tmp_path / "r2"),
                                    "--clusters", "50", "--config", str(config)])
    assert bad.exit_code == 2 and "must lie between" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize("max_points_per_centroid", [256, 2])
def test_torchrun_two_ranks_cluster_like_one_process(dataset, tmp_path, max_points_per_centroid):
    """Two gloo ranks shard the videos; their round-0 k-means must equal one process's on the same features,
    and so must the whole round file, also when k-means trains on a sample (12 clips > 4 x 2)."""
    import os
    import socket
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    config.write_text("\n".join(f"{k}: {v}" for k, v in {**FAST, "clusters": 4}.items()) + "\nworkers: 0\n"
                      + f"kmeans_max_points_per_centroid: {max_points_per_centroid}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "xdc_fast.cli", "pretrain", "--data", str(dataset),
               "--out", str(tmp_path / "ddp"), "--config", str(config), "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("round 0 epoch 0") == 1  # only rank 0 speaks
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1

    single = CliRunner().invoke(main, ["pretrain", "--data", str(dataset), "--out", str(tmp_path / "one"),
                                       "--config", str(config), "--device", "cpu"])
    assert single.exit_code == 0, single.output
    ddp = torch.load(tmp_path / "ddp" / "clusters" / "round_000.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "clusters" / "round_000.pt", weights_only=True)
    assert ddp["ids"] == one["ids"]
    for key in ("video_clip_labels", "audio_clip_labels"):
        assert torch.equal(ddp[key], one[key]), key
    # Every entry: labels and ids exactly; floats up to the order in which the ranks' sums are all-reduced.
    assert ddp.keys() == one.keys()
    for key, value in one.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(ddp[key], value), key
    for name, clustering in one["clusterings"].items():
        torch.testing.assert_close(ddp["clusterings"][name]["centroids"], clustering["centroids"], rtol=1e-4,
                                   atol=1e-5)
    record = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text())
    assert record["clips"] == 6  # 3 videos per rank
    # The command ends by drawing the run's figures (rank 0 only under torchrun).
    assert all((tmp_path / run / "report" / "curves.png").exists() for run in ("ddp", "one"))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_kill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(dataset, tmp_path, head):
    from xdc_fast.pretrain import Interrupted

    config = PretrainConfig(variant="xdc", head=head, **{**FAST, "epochs": 2, "batch_size": 2,
                                                         "checkpoint_every": 1})
    straight = pretrain(dataset, tmp_path / "a", config, log=lambda *_: None)
    with pytest.raises(Interrupted):
        pretrain(dataset, tmp_path / "b", config, log=lambda *_: None, stop_after_steps=2)  # 2 of 3 steps done
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert state["mid_epoch"]["step"] == 2 and state["mid_epoch"]["epoch"] == 0
    assert ("video.0.2.weight" in state["mid_epoch"]["heads"]) == (head == "mlp")
    resumed = pretrain(dataset, tmp_path / "b", config, resume=True, log=lambda *_: None)
    assert len(resumed) == len(straight) == 2
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["pseudo_label_acc"] == a["pseudo_label_acc"] and b["clips"] == a["clips"]
    final_a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["encoders"]
    final_b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["encoders"]
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-6)


def test_tensorboard_scalars_when_installed(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(dataset, tmp_path / "run", PretrainConfig(**FAST), log=lambda *_: None)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/video_0", "loss/audio_0", "nmi_video_audio", "vs_true_labels/video/nmi"} <= tags


def test_plateau_reclustering_follows_the_heldout_loss(dataset, tmp_path):
    config = PretrainConfig(**{**FAST, "epochs": 4, "epochs_per_round": 3, "recluster": "plateau",
                               "heldout_fraction": 0.34, "patience": 1})
    history = pretrain(dataset, tmp_path / "run", config, log=lambda *_: None)
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert all("heldout_loss" in r and r["clips"] == 4 for r in history)  # 2 of 6 videos held out
    by_round: dict[int, list] = {}
    for r in history:
        by_round.setdefault(r["round"], []).append(r["heldout_loss"])
    for losses in list(by_round.values())[:-1]:  # every finished round ended on the rule
        assert len(losses) >= 2  # the first epoch of a round always improves on nothing
        improved_last = losses[-1] < min(losses[:-1]) - 1e-4
        assert len(losses) == 3 or not improved_last  # the cap, or a stalled held-out loss
    with pytest.raises(ConfigError, match="heldout_fraction"):
        pretrain(dataset, tmp_path / "bad", PretrainConfig(**{**FAST, "recluster": "plateau", "heldout_fraction": 0}),
                 log=lambda *_: None)


def test_presets_are_valid_configurations():
    import yaml
    from pathlib import Path

    import xdc_fast

    for name in ("tiny", "paper"):
        values = yaml.safe_load((Path(xdc_fast.__file__).parent / "configs" / f"{name}.yaml").read_text())
        config = PretrainConfig.from_dict(values)
        assert config.arch == {"tiny": "tiny", "paper": "r2plus1d_18"}[name]


def test_audio_variant_on_silent_data_is_refused(tmp_path):
    from xdc_fast.data.prepare import prepare
    from xdc_fast.data.synthetic import write_media

    for i in range(4):
        write_media(tmp_path / "media" / "c" / f"v{i}.mp4", np.zeros((24, 32, 32, 3), dtype=np.uint8), 12)
    prepare(tmp_path / "media", tmp_path / "ds", workers=1, progress=False)
    with pytest.raises(DatasetError, match="learns from audio"):
        pretrain(tmp_path / "ds", tmp_path / "run", PretrainConfig(**{**FAST, "clusters": 2}), log=lambda *_: None)
    history = pretrain(tmp_path / "ds", tmp_path / "video_only",
                       PretrainConfig(**{**FAST, "clusters": 2, "variant": "sdc-video"}), log=lambda *_: None)
    assert len(history) == 1


def test_cli_config_presets_and_unknown_names(dataset, tmp_path):
    bad = CliRunner().invoke(main, ["pretrain", "--data", str(dataset), "--out", str(tmp_path / "x"),
                                    "--config", "huge"])
    assert bad.exit_code == 2 and "neither a preset" in bad.output


def test_resume_keeps_the_values_the_run_resolved_or_was_given(dataset, tmp_path):
    """An `auto` field on --resume takes the run's value (config.yaml), not a fresh resolution: a run
    begun with clusters 3 (or under older rules) resumes with `clusters: auto` instead of being refused."""
    config = PretrainConfig(**{**FAST, "epochs": 2})
    pretrain(dataset, tmp_path / "run", config, log=lambda *_: None, max_rounds=1)
    lines = []
    resumed = pretrain(dataset, tmp_path / "run", PretrainConfig(**{**FAST, "epochs": 2, "clusters": "auto"}),
                       resume=True, log=lines.append)
    assert len(resumed) == 2 and not any(line.startswith("auto: clusters") for line in lines)
    fresh = []
    pretrain(dataset, tmp_path / "other", PretrainConfig(**{**FAST, "epochs": 1, "clusters": "auto"}), log=fresh.append)
    assert "auto: clusters = 8 (the square root of 6 videos, kept between 8 and 1024)" in fresh


def test_a_run_begun_before_the_inputs_and_heads_were_chosen_resumes_as_it_began(tmp_path):
    import yaml

    from xdc_fast.pretrain import _resolve_auto

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"clusters": 3, "epochs": 2}))  # no video_input in it
    items = [{"id": str(i)} for i in range(6)]
    resumed, _ = _resolve_auto(PretrainConfig(**FAST), items, tmp_path, True, "cpu")
    assert (resumed.video_input, resumed.audio_input, resumed.head) == ("rgb", "logmel", "linear")
    fresh, why = _resolve_auto(PretrainConfig(**FAST), items, tmp_path, False, "cpu")
    assert fresh.video_input == "residual" and "tiny arch's" in why["video_input"]
    assert fresh.head == "mlp" and "tiny arch's" in why["head"]


def test_a_round_with_its_features_on_disk_clusters_as_in_memory(tmp_path):
    """round_features disk: each rank's features go to files, the whitening is fitted from their moments
    and the points are kept in float16; the clusters are those of the round held in memory (NMI >= 0.9;
    measured 1.0 here, distances within 5e-4), and the files are gone once the round is saved."""
    from xdc_fast import metrics
    from xdc_fast.rounds import read_round, round_file

    data = prepared_synthetic(tmp_path, classes=4, videos_per_class=5, seconds=2.0, fps=12, width=48, height=48,
                              seed=6)
    config = {**FAST, "clusters": 4, "pca_dim": 16}
    for store in ("memory", "disk"):
        pretrain(data, tmp_path / store, PretrainConfig(round_features=store, **config), log=lambda *_: None)
    assert not (tmp_path / "disk" / "features").exists()
    rounds = {store: read_round(round_file(tmp_path / store, 0)) for store in ("memory", "disk")}
    for clustering in ("video", "audio"):
        memory, disk = (rounds[s].assignments[clustering] for s in ("memory", "disk"))
        assert metrics.nmi(memory["clip_labels"], disk["clip_labels"]) >= 0.9, clustering
        # Distances and margins are measured for every clip either way (float16 points: close, not equal).
        np.testing.assert_allclose(disk["clip_distance"], memory["clip_distance"], atol=0.005)  # measured 5e-4


def test_auto_keeps_a_round_in_memory_when_it_fits_and_says_so_when_it_does_not(dataset, tmp_path, monkeypatch):
    from xdc_fast import planner

    lines = []
    pretrain(dataset, tmp_path / "fits", PretrainConfig(**FAST), log=lines.append)
    assert not any("round_features disk" in line for line in lines)
    # A machine whose memory holds the streamed round but not the round in memory.
    real = planner.check_fits

    def tight(plan, available=None):
        real(plan, available=0 if plan.features_disk_per_rank == 0 else 10**15)

    monkeypatch.setattr(planner, "check_fits", tight)
    lines.clear()
    pretrain(dataset, tmp_path / "tight", PretrainConfig(**FAST), log=lines.append)
    assert any("round_features disk" in line for line in lines)
    assert (tmp_path / "tight" / "clusters" / "round_000.pt").exists()


def test_colour_jitter_changes_the_training_clips_colours_and_nothing_else(dataset, tmp_path, monkeypatch):
    """Every training step of a jittered run sees the clips of the plain run with each clip's colours
    changed by its own seeded draw (the stream colour_jitter, epoch 0), and the same audio."""
    from xdc_fast import engine
    from xdc_fast.seeds import numpy_rng

    seen = {}
    step = engine.supervised_step

    def recording(model, optimizers, inputs, targets, **kwargs):
        seen.setdefault(current, []).append({m: x.clone() for m, x in inputs.items()})
        return step(model, optimizers, inputs, targets, **kwargs)

    monkeypatch.setattr(engine, "supervised_step", recording)
    for current in (0.0, 0.5):
        pretrain(dataset, tmp_path / f"run{current}", PretrainConfig(variant="xdc", colour_jitter=current,
                                                                      audio_shift=0, **FAST), log=lambda *_: None)
    draws = torch.from_numpy(numpy_rng(0, "colour_jitter", 0, 0).random((6, 4)))
    assert len(seen[0.0]) == len(seen[0.5]) >= 2
    for plain, jittered in zip(seen[0.0], seen[0.5]):
        assert torch.equal(plain["audio"], jittered["audio"])
        assert not torch.allclose(plain["video"], jittered["video"], atol=1e-3)
        # which draw each clip took: the one that maps its plain clip onto its jittered one
        for b in range(len(plain["video"])):
            assert any(torch.allclose(engine.jitter_colours(plain["video"][b:b + 1], draws[i:i + 1], 0.5),
                                      jittered["video"][b:b + 1], atol=1e-5) for i in range(len(draws)))
