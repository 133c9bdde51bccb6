import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, top_k_accuracy_score
from sklearn.preprocessing import StandardScaler

from tests.conftest import prepared_synthetic
from xdc_fast.checkpoint import CheckpointError, load_encoder
from xdc_fast.cli import main
from xdc_fast.config import FinetuneConfig
from xdc_fast.data.splits import choose_split, stratified_split
from xdc_fast.errors import XdcError as FinetuneError
from xdc_fast.finetune import finetune as finetune_full
from xdc_fast.metrics import score, softmax as softmax_numpy
from xdc_fast.probe import probe
from xdc_fast.protocols import linear_classifier

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome

FAST = dict(clip=dict(frames=4, resize_short=32, crop=28, audio_seconds=0.5, n_mels=20), test_clips=2, train_clips=2,
            batch_size=4, test_fraction=0.34)


def finetune(dataset, out, config, log=print):
    """What `xdc-fast finetune` runs: the probe for --mode linear, full finetuning otherwise."""
    return (probe if config.mode == "linear" else finetune_full)(dataset, out, config, log=log)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("finetune"), classes=3, videos_per_class=3, seconds=1.5, fps=8,
                              width=32, height=32, seed=3)


def test_video_accuracy_averages_softmax_over_clips():
    # Video 0 (label 1): clips disagree, the mean favours class 1. Video 1 (label 0): one confident
    # wrong clip outweighs two mildly right ones, so the video is wrong though most clips are right.
    probabilities = np.array([[0.6, 0.4], [0.1, 0.9], [0.2, 0.8],
                              [0.55, 0.45], [0.55, 0.45], [0.0, 1.0]])
    video_of_clip = np.array([0, 0, 0, 1, 1, 1])
    labels = np.array([1, 0])
    scored = score(probabilities, video_of_clip, labels, 2)
    assert scored["clip_acc"] == pytest.approx(4 / 6) and scored["video_acc"] == pytest.approx(0.5)
    assert scored["confusion"] == [[0, 1], [0, 1]]


def test_score_agrees_with_scikit_learn():
    rng = np.random.default_rng(0)
    probabilities = softmax_numpy(rng.normal(size=(60, 7)) * 3)
    video_of_clip = np.repeat(np.arange(20), 3)
    labels = rng.integers(0, 7, size=20)
    scored = score(probabilities, video_of_clip, labels, 7)
    clip_labels = labels[video_of_clip]
    assert scored["clip_acc"] == pytest.approx(top_k_accuracy_score(clip_labels, probabilities, k=1, labels=range(7)))
    assert scored["clip_top5"] == pytest.approx(top_k_accuracy_score(clip_labels, probabilities, k=5, labels=range(7)))
    per_video = probabilities.reshape(20, 3, 7).mean(1)
    assert scored["video_top5"] == pytest.approx(top_k_accuracy_score(labels, per_video, k=5, labels=range(7)))
    assert np.array_equal(scored["confusion"], confusion_matrix(labels, per_video.argmax(1), labels=range(7)))


def test_stratified_split_takes_every_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1 + [2])
    test = stratified_split(labels, 0.3, np.random.default_rng(0))
    assert test[:10].sum() == 3 and test[10:15].sum() == 2 and test[15:].sum() == 1
    assert np.array_equal(test, stratified_split(labels, 0.3, np.random.default_rng(0)))


def test_manifest_splits_are_used_and_a_missing_one_is_refused():
    items = [{"id": f"v{i}", "label": i % 2, "split": {"1": "train" if i < 4 else "test", "2": "test" if i < 4 else "train"}}
             for i in range(6)]
    chosen = choose_split(items, 1, 0.3, np.random.default_rng(0))
    assert [r["id"] for r in chosen.test] == ["v4", "v5"] and chosen.description["kind"] == "manifest"
    assert [r["id"] for r in choose_split(items, 2, 0.3, np.random.default_rng(0)).test] == ["v0", "v1", "v2", "v3"]
    with pytest.raises(FinetuneError, match="--split 3 is not in this dataset"):
        choose_split(items, 3, 0.3, np.random.default_rng(0))
    kinetics = [{"id": "a", "label": 0, "split": {"1": "train"}}, {"id": "b", "label": 0, "split": {"1": "val"}}]
    assert choose_split(kinetics, 1, 0.3, np.random.default_rng(0)).description["test_part"] == "val"
    with pytest.raises(FinetuneError, match="no label"):
        choose_split([{"id": "x", "label": None}], 1, 0.3, np.random.default_rng(0))


