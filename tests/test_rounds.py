"""The run folder's names and the round file, written and read back."""

import numpy as np
import pytest
import torch

from xdc_fast.cluster import fit_whitening
from xdc_fast.errors import XdcError
from xdc_fast.rounds import (RoundFile, checkpoint_path, encoders_of_round, load_round, load_saved_labels, read_round,
                             round_file, round_path)


def test_a_round_file_without_transforms_is_refused_by_name(tmp_path):
    (tmp_path / "clusters").mkdir()
    path = round_file(tmp_path, 2)
    RoundFile(["a", "b"], 1, [torch.zeros(1, 2, 3)], {"video": {"clip_labels": np.array([0, 1]),
                                                               "video_labels": np.array([0, 1])}}).save(path)
    assert round_path(tmp_path) == path
    with pytest.raises(XdcError, match=r"round_002\.pt holds no PCA-whitening transforms"):
        load_round(path)
    with pytest.raises(XdcError, match=r"round_005\.pt does not exist \(.* has rounds 2\.\.2\)"):
        round_path(tmp_path, 5)


def test_a_round_file_reads_back_as_written(tmp_path):
    """Every field survives torch.save with weights_only (what a user's torch.load allows), and a
    format-2 file keeps its whitening exactly."""
    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.normal(size=(20, 6)).astype(np.float32))
    whitening = fit_whitening(points, 3)
    labels = {"clip_labels": rng.integers(0, 4, 20), "video_labels": rng.integers(0, 4, 10),
              "clip_distance": rng.random(20, dtype=np.float32), "clip_margin": rng.random(20, dtype=np.float32),
              "video_distance": rng.random(10, dtype=np.float32), "video_margin": rng.random(10, dtype=np.float32)}
    written = RoundFile([f"v{i}" for i in range(10)], 2, [torch.randn(1, 4, 3)], {"video": labels}, 3, "sdc-video",
                        {"frames": 8}, 3, encoders_of_round(3), "ab" * 32,
                        {"video": {"inputs": ["video"], "whitening": whitening, "centroids": torch.randn(4, 3),
                                   "offsets": torch.rand(4)}})
    path = round_file(tmp_path, 3)
    path.parent.mkdir()
    written.save(path)
    back = load_round(path)
    assert back.path == path and back.k == 4 and back.encoders == "checkpoints/round_002.pt"
    for name in ("ids", "clips_per_video", "round", "variant", "clip", "pca_dim", "encoders_sha256"):
        assert getattr(back, name) == getattr(written, name)
    for key, value in labels.items():
        assert np.array_equal(back.assignments["video"][key], value)
    again = back.clusterings["video"]["whitening"]
    assert torch.equal(again.projection, whitening.projection) and torch.equal(again.mean, whitening.mean)
    assert torch.equal(back.clusterings["video"]["offsets"], written.clusterings["video"]["offsets"])
    assert read_round(path).to_dict().keys() == written.to_dict().keys()


def test_saved_labels_follow_the_ids_asked_for(tmp_path):
    path = tmp_path / "round_000.pt"
    RoundFile(["a", "b", "c"], 1, [], {"audio": {"clip_labels": np.array([5, 6, 7]),
                                                  "video_labels": np.array([5, 6, 7])}}).save(path)
    assert load_saved_labels(path, ["c", "a"])["audio"].tolist() == [7, 5]
    with pytest.raises(XdcError, match="no assignment for 1 item"):
        load_saved_labels(path, ["a", "z"])


def test_run_folder_names():
    assert checkpoint_path("run").as_posix() == "run/checkpoints/last.pt"
    assert checkpoint_path("run", "init").as_posix() == "run/checkpoints/init.pt"
    assert checkpoint_path("run", 7).as_posix() == "run/checkpoints/round_007.pt"
    assert encoders_of_round(0) == "checkpoints/init.pt" and encoders_of_round(2) == "checkpoints/round_001.pt"
