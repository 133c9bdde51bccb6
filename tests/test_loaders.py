"""``--loader auto|pyav|dali`` on the commands: DALI's CPU graph (VP9 media) against PyAV, the fallbacks.

DALI and PyAV decode the same clip plans; only resizing, colour conversion and spectrogram arithmetic
differ (the backend parity test bounds the inputs: video mean |difference| < 0.06 normalised units,
log-mel max |difference| < 1e-3). Through an encoder those become the feature tolerances used here:
video features within 10% (relative L2 over all clips; measured 2.6% for a random tiny encoder, whose
first layers pass input noise on roughly in proportion) and every clip's video feature at cosine > 0.99;
audio features within 1e-4 relative (measured 6e-7). The video encoders are fed frames: differences of
consecutive frames (the tiny default) double the decoders' pixel noise against what moves, which says nothing
of whether the two loaders read the same clips.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast import engine
from xdc_fast.cli import main
from xdc_fast.data import dali_backend
from xdc_fast.data.clips import ClipConfig
from xdc_fast.data.dataset import ClipDataset, collate_clips
from xdc_fast.errors import LoaderError

needs_dali = pytest.mark.skipif(not dali_backend.dali_available(), reason="nvidia-dali-cuda130 is not installed")
GEOMETRY = dict(frames=4, stride=2, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20)
VIDEO_RELATIVE, VIDEO_COSINE, AUDIO_RELATIVE = 0.10, 0.99, 1e-4


@pytest.fixture(scope="module")
def vp9(tmp_path_factory):
    """Three classes of two VP9 + Opus videos (DALI's CPU decoder reads VP9, not H.264)."""
    return prepared_synthetic(tmp_path_factory.mktemp("vp9"), classes=3, videos_per_class=2, seconds=2.0, fps=12,
                              width=48, height=48, codec="vp9", seed=2)


@pytest.fixture(scope="module")
def h264(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("h264"), classes=2, videos_per_class=2, seconds=2.0, fps=12,
                              width=48, height=48, seed=2)


@pytest.fixture
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(engine, "_ANNOUNCED", set())


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for m in a:
        assert a[m].shape == b[m].shape
        relative = np.linalg.norm(a[m] - b[m]) / np.linalg.norm(a[m])
        if m == "video":
            assert relative < VIDEO_RELATIVE
            cosine = (a[m] * b[m]).sum(1) / np.linalg.norm(a[m], axis=1) / np.linalg.norm(b[m], axis=1)
            assert cosine.min() > VIDEO_COSINE
        else:
            assert relative < AUDIO_RELATIVE


def _config_file(tmp_path, **values) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"clip": GEOMETRY, "video_input": "rgb", **values}))
    return str(path)


# ---- the commands with DALI's CPU graph -----------------------------------------------------------------

