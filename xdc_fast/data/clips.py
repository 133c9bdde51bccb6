"""What a clip is, where clips start, and the transforms that turn decoded media into tensors.

A clip is ``frames`` video frames taken every ``stride`` source frames (or at ``fps`` frames per
second when that is set) from a start time, plus the audio window of ``audio_seconds`` centred on
the same instant. Transforms are pure functions; randomness comes in as a numpy Generator so that a
sample depends only on (seed, epoch, index), never on which worker decoded it.

Defaults: 8 frames at stride 2, short side resized to 128 then a 112 crop (the R(2+1)D-18 input of the
XDC lineage; the paper's text does not fix the clip length); 1 s of 16 kHz mono audio turned into a
log-mel spectrogram of 40 bands with 25 ms windows every 10 ms (101 frames). The ``tiny`` encoders take
64 -> 56 crops, small enough for a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# XDC's input normalisation: the mean/std the XDC authors gave for their released video weights.
VIDEO_MEAN = (0.43216, 0.394666, 0.37645)
VIDEO_STD = (0.22803, 0.22145, 0.216989)


@dataclass(frozen=True)
class ClipConfig:
    frames: int = field(default=8, metadata={"min": 1})  # T
    stride: int = field(default=2, metadata={"min": 1})  # source frames between two clip frames
    fps: float | None = field(default=None, metadata={"min": 0, "min_open": True})  # this rate instead of stride
    resize_short: int = field(default=128, metadata={"min": 1})  # short side after resizing, before the crop
    crop: int = field(default=112, metadata={"min": 1})  # square crop side
    audio_seconds: float = field(default=1.0, metadata={"min": 0, "min_open": True})  # centred on the clip
    sample_rate: int = field(default=16000, metadata={"min": 1000})
    n_mels: int = field(default=40, metadata={"min": 1})
    window_ms: float = field(default=25.0, metadata={"min": 0, "min_open": True})
    hop_ms: float = field(default=10.0, metadata={"min": 0, "min_open": True})
    gain_db: float = field(default=6.0, metadata={"min": 0})  # training: audio gain drawn uniformly in +-gain_db
    eval_clips: int = field(default=10, metadata={"min": 1})  # evaluation: uniformly spaced clips per video

    def clip_seconds(self, video_fps: float) -> float:
        """Time the clip's frames span (first frame to one frame past the last)."""
        if self.fps:
            return self.frames / self.fps
        return self.frames * self.stride / video_fps

    def frame_times(self, start: float, video_fps: float) -> np.ndarray:
        step = 1.0 / self.fps if self.fps else self.stride / video_fps
        return start + step * np.arange(self.frames)


# Every field of a clip; a command's ``clip`` overrides may name any of them.
CLIP_FIELDS = tuple(f.name for f in fields(ClipConfig))

def clip_for_arch(arch: str) -> ClipConfig:
    """The clip an encoder arch takes when neither the user nor a checkpoint says (its table entry)."""
    from ..models.archs import arch_named

    return replace(ClipConfig(), **arch_named(arch).geometry)


def geometry(config: ClipConfig) -> dict:
    """The fields that define what an encoder sees (saved with checkpoints; eval_clips is per command)."""
    return {f: getattr(config, f) for f in CLIP_FIELDS if f != "eval_clips"}


def train_start(duration: float, clip_seconds: float, rng: np.random.Generator) -> float:
    """A start drawn uniformly over all the positions where the clip fits (0 when it never fits)."""
    return float(rng.uniform(0.0, max(0.0, duration - clip_seconds)))


def eval_starts(duration: float, clip_seconds: float, count: int) -> np.ndarray:
    """``count`` uniformly spaced starts covering the video from beginning to end."""
    return np.linspace(0.0, max(0.0, duration - clip_seconds), count)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side`` and the aspect ratio kept (even sizes)."""
    if width <= height:
        w, h = short_side, round(height * short_side / width)
    else:
        w, h = round(width * short_side / height), short_side
    return w + (w % 2), h + (h % 2)


@dataclass(frozen=True)
class ClipPlan:
    """Everything random about one sample, drawn once, so every backend decodes the same clip."""

    start: float  # seconds on the file's timeline
    frame_indices: tuple[int, ...] | None  # source frames (None for audio-only items)
    size: tuple[int, int] | None  # (width, height) after resizing
    crop_top: int
    crop_left: int
    flip: bool
    audio_start: float  # seconds; the window may begin before 0 (padded with silence)
    gain: float  # linear factor on the waveform


def plan_clip(record: dict, config: ClipConfig, start: float, rng: np.random.Generator | None) -> ClipPlan:
    """The clip of ``record`` at ``start``: crop, flip and gain from ``rng`` (training) or centred and
    untouched (``rng`` None, evaluation)."""
    if record.get("fps"):
        times = config.frame_times(start, record["fps"])
        # The frame shown at time t started at or before t (the epsilon absorbs float error).
        indices = tuple(int(i) for i in np.floor(times * record["fps"] + 1e-6))
        size = resized_size(record["width"], record["height"], config.resize_short)
        span = config.clip_seconds(record["fps"])
        room_h, room_w = max(0, size[1] - config.crop), max(0, size[0] - config.crop)
    else:
        indices, size, span, room_h, room_w = None, None, config.audio_seconds, 0, 0
    if rng is None:
        top, left, flip, gain = room_h // 2, room_w // 2, False, 1.0
    else:
        top, left = int(rng.integers(0, room_h + 1)), int(rng.integers(0, room_w + 1))
        flip = bool(rng.random() < 0.5)
        gain = float(10.0 ** (rng.uniform(-config.gain_db, config.gain_db) / 20.0)) if config.gain_db > 0 else 1.0
    return ClipPlan(start, indices, size, top, left, flip, start + span / 2 - config.audio_seconds / 2, gain)


def video_to_tensor(frames: np.ndarray, crop: int, top: int, left: int, flip: bool) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> the ``crop`` square at (top, left), flipped if asked, normalised with
    XDC's mean/std, as float ``[3, T, crop, crop]``."""
    import torch  # here, not at the top: the clip's definition above is read by --help, which loads no torch

    t, h, w, _ = frames.shape
    patch = frames[:, top : top + min(crop, h), left : left + min(crop, w)]
    if flip:
        patch = patch[:, :, ::-1]
    # Channels first while still uint8, then in place: converting a permuted view to float walks memory
    # with stride 3 and costs six times as much (3.1 against 0.5 ms for a 16x112x112 clip).
    video = torch.from_numpy(np.ascontiguousarray(np.moveaxis(patch, 3, 0))).float().div_(255.0)
    mean = torch.tensor(VIDEO_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(VIDEO_STD).view(3, 1, 1, 1)
    return video.sub_(mean).div_(std)


class LogMel:
    """Waveform ``[S]`` -> log-mel ``[1, n_mels, frames]`` (torchaudio's MelSpectrogram, natural log)."""

    def __init__(self, config: ClipConfig):
        import torchaudio

        window = int(round(config.sample_rate * config.window_ms / 1000))
        hop = int(round(config.sample_rate * config.hop_ms / 1000))
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=window, win_length=window, hop_length=hop, n_mels=config.n_mels
        )

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.log(self.mel(waveform) + 1e-6).unsqueeze(0)
