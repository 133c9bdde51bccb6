import logging

import numpy as np
import pytest
import torch

from xdc_fast.data.clips import VIDEO_MEAN, VIDEO_STD, ClipConfig
from xdc_fast.data.dali_backend import dali_available
from xdc_fast import engine
from xdc_fast.engine import make_loader
from xdc_fast.errors import LoaderError
from xdc_fast.data.dataset import ClipDataset, collate_clips
from xdc_fast.data.prepare import prepare
from xdc_fast.data.synthetic import SyntheticSpec, indexed_frames, make_synthetic_dataset, read_index, write_media

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali-cuda130 is not installed")


@pytest.fixture(scope="module")
def vp9_dataset(tmp_path_factory):
    # DALI's CPU decoder reads VP9 (not H.264): the same graph as on the GPU, testable here.
    root = tmp_path_factory.mktemp("vp9")
    make_synthetic_dataset(root / "media", SyntheticSpec(classes=2, videos_per_class=2, seconds=2.0, fps=12,
                                                         width=64, height=48, codec="vp9", seed=3))
    prepare(root / "media", root / "dataset", workers=1, progress=False)
    return root / "dataset"


@pytest.fixture(scope="module")
def indexed_vp9(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    audio = np.zeros((1, 16000 * 3), dtype=np.float32)
    write_media(root / "media" / "indexed.webm", indexed_frames(75, height=96, width=96), 25, audio, 16000,
                codec="vp9", keyframe_interval=25)
    prepare(root / "media", root / "dataset", workers=1, progress=False)
    return root / "dataset"


def _dali(dataset, batch_size=2):
    return make_loader(dataset, batch_size, loader="dali", device="cpu", workers=1)


@needs_dali
def test_dali_frames_are_the_planned_frames(indexed_vp9):
    config = ClipConfig(frames=6, stride=3, resize_short=96, crop=96, audio_seconds=0.5, eval_clips=5)
    ds = ClipDataset(indexed_vp9, config, train=False)
    mean = torch.tensor(VIDEO_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(VIDEO_STD).view(3, 1, 1, 1)
    for batch in _dali(ds):
        for video, index in zip(batch["video"], batch["index"].tolist()):
            _, plan = ds.plan(index)
            pixels = ((video * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy()
            assert [read_index(f) for f in pixels] == [min(i, 74) for i in plan.frame_indices]


@needs_dali
@pytest.mark.parametrize("train", [False, True])
def test_dali_cpu_matches_pyav(vp9_dataset, train):
    """Same clips, crops, flips and gains: video within resize/colour-conversion rounding (mean abs
    difference under 0.06 of a normalised unit, about 3/255 of a pixel), log-mel within 1e-3."""
    config = ClipConfig(frames=4, stride=2, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20, eval_clips=3)
    ds = ClipDataset(vp9_dataset, config, train=train, seed=1)
    seen = 0
    for batch in _dali(ds):
        reference = collate_clips([ds[i] for i in batch["index"].tolist()])
        assert batch["video"].shape == reference["video"].shape
        assert batch["audio"].shape == reference["audio"].shape
        assert float((batch["video"] - reference["video"]).abs().mean()) < 0.06
        assert float((batch["audio"] - reference["audio"]).abs().max()) < 1e-3
        assert torch.equal(batch["label"], reference["label"])
        seen += len(batch["index"])
    assert seen == len(ds)


def test_auto_falls_back_to_pyav_with_one_line(prepared, caplog, monkeypatch):
    monkeypatch.setattr(engine, "_ANNOUNCED", set())
    ds = ClipDataset(prepared, ClipConfig(frames=2, resize_short=32, crop=32, audio_seconds=0.5), seed=0)
    with caplog.at_level(logging.INFO, logger="xdc_fast.engine"):
        loader = make_loader(ds, 2, loader="auto", device="cpu", workers=0)
        make_loader(ds, 2, loader="auto", device="cpu", workers=0)  # said once, not once per epoch
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert [r.getMessage() for r in caplog.records if "loader:" in r.getMessage()] == \
        ["loader: PyAV (auto), because the device is not CUDA, where PyAV's workers outrun DALI's CPU graph"] \
        if dali_available() else \
        ["loader: PyAV (auto), because DALI is not installed; pip install nvidia-dali-cuda130"]
    batch = next(iter(loader))
    assert batch["video"].shape[0] == 2


@pytest.mark.skipif(dali_available(), reason="only without DALI")
def test_asking_for_dali_without_it_is_a_clear_error(prepared):
    ds = ClipDataset(prepared, ClipConfig(frames=2, resize_short=32, crop=32), seed=0)
    with pytest.raises(LoaderError, match="not installed"):
        make_loader(ds, 2, loader="dali", device="cpu")


# ---- on a GPU: H.264 on NVDEC (the codec of most datasets; DALI's CPU graph cannot read it) --------------

@pytest.fixture(scope="module")
def indexed_h264(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed_h264")
    audio = np.zeros((1, 16000 * 3), dtype=np.float32)
    write_media(root / "media" / "indexed.mp4", indexed_frames(75, height=96, width=96), 25, audio, 16000,
                codec="h264", keyframe_interval=25)
    prepare(root / "media", root / "dataset", workers=1, progress=False)
    return root / "dataset"


@pytest.fixture(scope="module")
def h264_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("h264")
    make_synthetic_dataset(root / "media", SyntheticSpec(classes=2, videos_per_class=2, seconds=2.0, fps=12,
                                                         width=64, height=48, codec="h264", seed=3))
    prepare(root / "media", root / "dataset", workers=1, progress=False)
    return root / "dataset"


def _nvdec(dataset, batch_size=2):
    return make_loader(dataset, batch_size, loader="dali", device="cuda", workers=2)


@needs_dali
@pytest.mark.cuda
def test_nvdec_h264_frames_are_the_planned_frames(indexed_h264):
    config = ClipConfig(frames=6, stride=3, resize_short=96, crop=96, audio_seconds=0.5, eval_clips=5)
    ds = ClipDataset(indexed_h264, config, train=False)
    mean = torch.tensor(VIDEO_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(VIDEO_STD).view(3, 1, 1, 1)
    for batch in _nvdec(ds):
        assert batch["video"].is_cuda
        for video, index in zip(batch["video"].cpu(), batch["index"].tolist()):
            _, plan = ds.plan(index)
            pixels = ((video * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy()
            assert [read_index(f) for f in pixels] == [min(i, 74) for i in plan.frame_indices]


@needs_dali
@pytest.mark.cuda
@pytest.mark.parametrize("modalities", [("video", "audio"), ("video",), ("audio",)])
def test_nvdec_h264_matches_pyav_within_the_cpu_graphs_tolerance(h264_dataset, modalities):
    config = ClipConfig(frames=4, stride=2, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20, eval_clips=3)
    ds = ClipDataset(h264_dataset, config, train=True, seed=1, modalities=modalities)
    seen = 0
    for batch in _nvdec(ds):
        reference = collate_clips([ds[i] for i in batch["index"].tolist()])
        if "video" in modalities:
            assert float((batch["video"].cpu() - reference["video"]).abs().mean()) < 0.06
        if "audio" in modalities:
            assert float((batch["audio"].cpu() - reference["audio"]).abs().max()) < 1e-3
        seen += len(batch["index"])
    assert seen == len(ds)


@pytest.fixture(scope="module")
def indexed_h264_vp9_shards(tmp_path_factory):
    """Long-GOP H.264 with B-frames (which DALI's CPU decoder cannot read) sharded as VP9 (which it can)."""
    from xdc_fast.data.shards import write_shards

    root = tmp_path_factory.mktemp("h264-to-vp9")
    audio = np.random.default_rng(0).normal(0, 0.1, size=(1, 16000 * 3)).astype(np.float32)
    write_media(root / "media" / "indexed.mp4", indexed_frames(75, height=96, width=96), 25, audio, 16000,
                codec="h264", keyframe_interval=250)
    prepare(root / "media", root / "dataset", workers=1, progress=False)
    write_shards(root / "dataset", short_side=96, gop=12, crf=4, codec="libvpx-vp9", progress=False)
    return root / "dataset"


@needs_dali
def test_dali_reads_vp9_shards_of_h264_footage_frame_for_frame(indexed_h264_vp9_shards):
    config = ClipConfig(frames=6, stride=3, resize_short=96, crop=96, audio_seconds=0.5, eval_clips=5)
    ds = ClipDataset(indexed_h264_vp9_shards, config, train=False)
    assert ds.shards is not None and ds.shards.video_codec == "vp9"
    files = ClipDataset(indexed_h264_vp9_shards, config, train=False, media="files")
    mean = torch.tensor(VIDEO_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(VIDEO_STD).view(3, 1, 1, 1)
    seen = 0
    for batch in _dali(ds):
        assert batch["skipped"] == 0
        for video, audio, index in zip(batch["video"], batch["audio"], batch["index"].tolist()):
            _, plan = ds.plan(index)
            pixels = ((video * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy()
            assert [read_index(f) for f in pixels] == [min(i, 74) for i in plan.frame_indices]
            # The audio comes from the shard's WAV, the extracted one byte for byte: PyAV's log-mel of the
            # original file agrees as on files.
            assert torch.allclose(audio, files[index]["audio"], atol=1e-3)
            seen += 1
    assert seen == len(ds)


@needs_dali
def test_several_pipelines_give_the_batches_of_one_in_the_same_order(vp9_dataset):
    config = ClipConfig(frames=4, stride=2, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20)
    ds = ClipDataset(vp9_dataset, config, train=True, seed=5)
    order = [3, 1, 0, 2, 2, 1, 3]
    one = list(make_loader(ds, 2, loader="dali", device="cpu", workers=1, indices=order, dali_pipelines=1))
    three = make_loader(ds, 2, loader="dali", device="cpu", workers=1, indices=order, dali_pipelines=3)
    assert three.pipelines == 3
    for _ in range(2):  # a second pass rebuilds the pipelines and gives the same batches again
        batches = list(three)
        assert [b["index"].tolist() for b in batches] == [[3, 1], [0, 2], [2, 1], [3]]
        for a, b in zip(one, batches):
            assert torch.equal(a["index"], b["index"])
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])


@needs_dali
def test_h264_shards_are_refused_by_the_cpu_graph_in_one_line(tmp_path, prepared):
    import shutil

    from xdc_fast.data.shards import write_shards

    dataset = tmp_path / "dataset"
    shutil.copytree(prepared, dataset)
    write_shards(dataset, short_side=40, gop=8, progress=False)
    ds = ClipDataset(dataset, ClipConfig(frames=4, stride=2, resize_short=40, crop=32))
    with pytest.raises(LoaderError, match="DALI's CPU decoder reads vp8/vp9/mjpeg only, and this dataset holds h264"):
        make_loader(ds, 2, loader="dali", device="cpu", workers=1)