@needs_dali
def test_pretrain_with_dali_runs_two_rounds_on_the_features_pyav_gives(vp9, tmp_path):
    from xdc_fast.config import PretrainConfig
    from xdc_fast.pretrain import build_encoders, prepare_run_data
    from xdc_fast.variants import variant
    from xdc_fast.seeds import seed_for

    settings = dict(clusters=3, epochs=2, epochs_per_round=1, batch_size=4, pca_dim=0)
    result = CliRunner().invoke(main, ["pretrain", "--data", str(vp9), "--out", str(tmp_path / "run"),
                                       "--config", _config_file(tmp_path, **settings), "--loader", "dali",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1] and all(r["clips"] == 6 and r["skipped"] == 0 for r in lines)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["loader"] == "dali"
    # What round 0 clustered: the initial encoders on the fixed clips, decoded by either loader.
    config = PretrainConfig(**settings, clip=GEOMETRY)
    data = prepare_run_data(vp9, config, variant("xdc"))
    torch.manual_seed(seed_for(config.seed, "encoders"))
    encoders = build_encoders(variant("xdc"), config.resolved_arch("cpu"), "rgb")
    cpu = torch.device("cpu")
    pyav, rows_pyav = engine.encode_clips(encoders, data.fixed_clips, 4, cpu, loader="pyav", gather=False)
    dali, rows_dali = engine.encode_clips(encoders, data.fixed_clips, 4, cpu, loader="dali", gather=False)
    assert np.array_equal(rows_pyav, rows_dali) and len(rows_dali) == 6 * config.clips_per_video
    _close(pyav, dali)


@needs_dali
def test_linear_probe_with_dali_scores_like_pyav(vp9, tmp_path):
    runs = {}
    for loader in ("pyav", "dali"):
        result = CliRunner().invoke(main, ["finetune", "--data", str(vp9), "--out", str(tmp_path / loader),
                                           "--mode", "linear", "--test-clips", "2", "--loader", loader,
                                           "--device", "cpu", "--config", _config_file(tmp_path, train_clips=2)])
        assert result.exit_code == 0, result.output
        runs[loader] = (json.loads((tmp_path / loader / "metrics.json").read_text()),
                        torch.load(tmp_path / loader / "features.pt", weights_only=True))
    (metrics_pyav, features_pyav), (metrics_dali, features_dali) = runs["pyav"], runs["dali"]
    assert metrics_dali["num_test_clips"] == metrics_pyav["num_test_clips"]
    assert metrics_dali["config"]["loader"] == "dali"
    _close({"video": features_pyav["features"].numpy()}, {"video": features_dali["features"].numpy()})
    # Six test clips: features this close leave the probe's calls alone, or move one clip at most.
    assert abs(metrics_dali["clip_acc"] - metrics_pyav["clip_acc"]) <= 1 / metrics_pyav["num_test_clips"] + 1e-9


@needs_dali
@pytest.mark.parametrize("modality", ["video", "audio"])
def test_extract_with_dali_gives_pyavs_features(vp9, tmp_path, modality):
    saved = {}
    for loader in ("pyav", "dali"):
        result = CliRunner().invoke(main, ["extract", "--data", str(vp9), "--out", str(tmp_path / f"{loader}.pt"),
                                           "--modality", modality, "--clips-per-video", "2", "--loader", loader,
                                           "--device", "cpu", "--config", _config_file(tmp_path)])
        assert result.exit_code == 0, result.output
        saved[loader] = torch.load(tmp_path / f"{loader}.pt", weights_only=True)
    assert saved["dali"]["ids"] == saved["pyav"]["ids"] and not saved["dali"]["failed"]
    _close({modality: saved["pyav"]["features"].numpy()}, {modality: saved["dali"]["features"].numpy()})


# ---- one modality, and a clip DALI cannot decode ----------------------------------------------------------

@needs_dali
@pytest.mark.parametrize("modalities", [("video",), ("audio",)])
def test_dali_serves_one_modality_like_pyav(vp9, modalities):
    ds = ClipDataset(vp9, ClipConfig(**GEOMETRY, eval_clips=2), train=False, modalities=modalities)
    seen = 0
    for batch in engine.make_loader(ds, 4, loader="dali", device="cpu", workers=1):
        reference = collate_clips([ds[i] for i in batch["index"].tolist()])
        assert set(batch) == set(reference)
        (m,) = modalities
        assert batch[m].shape == reference[m].shape
        if m == "video":
            assert float((batch[m] - reference[m]).abs().mean()) < 0.06
        else:
            assert float((batch[m] - reference[m]).abs().max()) < 1e-3
        assert torch.equal(batch["label"], reference["label"]) and batch["start"].dtype == reference["start"].dtype
        seen += len(batch["index"])
    assert seen == len(ds)


@needs_dali
def test_a_clip_dali_cannot_decode_falls_back_to_pyav_and_the_epoch_goes_on(vp9, tmp_path, caplog):
    ds = ClipDataset(vp9, ClipConfig(**GEOMETRY, eval_clips=2), train=False)
    broken = tmp_path / "broken.webm"
    broken.write_bytes(open(ds.items[2]["path"], "rb").read()[:300])  # the header alone: no frame decodes
    ds.items = [*ds.items[:2], {**ds.items[2], "path": str(broken)}, *ds.items[3:]]
    with caplog.at_level(logging.WARNING):
        batches = list(engine.make_loader(ds, 3, loader="dali", device="cpu", workers=1))
    # Batch 1 holds a clip of video 1 and both of video 2: DALI fails on it, PyAV decodes the first and
    # fails on the others, which are counted as PyAV counts them; the batches after it are DALI's again.
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3], [6, 7, 8], [9, 10, 11]]
    assert [b["skipped"] for b in batches] == [0, 2, 0, 0]
    assert all(set(b) == {"index", "label", "start", "skipped", "video", "audio"} for b in batches)
    assert sum("DALI could not decode a batch of 3 clips" in r.getMessage() for r in caplog.records) == 1
    reference = collate_clips([ds[3]])
    assert torch.equal(batches[1]["video"], reference["video"]) and torch.equal(batches[1]["audio"], reference["audio"])


