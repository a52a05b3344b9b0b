"""AlexNet, in the single-tower form torchvision releases weights for.

Krizhevsky, Sutskever and Hinton's 2012 network ("ImageNet Classification with Deep
Convolutional Neural Networks") was split across two GPUs, with 96-256-384-384-256
kernels, local response normalisation and cross-GPU connections only in some layers.
This is the variant of Krizhevsky's "One weird trick for parallelizing convolutional
neural networks" (2014): one tower, 64-192-384-256-256 kernels, no LRN, and an adaptive
average pool in front of the classifier so that any input of at least 63x63 works.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..registry import register_model
from ..spec import IMAGENET_INPUT, ReleasedWeights, imagenet_categories
from ._utils import with_weights


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)  # N x 256 x 6 x 6
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model(
    name="alexnet",
    family="AlexNet",
    paper="Krizhevsky, One weird trick for parallelizing convolutional neural networks, 2014",
    num_params=61_100_840,
    input=IMAGENET_INPUT,
    categories=imagenet_categories(),
    default_weights="imagenet",
    released=ReleasedWeights(
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", top1=56.522, file_mib=233.087
    ),
)
def alexnet(*, state_dict: Mapping[str, Tensor] | None = None, num_classes: int = 1000) -> AlexNet:
    """AlexNet (one-tower variant); ``state_dict`` in torchvision's format is loaded strictly."""
    return with_weights(AlexNet(num_classes), state_dict)
