"""R(2+1)D video encoders whose parameters are named exactly as torchvision's ``r2plus1d_18``.

The full configuration is torchvision's model with its classifier removed, so torchvision's weights
and the official XDC release (the same layout, BatchNorm eps 1e-3) load strictly but for the classifier.
``tiny`` keeps the architecture (R(2+1)D stem, four stages of basic blocks with (2+1)D convolutions,
the VMZ mid-plane rule) at a fraction of the width, for CPU runs, the demo and the tests.
"""

from __future__ import annotations


import torch
from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D

from .archs import ARCHS, VIDEO_INPUTS, Arch
from .init import init_like_torchvision


class R2Plus1D(nn.Module):
    """Clips ``[B, 3, T, H, W]`` -> features ``[B, widths[-1]]`` (512 for r2plus1d_18).

    ``video_input`` "residual" feeds the network the differences of consecutive frames (T - 1 of them)
    instead of the frames: what stays still (colour, texture, the background) cancels, so even the first
    layers see only what moves. The choice is kept in the ``frame_differences`` buffer, so a checkpoint
    carries it and every command that loads the encoder feeds it the same way; a state dict without that
    entry (older checkpoints, torchvision's and the official XDC weights) means frames."""

    def __init__(self, arch: Arch, bn_eps: float = 1e-5, video_input: str | None = None):
        super().__init__()
        video_input = video_input or arch.video_input
        if video_input not in VIDEO_INPUTS:
            raise ValueError(f"video_input should be one of {', '.join(VIDEO_INPUTS)}, got {video_input!r}")
        self.register_buffer("frame_differences", torch.tensor(int(video_input == "residual"), dtype=torch.uint8))
        self.residual = video_input == "residual"  # the buffer's value where forward reads it without a device sync
        width0 = arch.video_widths[0]
        self.stem = nn.Sequential(
            nn.Conv3d(3, arch.video_stem_mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(arch.video_stem_mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(arch.video_stem_mid, width0, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width0),
            nn.ReLU(inplace=True),
        )
        self.inplanes = width0
        for i, (planes, count) in enumerate(zip(arch.video_widths, arch.video_blocks)):
            setattr(self, f"layer{i + 1}", self._make_layer(planes, count, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.feature_dim = arch.video_widths[-1]
        init_like_torchvision(self, bn_eps)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=Conv2Plus1D.get_downsample_stride(stride),
                          bias=False),
                nn.BatchNorm3d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, Conv2Plus1D, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, Conv2Plus1D) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def video_input(self) -> str:
        return "residual" if self.residual else "rgb"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "frame_differences"
        state_dict.setdefault(key, torch.tensor(0, dtype=torch.uint8))  # written before the choice existed: frames
        self.residual = bool(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            x = x[:, :, 1:] - x[:, :, :-1]
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


def has_2d_form(conv: nn.Conv3d) -> bool:
    """A (2+1)D factor: spatial (1, k, k) without a temporal stride, or temporal (k, 1, 1)."""
    kt, kh, kw = conv.kernel_size
    spatial = kt == 1 and conv.stride[0] == 1 and conv.padding[0] == 0
    temporal = kh == 1 and kw == 1 and conv.padding[1:] == (0, 0) and conv.stride[1:] == (1, 1)
    return (spatial or temporal) and conv.groups == 1 and conv.dilation == (1, 1, 1)


def conv_on_views(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The (2+1)D factor ``conv`` (see :func:`has_2d_form`) applied to ``x [B, C, T, H, W]`` as a 2-D
    convolution on a view, with the same weights: the spatial one over the frames folded into the
    batch, the temporal one with height and width folded into one axis. In ``channels_last_3d`` both
    views are free (the folded axes lie next to each other in memory) and come out channels-last 2-D,
    the layout cuDNN's 2-D kernels take without a copy."""
    b, c, t, h, w = x.shape
    kt, kh, kw = conv.kernel_size
    if kt == 1 and conv.stride[0] == 1:
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = nn.functional.conv2d(frames, conv.weight[:, :, 0], conv.bias, conv.stride[1:], conv.padding[1:])
        return out.reshape(b, t, *out.shape[1:]).transpose(1, 2)
    if kh == 1 and kw == 1 and conv.stride[1:] == (1, 1):
        out = nn.functional.conv2d(x.reshape(b, c, t, h * w), conv.weight[..., 0], conv.bias, (conv.stride[0], 1),
                                   (conv.padding[0], 0))
        return out.reshape(b, out.shape[1], out.shape[2], h, w)
    raise ValueError(f"no 2-D form for a kernel of {conv.kernel_size} with stride {conv.stride}")


class Conv3dOnViews(nn.Conv3d):
    """A Conv3d of (2+1)D form computed as :func:`conv_on_views`: its parameters, their names and its
    outputs are the Conv3d's, so checkpoints load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_on_views(self, x)


def use_2d_views(model: nn.Module, on: bool = True) -> int:
    """Every (2+1)D convolution of ``model`` computed as a 2-D convolution on a view (``on``) or as the
    Conv3d again, in place; returns how many changed. The downsampling shortcut (1x1x1, strided in space and
    time) keeps its Conv3d: a 2-D form would compute every position and drop three in four."""
    before, after = (nn.Conv3d, Conv3dOnViews) if on else (Conv3dOnViews, nn.Conv3d)
    changed = 0
    for module in model.modules():
        if type(module) is before and has_2d_form(module):
            module.__class__ = after
            changed += 1
    return changed


def build_video_encoder(arch: str = "r2plus1d_18", bn_eps: float = 1e-5, video_input: str | None = None) -> R2Plus1D:
    """``arch`` is "r2plus1d_18" or "tiny"; ``bn_eps`` 1e-3 matches the official XDC weights; ``video_input``
    "rgb" (frames) or "residual" (differences of consecutive frames), by default the arch's."""
    if arch not in ARCHS:
        raise ValueError(f"unknown video arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return R2Plus1D(ARCHS[arch], bn_eps, video_input)


def load_video_weights(model: R2Plus1D, state_dict: dict) -> list[str]:
    """Load a torchvision-layout state dict strictly, except its classifier (``fc.*``), which an
    encoder does not have. Returns the classifier keys that were left out."""
    dropped = [key for key in state_dict if key.startswith("fc.")]
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")}, strict=True)
    return dropped
