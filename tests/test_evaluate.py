"""``xdc-fast evaluate`` end to end on the built-in synthetic data."""

import json

import pytest
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast.cli import main
from xdc_fast.config import EvaluateConfig
from xdc_fast.evaluate import evaluate

CLIP = {"frames": 4, "resize_short": 32, "crop": 28, "audio_seconds": 0.5, "n_mels": 20}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = prepared_synthetic(tmp_path_factory.mktemp("evaluate"), classes=3, videos_per_class=4, seconds=1.5,
                              fps=8, width=32, height=32, seed=5)
    # give the manifest two official-style splits, so "every split" means two
    manifest = root / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        position = i % 4  # 4 videos per class, in class order
        row["split"] = {"1": "test" if position == 0 else "train", "2": "test" if position == 1 else "train"}
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(**overrides):
    return EvaluateConfig(**{"clips_per_video": 2, "clip": CLIP, "batch_size": 8, "device": "cpu", "loader": "pyav",
                             **overrides})


@pytest.fixture(scope="module")
def both(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("both") / "o"
    return out, evaluate(dataset, out, config(checkpoints=["random", "random:1"]), log=lambda *_: None)


def test_two_checkpoints_in_one_run_equal_single_runs(dataset, both, tmp_path):
    out, document = both
    assert document["splits"] == ["1", "2"]
    single = evaluate(dataset, tmp_path / "single", config(checkpoints=["random:1"]), log=lambda *_: None)
    key = lambda s: (s["protocol"], s["metric"])  # noqa: E731
    mine = {key(s): (s["mean"], s["std"], s["values"]) for s in document["summary"] if s["checkpoint"] == "random:1"}
    alone = {key(s): (s["mean"], s["std"], s["values"]) for s in single["summary"]}
    assert mine == alone
    table_rows = [line for line in (out / "results.md").read_text().splitlines() if "| random:1 |" in line]
    assert table_rows == (tmp_path / "single" / "results.md").read_text().splitlines()[2:]
    assert len(table_rows) == 5  # one row per protocol
    # the two encoders really differ (the table is not one encoder twice)
    first = {key(s): s["values"] for s in document["summary"] if s["checkpoint"] == "random"}
    assert first != {k: v[2] for k, v in mine.items()}


def test_results_written_with_fingerprints(both):
    out, document = both
    assert (out / "results.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["results"]) == 2 * 2 * 5  # checkpoints x splits x protocols
    for r in saved["results"]:
        f = r["fingerprint"]
        assert len(f["manifest_sha256"]) == 64 and f["clips_per_video"] == 2 and f["clip"]["crop"] == 28
        assert f["checkpoint"] in ("random:0", "random:1") and f["code_version"]
        assert f["split"]["kind"] == "manifest" and str(f["split"]["split"]) == r["split"]
        assert len(f["split"]["test_ids_sha256"]) == 64
    knn = next(r for r in saved["results"] if r["protocol"] == "knn")
    assert knn["fingerprint"]["params"]["k"] == 20 and knn["fingerprint"]["params"]["temperature"] == 0.07
    svm = next(r for r in saved["results"] if r["protocol"] == "svm")
    assert svm["fingerprint"]["params"]["C"] in svm["fingerprint"]["params"]["cs"]
    for s in saved["summary"]:
        assert len(s["values"]) == 2 and all(0.0 <= v <= 1.0 for v in s["values"] if s["metric"] != "ari"
                                             and not s["metric"].startswith("num"))
    assert "mean ± std" in (out / "results.md").read_text()


def test_existing_results_are_refused(dataset, both):
    out, _ = both
    result = CliRunner().invoke(main, ["evaluate", "--data", str(dataset), "--out", str(out)])
    assert result.exit_code == 2 and "already holds results" in result.output


def test_cli_bad_protocol_is_one_error_line(dataset, tmp_path):
    result = CliRunner().invoke(main, ["evaluate", "--data", str(dataset), "--out", str(tmp_path / "o"),
                                       "--protocol", "knn", "--protocol", "nope"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "nope" in errors[0]
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_runs_one_split_and_chosen_protocols(dataset, tmp_path, monkeypatch):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("clip: {frames: 4, resize_short: 32, crop: 28, audio_seconds: 0.5, n_mels: 20}\n"
                           "loader: pyav\n")
    result = CliRunner().invoke(main, ["evaluate", "--data", str(dataset), "--out", str(tmp_path / "o"),
                                       "--checkpoint", "random", "--protocol", "knn", "--protocol", "retrieval",
                                       "--split", "2", "--clips-per-video", "2", "--device", "cpu",
                                       "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["splits"] == ["2"] and {r["protocol"] for r in saved["results"]} == {"knn", "retrieval"}


def test_a_checkpoint_file_scores_like_the_encoder_it_holds(dataset, both, tmp_path):
    from xdc_fast.checkpoint import load_encoder, save_atomic

    encoder, _ = load_encoder("random", "video", None, 1e-5, 1)
    path = tmp_path / "enc.pt"
    save_atomic({"encoders": {f"video.{k}": v for k, v in encoder.state_dict().items()}, "config": {"arch": "tiny"}},
                path)
    document = evaluate(dataset, tmp_path / "o", config(checkpoints=[str(path)], protocols=["knn", "retrieval"]),
                        log=lambda *_: None)
    from_file = {(s["protocol"], s["metric"]): s["values"] for s in document["summary"]}
    random1 = {(s["protocol"], s["metric"]): s["values"] for s in both[1]["summary"]
               if s["checkpoint"] == "random:1" and s["protocol"] in ("knn", "retrieval")}
    assert from_file == random1
    assert all(r["fingerprint"]["checkpoint"].startswith("sha256:") for r in document["results"])
