"""VGG, after Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition" (ICLR 2015), configurations A (vgg11), B (vgg13), D (vgg16) and
E (vgg19), with and without batch normalisation after each convolution (a later
addition, not in the paper). As in torchvision, an adaptive 7x7 average pool sits in
front of the classifier and the paper's dense evaluation is not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from ..registry import register
from ..spec import IMAGENET_INPUT, ModelSpec, ReleasedWeights, imagenet_categories
from ._utils import with_weights

# Output channels per 3x3 convolution, "M" = 2x2 max pool; one row per depth.
CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_layers(config: Sequence[int | str], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)  # N x 512 x 7 x 7
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg(
    *, config: str, batch_norm: bool, state_dict: Mapping[str, Tensor] | None = None, num_classes: int = 1000
) -> VGG:
    """VGG of the given configuration ("A", "B", "D", "E"); ``state_dict`` is loaded strictly."""
    return with_weights(VGG(make_layers(CONFIGS[config], batch_norm), num_classes), state_dict)


# name: (configuration, batch norm, parameter count, release file, released top-1, its size in MiB)
VARIANTS = {
    "vgg11": ("A", False, 132_863_336, "vgg11-8a719046.pth", 69.020, 506.84),
    "vgg11_bn": ("A", True, 132_868_840, "vgg11_bn-6002323d.pth", 70.370, 506.881),
    "vgg13": ("B", False, 133_047_848, "vgg13-19584684.pth", 69.928, 507.545),
    "vgg13_bn": ("B", True, 133_053_736, "vgg13_bn-abd245e5.pth", 71.586, 507.59),
    "vgg16": ("D", False, 138_357_544, "vgg16-397923af.pth", 71.592, 527.796),
    "vgg16_bn": ("D", True, 138_365_992, "vgg16_bn-6c64b313.pth", 73.360, 527.866),
    "vgg19": ("E", False, 143_667_240, "vgg19-dcbb9e9d.pth", 72.376, 548.051),
    "vgg19_bn": ("E", True, 143_678_248, "vgg19_bn-c79401a0.pth", 74.218, 548.143),
}

for _name, (_config, _bn, _params, _file, _top1, _mib) in VARIANTS.items():
    register(
        ModelSpec(
            name=_name,
            family="VGG",
            paper="Simonyan and Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, 2015",
            builder=partial(vgg, config=_config, batch_norm=_bn),
            num_params=_params,
            input=IMAGENET_INPUT,
            categories=imagenet_categories(),
            default_weights="imagenet",
            released=ReleasedWeights(f"https://download.pytorch.org/models/{_file}", top1=_top1, file_mib=_mib),
        )
    )
