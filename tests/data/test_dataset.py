import logging
import numpy as np

import pytest
import torch

from xdc_fast.data.clips import ClipConfig, VIDEO_MEAN, VIDEO_STD
from xdc_fast.data.dataset import ClipDataset, collate_clips

from .conftest import SMALL

CONFIG = ClipConfig(frames=4, stride=2, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20)


def test_sample_shapes_and_fields(prepared):
    ds = ClipDataset(prepared, CONFIG, seed=0)
    sample = ds[0]
    assert sample["video"].shape == (3, 4, 32, 32) and sample["video"].dtype == torch.float32
    assert sample["audio"].shape == (1, 20, 51)  # 0.5 s at a 10 ms hop
    assert sample["label"] == ds.items[0]["label"] and sample["index"] == 0
    clip = CONFIG.clip_seconds(SMALL.fps)
    assert 0 <= sample["start"] <= SMALL.seconds - clip


def test_same_seed_and_epoch_give_the_same_clip(prepared):
    a = ClipDataset(prepared, CONFIG, seed=3)
    b = ClipDataset(prepared, CONFIG, seed=3)
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert sa["start"] == sb["start"]
        assert torch.equal(sa["video"], sb["video"]) and torch.equal(sa["audio"], sb["audio"])
    b.set_epoch(1)
    assert [a[i]["start"] for i in range(len(a))] != [b[i]["start"] for i in range(len(b))]


def test_evaluation_clips_are_uniform_and_centre_cropped(prepared):
    ds = ClipDataset(prepared, CONFIG, train=False)
    per = CONFIG.eval_clips
    assert len(ds) == len(ds.items) * per
    starts = [ds[i]["start"] for i in range(per)]
    clip = CONFIG.clip_seconds(SMALL.fps)
    assert starts[0] == 0 and starts[-1] == pytest.approx(SMALL.seconds - clip)
    assert torch.equal(ds[0]["video"], ds[0]["video"])  # no randomness at evaluation


def test_video_normalisation_uses_the_xdc_statistics(prepared):
    ds = ClipDataset(prepared, CONFIG, train=False, modalities=("video",))
    video = ds[0]["video"]
    raw = video * torch.tensor(VIDEO_STD).view(3, 1, 1, 1) + torch.tensor(VIDEO_MEAN).view(3, 1, 1, 1)
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    assert "audio" not in ds[0]


def test_a_broken_file_is_skipped_and_counted(prepared, tmp_path, caplog):
    ds = ClipDataset(prepared, CONFIG, seed=0)
    ds.items = [dict(ds.items[0]), dict(ds.items[1], path=str(tmp_path / "gone.mp4"))]
    with caplog.at_level(logging.WARNING):
        batch = collate_clips([ds[0], ds[1]])
    assert batch["skipped"] == 1 and batch["video"].shape[0] == 1
    assert "gone.mp4" in caplog.text


def test_works_in_a_dataloader_with_workers(prepared):
    ds = ClipDataset(prepared, CONFIG, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    assert sum(b["video"].shape[0] for b in batches) == len(ds)
    serial = collate_clips([ds[i] for i in range(3)])
    assert torch.equal(batches[0]["video"], serial["video"])  # workers do not change the samples


def test_bad_requests(prepared):
    with pytest.raises(ValueError, match="modalities"):
        ClipDataset(prepared, CONFIG, modalities=("smell",))


def test_target_fps_picks_the_frames_shown_at_that_rate(prepared):
    from xdc_fast.data.clips import plan_clip

    record = ClipDataset(prepared, CONFIG).items[0]  # 12 fps source
    plan = plan_clip(record, ClipConfig(frames=5, fps=6.0), start=0.25, rng=None)
    assert plan.frame_indices == (3, 5, 7, 9, 11)  # every other source frame from 0.25 s
    faster = plan_clip(record, ClipConfig(frames=4, fps=24.0), start=0.0, rng=None)
    assert faster.frame_indices == (0, 0, 1, 1)  # above the source rate, frames repeat


def test_video_to_tensor_crops_flips_and_normalises_as_a_float64_reference():
    from xdc_fast.data.clips import video_to_tensor

    frames = np.random.default_rng(4).integers(0, 256, size=(5, 20, 30, 3), dtype=np.uint8)
    for top, left, flip in [(0, 0, False), (3, 11, True), (4, 14, False)]:
        got = video_to_tensor(frames, 16, top, left, flip).double().numpy()
        patch = frames[:, top:top + 16, left:left + 16].astype(np.float64) / 255.0
        if flip:
            patch = patch[:, :, ::-1]
        expected = (patch - np.array(VIDEO_MEAN)) / np.array(VIDEO_STD)  # [T, H, W, C]
        np.testing.assert_allclose(got, expected.transpose(3, 0, 1, 2), atol=1e-6)
