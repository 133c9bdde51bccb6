"""The family of families: seeds draw different class factors, a frame or the pitch alone says nothing of
the class, and the class is carried in both modalities."""

import numpy as np
import pytest

from xdc_fast.data.families import (AUDIO_FACTORS, TUNING_FAMILIES, VIDEO_FACTORS, FamilySpec, draw_family,
                                    render_audio, render_video)

SPEC = FamilySpec(family_seed=0, seconds=1.0, fps=16, width=48, height=40, sample_rate=8000)


def test_families_are_drawn_deterministically_and_vary_with_the_seed():
    assert draw_family(11) == draw_family(11)
    drawn = [draw_family(seed) for seed in range(60)]
    assert {f.video_factor for f in drawn} == set(VIDEO_FACTORS)
    assert {f.audio_factor for f in drawn} == set(AUDIO_FACTORS)
    for family in drawn:
        assert len(set(family.video_levels)) == family.classes == len(set(family.audio_levels)) == 6
        assert len(set(family.class_names())) == 6
    assert [f.tuning for f in drawn[:TUNING_FAMILIES + 1]] == [True] * TUNING_FAMILIES + [False]


def loo_nearest_centroid(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier on standardised features."""
    z = (features - features.mean(0)) / (features.std(0) + 1e-9)
    right = 0
    for i in range(len(z)):
        keep = np.arange(len(z)) != i
        means = np.stack([z[keep & (labels == c)].mean(0) for c in np.unique(labels)])
        right += int(np.argmin(((means - z[i]) ** 2).sum(1)) == labels[i])
    return right / len(z)


def media(family_seed: int, per_class: int = 8):
    family = draw_family(family_seed)
    spec = FamilySpec(**{**SPEC.__dict__, "family_seed": family_seed})
    videos, sounds, labels = [], [], []
    for label in range(family.classes):
        for i in range(per_class):
            rng = np.random.default_rng([family_seed, 99, label, i])
            videos.append(render_video(family, label, spec, rng))
            sounds.append(render_audio(family, label, spec, rng))
            labels.append(label)
    return family, np.stack(videos), np.stack(sounds), np.array(labels)


@pytest.mark.parametrize("family_seed", [8, 9, 10, 11])
def test_a_frame_alone_or_the_pitch_alone_says_nothing_of_the_class(family_seed):
    family, videos, sounds, labels = media(family_seed)
    chance = 1 / family.classes
    first = videos[:, 0].astype(np.float64)
    colour = np.concatenate([first.mean((1, 2)), first.std((1, 2))], axis=1)  # [videos, 6]
    assert loo_nearest_centroid(colour, labels) < chance + 0.2
    if family.audio_factor not in ("timbre", "noise_band"):  # there the spectrum's shape is the class
        spectrum = np.abs(np.fft.rfft(sounds.mean(1), axis=1))
        pitch = np.log(np.argmax(spectrum[:, 20:], axis=1) + 20.0)[:, None]
        assert loo_nearest_centroid(pitch, labels) < chance + 0.2


@pytest.mark.parametrize("family_seed", [8, 9, 10, 11])
def test_the_class_is_carried_by_both_modalities(family_seed):
    """The same nuisance draws with another class give other frames over time and another sound; the
    same class with other nuisance draws gives another first frame (the class is not a look)."""
    family = draw_family(family_seed)
    spec = FamilySpec(**{**SPEC.__dict__, "family_seed": family_seed})

    def render(label, seed):
        rng = np.random.default_rng(seed)
        return render_video(family, label, spec, rng), render_audio(family, label, spec, np.random.default_rng(seed))

    (video_a, audio_a), (video_b, audio_b) = render(0, 5), render(1, 5)
    moving = [np.abs(video_a[t].astype(int) - video_b[t].astype(int)).mean() for t in range(len(video_a))]
    assert max(moving) > 0.5  # the nuisance (noise included) is the same draw: only the class differs
    assert np.abs(audio_a - audio_b).mean() > 0.02
    other_video, _ = render(0, 6)
    assert np.abs(other_video[0].astype(int) - video_a[0].astype(int)).mean() > 20.0
