"""The machinery every command shares: building loaders, encoding clips across ranks, the model of
encoders plus heads, one supervised step, the learning-rate schedule and the progress bar.

``make_loader`` is the only place a loader is built, so a backend chosen here (PyAV in a torch
DataLoader, or DALI) is the one every command gets.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from . import distributed as xdist
from .errors import LoaderError, XdcError
from .progress import progress

log = logging.getLogger(__name__)

LOADERS = ("auto", "pyav", "dali")
_ANNOUNCED: set[str] = set()  # what `auto` chose and why, said once per process (not once per epoch)


def _announce(line: str) -> None:
    if line not in _ANNOUNCED and xdist.is_main_process():
        _ANNOUNCED.add(line)
        log.info(line)


# ---- loading ------------------------------------------------------------------------------------------

def make_loader(dataset, batch_size: int, *, loader: str = "pyav", workers: int = 0,
                device: str | torch.device = "cpu", indices: Iterable[int] | None = None,
                dali_pipelines: int | str = "auto"):
    """Batches of ``dataset`` (a ClipDataset), in ``indices`` order (default: all samples).

    ``loader``: "pyav" decodes on the CPU in a torch DataLoader with ``workers`` processes; "dali" decodes
    with DALI (NVDEC on a GPU, its CPU graph otherwise); "auto" takes DALI on a CUDA device when it is
    installed and builds, else PyAV, and says in one log line (INFO, once per process) which and why.
    ``dali_pipelines``: DALI pipelines taking batches in turn ("auto": one per NVDEC engine of the card).
    Batches are dicts of ``video [B,3,T,H,W]`` and/or ``audio [B,1,M,F]`` (the dataset's modalities), ``index``, ``label``,
    ``start`` and ``skipped`` (samples that failed to decode and were left out).

    Raises LoaderError (one line) when "dali" cannot serve: not installed, a codec DALI's CPU graph
    cannot decode, a pipeline that does not build."""
    from .data.dataset import collate_clips

    if loader not in LOADERS:
        raise LoaderError(f"loader should be one of {', '.join(LOADERS)}, got {loader!r}")
    device = torch.device(device)
    if loader in ("auto", "dali"):
        built, reason = _dali_loader(dataset, batch_size, loader, workers, device, indices, dali_pipelines)
        if built is not None:
            if loader == "auto":
                _announce("loader: DALI (auto), because the device is CUDA and DALI is installed and builds its "
                          "pipeline")
            return built
        if loader == "dali":
            raise LoaderError(f"--loader dali: {reason}")
        _announce(f"loader: PyAV (auto), because {reason}")
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    # The CUDA copy of a pinned batch overlaps the step before it (non_blocking in `to_device`).
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=collate_clips,
                                       pin_memory=device.type == "cuda" and torch.cuda.is_available())


def _dali_loader(dataset, batch_size, loader, workers, device: torch.device, indices, pipelines="auto"):
    """(a DaliClipLoader, None), or (None, why not) where ``auto`` falls back; ``dali`` raises LoaderError
    for a codec or a pipeline that does not build."""
    from .data import dali_backend

    if not dali_backend.dali_available():
        return None, "DALI is not installed; pip install nvidia-dali-cuda130"
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if loader == "auto" and not cuda:
        return None, "the device is not CUDA, where PyAV's workers outrun DALI's CPU graph"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    try:
        return dali_backend.DaliClipLoader(dataset, batch_size, device="gpu" if cuda else "cpu",
                                           num_threads=max(1, workers), device_id=device_id, indices=indices,
                                           pipelines=pipelines), None
    except LoaderError:
        raise
    except Exception as error:  # noqa: BLE001 - a missing NVDEC or driver surfaces here
        first_line = (str(error).strip().splitlines() or [""])[0]
        reason = f"the DALI pipeline did not build ({type(error).__name__}: {first_line})"
        if loader == "dali":
            raise LoaderError(f"--loader dali: {reason}; use --loader pyav") from None
        return None, reason


def device_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory layout its encoder runs fastest with: on CUDA, video clips ``[B,3,T,H,W]`` in
    ``channels_last_3d``, which cuDNN's bf16 3-D convolutions take without a transpose (1.5x the training
    step of R(2+1)D-18 on an H200, benchmarks/results/train_h200.md); the 2-D audio encoder was slower
    so, and stays as it is."""
    if x.is_cuda and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def shift_log_mel(log_mel: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each clip of ``log_mel [B,1,M,F]`` moved ``shifts[b]`` mel bins up (positive) or down, the bins it
    leaves filled with its edge bin (a pitch shift, approximately, on the mel axis)."""
    bins = log_mel.shape[2]
    source = (torch.arange(bins, device=log_mel.device)[None, :] - shifts.to(log_mel.device)[:, None])
    source = source.clamp(0, bins - 1)
    index = source[:, None, :, None].expand(-1, log_mel.shape[1], -1, log_mel.shape[3])
    return torch.gather(log_mel, 2, index)


def jitter_colours(video: torch.Tensor, draws: torch.Tensor, strength: float) -> torch.Tensor:
    """Each clip of a normalised ``video [B,3,T,H,W]`` with its colours changed by one draw ``draws[b]`` of
    four uniforms in [0, 1), the same for all its frames: brightness, contrast and saturation scaled by a
    factor in [1 - strength, 1 + strength] and the hue turned by up to ``strength / 2`` of a turn either way
    (torchvision's colour jitter, in that order)."""
    import torchvision.transforms.v2.functional as tvf

    from .data.clips import VIDEO_MEAN, VIDEO_STD

    mean = torch.tensor(VIDEO_MEAN, device=video.device, dtype=video.dtype).view(1, 3, 1, 1)
    std = torch.tensor(VIDEO_STD, device=video.device, dtype=video.dtype).view(1, 3, 1, 1)
    factors = 1.0 + strength * (2.0 * draws.double() - 1.0)
    hue = (min(strength, 1.0) / 2) * (2.0 * draws[:, 3].double() - 1.0)
    out = torch.empty_like(video)
    for b in range(video.shape[0]):
        frames = (video[b].transpose(0, 1) * std + mean).clamp_(0.0, 1.0)  # [T,3,H,W] in [0, 1]
        frames = tvf.adjust_brightness(frames, float(factors[b, 0]))
        frames = tvf.adjust_contrast(frames, float(factors[b, 1]))
        frames = tvf.adjust_saturation(frames, float(factors[b, 2]))
        frames = tvf.adjust_hue(frames, float(hue[b]))
        out[b] = ((frames - mean) / std).transpose(0, 1)
    return device_layout(out)


def to_device(batch: dict, names: Iterable[str], device: torch.device) -> dict[str, torch.Tensor]:
    return {m: device_layout(batch[m].to(device, non_blocking=True)) for m in names}


# ---- encoding -----------------------------------------------------------------------------------------

def shard_items(dataset, rank: int, world: int):
    """A copy of an evaluation dataset holding this rank's whole videos (so no clip is encoded twice),
    and their positions in ``dataset.items``."""
    shard = copy.copy(dataset)
    shard.items = dataset.items[rank::world]
    return shard, np.arange(rank, len(dataset.items), world)


def encode_clips(encoders: Mapping[str, nn.Module], dataset, batch_size: int, device: torch.device, *,
                 workers: int = 0, loader: str = "pyav", gather: bool = True, description: str | None = None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of every clip of an evaluation ClipDataset that decoded, per modality of ``encoders``,
    and the position of each clip in the dataset: ``video * dataset.config.eval_clips + clip``, where
    ``video`` indexes ``dataset.items`` (so ``position // eval_clips`` is the clip's video).

    The videos are shared out across ranks; with ``gather`` every rank gets everyone's features (rank
    order), without it only its own. Clips that failed to decode are missing from both results.
    ``loader`` and ``workers`` choose the decoding backend (see :func:`make_loader`)."""
    chunks = {m: [np.zeros((0, encoders[m].feature_dim), np.float32)] for m in encoders}
    videos = [np.zeros(0, np.int64)]
    for features, clip_position in _encoded_batches(encoders, dataset, batch_size, device, workers, loader, description):
        for m, values in features.items():
            chunks[m].append(values)
        videos.append(clip_position)
    features, clip_position = {m: np.concatenate(v) for m, v in chunks.items()}, np.concatenate(videos)
    if not gather:
        return features, clip_position  # the caller checks them, with every rank (pretrain's clustering)
    parts = xdist.all_gather_objects((features, clip_position))
    features = {m: np.concatenate([p[0][m] for p in parts]) for m in encoders}
    clip_position = np.concatenate([p[1] for p in parts])
    refuse_non_finite_features(features, clip_position, dataset)
    return features, clip_position


def _encoded_batches(encoders, dataset, batch_size, device, workers, loader, description):
    """(features per modality, clip positions) of each batch of this rank's share of ``dataset``."""
    shard, positions = shard_items(dataset, xdist.rank(), xdist.world_size())
    batches = progress(make_loader(shard, batch_size, loader=loader, workers=workers, device=device), description)
    for encoder in encoders.values():
        encoder.eval()
    per_video = dataset.config.eval_clips
    with torch.no_grad():
        for batch in batches:
            if "index" not in batch:
                continue
            inputs = to_device(batch, encoders, device)
            features = {}
            for m, encoder in encoders.items():
                with autocast(device):
                    features[m] = encoder(inputs[m]).float().cpu().numpy()
            index = batch["index"].numpy()
            yield features, positions[index // per_video] * per_video + index % per_video


def encode_clips_to_files(encoders: Mapping[str, nn.Module], dataset, batch_size: int, device: torch.device,
                          folder: str | Path, *, workers: int = 0, loader: str = "pyav",
                          description: str | None = None) -> tuple[dict, np.ndarray]:
    """:func:`encode_clips` of this rank's clips (``gather`` False) written batch by batch to one float32
    row file per modality under ``folder`` (``rank{R}_{modality}.npy``), so no process holds them all.
    Returns the files (``xdc_fast.features.RowFile``, as many rows as clips decoded) and the positions."""
    from .features import RowFile

    rank, world = xdist.rank(), xdist.world_size()
    # An upper bound on the rows, every clip of this rank's videos decoding (shard_items gives it those).
    most = len(range(rank, len(dataset.items), world)) * dataset.config.eval_clips
    files = {m: RowFile.create(Path(folder) / f"rank{rank}_{m}.npy", most, encoders[m].feature_dim, np.float32)
             for m in encoders}
    written, videos = 0, [np.zeros(0, np.int64)]
    for features, clip_position in _encoded_batches(encoders, dataset, batch_size, device, workers, loader, description):
        for m, values in features.items():
            files[m].write(written, values)
        written += len(clip_position)
        videos.append(clip_position)
    # The files keep their full size on disk; the rows past ``written`` (clips that did not decode) are
    # never read.
    return {m: RowFile(f.path, written, f.cols, f.dtype, f.offset) for m, f in files.items()}, np.concatenate(videos)


def refuse_non_finite_features(features: dict[str, np.ndarray], clip_position: np.ndarray, dataset) -> None:
    """Features holding NaN or infinity (weights that overflow on this data) would be scored, clustered or
    saved as if they meant something; every command that encodes stops here instead."""
    for m, values in features.items():
        bad = ~np.isfinite(values).all(axis=1) if values.ndim == 2 else np.zeros(0, bool)
        if bad.any():
            item = dataset.items[int(clip_position[np.flatnonzero(bad)[0]]) // dataset.config.eval_clips]
            raise XdcError(f"the {m} encoder gives non-finite features for {int(bad.sum())} of {len(values)} clips "
                           f"(e.g. {item['id']!r}): its weights overflow on this data, so nothing is scored or "
                           "written; use a checkpoint from before the run diverged")


# ---- models and steps ---------------------------------------------------------------------------------

def autocast(device: torch.device):
    """bf16 autocast on CUDA (Hopper's tensor cores), plain fp32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def new_head(dim: int, k: int, generator: torch.Generator | None = None, kind: str = "linear") -> nn.Module:
    """A classifier over ``dim`` features: linear with N(0, 0.01) weights and zero bias (DeepCluster's head
    init), or ``kind="mlp"``, a hidden layer of width ``dim`` (He-initialised, for the ReLU after it) before
    that linear classifier."""
    classifier = nn.Linear(dim, k)
    nn.init.normal_(classifier.weight, 0, 0.01, generator=generator)
    nn.init.zeros_(classifier.bias)
    if kind == "linear":
        return classifier
    if kind != "mlp":
        raise ValueError(f"head should be linear or mlp, got {kind!r}")
    hidden = nn.Linear(dim, dim)
    nn.init.kaiming_normal_(hidden.weight, nonlinearity="relu", generator=generator)
    nn.init.zeros_(hidden.bias)
    return nn.Sequential(hidden, nn.ReLU(), classifier)


class EncodersWithHeads(nn.Module):
    """Encoders and their heads as one module, so DDP sees every parameter a step uses.

    ``forward({modality: clips})`` returns ``{modality: [logits of each head]}``; the encoders run under
    bf16 autocast on CUDA and the heads in fp32 (the logits feed a softmax over up to thousands of
    clusters, where bf16's 8 bits of mantissa would blur the targets)."""

    def __init__(self, encoders: Mapping[str, nn.Module], heads: Mapping[str, Iterable[nn.Module]]):
        super().__init__()
        self.encoders = encoders if isinstance(encoders, nn.ModuleDict) else nn.ModuleDict(encoders)
        self.heads = heads if isinstance(heads, nn.ModuleDict) else \
            nn.ModuleDict({m: nn.ModuleList(h) for m, h in heads.items()})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out = {}
        for m in self.heads:
            with autocast(inputs[m].device):
                feature = self.encoders[m](inputs[m])
            out[m] = [head(feature.float()) for head in self.heads[m]]
        return out


def compile_encoders(encoders: Mapping[str, nn.Module], enabled: bool) -> None:
    """``torch.compile`` each encoder in place (``nn.Module.compile``), so checkpoints keep their keys and
    a compiled run resumes an eager one and the other way round."""
    if enabled:
        for encoder in encoders.values():
            encoder.compile()


def video_weights_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 3-D convolution weights in ``channels_last_3d``, the layout their gradients take
    when the clips come in it (``device_layout``): DDP's gradient buckets are laid out after the weights,
    and a mismatch costs a copy per weight each step (and a warning)."""
    for parameter in model.parameters():
        if parameter.dim() == 5:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)
    return model


def distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DDP under torchrun, as it is otherwise; on CUDA with its video weights in the
    clips' layout."""
    if device.type == "cuda":
        video_weights_channels_last(model)
    if not xdist.is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def supervised_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], inputs: dict[str, torch.Tensor],
                    targets: dict[str, list[torch.Tensor]], *, max_grad_norm: float | None = None,
                    where: str = "", sync: bool = True) -> dict:
    """One SGD step on the summed cross-entropy of every head; returns ``{f"{m}_{h}": (loss, correct)}``.

    A non-finite loss stops the run loudly, before the weights take it in. ``sync=False`` reads nothing
    back from the device, so the host can queue the next step while this one runs: the figures stay
    device tensors, ``figures["finite"]`` says whether the loss was finite, and the caller must look at
    it before it saves or trusts the weights (the step has been taken either way)."""
    outputs = model(inputs)
    total, figures = 0.0, {}
    for m, logits_of_heads in outputs.items():
        for h, logits in enumerate(logits_of_heads):
            loss = nn.functional.cross_entropy(logits, targets[m][h])
            total = total + loss
            correct = (logits.argmax(1) == targets[m][h]).sum()
            figures[f"{m}_{h}"] = (loss.item(), int(correct)) if sync else (loss.detach(), correct)
    if not sync:
        figures["finite"] = torch.isfinite(total.detach())
    elif not torch.isfinite(total):
        raise FloatingPointError(f"the loss became {float(total.detach())} {where}".rstrip())
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_([p for group in optimizers for g in group.param_groups for p in g["params"]],
                                 max_grad_norm)
    for optimizer in optimizers:
        optimizer.step()
    return figures


def set_lr(optimizers: Iterable[torch.optim.Optimizer], rate: float) -> None:
    """Every group at ``rate``, or at ``rate`` times its ``lr_scale`` where it has one (a modality of its own
    rate on the shared schedule)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = rate * group.get("lr_scale", 1.0)


def modality_groups(modules: nn.ModuleDict, lr: float, audio_lr: float | None) -> Iterable:
    """``modules``' parameters for an optimizer: one group per modality, the audio one scaled to ``audio_lr``,
    where that rate differs; else one group (the layout every earlier checkpoint's optimizer has)."""
    if audio_lr is None or audio_lr == lr or "audio" not in modules:
        return modules.parameters()
    return [{"params": list(module.parameters()), "lr_scale": audio_lr / lr if name == "audio" else 1.0}
            for name, module in modules.items()]


def lr_schedule(lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                schedule: str = "cosine") -> np.ndarray:
    """Learning rate of every step of a run, precomputed: linear warm-up from 0, then cosine decay to 0 at
    the last step (or constant)."""
    total = epochs * steps_per_epoch
    steps = np.arange(total, dtype=np.float64)
    if schedule == "constant":
        rates = np.full(total, lr)
    elif schedule == "cosine":
        rates = 0.5 * lr * (1 + np.cos(np.pi * steps / max(total, 1)))
    else:
        raise ValueError(f"schedule should be cosine or constant, got {schedule!r}")
    warm = int(round(warmup_epochs * steps_per_epoch))
    if warm > 0:
        rates[:warm] = lr * (steps[:warm] + 1) / warm
    return rates


def rates_of_epoch(rates: np.ndarray, epoch: int, steps_per_epoch: int) -> np.ndarray:
    return rates[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
