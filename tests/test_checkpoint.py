import pytest
import torch

from xdc_fast.checkpoint import load_encoder, load_encoders_from
from xdc_fast.errors import CheckpointError
from xdc_fast.models import build_audio_encoder, build_video_encoder


@pytest.fixture
def residual_checkpoint(tmp_path):
    """One of our checkpoints whose video encoder was trained on frame differences."""
    encoders = torch.nn.ModuleDict({"video": build_video_encoder("tiny", video_input="residual"),
                                    "audio": build_audio_encoder("tiny")})
    path = tmp_path / "last.pt"
    torch.save({"encoders": encoders.state_dict(), "config": {"arch": "tiny"}}, path)
    return path


def test_every_command_feeds_an_encoder_what_it_was_trained_on(residual_checkpoint):
    encoder, source = load_encoder(residual_checkpoint, "video")
    assert encoder.video_input == "residual" and source["video_input"] == "residual"
    _, audio_source = load_encoder(residual_checkpoint, "audio")
    assert "video_input" not in audio_source and audio_source["audio_input"] == "logmel"
    with pytest.raises(CheckpointError, match="fed residual frames, but --video-input rgb"):
        load_encoder(residual_checkpoint, "video", video_input="rgb")


def test_random_encoders_take_the_input_asked_for():
    for arch, asked, expected in (("tiny", None, "residual"), ("r2plus1d_18", None, "rgb"), ("tiny", "rgb", "rgb"),
                                  ("r2plus1d_18", "residual", "residual")):
        encoder, source = load_encoder("random", "video", arch=arch, video_input=asked)
        assert encoder.video_input == source["video_input"] == expected


def test_a_run_starting_from_a_checkpoint_fed_otherwise_is_refused(residual_checkpoint):
    frames = torch.nn.ModuleDict({"video": build_video_encoder("tiny", video_input="rgb")})
    with pytest.raises(CheckpointError, match="pass --video-input residual"):
        load_encoders_from(frames, residual_checkpoint, "tiny", "rgb")
    differences = torch.nn.ModuleDict({"video": build_video_encoder("tiny", video_input="residual")})
    assert load_encoders_from(differences, residual_checkpoint, "tiny", "residual") == ["video"]


def test_the_audio_input_travels_with_the_checkpoint_and_a_contradicting_one_is_refused(tmp_path):
    encoders = torch.nn.ModuleDict({"audio": build_audio_encoder("tiny", audio_input="centred")})
    path = tmp_path / "last.pt"
    torch.save({"encoders": encoders.state_dict(), "config": {"arch": "tiny"}}, path)
    encoder, source = load_encoder(path, "audio")
    assert encoder.audio_input == source["audio_input"] == "centred"
    with pytest.raises(CheckpointError, match="fed centred log-mel, but --audio-input logmel"):
        load_encoder(path, "audio", audio_input="logmel")
    random, source = load_encoder("random", "audio", audio_input="centred")
    assert random.audio_input == source["audio_input"] == "centred"
    plain = torch.nn.ModuleDict({"audio": build_audio_encoder("tiny", audio_input="logmel")})
    with pytest.raises(CheckpointError, match="set audio_input: centred"):
        load_encoders_from(plain, path, "tiny", audio_input="logmel")
    assert load_encoders_from(plain, path, "tiny", audio_input="centred") == ["audio"]
