"""``xdc-fast export``: a round's clusters become a dataset that finetune reads, names included."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast.cli import main
from xdc_fast.config import PretrainConfig
from xdc_fast.data.prepare import load_manifest
from xdc_fast.pretrain import pretrain

CLIP = dict(frames=4, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    dataset = prepared_synthetic(root, classes=3, videos_per_class=4, seconds=2.0, fps=12, width=48, height=48,
                                 seed=3)
    pretrain(dataset, root / "run", PretrainConfig(clusters=3, epochs=1, epochs_per_round=1, batch_size=4,
                                                   pca_dim=4, clip=CLIP), log=lambda *_: None)
    return root / "run", dataset


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_then_a_linear_probe_runs_on_it(run, tmp_path):
    run_dir, dataset = run
    result = invoke("export", run_dir, "--round", 0, "--modality", "audio", "--out", tmp_path / "ds")
    assert result.exit_code == 0, result.output
    saved = torch.load(run_dir / "clusters" / "round_000.pt", weights_only=True)
    exported = load_manifest(tmp_path / "ds")
    by_id = {r["id"]: r for r in exported}
    assert sorted(by_id) == sorted(saved["ids"])
    for item_id, cluster in zip(saved["ids"], saved["audio_video_labels"].tolist()):
        assert by_id[item_id]["label"] == cluster
    original = {r["id"]: r for r in load_manifest(dataset)}
    for r in exported:  # the same media, the original label kept beside the cluster
        assert r["path"] == original[r["id"]]["path"] and r["source_label"] == original[r["id"]]["label"]
    classes = json.loads((tmp_path / "ds" / "classes.json").read_text())
    assert classes == ["cluster_00", "cluster_01", "cluster_02"]
    sizes = np.bincount([r["label"] for r in exported], minlength=3)
    assert sizes[sizes > 0].min() >= 2, f"this seed's clusters {sizes} cannot make a stratified split"

    # A person names the clusters; finetune reports those names, and exporting again keeps them.
    named = ["drums", "whistle", "hum"]
    (tmp_path / "ds" / "classes.json").write_text(json.dumps(named))
    config = tmp_path / "probe.yaml"
    config.write_text("train_clips: 2\nclip:\n" + "".join(f"  {k}: {v}\n" for k, v in CLIP.items()))
    probe = invoke("finetune", "--mode", "linear", "--modality", "audio", "--checkpoint",
                   run_dir / "checkpoints" / "last.pt", "--data", tmp_path / "ds", "--out", tmp_path / "probe",
                   "--test-clips", 2, "--config", config)
    assert probe.exit_code == 0, probe.output
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert 0.0 <= metrics["video_acc"] <= 1.0 and metrics["num_test_videos"] >= 3
    assert metrics["classes"] == named  # the edited names are the class names finetune reports
    assert invoke("export", run_dir, "--round", 0, "--modality", "audio", "--out", tmp_path / "ds").exit_code == 0
    assert json.loads((tmp_path / "ds" / "classes.json").read_text()) == named
    assert {r["label_name"] for r in load_manifest(tmp_path / "ds")} <= set(named)


def test_min_margin_keeps_only_confident_members(run, tmp_path):
    run_dir, _ = run
    saved = torch.load(run_dir / "clusters" / "round_000.pt", weights_only=True)
    margins = saved["video_video_margin"].numpy()
    threshold = float(np.median(margins))
    result = invoke("export", run_dir, "--modality", "video", "--min-margin", threshold, "--out", tmp_path / "ds")
    assert result.exit_code == 0, result.output
    kept = {r["id"] for r in load_manifest(tmp_path / "ds")}
    assert kept == {i for i, m in zip(saved["ids"], margins) if m >= threshold}
    rejects = [json.loads(line) for line in (tmp_path / "ds" / "rejects.jsonl").read_text().splitlines()]
    assert len(kept) + len(rejects) == len(saved["ids"]) and all("--min-margin" in r["reason"] for r in rejects)
    assert json.loads((tmp_path / "ds" / "export.json").read_text())["min_margin"] == threshold


def test_bad_requests_are_one_line_errors(run, tmp_path):
    run_dir, _ = run
    for args, message in ((["--modality", "concat"], "has no concat clustering"),
                          (["--modality", "video", "--min-margin", 1e9], "leaves no item"),
                          (["--modality", "video", "--round", 7], "round_007.pt does not exist")):
        result = invoke("export", run_dir, *args, "--out", tmp_path / "x")
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "export.json").write_text("{}")  # a folder export wrote, whose names were edited
    (tmp_path / "named" / "classes.json").write_text('["only one"]')
    result = invoke("export", run_dir, "--modality", "video", "--out", tmp_path / "named")
    assert result.exit_code == 2 and "a list of 3 non-empty names" in result.output
