"""ResNet audio encoders on a one-channel log-mel spectrogram ``[B, 1, n_mels, frames]``.

The full configuration is ResNet-18 (torchvision's basic blocks and layer names) with a one-channel
stem; ``tiny`` is the same shape of network at a quarter of the width, one block per stage.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from .archs import ARCHS
from .init import init_like_torchvision

# torchvision's name for the audio encoder of the paper's arch.
AUDIO_ALIASES = {"resnet18": "r2plus1d_18"}


class AudioResNet(nn.Module):
    def __init__(self, widths, blocks):
        super().__init__()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


def build_audio_encoder(arch: str = "resnet18") -> AudioResNet:
    """``arch`` is "resnet18" (also accepted as "r2plus1d_18", the video arch it pairs with) or "tiny"."""
    arch = AUDIO_ALIASES.get(arch, arch)
    if arch not in ARCHS:
        raise ValueError(f"unknown audio arch {arch!r}; choose one of {', '.join([*ARCHS, *AUDIO_ALIASES])}")
    return AudioResNet(ARCHS[arch].audio_widths, ARCHS[arch].audio_blocks)
