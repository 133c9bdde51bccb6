"""The "is it learning?" signal: chance under the sampler, the verdicts, and real runs on targets that
are pure noise (flagged) and on targets the audio encoder can learn (not flagged)."""

import math

import numpy as np
import pytest
import torch

from xdc_fast.config import PretrainConfig
from xdc_fast.learning import (AGREEMENT_RISE, FITS, MIN_CLIPS, agreement_warns, chance_of_heads, chance_under_sampler,
                               describe_round, lift, noise_lift, round_signal, run_summary, verdict)
from xdc_fast.pseudo_labels import balanced_indices

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome


def test_chance_matches_the_sampler_it_describes():
    """The majority share and entropy of the targets that balanced_indices actually draws."""
    rng = np.random.default_rng(0)
    sampled_by = rng.integers(0, 5, size=300)
    sampled_by[:120] = 0  # one big cluster: without balancing its targets would dominate
    target = np.where(sampled_by == 0, 3, rng.integers(0, 4, size=300))
    target[5] = -1  # a clip that did not decode is never drawn
    draws = balanced_indices(np.where(target >= 0, sampled_by, -1), 200_000, np.random.default_rng(1))
    frequencies = np.bincount(target[draws], minlength=4) / len(draws)
    chance = chance_under_sampler(sampled_by, target)
    assert chance.accuracy == pytest.approx(frequencies.max(), abs=0.005)
    entropy = -sum(p * math.log(p) for p in frequencies if p > 0)
    assert chance.loss == pytest.approx(entropy, abs=0.01)


def test_a_head_learning_the_sampled_clustering_has_chance_one_over_k():
    labels = np.repeat(np.arange(6), [40, 5, 5, 10, 10, 30])
    chance = chance_under_sampler(labels, labels)
    assert chance.accuracy == pytest.approx(1 / 6) and chance.loss == pytest.approx(math.log(6))


def test_chance_of_heads_names_each_head_of_a_variant():
    from xdc_fast.variants import VARIANTS

    labels = {"video": np.array([0, 0, 1, 1]), "audio": np.array([0, 1, 0, 1])}
    heads = chance_of_heads(VARIANTS["mdc"].learns, labels, labels["video"])
    assert set(heads) == {"video_0", "video_1", "audio_0", "audio_1"}
    assert heads["video_0"]["accuracy"] == pytest.approx(0.5) and heads["video_1"]["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("accuracy,chance,clips,expected", [
    (0.12, 0.125, 500, "at chance"), (0.20, 0.125, 500, "weak"), (0.40, 0.125, 500, "fits"),
    (0.40, 0.125, MIN_CLIPS - 1, "too few clips to tell"), (0.05, 0.3, 500, "at chance")])
def test_verdicts(accuracy, chance, clips, expected):
    assert verdict(accuracy, chance, clips) == expected


def test_a_lift_within_the_noise_of_few_videos_is_at_chance():
    # 43% against a chance of 37% is a lift of 0.1 ("weak") on many samples, but on 30 held-out videos
    # sampling noise alone reaches it; 90% is beyond any noise.
    assert verdict(0.43, 0.367, 150, independent=30) == "at chance"
    assert verdict(0.43, 0.367, 150, independent=3000) == "weak"
    assert verdict(0.90, 0.367, 150, independent=30) == "fits"


@pytest.mark.parametrize("chance,videos", [(1 / 3, 30), (0.125, 40), (0.5, 200)])
def test_noise_floor_is_rarely_reached_by_chance_alone(chance, videos):
    # Simulated held-out sets whose predictions are right with probability `chance`: the floor is three
    # standard errors, so well under 1% of them may pass it, and it is not so wide that a third do.
    accuracy = np.random.default_rng(0).binomial(videos, chance, size=200_000) / videos
    passed = np.mean([lift(a, chance) >= noise_lift(chance, videos) for a in accuracy[:20_000]])
    assert passed < 0.01
    assert noise_lift(chance, videos) < lift(chance + 4 * np.sqrt(chance * (1 - chance) / videos), chance)


def record(round_index, accuracy, chance=0.125, clips=200):
    return {"round": round_index, "clips": clips, "loss": {"video_0": 2.0}, "pseudo_label_acc": {"video_0": accuracy},
            "chance": {"video_0": {"accuracy": chance, "loss": math.log(1 / chance)}},
            "clusters": {"audio": {"sizes": [10] * 8, "empty": 0}}}


def test_a_round_at_chance_warns_with_the_settings_to_change():
    lines = describe_round(record(2, 0.12), steps_per_round=36, lr=0.01)
    assert lines[0].startswith("is it learning? round 2, on the training clips: video_0 at chance (12% vs chance 12%")
    assert len(lines) == 2 and "36 steps" in lines[1] and "epochs_per_round" in lines[1] and "lr 0.01" in lines[1]
    assert len(describe_round(record(2, 0.6), steps_per_round=36, lr=0.01)) == 1


def test_the_run_summary_says_which_heads_ended_at_chance_weak_or_fitting():
    assert "video_0 ended at chance" in run_summary([record(0, 0.5), record(1, 0.1)])
    assert "every head fit its targets" in run_summary([record(0, 0.1), record(1, 0.5)])
    weak = run_summary([record(0, 0.5), record(1, 0.2)])  # a lift of 9% of the way from chance to 1
    assert "video_0 ended weak" in weak and "every head" not in weak


