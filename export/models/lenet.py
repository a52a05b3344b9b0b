"""LeNet-5, as LeCun, Bottou, Bengio and Haffner describe it in "Gradient-Based Learning
Applied to Document Recognition" (Proc. IEEE, 1998).

It keeps the paper's layer sizes and tanh activations, with two simplifications that
every modern re-implementation makes: the subsampling layers are plain 2x2 average
pooling (the paper's have a trainable coefficient and bias each), C3 connects to all six
S2 maps (the paper uses a sparse connection table), and the output layer is a linear
layer read through softmax instead of Euclidean RBF units.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..registry import register_model
from ..spec import DIGIT_CATEGORIES, InputSpec
from ._utils import with_weights


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5),  # C1: N x 6 x 28 x 28
            nn.Tanh(),
            nn.AvgPool2d(kernel_size=2, stride=2),  # S2: N x 6 x 14 x 14
            nn.Conv2d(6, 16, kernel_size=5),  # C3: N x 16 x 10 x 10
            nn.Tanh(),
            nn.AvgPool2d(kernel_size=2, stride=2),  # S4: N x 16 x 5 x 5
            nn.Conv2d(16, 120, kernel_size=5),  # C5: N x 120 x 1 x 1
            nn.Tanh(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(120, 84),  # F6
            nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        # N x 1 x 32 x 32
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# Light strokes on a dark ground, like MNIST; the mean and std are those of the scaled
# pixels in [0, 1] mapped onto [-1, 1], which suits tanh units.
LENET5_INPUT = InputSpec(size=32, channels=1, resize=32, mean=(0.5,), std=(0.5,), polarity="light-on-dark")


@register_model(
    name="lenet5",
    family="LeNet",
    paper="LeCun et al., Gradient-Based Learning Applied to Document Recognition, 1998",
    num_params=61_706,
    input=LENET5_INPUT,
    categories=DIGIT_CATEGORIES,
    default_weights="trained",
    typicality_layer="features.5",  # S4
    typicality_features=16 * 5 * 5,
)
def lenet5(*, state_dict: Mapping[str, Tensor] | None = None, num_classes: int = len(DIGIT_CATEGORIES)) -> LeNet5:
    """LeNet-5 for 32x32 grayscale digits; trained by ``python -m export lenet5``."""
    return with_weights(LeNet5(num_classes=num_classes), state_dict)
