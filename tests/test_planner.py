"""The round planner: its figures follow the data's shape, `xdc-fast plan` prints them, and pretraining
refuses a run whose rounds would not fit. Its memory figure against a measured peak is in
tests/test_features.py (the small scale simulation)."""

import json

import pytest
from click.testing import CliRunner

from xdc_fast.cli import main
from xdc_fast.planner import check_fits, plan_round


def test_the_plan_scales_with_the_data_and_the_ranks():
    small = plan_round(1_000_000, 2, 8, baseline=0)
    big = plan_round(10_000_000, 2, 8, baseline=0)
    wide = plan_round(10_000_000, 2, 64, baseline=0)
    assert big.features_disk_per_rank == pytest.approx(10 * small.features_disk_per_rank, rel=1e-3)
    assert wide.features_disk_per_rank == pytest.approx(big.features_disk_per_rank / 8, rel=1e-3)
    # Past k x 256 points the training sample stops growing; the assignment does not.
    assert small.sample == big.sample == 1024 * 256 and big.assign_flop == 10 * small.assign_flop
    assert plan_round(1000, 2, 1, baseline=0, max_points_per_centroid=None).sample == 2000
    # Holding every feature in memory costs more than the stream, and grows with the data.
    held = plan_round(10_000_000, 2, 8, baseline=0, streamed=False)
    assert held.peak_per_rank > big.peak_per_rank
    assert plan_round(20_000_000, 2, 8, baseline=0, streamed=False).features_memory_per_rank > \
        1.9 * held.features_memory_per_rank


def test_check_fits_refuses_a_round_larger_than_the_memory():
    figures = plan_round(1_000_000, 2, 8, baseline=0)
    check_fits(figures, available=figures.peak_per_node)
    with pytest.raises(Exception, match="needs about .* GiB more per node"):
        check_fits(figures, available=figures.peak_per_node // 2)


def test_plan_command_prints_and_writes_the_plan(tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", "--videos", "500000", "--world", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "1,000,000 clips (125,000 per rank)" in result.output and "peak memory" in result.output
    figures = json.loads(out.read_text())
    assert figures["clips"] == 1_000_000 and figures["clusterings"] == 2
    cdc = CliRunner().invoke(main, ["plan", "--videos", "500000", "--variant", "cdc"])
    assert "3 clustering(s)" in cdc.output
    bad = CliRunner().invoke(main, ["plan", "--videos", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


@pytest.mark.training_outcome
def test_pretrain_prints_the_plan_and_refuses_a_round_that_would_not_fit(tmp_path, monkeypatch):
    from tests.conftest import prepared_synthetic
    from tests.test_pretrain import FAST
    from xdc_fast import planner

    dataset = prepared_synthetic(tmp_path / "data", classes=2, videos_per_class=2, seconds=1.0, fps=8, width=32,
                                 height=32, seed=1)
    config = tmp_path / "c.yaml"
    config.write_text("\n".join(f"{k}: {v}" for k, v in {**FAST, "clusters": 2}.items()) + "\n")
    monkeypatch.setattr(planner, "available_bytes", lambda: 1)
    result = CliRunner().invoke(main, ["pretrain", "--data", str(dataset), "--out", str(tmp_path / "run"),
                                       "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "plan: 8 clips" in result.output and "Error: a clustering round needs" in result.output
    assert "Traceback" not in result.output
