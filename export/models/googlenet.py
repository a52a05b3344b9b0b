"""GoogLeNet (Inception v1), after Szegedy et al., "Going Deeper with Convolutions" (CVPR 2015).

As in torchvision, whose weights this loads: batch normalisation after every convolution
(not in the paper), and the "5x5" branch of each Inception block uses a 3x3 kernel (a
long-standing quirk of the released weights, pytorch/vision#906). The two auxiliary
classifiers exist for training only: a state dict that contains them loads, and they are
dropped before export. Release weights expect ``transform_input``: the graph is fed the
ImageNet-normalised image and re-normalises it to the (x - 0.5) / 0.5 scaling the
network was trained with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_model
from ..spec import IMAGENET_INPUT, IMAGENET_MEAN, IMAGENET_STD, ReleasedWeights, imagenet_categories


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    def __init__(
        self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1),  # 3x3, as released
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(x, (4, 4))  # N x C x 4 x 4
        x = torch.flatten(self.conv(x), 1)  # N x 2048
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        return self.fc2(x)


class GoogLeNet(nn.Module):
    def __init__(
        self, num_classes: int = 1000, aux_logits: bool = False, transform_input: bool = False, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.aux1: InceptionAux | None = InceptionAux(512, num_classes) if aux_logits else None
        self.aux2: InceptionAux | None = InceptionAux(528, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

    def drop_aux_logits(self) -> None:
        """Remove the training-only auxiliary classifiers."""
        self.aux1 = None
        self.aux2 = None

    def _transform_input(self, x: Tensor) -> Tensor:
        if not self.transform_input:
            return x
        # ImageNet-normalised -> (x - 0.5) / 0.5, per channel
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return x * (std / 0.5) + (mean - 0.5) / 0.5

    def forward(self, x: Tensor) -> Tensor:
        x = self._transform_input(x)  # N x 3 x 224 x 224
        x = self.maxpool1(self.conv1(x))  # N x 64 x 56 x 56
        x = self.maxpool2(self.conv3(self.conv2(x)))  # N x 192 x 28 x 28
        x = self.maxpool3(self.inception3b(self.inception3a(x)))  # N x 480 x 14 x 14
        x = self.inception4a(x)  # N x 512 x 14 x 14
        x = self.inception4d(self.inception4c(self.inception4b(x)))  # N x 528 x 14 x 14
        x = self.maxpool4(self.inception4e(x))  # N x 832 x 7 x 7
        x = self.inception5b(self.inception5a(x))  # N x 1024 x 7 x 7
        x = torch.flatten(self.avgpool(x), 1)  # N x 1024
        return self.fc(self.dropout(x))


@register_model(
    name="googlenet",
    family="GoogLeNet",
    paper="Szegedy et al., Going Deeper with Convolutions, 2015",
    num_params=6_624_904,
    input=IMAGENET_INPUT,
    categories=imagenet_categories(),
    default_weights="imagenet",
    released=ReleasedWeights(
        "https://download.pytorch.org/models/googlenet-1378be20.pth", top1=69.778, file_mib=49.731
    ),
)
def googlenet(*, state_dict: Mapping[str, Tensor] | None = None, num_classes: int = 1000) -> GoogLeNet:
    """GoogLeNet without auxiliary classifiers.

    A ``state_dict`` in torchvision's release format (auxiliary heads included or not) is
    loaded strictly and switches on ``transform_input``, the convention of those weights.
    """
    if state_dict is None:
        return GoogLeNet(num_classes)
    has_aux = any(key.startswith(("aux1.", "aux2.")) for key in state_dict)
    model = GoogLeNet(num_classes, aux_logits=has_aux, transform_input=True)
    model.load_state_dict(state_dict, strict=True)
    model.drop_aux_logits()
    return model
