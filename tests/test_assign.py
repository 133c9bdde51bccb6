"""``xdc-fast assign``: new videos mapped to a round's clusters, checked against the round itself and
against an independent float64 nearest-centroid computation on features from ``extract``."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast.assign import assign
from xdc_fast.cli import main
from xdc_fast.config import PretrainConfig
from xdc_fast.pretrain import pretrain

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome

CLIP = dict(frames=4, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20)
# cdc clusters video, audio and their concatenation: every kind of clustering a round can keep.
RUN = dict(variant="cdc", clusters=3, epochs=2, epochs_per_round=1, batch_size=4, pca_dim=4, clip=CLIP)
MEDIA = dict(classes=3, videos_per_class=2, seconds=2.0, fps=12, width=48, height=48)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-round run (round 1 clusters with the encoders at the end of round 0) and its dataset."""
    root = tmp_path_factory.mktemp("assign")
    dataset = prepared_synthetic(root / "train", **MEDIA, seed=2)
    pretrain(dataset, root / "run", PretrainConfig(**RUN), log=lambda *_: None)
    return root / "run", dataset


@pytest.fixture(scope="module")
def new_videos(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("new"), **MEDIA, seed=7)


def saved_round(run_dir, round_index):
    return torch.load(run_dir / "clusters" / f"round_{round_index:03d}.pt", weights_only=True)


@pytest.mark.parametrize("round_index", [0, 1])
def test_assign_on_the_training_videos_gives_back_the_rounds_assignments(run, tmp_path, round_index):
    run_dir, dataset = run
    result = assign(run_dir, dataset, tmp_path / "a.json", round_index, device="cpu", log=lambda *_: None)
    saved = saved_round(run_dir, round_index)
    assert result["clusterings"] == ["video", "audio", "concat"]
    assert [v["id"] for v in result["videos"]] == saved["ids"]
    assert result["encoders"] == ("checkpoints/init.pt" if round_index == 0 else "checkpoints/round_000.pt")
    for name in result["clusterings"]:
        assert result["clips"][name]["cluster"] == saved[f"{name}_clip_labels"].tolist(), name
        assert [v[name]["cluster"] for v in result["videos"]] == saved[f"{name}_video_labels"].tolist(), name
        np.testing.assert_allclose([v[name]["margin"] for v in result["videos"]], saved[f"{name}_video_margin"],
                                   atol=1e-5)
    assert json.loads((tmp_path / "a.json").read_text()) == result


def test_a_balanced_rounds_assignments_come_back_from_assign(tmp_path):
    """A round labelled by the balanced assignment keeps its offsets: assign reproduces its labels, which
    the nearest centroid alone need not."""
    dataset = prepared_synthetic(tmp_path / "data", **MEDIA, seed=2)
    run_dir = tmp_path / "run"
    pretrain(dataset, run_dir, PretrainConfig(**{**RUN, "epochs": 1, "assignment": "balanced"}), log=lambda *_: None)
    saved = saved_round(run_dir, 0)
    result = assign(run_dir, dataset, tmp_path / "a.json", 0, device="cpu", log=lambda *_: None)
    for name in result["clusterings"]:
        assert saved["clusterings"][name]["offsets"].shape == (RUN["clusters"],)
        assert result["clips"][name]["cluster"] == saved[f"{name}_clip_labels"].tolist(), name
        assert max(np.bincount(saved[f"{name}_clip_labels"].numpy())) <= 5  # 12 clips in 3 clusters of about 4


