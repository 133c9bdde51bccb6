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

from .choices import MODALITIES
from .errors import CheckpointError
from .models.archs import ARCHS


def read_checkpoint(path: str | Path) -> dict:
    """The file's contents (tensors only: ``weights_only``), or a CheckpointError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                              f"{first_line(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict or an xdc-fast checkpoint")
    return state


def first_line(error: BaseException) -> str:
    """The first line of an error from torch: its explanations run to a page (a key diff, advice on
    weights_only) where one line says what is wrong."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def is_ours(state: dict) -> bool:
    return "encoders" in state


def checkpoint_arch(state: dict, path=None) -> str:
    """The arch a checkpoint's encoders were built with (torchvision-layout files are r2plus1d_18)."""
    if not is_ours(state):
        return "r2plus1d_18"
    config = state.get("config")
    arch = config.get("arch", "tiny") if isinstance(config, dict) else "tiny"
    if arch not in ARCHS:
        raise CheckpointError(f"{path or 'the checkpoint'} names an encoder arch {arch!r} that this version does not "
                              f"build (it builds {', '.join(ARCHS)})")
    return arch


def refuse_non_finite(module: nn.Module, path) -> None:
    """A checkpoint whose weights hold NaN or infinity (a run that diverged) gives features that every
    protocol would score as if they meant something; it is refused when loaded."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path} holds non-finite weights ({name}: {bad} of {tensor.numel()} values are NaN "
                                  "or infinite), the mark of a run that diverged; use an earlier checkpoint "
                                  "(RUN/checkpoints/round_NNN.pt)")


def load_state(module: nn.Module, state: dict, path) -> None:
    """``module`` filled from ``state`` (every key, every shape), then checked to be finite."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        missing = set(module.state_dict()) - set(state)
        unexpected = set(state) - set(module.state_dict())
        detail = (f"{len(missing)} weight(s) missing (e.g. {sorted(missing)[0]}), {len(unexpected)} unexpected"
                  if missing or unexpected else first_line(error))
        raise CheckpointError(f"{path} does not fit the encoder it names: {detail}") from None
    refuse_non_finite(module, path)


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


def build_encoder(modality: str, arch: str, bn_eps: float = 1e-5, video_input: str | None = None,
                  audio_input: str | None = None) -> nn.Module:
    from .models import build_audio_encoder, build_video_encoder

    if modality not in MODALITIES:
        raise CheckpointError(f"modality should be video or audio, got {modality!r}")
    return (build_video_encoder(arch, bn_eps, video_input) if modality == "video" else
            build_audio_encoder(arch, audio_input))


def check_inputs(encoder: nn.Module, path, video_input: str | None, audio_input: str | None) -> None:
    """An input asked for that the file's encoder was not trained on is refused, as a contradicting arch
    is: the encoder would be fed what it never saw."""
    for key, wanted, what in (("video_input", video_input, "frames"), ("audio_input", audio_input, "log-mel")):
        found = getattr(encoder, key, None)
        if wanted is not None and found is not None and wanted != found:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{path} holds an encoder fed {found} {what}, but {flag} {wanted} was asked for; "
                                  f"leave {flag} out to use the file's")


