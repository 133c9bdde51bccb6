"""Configurations: every field is checked where it enters (Python, YAML, flags), with one-line errors."""

import pytest
import yaml
from click.testing import CliRunner

from xdc_fast.cli import main
from xdc_fast.config import ConfigError, ExtractConfig, FinetuneConfig, PretrainConfig, from_dict

BAD_VALUES = [
    (PretrainConfig, "batch_size", 0, "batch_size: 0 is out of range; it must be at least 1"),
    (PretrainConfig, "batch_size", "8", "batch_size: expected an integer, got '8' (str)"),
    (PretrainConfig, "batch_size", True, "batch_size: expected an integer, got True"),
    (PretrainConfig, "lr", -1, "lr: -1.0 is out of range; it must be greater than 0"),
    (PretrainConfig, "lr", 0, "lr: 0.0 is out of range; it must be greater than 0"),
    (PretrainConfig, "schedule", "linear", "schedule: 'linear' is not one of cosine, constant"),
    (PretrainConfig, "arch", "resnet50", "arch: 'resnet50' is not one of auto, tiny, r2plus1d_18"),
    (PretrainConfig, "variant", "sdc", "variant: 'sdc' is not one of xdc, mdc, cdc, sdc-video, sdc-audio"),
    (PretrainConfig, "momentum", 1.5, "momentum: 1.5 is out of range; it must be at most 1"),
    (PretrainConfig, "clip", {"crop": 0}, "clip.crop: 0 is out of range"),
    (PretrainConfig, "clip", {"fps": "fast"}, "clip.fps: expected a number"),
    (PretrainConfig, "clip", {"crops": 3}, "unknown configuration key 'crops' for ClipConfig"),
    (PretrainConfig, "epochs", None, "epochs: a value is needed"),
    (PretrainConfig, "epochs", "many", "epochs: expected an integer or 'auto', got 'many'"),
    (PretrainConfig, "pca_dim", -1, "pca_dim: -1 is out of range"),
    (FinetuneConfig, "mode", "probe", "mode: 'probe' is not one of full, linear"),
    (FinetuneConfig, "test_clips", 0, "test_clips: 0 is out of range"),
    (FinetuneConfig, "test_fraction", 0, "test_fraction: 0.0 is out of range; it must be greater than 0"),
    (FinetuneConfig, "modality", "text", "modality: 'text' is not one of video, audio"),
    (FinetuneConfig, "linear_c", "big", "linear_c: expected a number"),
    (ExtractConfig, "aggregate", "max", "aggregate: 'max' is not one of mean, all"),
    (ExtractConfig, "clips_per_video", -2, "clips_per_video: -2 is out of range"),
    (ExtractConfig, "device", "tpu", "device: 'tpu' is not one of auto, cpu, cuda"),
    (ExtractConfig, "learning_rate", 0.1, "unknown configuration key 'learning_rate' for ExtractConfig"),
]


@pytest.mark.parametrize("cls,field,value,message", BAD_VALUES)
def test_a_bad_value_is_one_line_naming_field_value_and_what_is_allowed(cls, field, value, message):
    with pytest.raises(ConfigError) as caught:
        from_dict(cls, {field: value})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_python_construction_is_checked_too():
    with pytest.raises(ConfigError, match="batch_size: 0"):
        PretrainConfig(batch_size=0)


def test_ints_are_accepted_for_floats_and_flat_geometry_moves_under_clip():
    config = from_dict(PretrainConfig, {"lr": 1, "frames": 4, "crop": 32, "clip": {"n_mels": 20}})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.clip == {"frames": 4, "crop": 32, "n_mels": 20}
    clip = config.clip_config()
    assert (clip.frames, clip.crop, clip.n_mels, clip.resize_short) == (4, 32, 20, 64)  # the rest: tiny's geometry
    assert from_dict(PretrainConfig, {"arch": "r2plus1d_18"}).clip_config().crop == 112


@pytest.mark.parametrize("command,cls", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig),
                                         ("extract", ExtractConfig)])
