"""Encoders: R(2+1)D for video, ResNet for log-mel audio; full-size (the paper's) and `tiny` for CPUs.

The table of architectures (:mod:`xdc_fast.models.archs`) imports no torch; the builders load it on
first use, so naming an arch (``--help``, a configuration check) costs nothing.
"""

from .archs import ARCHS, VIDEO_INPUTS, Arch, arch_named, default_arch

_BUILDERS = {"build_video_encoder": "r2plus1d", "load_video_weights": "r2plus1d", "build_audio_encoder": "audio_resnet"}


def __getattr__(name: str):
    if name in _BUILDERS:
        import importlib

        return getattr(importlib.import_module(f".{_BUILDERS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ARCHS", "VIDEO_INPUTS", "Arch", "arch_named", "default_arch", *_BUILDERS]
