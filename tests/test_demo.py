import json

import numpy as np
import pytest
from click.testing import CliRunner

from xdc_fast.cli import main
from xdc_fast.demo import DEMO_PRETRAIN, DemoConfig, cluster_nmi, format_table, run_demo

SMALL_PRETRAIN = {**DEMO_PRETRAIN, "epochs": 2, "epochs_per_round": 1, "clusters": 2, "frames": 4, "resize_short": 32,
                  "crop": 28, "audio_seconds": 0.5, "n_mels": 20, "batch_size": 4}


def test_cluster_nmi_finds_separated_classes_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    centres = rng.normal(size=(3, 16)) * 5
    assert cluster_nmi(centres[labels] + rng.normal(size=(60, 16)) * 0.3, labels, 3, seed=0) == pytest.approx(1.0)
    assert cluster_nmi(rng.normal(size=(60, 16)), labels, 3, seed=0) < 0.2


def test_demo_runs_end_to_end_in_a_reduced_size(tmp_path):
    lines = []
    config = DemoConfig(classes=2, videos_per_class=4, seconds=1.5, probe_clips=2, pretrain=SMALL_PRETRAIN)
    rows = run_demo(tmp_path / "demo", config, log=lines.append)
    assert [(r.modality, r.encoder) for r in rows] == [("video", "random"), ("video", "xdc"), ("audio", "random"),
                                                       ("audio", "xdc")]
    assert all(0 <= r.clip_acc <= 1 and 0 <= r.video_acc <= 1 and 0 <= r.nmi <= 1 for r in rows)
    written = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert written["rows"][1]["video_acc"] == rows[1].video_acc and set(written["seconds"]) == {"data", "pretrain", "scoring", "total"}
    for name in ("video_random", "video_xdc", "audio_random", "audio_xdc"):
        probe = json.loads((tmp_path / "demo" / "probe" / name / "metrics.json").read_text())
        assert probe["config"]["mode"] == "linear" and probe["num_test_videos"] == 2
    # Both encoders of a modality are probed on the same test videos.
    tests = {json.dumps(json.loads((tmp_path / "demo" / "probe" / f"video_{n}" / "metrics.json").read_text())["split"])
             for n in ("random", "xdc")}
    assert len(tests) == 1
    assert (tmp_path / "demo" / "pretrain" / "report" / "curves.png").exists()
    assert format_table(rows, 2) in "\n".join(lines)
    with pytest.raises(FileExistsError):
        run_demo(tmp_path / "demo", config, log=lines.append)


def test_cli_demo_help_and_existing_output(tmp_path):
    (tmp_path / "demo.json").write_text("{}")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already holds a demo" in result.output
    assert "--videos-per-class" in CliRunner().invoke(main, ["demo", "--help"]).output
