import numpy as np
import pytest
import torch

from xdc_fast.probe import linear_probe, stratified_split, video_accuracy


def test_video_accuracy_averages_softmax_over_clips():
    # Video 0 (label 1): clips disagree, the mean favours class 1. Video 1 (label 0): one confident
    # wrong clip outweighs two mildly right ones, so the video is wrong though most clips are right.
    probabilities = np.array([[0.6, 0.4], [0.1, 0.9], [0.2, 0.8],
                              [0.55, 0.45], [0.55, 0.45], [0.0, 1.0]])
    video_of_clip = np.array([0, 0, 0, 1, 1, 1])
    labels = np.array([1, 0])
    assert video_accuracy(probabilities, video_of_clip, labels) == pytest.approx(0.5)


def test_stratified_split_takes_every_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    test = stratified_split(labels, 0.3, seed=0)
    assert test[:10].sum() == 3 and test[10:15].sum() == 2 and test[15]
    assert np.array_equal(test, stratified_split(labels, 0.3, seed=0))


def test_linear_probe_runs_on_a_prepared_dataset(tmp_path):
    from xdc_fast.data.clips import ClipConfig
    from xdc_fast.data.prepare import prepare
    from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset
    from xdc_fast.models import build_audio_encoder

    make_synthetic_dataset(tmp_path / "m", SyntheticSpec(classes=2, videos_per_class=4, seconds=1.5, fps=8,
                                                         width=32, height=32))
    prepare(tmp_path / "m", tmp_path / "ds", workers=1, progress=False)
    torch.manual_seed(0)
    result = linear_probe(build_audio_encoder("tiny"), tmp_path / "ds", "audio",
                          ClipConfig(audio_seconds=0.5, n_mels=20, eval_clips=2), seed=0, test_fraction=0.25)
    assert result.num_test_videos == 2 and 0.0 <= result.clip_acc <= 1.0 and 0.0 <= result.video_acc <= 1.0