def load_encoder(checkpoint: str | Path, modality: str, arch: str | None = None, bn_eps: float = 1e-5,
                 seed: int = 0, video_input: str | None = None,
                 audio_input: str | None = None) -> tuple[nn.Module, dict]:
    """The ``modality`` encoder of ``checkpoint`` (a path, or ``"random"``), and what was loaded.

    ``arch`` defaults to the checkpoint's (``tiny`` for random); giving one that contradicts the file
    is an error rather than a silent partial load, and so is a ``video_input`` the file's video encoder
    was not trained on (random encoders take it, by default their arch's, as a pretraining feeds them).
    ``bn_eps`` 1e-3 matches the official XDC video weights. ``random`` encoders are drawn from ``seed``.
    The returned dict has ``source`` (random|xdc-fast|torchvision), ``arch``, ``video_input`` for a video
    encoder and, for our checkpoints, the ``config`` they were trained with.
    """
    from .models import load_video_weights

    if str(checkpoint) == "random":
        arch = arch or "tiny"
        torch.manual_seed(seed)
        encoder = build_encoder(modality, arch, bn_eps, video_input, audio_input)
        return encoder, {"source": "random", "arch": arch, "seed": seed, **input_of(encoder)}
    state = read_checkpoint(checkpoint)
    found = checkpoint_arch(state, checkpoint)
    if arch is not None and arch != found:
        raise CheckpointError(f"{checkpoint} holds a {found} encoder, but --arch {arch} was asked for")
    encoder = build_encoder(modality, found, bn_eps)
    if is_ours(state):
        load_state(encoder, own_encoder_state(state, modality, checkpoint), checkpoint)
        check_inputs(encoder, checkpoint, video_input, audio_input)
        return encoder, {"source": "xdc-fast", "arch": found, "config": state.get("config", {}),
                         "clip": checkpoint_clip(state), **input_of(encoder)}
    if modality != "video":
        raise CheckpointError(f"{checkpoint} is a torchvision-layout video weight file; it holds no audio encoder")
    try:
        load_video_weights(encoder, torchvision_video_state(state))
    except RuntimeError as error:
        raise CheckpointError(f"{checkpoint} does not match torchvision's r2plus1d_18 layout: "
                              f"{first_line(error)}") from None
    refuse_non_finite(encoder, checkpoint)
    check_inputs(encoder, checkpoint, video_input, audio_input)
    return encoder, {"source": "torchvision", "arch": found, **input_of(encoder)}


def input_of(encoder: nn.Module) -> dict:
    """What the encoder is fed (what its results record): ``{"video_input": ...}`` or ``{"audio_input": ...}``."""
    return {key: getattr(encoder, key) for key in ("video_input", "audio_input") if hasattr(encoder, key)}


def load_encoders_from(encoders: nn.ModuleDict, path: str | Path, arch: str,
                       video_input: str | None = None, audio_input: str | None = None) -> list[str]:
    """Fill ``encoders`` (modality -> module of ``arch``) from another run's checkpoint, or the video
    encoder from torchvision-layout weights (a torchvision or official XDC file). Returns the modalities
    loaded; a file of another arch, one that fits no encoder, or a video encoder fed otherwise than
    ``video_input`` (default: the arch's) is a CheckpointError."""
    from .models import load_video_weights

    state = read_checkpoint(path)
    found = checkpoint_arch(state, path)
    if is_ours(state) and found != arch:  # a torchvision-layout file names no arch: its shapes decide below
        raise CheckpointError(f"{path} holds {found} encoders, but this run builds {arch} ones; pass --arch {found} "
                              "or a checkpoint of the same arch")
    try:
        if is_ours(state):
            loaded = list(encoders)
            for m in encoders:
                encoders[m].load_state_dict(own_encoder_state(state, m, path), strict=True)
        elif "video" not in encoders:
            raise CheckpointError(f"{path} holds video weights only, and this variant trains no video encoder")
        else:
            loaded = ["video"]
            load_video_weights(encoders["video"], torchvision_video_state(state))
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the {arch} encoders (neither one of our checkpoints nor "
                              f"torchvision's r2plus1d_18 layout): {first_line(error)}") from None
    for m in loaded:
        refuse_non_finite(encoders[m], path)
    video_input = video_input or ARCHS[arch].video_input
    if "video" in loaded and encoders["video"].video_input != video_input:
        raise CheckpointError(f"{path} holds a video encoder fed {encoders['video'].video_input} frames, but this run "
                              f"feeds {video_input}; pass --video-input {encoders['video'].video_input}")
    audio_input = audio_input or ARCHS[arch].audio_input
    if "audio" in loaded and encoders["audio"].audio_input != audio_input:
        raise CheckpointError(f"{path} holds an audio encoder fed the {encoders['audio'].audio_input} log-mel, but "
                              f"this run feeds {audio_input}; set audio_input: {encoders['audio'].audio_input}")
    return loaded