def test_linear_classifier_reproduces_scikit_learns_probabilities():
    rng = np.random.default_rng(1)
    for classes in (2, 4):
        x = rng.normal(size=(80, 6)) * rng.uniform(0.5, 5, size=6) + rng.normal(size=6)
        y = rng.integers(0, classes, size=80)
        layer = linear_classifier(x, y, classes + 1, c=0.5, seed=0)  # one class never seen in training
        scaler = StandardScaler().fit(x)
        oracle = LogisticRegression(C=0.5, max_iter=3000, random_state=0).fit(scaler.transform(x), y)
        ours = softmax_numpy(layer(torch.from_numpy(x).float()).detach().double().numpy())
        assert np.allclose(ours[:, :classes], oracle.predict_proba(scaler.transform(x)), atol=1e-4)
        assert np.all(ours[:, classes] < 1e-6)


@pytest.mark.parametrize("modality,mode", [("audio", "linear"), ("video", "linear"), ("audio", "full"), ("video", "full")])
def test_finetune_writes_metrics_that_the_saved_model_reproduces(dataset, tmp_path, modality, mode):
    from xdc_fast.data.clips import ClipConfig
    from xdc_fast.data.dataset import ClipDataset
    from xdc_fast.engine import encode_clips

    config = FinetuneConfig(modality=modality, mode=mode, epochs=2, **FAST)
    metrics = finetune(dataset, tmp_path / "ft", config, log=lambda *_: None)
    written = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert written["clip_acc"] == metrics["clip_acc"] and written["num_test_videos"] == 3
    assert written["split"]["kind"] == "stratified" and len(written["split"]["test_ids"]) == 3
    assert sum(map(sum, written["confusion"])) == 3 and written["num_test_clips"] == 6
    assert (tmp_path / "ft" / "confusion.png").stat().st_size > 0
    assert written["final_epoch"] == (1 if mode == "full" else None)
    # The saved encoder and layer, run independently over the test clips, give the reported accuracies.
    encoder, source = load_encoder(tmp_path / "ft" / "checkpoints" / "last.pt", modality)
    saved = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)
    head = torch.nn.Linear(encoder.feature_dim, 3)
    head.load_state_dict(saved["head"])
    test_set = ClipDataset(dataset, ClipConfig(**{**saved["clip"], "eval_clips": 2}), train=False, modalities=(modality,))
    test_set.items = [r for r in test_set.items if r["id"] in set(written["split"]["test_ids"])]
    features, position = encode_clips({modality: encoder}, test_set, 4, torch.device("cpu"))
    features, video_of_clip = features[modality], position // 2
    probabilities = softmax_numpy(head(torch.from_numpy(features)).detach().numpy())
    labels = np.array([r["label"] for r in test_set.items])
    assert score(probabilities, video_of_clip, labels, probabilities.shape[1])["video_acc"] == pytest.approx(written["video_acc"])
    if mode == "full":
        assert len(written["history"]) == 2 and all(np.isfinite(r["train_loss"]) for r in written["history"])
    # Linear keeps the encoder frozen (equal to the seeded random start); full trains it.
    start, _ = load_encoder("random", modality, seed=0)
    same = [torch.equal(a, b) for a, b in zip(start.state_dict().values(), encoder.state_dict().values())]
    assert all(same) if mode == "linear" else not all(same)


def test_linear_probe_of_audio_finds_the_pitch_classes(dataset, tmp_path):
    # Pitch carries the class and a random audio encoder keeps it: a working probe must beat chance (1/3).
    metrics = finetune(dataset, tmp_path / "ft", FinetuneConfig(modality="audio", mode="linear", **FAST),
                       log=lambda *_: None)
    assert metrics["clip_acc"] > 0.5


def test_existing_results_are_not_overwritten(dataset, tmp_path):
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "metrics.json").write_text("{}")
    with pytest.raises(FinetuneError, match="already holds results"):
        finetune(dataset, tmp_path / "ft", FinetuneConfig(**FAST), log=lambda *_: None)