def test_the_run_summary_says_how_far_the_modalities_clusters_agree():
    first, last = record(0, 0.5), record(1, 0.5)
    plain = run_summary([first, last])
    assert "video vs audio" not in plain
    agreeing = run_summary([{**first, "nmi_video_audio": 0.12}, {**last, "nmi_video_audio": 0.55}])
    assert "NMI 0.55 in round 1, against 0.12 in round 0" in agreeing and "nuisance" not in agreeing
    flat = run_summary([{**first, "nmi_video_audio": 0.15}, {**last, "nmi_video_audio": 0.12}])
    assert f"a rise under {AGREEMENT_RISE:g}" in flat and "nuisance" in flat
    barely = run_summary([{**first, "nmi_video_audio": 0.15}, {**last, "nmi_video_audio": 0.15 + AGREEMENT_RISE / 2}])
    assert "nuisance" in barely
    clear = run_summary([{**first, "nmi_video_audio": 0.15}, {**last, "nmi_video_audio": 0.15 + 2 * AGREEMENT_RISE}])
    assert "nuisance" not in clear
    # A variant the warning does not speak for still reads the agreement, without the warning.
    quiet = run_summary([{**first, "nmi_video_audio": 0.15}, {**last, "nmi_video_audio": 0.12}], warn_nuisance=False)
    assert "NMI 0.12 in round 1, against 0.15 in round 0" in quiet and "nuisance" not in quiet


def test_a_round_whose_clusters_agree_barely_more_than_the_random_encoders_warns_of_nuisance():
    later = {**record(1, 0.5), "nmi_video_audio": 0.21}
    warned = describe_round(later, steps_per_round=36, lr=0.01, first_agreement=0.20)
    assert "NMI 0.21 (round 0: 0.20)" in warned[0]
    assert len(warned) == 2 and warned[1].startswith("warning: in round 1") and "colour_jitter" in warned[1]
    assert len(describe_round(later, steps_per_round=36, lr=0.01, first_agreement=0.21 - 2 * AGREEMENT_RISE)) == 1
    assert len(describe_round(later, steps_per_round=36, lr=0.01)) == 1  # nothing to compare with
    quiet = describe_round(later, steps_per_round=36, lr=0.01, first_agreement=0.20, warn_nuisance=False)
    assert quiet == warned[:1]  # the same figures, no warning
    first = {**record(0, 0.5), "nmi_video_audio": 0.2}
    assert len(describe_round(first, steps_per_round=36, lr=0.01, first_agreement=0.2)) == 1  # round 0 is the reference
    assert agreement_warns([0.2, None, 0.2]) and not agreement_warns([0.2]) and not agreement_warns([None, 0.3])


# ---- real runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pitched(tmp_path_factory):
    """Audio whose class is its pitch (the shapes family): 3 classes x 20 videos."""
    from xdc_fast.data.prepare import load_manifest, prepare
    from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset

    root = tmp_path_factory.mktemp("learning")
    make_synthetic_dataset(root / "media", SyntheticSpec(classes=3, videos_per_class=20, seconds=2.0, fps=8,
                                                         width=32, height=32, seed=4))
    prepare(root / "media", root / "ds", workers=1, progress=False)
    return root / "ds", load_manifest(root / "ds")


def run_on_targets(dataset, items, targets: np.ndarray, out) -> tuple[list[dict], list[str]]:
    """sdc-audio trained on fixed per-video targets (a cluster transfer), with its log."""
    from xdc_fast.files import save_atomic
    from xdc_fast.pretrain import pretrain

    labels = out.parent / f"{out.name}_labels.pt"
    save_atomic({"ids": [r["id"] for r in items], "audio_video_labels": torch.from_numpy(targets)}, labels)
    lines = []
    # Half the videos held out: 30 held-out videos, enough to judge; the other half is easy to memorise,
    # given epochs enough that memorising does not hang on the last bits of a float path (8 epochs
    # memorised 53% of the noise on one CPU's kernels and 67% on another's; 24 give 77-90% on four).
    config = PretrainConfig(variant="sdc-audio", epochs=24, epochs_per_round=24, batch_size=5, lr=0.05,
                            heldout_fraction=0.5, labels_from=str(labels), clusters=3,
                            clip=dict(audio_seconds=0.5, n_mels=20), seed=0,
                            audio_shift=0)  # pitch is the class here: shifting it would hide the class
    return pretrain(dataset, out, config, log=lines.append), lines


def test_noise_targets_are_flagged_and_learnable_ones_are_not(pitched, tmp_path):
    dataset, items = pitched
    classes = np.array([r["label"] for r in items])
    noise = np.random.default_rng(0).permutation(classes)  # same sizes, no relation to the audio
    history, lines = run_on_targets(dataset, items, noise, tmp_path / "noise")
    assert history[-1]["heldout"]["audio_0"]["videos"] == 30
    # The training videos' noise is memorised: on the training clips alone the verdict would be a fit...
    on_training = round_signal({**history[-1], "heldout": None})["audio_0"]
    assert on_training["lift"] >= FITS and on_training["verdict"] == "fits", on_training
    # ...but the held-out videos show it carries to no new video.
    assert round_signal(history[-1])["audio_0"]["verdict"] == "at chance"
    assert any(line.startswith("warning: the audio encoder did not fit its targets") for line in lines), lines
    assert "audio_0 ended at chance" in lines[-1]
    # With too few held-out videos the verdict falls back to the training clips, and says so.
    few = {**history[-1], "heldout": {h: {**v, "videos": 9} for h, v in history[-1]["heldout"].items()}}
    assert "only 9 held-out videos" in describe_round(few, 10, 0.05)[0]

    history, lines = run_on_targets(dataset, items, classes, tmp_path / "classes")
    assert not any(line.startswith("warning") for line in lines), lines
    assert "every head fit its targets" in lines[-1]
    assert "on the held-out clips: audio_0 fits" in next(line for line in lines if line.startswith("is it learning?"))
