import math

from click.testing import CliRunner

from xdc_fast.bench import bench_loader, format_loader_table
from xdc_fast.cli import main
from xdc_fast.data.prepare import prepare
from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset


def test_bench_loader_rows(tmp_path):
    make_synthetic_dataset(tmp_path / "media", SyntheticSpec(classes=2, videos_per_class=1, seconds=2.0, fps=12,
                                                             width=64, height=48))
    prepare(tmp_path / "media", tmp_path / "ds", workers=1, progress=False)
    rows = bench_loader(str(tmp_path / "ds"), workers=(0,), clips=4)
    names = [r.name for r in rows]
    assert names[0].startswith("pyav") and names[1].startswith("naive") and names[2].startswith("dali")
    for r in rows[:2]:
        assert r.clips == 4 and r.skipped == 0 and math.isfinite(r.clips_per_second)  # a measurement, no speed claim
    assert "| naive (decode from start) | 0 | 4 |" in format_loader_table(rows)
    # The synthetic data is H.264, which DALI decodes only on a GPU: reported, not measured, here.
    assert rows[2].clips == 0 or math.isfinite(rows[2].clips_per_second)

    result = CliRunner().invoke(main, ["bench", "loader", "--data", str(tmp_path / "ds"), "--workers", "0",
                                       "--clips", "2"])
    assert result.exit_code == 0, result.output
    assert "clips/s" in result.output


def test_bench_train_times_each_encoder():
    import math

    from xdc_fast.bench import bench_train, format_train_table

    rows, shares = bench_train("cpu", ("tiny",), batch_size=2, steps=1, round_shares=False)
    assert [(r.arch, r.modality) for r in rows] == [("tiny", "video"), ("tiny", "audio")]
    assert all(math.isfinite(r.clips_per_second) for r in rows)  # each encoder was measured
    assert "| tiny | video | 2 |" in format_train_table(rows, shares, "cpu")
    result = CliRunner().invoke(main, ["bench", "train", "--steps", "1", "--batch-size", "2", "--no-round"])
    assert result.exit_code == 0, result.output
    assert "clips/s" in result.output
