import numpy as np
import torch

from xdc_fast.data.clips import ClipConfig
from xdc_fast.data.dataset import ClipDataset
import pytest

from xdc_fast.data.synthetic import CLASS_PITCH, SyntheticSpec, class_names, make_synthetic_dataset

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome



def test_same_seed_same_media(tmp_path):
    spec = SyntheticSpec(classes=2, videos_per_class=1, seconds=1.0, fps=8, width=32, height=32, seed=5)
    a = make_synthetic_dataset(tmp_path / "a", spec)
    b = make_synthetic_dataset(tmp_path / "b", spec)
    for pa, pb in zip(a, b):
        assert pa.relative_to(tmp_path / "a") == pb.relative_to(tmp_path / "b")
        assert pa.read_bytes() == pb.read_bytes()
    c = make_synthetic_dataset(tmp_path / "c", SyntheticSpec(**{**spec.__dict__, "seed": 6}))
    assert c[0].read_bytes() != a[0].read_bytes()


def test_both_modalities_carry_the_class(prepared):
    """Each video's strongest frequency is its class's pitch, and its shape moves; colours are nuisance."""
    import wave

    from xdc_fast.data.prepare import load_manifest
    from xdc_fast.data.synthetic import CLASS_NAMES

    colours = {}
    for record in load_manifest(prepared):
        with wave.open(str(prepared / record["audio"])) as w:
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
        spectrum = np.abs(np.fft.rfft(samples))
        peak = np.fft.rfftfreq(len(samples), 1 / 16000)[int(np.argmax(spectrum[1:])) + 1]
        pitch = CLASS_PITCH[CLASS_NAMES.index(record["label_name"])]
        assert abs(peak - pitch) < 0.05 * pitch, (record["id"], peak, pitch)
        ds = ClipDataset(prepared, ClipConfig(frames=8, stride=1, resize_short=48, crop=48, eval_clips=1),
                         train=False, modalities=("video",))
        ds.items = [record]
        video = ds[0]["video"]
        assert float((video[:, 1:] - video[:, :-1]).abs().mean()) > 0.01  # the shape moves
        colours.setdefault(record["label"], []).append(video.mean(dim=(1, 2, 3)))
    # Within a class the mean colour varies as much as between classes: it cannot be the cue.
    within = np.mean([float(torch.stack(v).std(0).mean()) for v in colours.values()])
    assert within > 0.1


# ---- the motion family: evaluation-only data whose cues are motion and rhythm -------------------------

MOTION = SyntheticSpec(classes=6, videos_per_class=8, seconds=2.0, fps=16, width=80, height=64, seed=3,
                       family="motion")


@pytest.fixture(scope="module")
def motion_media(tmp_path_factory):
    """Decoded frames and audio of every motion-family video, with its class."""
    from xdc_fast.data.pyav_backend import decode_frame_indices

    root = tmp_path_factory.mktemp("motion")
    paths = make_synthetic_dataset(root, MOTION)
    names = class_names("motion")
    labels = np.array([names.index(p.parent.name) for p in paths])
    frames = np.stack([decode_frame_indices(p, list(range(0, 24, 2))) for p in paths]).astype(np.float64)
    audio = np.stack([decoded_audio(p)[:28000] for p in paths])
    return frames, audio, labels


def decoded_audio(path) -> np.ndarray:
    """The file's audio as mono float64 at its own rate (16 kHz here)."""
    import av

    with av.open(str(path)) as container:
        blocks = [frame.to_ndarray() for frame in container.decode(audio=0)]
    return np.concatenate(blocks, axis=1).mean(axis=0).astype(np.float64)


def cross_validated_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of a standardised logistic regression, 4-fold stratified cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(4, shuffle=True, random_state=0)
    return float(cross_val_score(model, features, labels, cv=folds).mean())


def shift_between(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Displacement (dy, dx) of frame b relative to a, from the peak of their phase correlation."""
    fa, fb = np.fft.fft2(a.mean(-1)), np.fft.fft2(b.mean(-1))
    cross = fb * np.conj(fa)
    peak = np.unravel_index(np.argmax(np.abs(np.fft.ifft2(cross / (np.abs(cross) + 1e-9)))), a.shape[:2])
    return tuple(float(p if p <= s // 2 else p - s) for p, s in zip(peak, a.shape[:2]))


def test_motion_family_a_frame_alone_does_not_tell_the_class(motion_media):
    frames, _, labels = motion_media
    chance = 1 / MOTION.classes
    # One frame: its colours, its texture (a coarse thumbnail) and its statistics.
    one = frames[:, 5]
    thumbnail = one.reshape(len(one), 8, 8, 10, 8, 3).mean(axis=(2, 4)).reshape(len(one), -1)
    statistics = np.concatenate([one.mean(axis=(1, 2)), one.std(axis=(1, 2))], axis=1)
    for name, features in (("thumbnail", thumbnail), ("colour statistics", statistics)):
        accuracy = cross_validated_accuracy(features, labels)
        assert accuracy < chance + 0.2, (name, accuracy)
    # Motion over time does: the drift between two frames (a positive control, so the test can fail).
    drift = np.array([shift_between(f[2], f[4]) for f in frames])
    assert cross_validated_accuracy(drift, labels) > 0.8


def test_motion_family_the_pitch_alone_does_not_tell_the_class(motion_media):
    _, audio, labels = motion_media
    chance = 1 / MOTION.classes
    spectrum = np.abs(np.fft.rfft(audio, axis=1))
    frequencies = np.fft.rfftfreq(audio.shape[1], 1 / 16000)
    pitch = frequencies[spectrum[:, 1:].argmax(axis=1) + 1]
    assert cross_validated_accuracy(np.log(pitch)[:, None], labels) < chance + 0.2
    # The rhythm does: the spectrum of the loudness envelope (10 ms frames) shows the beat.
    envelope = np.abs(audio).reshape(len(audio), -1, 160).mean(axis=2)
    envelope = (envelope - envelope.mean(1, keepdims=True)) / (envelope.std(1, keepdims=True) + 1e-9)
    beat = np.abs(np.fft.rfft(envelope, axis=1))[:, 1:60]
    assert cross_validated_accuracy(beat, labels) > 0.8


def test_motion_family_names_and_checks():
    assert len(class_names("motion")) == len(set(class_names("motion"))) == 6
    with pytest.raises(ValueError, match="family"):
        SyntheticSpec(family="colours")
    with pytest.raises(ValueError, match="classes"):
        SyntheticSpec(family="motion", classes=7)
