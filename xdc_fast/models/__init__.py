"""Encoders: R(2+1)D for video, ResNet for log-mel audio; full-size (the paper's) and `tiny` for CPUs."""

from .audio_resnet import build_audio_encoder
from .r2plus1d import build_video_encoder, load_video_weights

__all__ = ["build_audio_encoder", "build_video_encoder", "load_video_weights"]