@pytest.mark.parametrize("field,value,message", [("batch_size", 0, "batch_size: 0 is out of range"),
                                                 ("batch_size", "many", "batch_size: expected an integer"),
                                                 ("device", "tpu", "device: 'tpu' is not one of"),
                                                 ("clip", {"crop": -1}, "clip.crop: -1 is out of range")])
def test_a_bad_yaml_value_is_one_error_line_and_exit_2(tmp_path, command, cls, field, value, message):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({field: value}))
    out = tmp_path / ("o.pt" if command == "extract" else "o")
    result = CliRunner().invoke(main, [command, "--data", str(tmp_path), "--out", str(out),
                                       "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("command,cls,flags", [
    ("pretrain", PretrainConfig, {"--epochs": "epochs", "--clusters": "clusters", "--batch-size": "batch_size",
                                  "--lr": "lr", "--variant": "variant", "--arch": "arch", "--seed": "seed"}),
    ("finetune", FinetuneConfig, {"--epochs": "epochs", "--test-clips": "test_clips", "--lr": "lr",
                                  "--mode": "mode", "--eval-every": "eval_every", "--workers": "workers"}),
    ("extract", ExtractConfig, {"--clips-per-video": "clips_per_video", "--aggregate": "aggregate",
                                "--batch-size": "batch_size"})])
def test_help_shows_each_options_real_default(command, cls, flags):
    import re

    lines = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output.splitlines()
    defaults = cls()
    for flag, field in flags.items():
        start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("-")), len(lines))
        shown = re.search(r"\[default: ([^\]]+)\]", " ".join(" ".join(lines[start:end]).split()))
        assert shown, flag
        assert shown.group(1).split(";")[0].strip() == str(getattr(defaults, field)), flag  # "; x>=1": the range
    assert any(line.strip().startswith("--config FILE") for line in lines)


def test_flag_beats_file_beats_default(tmp_path):
    from xdc_fast.cli import build_config

    (tmp_path / "c.yaml").write_text("epochs: 7\nlr: 0.5\nmomentum: 0.5\n")
    runner = CliRunner()
    seen = {}

    import xdc_fast.pretrain as pretrain_module

    def fake(dataset, out, config, **_):
        seen["config"] = config
        return []

    original = pretrain_module.pretrain
    pretrain_module.pretrain = fake
    try:
        result = runner.invoke(main, ["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--lr", "0.1",
                                      "--config", str(tmp_path / "c.yaml")])
    finally:
        pretrain_module.pretrain = original
    config = seen["config"]
    assert (config.lr, config.epochs, config.momentum, config.batch_size) == (0.1, 7, 0.5, 8), result.output
    assert build_config(PretrainConfig, {"momentum": 0.3}, {"lr": 0.2}).momentum == 0.3


# ---- auto: settings resolved from the data's size ------------------------------------------------------

@pytest.mark.parametrize("videos,batch,expected", [
    # videos, batch size -> clusters, pca_dim, kmeans_nredo, epochs_per_round, epochs
    (96, 8, (10, 0, 3, 8, 56)),  # the demo's size: 12 steps an epoch, seven rounds of 8 epochs, L2 only
    (40, 8, (8, 0, 3, 18, 126)),  # at least 8 clusters; 5 steps an epoch
    (288, 8, (17, 0, 3, 3, 21)),  # the families' size: seven rounds of 3 epochs, as measured there
    (5000, 8, (71, 64, 3, 1, 7)),  # 10000 clips: 100 per dimension allows 64; 625 steps an epoch
    (240000, 32, (490, 128, 1, 1, 7)),  # Kinetics-size: whitening capped by tiny's 128 features
])
def test_auto_settings_follow_the_data_size(videos, batch, expected):
    import math

    from xdc_fast.config import resolve_auto

    config, why = resolve_auto(PretrainConfig(batch_size=batch), videos, math.ceil(videos / batch))
    assert (config.clusters, config.pca_dim, config.kmeans_nredo, config.epochs_per_round, config.epochs) == expected
    assert set(why) == {"clusters", "pca_dim", "kmeans_nredo", "epochs_per_round", "epochs", "video_input",
                        "audio_input", "head"}
    # On the CPU the arch is tiny.
    assert (config.video_input, config.audio_input, config.head) == ("residual", "logmel", "mlp")
    paper = resolve_auto(PretrainConfig(arch="r2plus1d_18"), videos, 10)[0]
    assert (paper.video_input, paper.audio_input, paper.head) == ("rgb", "logmel", "linear")
    # Rounds share 600 steps: seven for tiny (86 steps each), three for the paper's arch (200 each), each
    # round the fewest epochs that reach its share.
    for arch, rounds in (("tiny", 7), ("r2plus1d_18", 3)):
        steps = math.ceil(videos / batch)
        resolved = resolve_auto(PretrainConfig(arch=arch, batch_size=batch), videos, steps)[0]
        share, per_round = math.ceil(600 / rounds), resolved.epochs_per_round * steps
        assert per_round >= share and (resolved.epochs_per_round == 1 or per_round - steps < share)
        assert resolved.epochs == max(4, rounds * resolved.epochs_per_round)


