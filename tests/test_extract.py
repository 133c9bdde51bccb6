import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast.checkpoint import load_encoder
from xdc_fast.cli import main
from xdc_fast.data.prepare import load_manifest
from xdc_fast.config import ExtractConfig
from xdc_fast.errors import XdcError
from xdc_fast.extract import extract

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome

GEOMETRY = dict(frames=4, resize_short=32, crop=28, audio_seconds=0.5, n_mels=20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("extract"), classes=2, videos_per_class=2, seconds=1.5, fps=8,
                              width=32, height=32, seed=5)


def test_one_row_per_manifest_item_equal_to_the_encoder_on_its_clips(dataset, tmp_path):
    from xdc_fast.data.clips import ClipConfig
    from xdc_fast.data.dataset import ClipDataset

    saved = extract(dataset, tmp_path / "f.pt", ExtractConfig(modality="audio", clips_per_video=3, clip=GEOMETRY),
                    log=lambda *_: None)
    written = torch.load(tmp_path / "f.pt", weights_only=True)
    items = load_manifest(dataset)
    assert written["ids"] == [r["id"] for r in items] and written["features"].shape == (len(items), encoder_dim())
    assert written["labels"].tolist() == [r["label"] for r in items] and written["failed"] == []
    # Oracle: the same random encoder applied clip by clip, averaged per item.
    encoder, _ = load_encoder("random", "audio")
    clips = ClipDataset(dataset, ClipConfig(**GEOMETRY, eval_clips=3), train=False, modalities=("audio",))
    with torch.no_grad():
        expected = torch.stack([encoder.eval()(clips[i]["audio"][None])[0] for i in range(len(clips))])
    assert torch.allclose(written["features"], expected.reshape(len(items), 3, -1).mean(1), atol=1e-5)
    assert np.allclose(saved["features"], written["features"].numpy())


def test_all_clips_as_npz(dataset, tmp_path):
    extract(dataset, tmp_path / "f.npz", ExtractConfig(modality="video", clips_per_video=2, aggregate="all",
                                                       clip=GEOMETRY), log=lambda *_: None)
    written = np.load(tmp_path / "f.npz")
    assert written["features"].shape[:2] == (4, 2) and list(written["ids"]) == [r["id"] for r in load_manifest(dataset)]
    assert np.isfinite(written["features"]).all()


def test_an_undecodable_item_gets_a_nan_row_and_is_listed(dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    items = load_manifest(copy)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    lines = (copy / "manifest.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace(items[0]["path"], str(broken))
    (copy / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    saved = extract(copy, tmp_path / "f.pt", ExtractConfig(modality="video", clips_per_video=2, clip=GEOMETRY),
                    log=lambda *_: None)
    assert saved["failed"] == [items[0]["id"]]
    assert np.isnan(saved["features"][0]).all() and np.isfinite(saved["features"][1:]).all()


def test_bad_output_name_and_cli(dataset, tmp_path):
    with pytest.raises(XdcError, match=r"\.pt or \.npz"):
        extract(dataset, tmp_path / "f.csv", ExtractConfig(clip=GEOMETRY), log=lambda *_: None)
    result = CliRunner().invoke(main, ["extract", "--data", str(dataset), "--out", str(tmp_path / "c.pt"),
                                       "--modality", "audio", "--clips-per-video", "1"])
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "c.pt", weights_only=True)["features"].shape[0] == 4
    result = CliRunner().invoke(main, ["extract", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d.pt")])
    assert result.exit_code == 2 and "no manifest.jsonl" in result.output


def encoder_dim() -> int:
    return load_encoder("random", "audio")[0].feature_dim


def test_config_file_fills_the_clip_geometry(dataset, tmp_path):
    """extract takes --config like pretrain and finetune; a flag still beats the file."""
    import yaml

    (tmp_path / "e.yaml").write_text(yaml.safe_dump({"clip": GEOMETRY, "clips_per_video": 3, "modality": "audio"}))
    result = CliRunner().invoke(main, ["extract", "--data", str(dataset), "--out", str(tmp_path / "c.pt"),
                                       "--config", str(tmp_path / "e.yaml"), "--clips-per-video", "1"])
    assert result.exit_code == 0, result.output
    written = torch.load(tmp_path / "c.pt", weights_only=True)
    assert written["clip"]["n_mels"] == 20 and written["modality"] == "audio" and "x 1 clips" in result.output
