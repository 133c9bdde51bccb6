"""The weight initialisation torchvision's ResNets use, for encoders built outside torchvision."""

from torch import nn


def init_like_torchvision(model: nn.Module, bn_eps: float | None = None) -> None:
    """Kaiming-normal convolutions (fan_out), BatchNorm weight 1 and bias 0; optionally a BatchNorm eps."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
            if bn_eps is not None:
                m.eps = bn_eps
