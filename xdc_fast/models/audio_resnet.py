"""ResNet audio encoders on a one-channel log-mel spectrogram ``[B, 1, n_mels, frames]``.

The full configuration is ResNet-18 (torchvision's basic blocks and layer names) with a one-channel
stem; ``tiny`` is the same shape of network at a quarter of the width, one block per stage.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from .archs import ARCHS, AUDIO_INPUTS
from .init import init_like_torchvision

# torchvision's name for the audio encoder of the paper's arch.
AUDIO_ALIASES = {"resnet18": "r2plus1d_18"}


class AudioResNet(nn.Module):
    """Log-mel ``[B, 1, n_mels, frames]`` -> features ``[B, widths[-1]]``.

    ``audio_input`` "centred" subtracts each clip's mean log-mel before the first layer: a clip's
    loudness is an offset on the log scale, and left in, a random encoder's features (and so a first
    round's clusters) follow it, though it is each video's own and the video does not share it. The
    choice is kept in the ``centred_input`` buffer, so a checkpoint carries it; a state dict without that
    entry (written before the choice existed) means the plain log-mel."""

    def __init__(self, widths, blocks, audio_input: str = "logmel"):
        super().__init__()
        if audio_input not in AUDIO_INPUTS:
            raise ValueError(f"audio_input should be one of {', '.join(AUDIO_INPUTS)}, got {audio_input!r}")
        self.register_buffer("centred_input", torch.tensor(int(audio_input == "centred"), dtype=torch.uint8))
        self.centred = audio_input == "centred"  # the buffer's value where forward reads it without a device sync
        self.conv1 = nn.Conv2d(1, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = widths[0]
        for i, (planes, count) in enumerate(zip(widths, blocks)):
            setattr(self, f"layer{i + 1}", self._make_layer(planes, count, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = widths[-1]
        init_like_torchvision(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def audio_input(self) -> str:
        return "centred" if self.centred else "logmel"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "centred_input"
        state_dict.setdefault(key, torch.tensor(0, dtype=torch.uint8))  # written before the choice existed
        self.centred = bool(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centred:
            x = x - x.mean(dim=(1, 2, 3), keepdim=True)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


def build_audio_encoder(arch: str = "resnet18", audio_input: str | None = None) -> AudioResNet:
    """``arch`` is "resnet18" (also accepted as "r2plus1d_18", the video arch it pairs with) or "tiny";
    ``audio_input`` defaults to the arch's."""
    arch = AUDIO_ALIASES.get(arch, arch)
    if arch not in ARCHS:
        raise ValueError(f"unknown audio arch {arch!r}; choose one of {', '.join([*ARCHS, *AUDIO_ALIASES])}")
    return AudioResNet(ARCHS[arch].audio_widths, ARCHS[arch].audio_blocks, audio_input or ARCHS[arch].audio_input)
