import json

import pytest
from click.testing import CliRunner

from xdc_fast.cli import main
from xdc_fast.config import EvaluateConfig
from xdc_fast.demo import DemoConfig, demo_config, format_table, run_demo
from xdc_fast.errors import XdcError
from xdc_fast.evaluate import compare, evaluate

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome

SMALL_PRETRAIN = {**demo_config().pretrain, "epochs": 2, "epochs_per_round": 1, "clusters": 2, "batch_size": 4,
                  "clip": {"frames": 4, "resize_short": 32, "crop": 28, "audio_seconds": 0.5, "n_mels": 20}}


def test_demo_runs_end_to_end_in_a_reduced_size(tmp_path):
    lines = []
    config = DemoConfig(classes=2, videos_per_class=4, seconds=1.5, probe_clips=2, pretrain=SMALL_PRETRAIN)
    rows = run_demo(tmp_path / "demo", config, log=lines.append)
    assert [(r.modality, r.encoder) for r in rows] == [("video", "random"), ("video", "xdc"), ("audio", "random"),
                                                       ("audio", "xdc")]
    assert all(0 <= r.clip_acc <= 1 and 0 <= r.video_acc <= 1 and 0 <= r.nmi <= 1 for r in rows)
    written = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert written["rows"][1]["video_acc"] == rows[1].video_acc
    assert set(written["seconds"]) == {"data", "pretrain", "evaluate", "total"}
    assert not (tmp_path / "demo" / "probe").exists()  # the table is evaluate's: no second probe
    # Both encoders of a modality are scored on the same test videos.
    saved = json.loads((tmp_path / "demo" / "evaluate" / "video" / "results.json").read_text())
    tests = {json.dumps(r["fingerprint"]["split"]) for r in saved["results"] if r["protocol"] == "linear"}
    assert len(tests) == 1 and all(r["scores"]["num_test_videos"] == 2 for r in saved["results"]
                                   if r["protocol"] == "linear")
    assert (tmp_path / "demo" / "pretrain" / "report" / "curves.png").exists()
    assert format_table(rows, 2) in "\n".join(lines)
    check_evaluate_stage(tmp_path / "demo", rows, lines, tmp_path)
    with pytest.raises(XdcError, match="already holds a demo"):
        run_demo(tmp_path / "demo", config, log=lines.append)


def check_evaluate_stage(demo, rows, lines, tmp_path):
    """The demo's evaluate/ of each modality scores XDC and random with evaluate's default protocols; its
    linear probe and clustering are the demo table's, and its XDC results, and printed rows, are those of a
    standalone `evaluate` of the checkpoint on the same folder."""
    checkpoint = str(demo / "pretrain" / "checkpoints" / "last.pt")
    for modality in ("video", "audio"):
        folder = demo / "evaluate" / modality
        saved = json.loads((folder / "results.json").read_text())
        assert (folder / "results.md").exists() and (folder / "results.png").stat().st_size > 0
        assert {(r["checkpoint"], r["protocol"]) for r in saved["results"]} == \
            {(c, p) for c in (checkpoint, "random") for p in ("linear", "knn", "retrieval", "svm", "clustering")}
        for name, label in (("xdc", checkpoint), ("random", "random")):
            (row,) = [r for r in rows if (r.modality, r.encoder) == (modality, name)]
            (linear,) = [r for r in saved["results"] if (r["checkpoint"], r["protocol"]) == (label, "linear")]
            assert (linear["scores"]["clip_acc"], linear["scores"]["video_acc"]) == (row.clip_acc, row.video_acc)
            (clustered,) = [r for r in saved["results"] if (r["checkpoint"], r["protocol"]) == (label, "clustering")]
            assert clustered["scores"]["nmi"] == row.nmi
    # a standalone run of the XDC checkpoint alone, its clip geometry read from the checkpoint
    alone = evaluate(demo / "data", tmp_path / "alone", EvaluateConfig(checkpoints=[checkpoint], clips_per_video=2),
                     log=lambda *_: None)
    demo_video = demo / "evaluate" / "video" / "results.json"
    assert compare(demo_video, tmp_path / "alone")["comparable"]
    in_demo = {(s["protocol"], s["metric"]): s["values"] for s in json.loads(demo_video.read_text())["summary"]
               if s["checkpoint"] == checkpoint}
    assert in_demo == {(s["protocol"], s["metric"]): s["values"] for s in alone["summary"]}
    printed = "\n".join(lines)
    standalone_rows = (tmp_path / "alone" / "results.md").read_text().splitlines()[2:]
    assert len(standalone_rows) == 5
    assert all(row.replace(f"| {checkpoint} |", "| xdc |") in printed for row in standalone_rows)


def test_cli_demo_help_and_existing_output(tmp_path):
    (tmp_path / "demo.json").write_text("{}")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already holds a demo" in result.output
    assert "--videos-per-class" in CliRunner().invoke(main, ["demo", "--help"]).output


def test_demo_settings_come_from_the_yaml_with_the_clis_overrides(tmp_path):
    config = demo_config(epochs=30, videos_per_class=5, seed=2)
    assert config.pretrain["epochs"] == 30 and config.pretrain["epochs_per_round"] == 10
    assert config.videos_per_class == 5 and config.seed == 2 and config.pretrain["variant"] == "xdc"
    (tmp_path / "bad.yaml").write_text("classes: 4\npretrain:\n  lr: -1\n")
    with pytest.raises(XdcError, match="lr: -1.0 is out of range"):
        demo_config(tmp_path / "bad.yaml")
