"""ResNet, after He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016).

ResNet-18/34 stack basic blocks (two 3x3 convolutions), ResNet-50/101/152 bottlenecks
(1x1, 3x3, 1x1). As in torchvision's V1 weights, the bottleneck's stride sits on the
3x3 convolution ("ResNet v1.5"), not on the first 1x1 as in the paper, and projection
shortcuts (option B) are used where the shape changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import Tensor, nn

from ..registry import register
from ..spec import IMAGENET_INPUT, ModelSpec, ReleasedWeights, imagenet_categories
from ._utils import with_weights


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # N x 64 x 56 x 56
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # N x 512*expansion x 7 x 7
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet(
    *,
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    state_dict: Mapping[str, Tensor] | None = None,
    num_classes: int = 1000,
) -> ResNet:
    """ResNet with ``layers`` blocks per stage; ``state_dict`` is loaded strictly."""
    return with_weights(ResNet(block, layers, num_classes), state_dict)


# name: (block, blocks per stage, parameter count, release file, released top-1, its size in MiB)
VARIANTS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int], int, str, float, float]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], 11_689_512, "resnet18-f37072fd.pth", 69.758, 44.661),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 21_797_672, "resnet34-b627a593.pth", 73.314, 83.275),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 25_557_032, "resnet50-0676ba61.pth", 76.130, 97.781),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 44_549_160, "resnet101-63fe2227.pth", 77.374, 170.511),
    "resnet152": (Bottleneck, [3, 8, 36, 3], 60_192_808, "resnet152-394f9c45.pth", 78.312, 230.434),
}

for _name, (_block, _layers, _params, _file, _top1, _mib) in VARIANTS.items():
    register(
        ModelSpec(
            name=_name,
            family="ResNet",
            paper="He et al., Deep Residual Learning for Image Recognition, 2016",
            builder=partial(resnet, block=_block, layers=_layers),
            num_params=_params,
            input=IMAGENET_INPUT,
            categories=imagenet_categories(),
            default_weights="imagenet",
            released=ReleasedWeights(f"https://download.pytorch.org/models/{_file}", top1=_top1, file_mib=_mib),
        )
    )
