"""The arithmetic of benchmarks/families.py: gains paired by family and seed, the interval across
families, and the signals read off a run's history."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("families_study", BENCHMARKS / "families.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def record(family, seed, variant, video, audio, tag="defaults", signals=None):
    return {"family": f"family{family:03d}", "seed": seed, "variant": variant, "tag": tag,
            "scores": {"video": {"video_acc": video}, "audio": {"video_acc": audio}}, "signals": signals or {}}


def test_gains_pair_each_xdc_run_with_the_random_encoder_of_its_family_and_seed(study):
    records = [record(8, 0, "random", 0.30, 0.40), record(8, 1, "random", 0.20, 0.50),
               record(8, 0, "xdc", 0.50, 0.45), record(8, 1, "xdc", 0.10, 0.55),
               record(9, 0, "xdc", 0.9, 0.9),  # no random run of its own: left out
               record(8, 0, "xdc", 0.99, 0.99, tag="other")]
    got = study.gains(records, "defaults")
    assert list(got) == [8]
    assert [(r["seed"], round(r["video"], 6), round(r["audio"], 6)) for r in got[8]] == [(0, 20.0, 5.0), (1, -10.0, 5.0)]


def test_a_configuration_fed_frame_differences_is_paired_with_a_random_encoder_fed_the_same(study):
    residual = {"video_input": "residual"}
    records = [record(8, 0, "random", 0.30, 0.40), {**record(8, 0, "random", 0.45, 0.40), "overrides": residual},
               record(8, 0, "xdc", 0.50, 0.45), {**record(8, 0, "xdc", 0.50, 0.45, tag="res"), "overrides": residual},
               {**record(9, 0, "xdc", 0.9, 0.9, tag="res"), "overrides": residual},
               record(9, 0, "random", 0.1, 0.1)]  # an rgb baseline only: family 9's residual run has none
    assert [round(r["video"], 6) for r in study.gains(records, "defaults")[8]] == [20.0]
    got = study.gains(records, "res")
    assert list(got) == [8] and [round(r["video"], 6) for r in got[8]] == [5.0]
    # So is its supervised ceiling, and an rgb table keeps the rgb one.
    records += [{**record(8, 0, "supervised", 0.65, 0.40), "overrides": {"modalities": ["video"], **residual}},
                record(8, 0, "supervised", 0.50, 0.40)]
    assert round(study.ceilings(records, "residual")[8]["video"][0], 6) == 20.0
    assert round(study.ceilings(records)[8]["video"][0], 6) == 20.0 and len(study.ceilings(records)[8]["video"]) == 1


def test_a_configuration_fed_centred_audio_is_paired_with_a_random_encoder_fed_the_same(study):
    records = [{**record(8, 0, "random", 0.30, 0.40), "video_input": "residual"},
               {**record(8, 0, "random", 0.30, 0.70), "video_input": "residual", "audio_input": "centred"},
               {**record(8, 0, "xdc", 0.50, 0.80), "video_input": "residual"},
               {**record(8, 0, "xdc", 0.50, 0.80, tag="centred"), "video_input": "residual",
                "audio_input": "centred"}]
    assert [round(r["audio"], 6) for r in study.gains(records, "defaults")[8]] == [40.0]
    assert [round(r["audio"], 6) for r in study.gains(records, "centred")[8]] == [10.0]


def test_the_supervised_ceiling_is_paired_with_random_and_reported_beside_the_gains(study):
    ceiling = {"family": "family008", "seed": 0, "variant": "supervised", "tag": "defaults",
               "scores": {"video": {"video_acc": 0.55}}}  # the ceiling of one modality only
    records = [record(8, 0, "random", 0.30, 0.40), record(8, 0, "xdc", 0.35, 0.50), ceiling,
               record(9, 0, "random", 0.20, 0.20), record(9, 0, "xdc", 0.20, 0.30),
               {**ceiling, "family": "family010"}]  # no random run of its own: left out
    assert {f: {m: [round(v, 6) for v in got] for m, got in c.items()} for f, c in study.ceilings(records).items()} \
        == {8: {"video": [25.0]}}
    text = study.report(records, "defaults")
    assert "| supervised − random, video |" in text and "supervised − random, audio" not in text
    row8 = next(line for line in text.splitlines() if line.startswith("| 8 |"))
    row9 = next(line for line in text.splitlines() if line.startswith("| 9 |"))
    assert row8.endswith("| +25.0 |") and row9.endswith("| — |")
    assert "the supervised ceiling, video: mean +25.0 over random (1 families, 1 runs" in text


def test_the_interval_is_students_t_over_families(study):
    values = [3.0, 7.0, -1.0, 10.0, 4.5]
    mean, std, low, high = study.interval(values)
    reference = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert (low, high) == pytest.approx(reference)


def test_signals_of_a_run_and_their_rank_correlation_with_the_gain(study):
    runs = [{"seed": s, "video": gain, "audio": -gain,
             "signals": {"nmi_video_audio": [0.1, agreement], "nmi_to_previous": [None, {"video": 0.5}],
                         "lift": [{}, {"video_0": 0.2}]}}
            for s, (gain, agreement) in enumerate([(5.0, 0.3), (-3.0, 0.1), (12.0, 0.6)])]
    signals = study.candidate_signals(runs[0])
    assert signals["video-audio agreement, last minus random (round 0)"] == pytest.approx(0.2)
    assert signals["agreement with the previous round, last"] == 0.5
    records = [record(8, r["seed"], "random", 0.0, 0.5) for r in runs] + \
              [record(8, r["seed"], "xdc", r["video"] / 100, 0.5 - r["video"] / 100, signals=r["signals"]) for r in runs]
    text = study.report(records, "defaults")
    assert "video-audio agreement, last round vs the video gain: ρ = +1.00 (3 runs)" in text
    assert "vs the audio gain: ρ = -1.00" in text
    assert "| 8 |" not in study.report(records, "defaults", families=[9])  # only the families asked for


def test_the_warning_record_counts_warned_runs_among_harmed_and_other_runs(study):
    from xdc_fast.learning import AGREEMENT_RISE

    def run(video, audio, rise):
        return {"video": video, "audio": audio, "signals": {"nmi_video_audio": [0.2, None, 0.2 + rise]}}

    small, large = AGREEMENT_RISE / 2, 2 * AGREEMENT_RISE
    runs = [run(-5.0, 10.0, small), run(3.0, -1.0, small), run(-2.0, -2.0, large),  # harmed: 2 of 3 warned
            run(5.0, 5.0, small), run(8.0, 0.0, large), run(1.0, 9.0, large), run(4.0, 4.0, large)]  # 1 of 4
    assert study.warning_record(runs) == ("warned on 2 of 3 (67%) runs with a negative gain in a modality, "
                                          "on 1 of 4 (25%) others")
    assert study.warning_record(runs, rise=0.0).startswith("warned on 0 of 3 (0%)")
    assert study.warning_record(runs, rise=1.0).endswith("on 4 of 4 (100%) others")


def test_configurations_are_compared_on_the_runs_they_all_have(study):
    records = [record(1, 0, "random", 0.2, 0.3), record(2, 0, "random", 0.2, 0.3), record(3, 0, "random", 0.2, 0.3),
               record(1, 0, "xdc", 0.3, 0.5), record(2, 0, "xdc", 0.15, 0.4), record(3, 0, "xdc", 0.9, 0.9),
               record(1, 0, "xdc", 0.4, 0.3, tag="jitter"), record(2, 0, "xdc", 0.2, 0.5, tag="jitter")]
    for r in records:
        r["overrides"] = {"colour_jitter": 0.4} if r["tag"] == "jitter" else {}
    text = study.compare(records, ["defaults", "jitter"], families=[1, 2, 3])
    assert "(family, seed): 1/0, 2/0." in text  # family 3 has no jitter run: left out of both rows
    defaults = next(line for line in text.splitlines() if line.startswith("| defaults |"))
    jitter = next(line for line in text.splitlines() if line.startswith("| jitter |"))
    # defaults: video gains +10, -5 -> mean 2.5, std 10.6, worst -5; audio +20, +10
    assert "| +2.5, 10.6, -5.0 | +15.0, 7.1, +10.0 |" in defaults and "warned on 0 of 1 (0%)" in defaults
    assert "colour_jitter=0.4" in jitter and "| +10.0, 14.1, +0.0 | +10.0, 14.1, +0.0 |" in jitter
    # Runs from before frame differences became the tiny default say what they were fed.
    assert "| fed rgb (then the default) |" in defaults
    swept = study.compare(records, ["defaults", "jitter"], families=[1, 2, 3], sweep=True)
    assert "over these 4 runs" in swept and "- a rise under 0.05: warned on 0 of 1 (0%)" in swept


def test_runs_of_another_data_size_are_kept_apart(study):
    older = record(8, 0, "random", 0.3, 0.3)  # written before sizes varied: the study's own size
    larger = {**record(8, 0, "random", 0.5, 0.5), "videos_per_class": 4 * study.VIDEOS_PER_CLASS}
    assert study.of_size([older, larger], study.VIDEOS_PER_CLASS) == [older]
    assert study.of_size([older, larger], 4 * study.VIDEOS_PER_CLASS) == [larger]


def test_agreement_with_round_0_is_read_off_the_saved_clusterings(study, tmp_path):
    from sklearn.metrics import normalized_mutual_info_score
    from variants import agreement_with_first_round

    from xdc_fast.rounds import RoundFile

    rng = np.random.default_rng(0)
    first = {m: rng.integers(0, 4, 40) for m in ("video", "audio")}
    later = {"video": first["video"].copy(), "audio": rng.integers(0, 4, 40)}  # video unmoved, audio redrawn
    later["audio"][3] = -1  # a video the round could not read: left out of the agreement
    for index, labels in enumerate([first, later]):
        RoundFile([f"v{i}" for i in range(40)], 1, [], {m: {"clip_labels": v, "video_labels": v}
                                                        for m, v in labels.items()}).save(
            tmp_path / f"round_{index:03d}.pt")
    got = agreement_with_first_round(tmp_path)
    assert got[0] == {"video": pytest.approx(1.0), "audio": pytest.approx(1.0)}
    kept = np.arange(40) != 3
    assert got[1]["video"] == pytest.approx(1.0)
    assert got[1]["audio"] == pytest.approx(normalized_mutual_info_score(first["audio"][kept], later["audio"][kept]))
    signals = study.candidate_signals({"signals": {"nmi_to_first": got}})
    assert signals["audio clusters' agreement with round 0's, last clustering"] == pytest.approx(got[1]["audio"])


def test_a_baseline_variant_is_named_paired_with_random_and_compared_beside_xdc(study):
    sdc = {**record(8, 0, "sdc-video", 0.45, 0.0, tag="sdc"), "scores": {"video": {"video_acc": 0.45}}}
    records = [record(8, 0, "random", 0.30, 0.40), record(8, 0, "xdc", 0.50, 0.45),
               record(8, 0, "mdc", 0.35, 0.60, tag="mdc"), sdc]
    assert [round(r["video"], 6) for r in study.gains(records, "mdc")[8]] == [5.0]
    assert study.gains(records, "sdc")[8][0].keys() == {"seed", "signals", "video"}  # one encoder trained
    text = study.report(records, "sdc")
    assert "| SDC-VIDEO − random, video |" in text and "| 8 | " in text and text.count("—") == 1
    assert "- video: mean +15.0" in text and "- audio:" not in text
    table = study.compare(records, ["defaults", "mdc", "sdc"], families=[8])
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| variant=mdc, " in rows["| mdc"] and "+5.0, nan, +5.0 | +20.0, nan, +20.0" in rows["| mdc"]
    assert "| variant=sdc-video, " in rows["| sdc"] and rows["| sdc"].count(" - |") == 1


def test_a_tag_names_one_variant(study):
    records = [record(8, 0, "random", 0.3, 0.4, tag="any"), record(8, 0, "mdc", 0.5, 0.5, tag="mdc")]
    assert study.variant_of_tag(records, "mdc", None) == "mdc"  # a report of the tag needs no --variant
    assert study.variant_of_tag(records, "new", None) == "xdc"
    assert study.variant_of_tag(records, "new", "cdc") == "cdc" and study.variant_of_tag(records, "mdc", "mdc") == "mdc"
    with pytest.raises(ValueError, match="already names mdc runs"):
        study.variant_of_tag(records, "mdc", "xdc")
