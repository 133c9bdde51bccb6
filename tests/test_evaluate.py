"""``xdc-fast evaluate`` end to end on the built-in synthetic data."""

import json

import pytest
from click.testing import CliRunner

from tests.conftest import prepared_synthetic
from xdc_fast.cli import main
from xdc_fast.config import EvaluateConfig
from xdc_fast.evaluate import compare, evaluate

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome

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
    # the C chosen on the training videos is an outcome, kept beside the fingerprint, not in it
    assert svm["selected"]["C"] in svm["fingerprint"]["params"]["cs"] and "C" not in svm["fingerprint"]["params"]
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
    from xdc_fast.checkpoint import load_encoder
    from xdc_fast.files import save_atomic

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


# ---- --compare -----------------------------------------------------------------------------------------

def compare_cli(a, b):
    return CliRunner().invoke(main, ["evaluate", "--compare", str(a), str(b)])


def test_compare_a_results_file_with_itself_is_comparable(both):
    out, _ = both
    result = compare_cli(out / "results.json", out)  # a folder holding results.json counts as the file
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("comparable")


def test_compare_another_encoder_under_the_same_protocol_is_comparable(dataset, both, tmp_path):
    from xdc_fast.checkpoint import load_encoder
    from xdc_fast.files import save_atomic

    encoder, _ = load_encoder("random", "video", None, 1e-5, 7)
    path = tmp_path / "other.pt"
    save_atomic({"encoders": {f"video.{k}": v for k, v in encoder.state_dict().items()}, "config": {"arch": "tiny"}},
                path)
    evaluate(dataset, tmp_path / "o", config(checkpoints=[str(path)], protocols=["knn", "retrieval"]),
             log=lambda *_: None)
    comparison = compare(tmp_path / "o" / "results.json", both[0] / "results.json")
    assert comparison["comparable"] and comparison["differences"] == []
    assert comparison["common_protocols"] == ["knn", "retrieval"]
    assert comparison["only_in_b"] == ["linear", "svm", "clustering"] and comparison["only_in_a"] == []
    assert comparison["encoders"][0][0].startswith("sha256:")


def test_compare_names_a_changed_hyperparameter_and_missing_splits(dataset, both, tmp_path):
    evaluate(dataset, tmp_path / "k5", config(checkpoints=["random:1"], protocols=["knn"], knn_k=5),
             log=lambda *_: None)
    evaluate(dataset, tmp_path / "s2", config(checkpoints=["random:1"], protocols=["retrieval"], split=2),
             log=lambda *_: None)
    k5 = compare(tmp_path / "k5" / "results.json", both[0] / "results.json")
    assert not k5["comparable"]
    assert [(d["field"], d["a"], d["b"], d["where"]) for d in k5["differences"]] == [
        ("params.k", ["5"], ["20"], ["knn split 1", "knn split 2"])]
    s2 = compare(both[0] / "results.json", tmp_path / "s2" / "results.json")
    assert [d["field"] for d in s2["differences"]] == ["splits of retrieval"]
    assert s2["differences"][0]["a"] == ["1", "2"] and s2["differences"][0]["b"] == ["2"]
    result = compare_cli(tmp_path / "k5" / "results.json", both[0] / "results.json")
    assert result.exit_code == 1
    assert "differs: params.k: a 5; b 20" in result.output and "not comparable" in result.output


@pytest.mark.parametrize("field, path", [("manifest_sha256", ("manifest_sha256",)), ("clip.crop", ("clip", "crop")),
                                         ("split.test_ids_sha256", ("split", "test_ids_sha256")),
                                         ("code_version", ("code_version",))])