@needs_dali
def test_dali_failing_on_every_batch_hands_the_rest_to_pyav_once(vp9, tmp_path, caplog):
    ds = ClipDataset(vp9, ClipConfig(**GEOMETRY, eval_clips=1), train=False, modalities=("audio",))
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF" + bytes(40))  # no audio DALI (or PyAV) can read
    ds.items = [{**r, "audio": str(broken)} for r in ds.items]  # root / absolute path = the absolute path
    loader = engine.make_loader(ds, 1, loader="dali", device="cpu", workers=1)
    with caplog.at_level(logging.WARNING):
        batches = list(loader) + list(loader)
    assert [b["skipped"] for b in batches] == [1] * 12 and not any("index" in b for b in batches)
    assert sum("DALI could not decode" in r.getMessage() for r in caplog.records) == loader.GIVE_UP
    assert sum("PyAV decodes the rest" in r.getMessage() for r in caplog.records) == 1


# ---- without DALI, and what DALI's CPU graph cannot do --------------------------------------------------

def test_without_dali_auto_falls_back_in_one_line_and_dali_is_one_clear_error(vp9, tmp_path, monkeypatch,
                                                                             fresh_announcements):
    monkeypatch.setattr(dali_backend, "dali_available", lambda: False)
    result = CliRunner().invoke(main, ["extract", "--data", str(vp9), "--out", str(tmp_path / "a.pt"),
                                       "--clips-per-video", "1", "--loader", "auto", "--device", "cpu",
                                       "--config", _config_file(tmp_path)])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if line.startswith("loader:")]
    assert said == ["loader: PyAV (auto), because DALI is not installed; pip install nvidia-dali-cuda130"]
    result = CliRunner().invoke(main, ["extract", "--data", str(vp9), "--out", str(tmp_path / "b.pt"),
                                       "--clips-per-video", "1", "--loader", "dali", "--device", "cpu",
                                       "--config", _config_file(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == \
        "Error: --loader dali: DALI is not installed; pip install nvidia-dali-cuda130"


def test_auto_on_the_cpu_keeps_pyav(vp9, fresh_announcements, caplog):
    ds = ClipDataset(vp9, ClipConfig(**GEOMETRY, eval_clips=1), train=False)
    with caplog.at_level(logging.INFO, logger="xdc_fast.engine"):
        loader = engine.make_loader(ds, 2, loader="auto", device=torch.device("cpu"))
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("loader:")] == \
        [("loader: PyAV (auto), because the device is not CUDA, where PyAV's workers outrun DALI's CPU graph"
          if dali_backend.dali_available() else
          "loader: PyAV (auto), because DALI is not installed; pip install nvidia-dali-cuda130")]


@needs_dali
def test_h264_with_dali_on_the_cpu_is_one_clear_error(h264, tmp_path):
    ds = ClipDataset(h264, ClipConfig(**GEOMETRY), train=True)
    with pytest.raises(LoaderError, match="h264"):
        engine.make_loader(ds, 2, loader="dali", device="cpu")
    result = CliRunner().invoke(main, ["pretrain", "--data", str(h264), "--out", str(tmp_path / "run"),
                                       "--config", _config_file(tmp_path, clusters=2, epochs=1, pca_dim=0),
                                       "--loader", "dali", "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: DALI's CPU decoder reads vp8/vp9/mjpeg only") and "h264" in line
    assert "--loader pyav" in line and "--device cuda" in line
    # An audio-only request never touches the video, so the codec does not matter.
    audio = ClipDataset(h264, ClipConfig(**GEOMETRY), train=True, modalities=("audio",))
    assert isinstance(engine.make_loader(audio, 2, loader="dali", device="cpu"), dali_backend.DaliClipLoader)
