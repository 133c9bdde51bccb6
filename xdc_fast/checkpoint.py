"""Saving checkpoints atomically, and loading an encoder from any file a user may hold.

Three kinds of file give an encoder: ours (pretraining or finetuning, a dict with ``encoders`` whose
keys are prefixed by the modality, and ``config`` with the arch), a torchvision-layout video state dict
(torchvision's ``r2plus1d_18`` or the official XDC release, possibly nested under ``state_dict`` or
``model`` and prefixed by ``module.``), and the word ``random`` for the untrained baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import XdcError
from .files import save_atomic  # noqa: F401 - where callers have always found it

MODALITIES = ("video", "audio")


class CheckpointError(XdcError):
    """A checkpoint that cannot give the encoder asked for (reported without a traceback)."""




def read_checkpoint(path: str | Path) -> dict:
    """The file's contents (tensors only: ``weights_only``), or a CheckpointError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict or an xdc-fast checkpoint")
    return state


def is_ours(state: dict) -> bool:
    return "encoders" in state


def checkpoint_arch(state: dict) -> str:
    """The arch a checkpoint's encoders were built with (torchvision-layout files are r2plus1d_18)."""
    if is_ours(state):
        return state.get("config", {}).get("arch", "tiny")
    return "r2plus1d_18"


def own_encoder_state(state: dict, modality: str, path) -> dict:
    """The ``modality.*`` entries of one of our checkpoints, without the prefix."""
    own = {k[len(modality) + 1 :]: v for k, v in state["encoders"].items() if k.startswith(modality + ".")}
    if not own:
        present = sorted({k.split(".")[0] for k in state["encoders"]})
        raise CheckpointError(f"{path} holds no {modality} encoder (it has: {', '.join(present) or 'none'})")
    return own


def checkpoint_clip(state: dict) -> dict:
    """The clip geometry an encoder of ours was trained with ({} for other files): the ``clip`` entry, or
    the flat keys older checkpoints kept in their config."""
    if not is_ours(state):
        return {}
    if "clip" in state:
        return dict(state["clip"])
    config = state.get("config", {})
    return {k: config[k] for k in ("frames", "stride", "resize_short", "crop", "audio_seconds", "n_mels")
            if config.get(k) is not None}


def torchvision_video_state(state: dict) -> dict:
    """A torchvision-layout state dict out of the usual wrappings of released weight files."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def build_encoder(modality: str, arch: str, bn_eps: float = 1e-5) -> nn.Module:
    from .models import build_audio_encoder, build_video_encoder

    if modality not in MODALITIES:
        raise CheckpointError(f"modality should be video or audio, got {modality!r}")
    return build_video_encoder(arch, bn_eps) if modality == "video" else build_audio_encoder(arch)


def load_encoder(checkpoint: str | Path, modality: str, arch: str | None = None, bn_eps: float = 1e-5,
                 seed: int = 0) -> tuple[nn.Module, dict]:
    """The ``modality`` encoder of ``checkpoint`` (a path, or ``"random"``), and what was loaded.

    ``arch`` defaults to the checkpoint's (``tiny`` for random); giving one that contradicts the file
    is an error rather than a silent partial load. ``bn_eps`` 1e-3 matches the official XDC video
    weights. ``random`` encoders are drawn from ``seed``. The returned dict has ``source``
    (random|xdc-fast|torchvision), ``arch`` and, for our checkpoints, the ``config`` they were trained with.
    """
    from .models import load_video_weights

    if str(checkpoint) == "random":
        arch = arch or "tiny"
        torch.manual_seed(seed)
        return build_encoder(modality, arch, bn_eps), {"source": "random", "arch": arch, "seed": seed}
    state = read_checkpoint(checkpoint)
    found = checkpoint_arch(state)
    if arch is not None and arch != found:
        raise CheckpointError(f"{checkpoint} holds a {found} encoder, but --arch {arch} was asked for")
    encoder = build_encoder(modality, found, bn_eps)
    if is_ours(state):
        encoder.load_state_dict(own_encoder_state(state, modality, checkpoint), strict=True)
        return encoder, {"source": "xdc-fast", "arch": found, "config": state.get("config", {}),
                         "clip": checkpoint_clip(state)}
    if modality != "video":
        raise CheckpointError(f"{checkpoint} is a torchvision-layout video weight file; it holds no audio encoder")
    try:
        load_video_weights(encoder, torchvision_video_state(state))
    except RuntimeError as error:
        raise CheckpointError(f"{checkpoint} does not match torchvision's r2plus1d_18 layout: "
                              f"{str(error).splitlines()[0]}") from None
    return encoder, {"source": "torchvision", "arch": found}


def load_encoders_from(encoders: nn.ModuleDict, path: str | Path, arch: str) -> list[str]:
    """Fill ``encoders`` (modality -> module of ``arch``) from another run's checkpoint, or the video
    encoder from torchvision-layout weights (a torchvision or official XDC file). Returns the modalities
    loaded; a file of another arch, or one that fits no encoder, is a CheckpointError."""
    from .models import load_video_weights

    state = read_checkpoint(path)
    found = checkpoint_arch(state)
    if is_ours(state) and found != arch:  # a torchvision-layout file names no arch: its shapes decide below
        raise CheckpointError(f"{path} holds {found} encoders, but this run builds {arch} ones; pass --arch {found} "
                              "or a checkpoint of the same arch")
    try:
        if is_ours(state):
            for m in encoders:
                encoders[m].load_state_dict(own_encoder_state(state, m, path), strict=True)
            return list(encoders)
        if "video" not in encoders:
            raise CheckpointError(f"{path} holds video weights only, and this variant trains no video encoder")
        load_video_weights(encoders["video"], torchvision_video_state(state))
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the {arch} encoders (neither one of our checkpoints nor "
                              f"torchvision's r2plus1d_18 layout): {str(error).splitlines()[0]}") from None
    return ["video"]