def test_compare_names_each_changed_fingerprint_field(both, tmp_path, field, path):
    saved = json.loads((both[0] / "results.json").read_text())
    changed = saved["results"][3]  # one result of one checkpoint, split and protocol
    target = changed["fingerprint"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "something else"
    (tmp_path / "edited.json").write_text(json.dumps(saved))
    comparison = compare(both[0] / "results.json", tmp_path / "edited.json")
    assert [d["field"] for d in comparison["differences"]] == [field]
    assert comparison["differences"][0]["where"] == [f"{changed['protocol']} split {changed['split']}"]
    assert comparison["differences"][0]["b"] == sorted(comparison["differences"][0]["a"] + ['"something else"'])


def test_compare_refuses_what_is_not_a_results_file(both, tmp_path):
    (tmp_path / "text.json").write_text("not json at all\n")
    (tmp_path / "list.json").write_text("[1, 2]\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"clip_acc": 0.5, "video_acc": 0.5}))
    for bad in ("text.json", "list.json", "metrics.json", "missing.json"):
        result = compare_cli(both[0] / "results.json", tmp_path / bad)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and bad in errors[0] and "Traceback" not in result.output


def test_evaluate_without_data_or_compare_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--data and --out are required" in result.output


# ---- finetune: full finetuning, trained per checkpoint and split ----------------------------------------

def test_finetune_protocol_gives_the_numbers_of_finetune_full(dataset, tmp_path):
    """The same encoder file, split and settings through `finetune --mode full` and through `evaluate
    --protocol finetune` (after knn has encoded every video with the same encoder): the same training
    losses epoch by epoch and the same final scores."""
    from xdc_fast.checkpoint import load_encoder
    from xdc_fast.files import save_atomic
    from xdc_fast.config import FinetuneConfig
    from xdc_fast.finetune import finetune

    encoder, _ = load_encoder("random", "audio", None, 1e-5, 3)
    path = tmp_path / "enc.pt"
    save_atomic({"encoders": {f"audio.{k}": v for k, v in encoder.state_dict().items()}, "config": {"arch": "tiny"}},
                path)
    # audio: the same loop as video at a tenth of the CPU time
    settings = dict(modality="audio", epochs=2, lr=0.05, warmup_epochs=0.5, batch_size=4, seed=2)
    document = evaluate(dataset, tmp_path / "e", config(checkpoints=[str(path)], protocols=["knn", "finetune"], split=1,
                                                          finetune_clips=2, **settings), log=lambda *_: None)
    alone = finetune(dataset, tmp_path / "f",
                     FinetuneConfig(checkpoint=str(path), mode="full", split=1, clips_per_video=2, test_clips=2,
                                    clip=CLIP, device="cpu", loader="pyav", **settings), log=lambda *_: None)
    (result,) = [r for r in document["results"] if r["protocol"] == "finetune"]
    assert result["split"] == "1" and alone["split"] == {"kind": "manifest", "split": 1, "test_part": "test"}
    assert [(r["train_loss"], r["train_acc"], r["clips"]) for r in result["history"]] == \
        [(r["train_loss"], r["train_acc"], r["clips"]) for r in alone["history"]]
    assert [r["clips"] for r in alone["history"]] == [18, 18]  # 9 training videos x 2 random clips
    for key in ("clip_acc", "video_acc", "clip_top5", "video_top5", "num_test_videos", "num_test_clips"):
        assert result["scores"][key] == alone[key], key
    assert result["scores"]["num_test_videos"] == 3 and result["scores"]["num_test_clips"] == 6
    params = result["fingerprint"]["params"]
    assert (params["epochs"], params["lr"], params["warmup_epochs"], params["batch_size"], params["seed"],
            params["train_clips_per_video"]) == (2, 0.05, 0.5, 4, 2, 2)
    assert "| finetune | video_acc |" in (tmp_path / "e" / "results.md").read_text()


def test_finetune_protocol_is_not_a_default_and_its_settings_enter_the_fingerprint(dataset, tmp_path):
    assert "finetune" not in EvaluateConfig().protocols
    assert EvaluateConfig(protocols=["finetune"]).protocols == ["finetune"]
    runs = {}
    for name, lr in (("a", 0.01), ("b", 0.02)):
        runs[name] = evaluate(dataset, tmp_path / name, config(protocols=["finetune"], modality="audio", split=2,
                                                               epochs=1, lr=lr), log=lambda *_: None)
    comparison = compare(tmp_path / "a", tmp_path / "b")
    assert [(d["field"], d["a"], d["b"]) for d in comparison["differences"]] == [("params.lr", ["0.01"], ["0.02"])]
    # a different learning rate trained a different encoder: the fingerprint is telling the truth
    assert runs["a"]["results"][0]["history"][0]["train_loss"] != runs["b"]["results"][0]["history"][0]["train_loss"]


def test_finetune_protocol_refuses_a_multilabel_dataset(dataset, tmp_path):
    import shutil

    shutil.copytree(dataset, tmp_path / "ml")
    manifest = tmp_path / "ml" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows[0]["labels"] = [rows[0]["label"], (rows[0]["label"] + 1) % 3]  # one item with two classes
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["evaluate", "--data", str(tmp_path / "ml"), "--out", str(tmp_path / "o"),
                                       "--protocol", "finetune", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "multi-label" in errors[0] and "finetune" in errors[0]
    assert "Traceback" not in result.output and not (tmp_path / "o" / "results.json").exists()