def test_given_values_are_kept_and_only_auto_ones_resolved():
    from xdc_fast.config import resolve_auto

    config, why = resolve_auto(PretrainConfig(clusters=12, epochs=6, pca_dim=16, video_input="rgb",
                                              audio_input="logmel", head="linear"), 96, 12)
    assert (config.clusters, config.epochs, config.pca_dim, config.epochs_per_round) == (12, 6, 16, 8)
    assert config.video_input == "rgb" and config.head == "linear" and set(why) == {"kmeans_nredo", "epochs_per_round"}
    assert resolve_auto(PretrainConfig(arch="r2plus1d_18"), 400000, 10)[0].pca_dim == 256


def test_auto_on_the_command_line_and_in_the_saved_config(tmp_path):
    """--epochs auto and numbers both parse; config.yaml keeps the values used and why."""
    from xdc_fast.data.prepare import prepare
    from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "media", SyntheticSpec(classes=2, videos_per_class=3, seconds=1.5, fps=8,
                                                             width=32, height=32))
    prepare(tmp_path / "media", tmp_path / "ds", workers=1, progress=False)
    fast = ["--batch-size", "6", "--config", str(tmp_path / "c.yaml")]
    (tmp_path / "c.yaml").write_text("epochs_per_round: 1\nclip: {frames: 4, resize_short: 32, crop: 28, "
                                     "audio_seconds: 0.5, n_mels: 20}\n")
    result = CliRunner().invoke(main, ["pretrain", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
                                       "--epochs", "auto", "--clusters", "3", *fast])
    assert result.exit_code == 0, result.output
    assert "auto: epochs = 7 (the tiny arch's 7 rounds of 1 epoch(s), at least 4)" in result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["epochs"], saved["clusters"], saved["epochs_per_round"]) == (7, 3, 1)
    assert set(saved["resolved_from_auto"]) == {"epochs", "pca_dim", "kmeans_nredo", "video_input", "audio_input",
                                                 "head"}
    assert saved["video_input"] == "residual"
    bad = CliRunner().invoke(main, ["pretrain", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "r2"),
                                    "--epochs", "lots", *fast])
    assert bad.exit_code == 2 and "lots" in bad.output and "Traceback" not in bad.output


def test_epochs_fewer_than_one_auto_round_say_the_run_is_one_partial_round():
    from xdc_fast.config import resolve_auto

    config, why = resolve_auto(PretrainConfig(epochs=3), 96, 12)  # 12 steps an epoch: a round needs 8
    assert config.epochs_per_round == 8 and config.epochs == 3
    assert "one partial round of 36 steps" in why["epochs_per_round"]
    _, enough = resolve_auto(PretrainConfig(epochs=40), 96, 12)
    assert "partial" not in enough["epochs_per_round"]


def test_an_auto_arch_follows_the_device():
    config = PretrainConfig()
    assert config.arch == "auto"
    assert config.resolved_arch("cpu") == "tiny" and config.resolved_arch("cuda") == "r2plus1d_18"
    assert PretrainConfig(arch="r2plus1d_18").resolved_arch("cpu") == "r2plus1d_18"
    assert PretrainConfig(device="cpu").clip_config().crop == 56  # tiny's geometry on the CPU