def test_assign_on_new_videos_equals_nearest_centroids_of_extracted_features(run, new_videos, tmp_path):
    """The oracle: per-clip features from `extract` with the round's encoder checkpoint, whitened with the
    saved mean and projection and assigned to the saved centroids in float64 numpy."""
    from xdc_fast.config import ExtractConfig
    from xdc_fast.extract import extract

    run_dir, _ = run
    result = assign(run_dir, new_videos, tmp_path / "new.json", 1, device="cpu", log=lambda *_: None)
    saved = saved_round(run_dir, 1)
    cpv = saved["clips_per_video"]
    features = {m: extract(new_videos, tmp_path / f"{m}.pt",
                           ExtractConfig(checkpoint=str(run_dir / saved["encoders"]), modality=m,
                                         clips_per_video=cpv, aggregate="all", batch_size=3),
                           log=lambda *_: None)["features"]
                for m in ("video", "audio")}
    features = {m: f.reshape(-1, f.shape[-1]) for m, f in features.items()}  # [videos x clips, dim], video-major
    assert result["k"] == 3 and len(result["videos"]) == 6
    for name, clustering in saved["clusterings"].items():
        raw = np.concatenate([features[m] for m in clustering["inputs"]], axis=1).astype(np.float64)
        white = (raw - clustering["mean"].numpy()) @ clustering["projection"].numpy()
        white /= np.linalg.norm(white, axis=1, keepdims=True)
        d = ((white[:, None] - clustering["centroids"].double().numpy()[None]) ** 2).sum(-1)
        assert result["clips"][name]["cluster"] == d.argmin(1).tolist(), name
        np.testing.assert_allclose(result["clips"][name]["distance"], d.min(1), rtol=1e-4, atol=1e-6)
        votes = d.argmin(1).reshape(-1, cpv)
        assert [v[name]["cluster"] for v in result["videos"]] == [int(np.bincount(r).argmax()) for r in votes]


def test_csv_has_one_row_per_video(run, tmp_path):
    run_dir, dataset = run
    result = CliRunner().invoke(main, ["assign", "--run", str(run_dir), "--data", str(dataset), "--out",
                                       str(tmp_path / "a.csv"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0].split(",")[:5] == ["id", "label", "video_cluster", "video_distance", "video_margin"]
    assert len(lines) == 7
    last = saved_round(run_dir, 1)  # the default round is the last one
    assert [int(line.split(",")[8]) for line in lines[1:]] == last["concat_video_labels"].tolist()


def cli_error(args):
    result = CliRunner().invoke(main, ["assign", *args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: ")
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_a_run_without_saved_transforms_is_a_clear_error(run, tmp_path):
    run_dir, dataset = run
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    state = saved_round(old, 1)
    kept = ("ids", "clips_per_video", "centroids")  # what a round file held before transforms were kept
    torch.save({k: v for k, v in state.items() if k in kept or k.endswith("_labels")},
               old / "clusters" / "round_001.pt")
    message = cli_error(["--run", str(old), "--data", str(dataset), "--out", str(tmp_path / "x.json")])
    assert "round_001.pt holds no PCA-whitening transforms" in message
    (old / "checkpoints" / "init.pt").unlink()  # round 0 still has its transforms, but not its encoders
    message = cli_error(["--run", str(old), "--round", "0", "--data", str(dataset), "--out", str(tmp_path / "x.json")])
    assert "checkpoints/init.pt does not exist" in message
    assert not (tmp_path / "x.json").exists()


def test_a_dataset_with_other_clip_geometry_is_a_clear_error(run, tmp_path):
    from xdc_fast.data.prepare import prepare

    run_dir, dataset = run
    media = dataset.parent / "media"
    prepare(media, tmp_path / "ds8k", sample_rate=8000, workers=1, progress=False)
    message = cli_error(["--run", str(run_dir), "--data", str(tmp_path / "ds8k"), "--out", str(tmp_path / "x.json")])
    assert "clip geometry" in message and "8000 Hz" in message and "--sample-rate 16000" in message
    message = cli_error(["--run", str(run_dir), "--data", str(dataset), "--out", str(tmp_path / "x.txt")])
    assert ".json or .csv" in message


def test_under_torchrun_two_ranks_write_what_one_process_writes(run, tmp_path):
    run_dir, dataset = run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "xdc_fast.cli", "assign", str(run_dir), "--data",
               str(dataset), "--out", str(tmp_path / "ddp.json"), "--device", "cpu"]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    one = assign(run_dir, dataset, tmp_path / "one.json", device="cpu", log=lambda *_: None)
    for name in one["clusterings"]:
        assert ddp["clips"][name]["cluster"] == one["clips"][name]["cluster"]
        assert [v[name]["cluster"] for v in ddp["videos"]] == [v[name]["cluster"] for v in one["videos"]]