def test_load_encoder_reads_torchvision_layout_weights(tmp_path):
    from torchvision.models.video import r2plus1d_18

    reference = r2plus1d_18(weights=None).eval()
    # Released files are often wrapped: {"state_dict": {"module.<key>": ...}}.
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "w.pt")
    encoder, source = load_encoder(tmp_path / "w.pt", "video")
    assert source == {"source": "torchvision", "arch": "r2plus1d_18", "video_input": "rgb"}
    x = torch.randn(1, 3, 4, 32, 32)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(x), reference(x), atol=1e-5)
    with pytest.raises(CheckpointError, match="holds a r2plus1d_18 encoder"):
        load_encoder(tmp_path / "w.pt", "video", arch="tiny")
    with pytest.raises(CheckpointError, match="no audio encoder"):
        load_encoder(tmp_path / "w.pt", "audio")


def test_random_checkpoint_is_seeded_and_bad_files_are_refused(tmp_path):
    a, _ = load_encoder("random", "audio", seed=4)
    b, _ = load_encoder("random", "audio", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_encoder(tmp_path / "junk.pt", "video")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(tmp_path / "missing.pt", "video")


def test_cli_finetune_reports_bad_input_without_a_traceback(dataset, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["finetune", "--data", str(dataset), "--out", str(tmp_path / "o"),
                                  "--checkpoint", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output
    (tmp_path / "bad.yaml").write_text("frames: 4\nlearning_rate: 0.1\n")
    result = runner.invoke(main, ["finetune", "--data", str(dataset), "--out", str(tmp_path / "o"),
                                  "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "unknown configuration key 'learning_rate'" in result.output
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_cli_finetune_linear_audio(dataset, tmp_path):
    import yaml

    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(FAST))
    result = CliRunner().invoke(main, ["finetune", "--data", str(dataset), "--out", str(tmp_path / "o"),
                                       "--modality", "audio", "--mode", "linear", "--config", str(tmp_path / "fast.yaml")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert f"video accuracy {written['video_acc']:.1%}" in result.output and written["config"]["mode"] == "linear"


def _torchrun(args, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "xdc_fast.cli", *args, "--device", "cpu"]
    return subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


def test_torchrun_two_ranks_score_like_one_process(dataset, tmp_path):
    """Ranks split the test videos and gather the features: the linear probe's result equals one process's;
    full finetuning runs as one DDP model with only rank 0 writing."""
    import yaml

    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(FAST))
    common = ["--data", str(dataset), "--modality", "audio", "--config", str(tmp_path / "fast.yaml")]
    result = _torchrun(["finetune", *common, "--mode", "linear", "--out", str(tmp_path / "ddp")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test: clip accuracy") == 1  # only rank 0 speaks
    single = CliRunner().invoke(main, ["finetune", *common, "--mode", "linear", "--out", str(tmp_path / "one"),
                                       "--device", "cpu"])
    assert single.exit_code == 0, single.output
    ddp, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    for key in ("clip_acc", "video_acc", "num_test_videos", "num_test_clips", "confusion"):
        assert ddp[key] == one[key], key

    result = _torchrun(["finetune", *common, "--mode", "full", "--epochs", "1", "--out", str(tmp_path / "full")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert written["history"][0]["clips"] == 6 and written["num_test_videos"] == 3  # 6 training videos, both ranks


def test_esc50_folds_linear_audio_probe(tmp_path):
    """ESC-50 layout: fold N is split N's test set; pure tones of two pitches are told apart by a probe
    of a random audio encoder, and asking for video on audio-only data is refused."""
    import csv

    from tests.data.test_formats import _write_wav
    from xdc_fast.data.prepare import prepare

    rng = np.random.default_rng(0)
    (tmp_path / "esc" / "meta").mkdir(parents=True)
    with (tmp_path / "esc" / "meta" / "esc50.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for fold in range(1, 6):
            for target, (category, pitch) in enumerate((("hum", 200.0), ("whistle", 3000.0))):
                name = f"{fold}-{target}-A-{target}.wav"
                writer.writerow([name, fold, target, category, "False", "x", "A"])
                t = np.arange(16000 * 2) / 16000
                tone = 0.3 * np.sin(2 * np.pi * pitch * rng.uniform(0.95, 1.05) * t) + rng.normal(0, 0.01, t.size)
                _write_wav(tmp_path / "esc" / "audio" / name, tone.astype(np.float32), 16000)
    prepare(tmp_path / "esc", tmp_path / "ds", fmt="esc50", workers=1, progress=False)
    config = FinetuneConfig(modality="audio", mode="linear", split=3, **FAST)
    metrics = finetune(tmp_path / "ds", tmp_path / "ft", config, log=lambda *_: None)
    assert metrics["split"] == {"kind": "manifest", "split": 3, "test_part": "test"}
    assert metrics["num_test_videos"] == 2 and metrics["num_train_videos"] == 8
    assert metrics["video_acc"] == 1.0 and metrics["classes"] == ["hum", "whistle"]
    with pytest.raises(FinetuneError, match="audio-only"):
        finetune(tmp_path / "ds", tmp_path / "ft2", FinetuneConfig(modality="video", **FAST), log=lambda *_: None)


def test_a_restarted_finetune_keeps_its_results_and_refuses_other_settings(dataset, tmp_path, monkeypatch):
    """Under a launcher (--resume auto) a job that had finished is not run again; other settings are refused,
    and by hand the folder is refused as before."""
    import yaml

    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(FAST))
    args = ["finetune", "--data", str(dataset), "--out", str(tmp_path / "o"), "--modality", "audio", "--mode",
            "linear", "--config", str(tmp_path / "fast.yaml")]
    assert CliRunner().invoke(main, args).exit_code == 0
    written = (tmp_path / "o" / "metrics.json").read_text()
    by_hand = CliRunner().invoke(main, args)
    assert by_hand.exit_code == 2 and "already holds results" in by_hand.output
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "nothing to run" in again.output, again.output
    assert (tmp_path / "o" / "metrics.json").read_text() == written
    other = CliRunner().invoke(main, [*args, "--seed", "5"])
    assert other.exit_code == 2 and other.output.count("Error:") == 1 and "other settings" in other.output


def test_a_finetuning_stopped_after_an_epoch_resumes_and_ends_as_the_uninterrupted_run(dataset, tmp_path, monkeypatch):
    """Stopped as epoch 2 of 3 begins (a crash, a preemption): --resume goes on after epoch 1 from
    checkpoints/epoch.pt and ends with the uninterrupted run's weights and scores; other settings are
    refused, and the epoch checkpoint is gone once the results are written."""
    from xdc_fast import transfer
    from xdc_fast.config import ConfigError

    config = FinetuneConfig(mode="full", epochs=3, lr=0.05, **FAST)
    straight = finetune_full(dataset, tmp_path / "straight", config, log=lambda *_: None)
    real = transfer.train_epoch

    def stopping(*args, **kwargs):
        if args[5] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer, "train_epoch", stopping)
    with pytest.raises(KeyboardInterrupt):
        finetune_full(dataset, tmp_path / "stopped", config, log=lambda *_: None)
    monkeypatch.setattr(transfer, "train_epoch", real)
    saved = torch.load(tmp_path / "stopped" / "checkpoints" / "epoch.pt", weights_only=True)
    assert saved["epoch"] == 1 and len(saved["history"]) == 2
    with pytest.raises(ConfigError, match="other settings"):
        finetune_full(dataset, tmp_path / "stopped", FinetuneConfig(mode="full", epochs=3, lr=0.1, **FAST),
                      log=lambda *_: None, resume=True)
    lines = []
    resumed = finetune_full(dataset, tmp_path / "stopped", config, log=lines.append, resume=True)
    assert any("resuming after epoch 1" in line for line in lines)
    assert resumed["video_acc"] == straight["video_acc"] and resumed["history"] == straight["history"]
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True) for run in ("straight", "stopped"))
    for key in a["encoders"]:
        assert torch.equal(a["encoders"][key], b["encoders"][key]), key
    assert torch.equal(a["head"]["weight"], b["head"]["weight"])
    assert not (tmp_path / "stopped" / "checkpoints" / "epoch.pt").exists()
