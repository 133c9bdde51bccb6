"""The encoder architectures, as data: widths and depths of both encoders, the clip geometry they take,
and the device they are meant for.

Everything that names an architecture reads this table: the CLI's ``--arch`` choices and help, the
configuration checks, the feature width that ``auto`` settings use, the clip geometry of a run and of a
checkpoint, and the encoder builders. Adding an architecture is one entry here and a test. The module
imports no torch, so ``--help`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Arch:
    name: str
    summary: str
    video_widths: tuple[int, int, int, int]  # channels of the four R(2+1)D stages
    video_blocks: tuple[int, int, int, int]
    video_stem_mid: int  # channels between the stem's spatial and temporal convolutions
    audio_widths: tuple[int, int, int, int]  # channels of the four ResNet stages over the log-mel
    audio_blocks: tuple[int, int, int, int]
    geometry: dict  # clip fields this arch takes unless the user or a checkpoint says otherwise
    meant_for: str  # "cpu" or "cuda": the device on which it is the default
    video_input: str = "rgb"  # what its video encoder is fed unless the run says otherwise (VIDEO_INPUTS)
    audio_input: str = "logmel"  # what its audio encoder is fed unless the run says otherwise (AUDIO_INPUTS)
    head: str = "linear"  # the pretraining heads unless the run says otherwise (HEADS)
    rounds: int = 3  # how many rounds an auto-length pretraining is split into (config.resolve_auto)

    @property
    def feature_dim(self) -> int:
        """Width of the features both encoders give (what k-means clusters before PCA)."""
        return min(self.video_widths[-1], self.audio_widths[-1])


ARCHS = {a.name: a for a in (
    Arch("tiny", "R(2+1)D and ResNet at a quarter of the width, one block per stage (a CPU's size)",
         (16, 32, 64, 128), (1, 1, 1, 1), 12, (16, 32, 64, 128), (1, 1, 1, 1),
         {"resize_short": 64, "crop": 56}, "cpu", "residual", head="mlp", rounds=7),
    Arch("r2plus1d_18", "R(2+1)D-18 for video and ResNet-18 for audio, the paper's (a GPU job)",
         (64, 128, 256, 512), (2, 2, 2, 2), 45, (64, 128, 256, 512), (2, 2, 2, 2),
         {"resize_short": 128, "crop": 112}, "cuda"),
)}

# What a video encoder sees: the frames, or the differences of consecutive frames (see models.r2plus1d).
VIDEO_INPUTS = ("rgb", "residual")
VIDEO_INPUT_HELP = ("What the video encoder is fed: rgb (the frames, as the paper and every released weight file) or "
                    "residual (the differences of consecutive frames, so what stands still cancels and the encoder "
                    "sees motion from its first layer). auto: the arch's, residual for tiny and rgb for r2plus1d_18 "
                    "(docs/pretraining.md#video-input).")

# What an audio encoder sees: the log-mel, or the log-mel less its mean over the clip (see models.audio_resnet).
AUDIO_INPUTS = ("logmel", "centred")
AUDIO_INPUT_HELP = ("What the audio encoder is fed: logmel (the log-mel spectrogram, as the paper) or centred (the "
                    "log-mel less its mean over the clip, so a clip's loudness, an offset on a log scale, cancels). "
                    "auto: the arch's, logmel for both (docs/pretraining.md#audio-input).")

# The classifier each pretraining round trains over an encoder's features (see engine.new_head).
HEADS = ("linear", "mlp")
HEAD_HELP = ("The classifier each round trains over an encoder's features to predict its targets: linear "
             "(DeepCluster's and XDC's) or mlp (a hidden layer as wide as the features and a ReLU before the "
             "classifier, as SimCLR's projection head, so the features need not become a linear code of the round's "
             "clusters). Heads are fresh each round and dropped after pretraining. auto: the arch's, mlp for tiny "
             "and linear for r2plus1d_18 (docs/pretraining.md#heads).")

# The arch a run takes when none is named: the paper's on a GPU, the tiny one on a CPU.
DEFAULT_ARCH = {a.meant_for: a.name for a in ARCHS.values()}
ARCH_HELP = ("Encoders: " + "; ".join(f"{a.name}: {a.summary}" for a in ARCHS.values())
             + f". auto: {DEFAULT_ARCH['cuda']} on CUDA, {DEFAULT_ARCH['cpu']} on the CPU.")


def arch_named(name: str) -> Arch:
    if name not in ARCHS:
        raise ConfigError(f"unknown encoder arch {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def default_arch(device_type: str) -> str:
    """The arch for a run on ``device_type`` ("cpu" or "cuda") that names none."""
    return DEFAULT_ARCH["cuda" if device_type == "cuda" else "cpu"]
