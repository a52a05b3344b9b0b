"""Occlusion: where the answer depends on the image, measured through the served graph itself.

Zeiler and Fergus ("Visualizing and Understanding Convolutional Networks", ECCV 2014) slide
a grey square over the image and watch the class's probability: where covering the image
costs the class most, the network was looking. It needs nothing but the graph, so it
explains any model of the store at any precision, and it is the cross-check for gradient
methods. The patch is filled with what the model takes for "nothing there": for photos the
mean pixel (the input's ``mean`` x 255), which its normalisation maps to zero; for light
strokes on a dark ground (LeNet-5) the ground itself, since a grey square on black is half
a stroke, and covering the empty ground with it moved the digits' maps onto the background.

Every position of the patch is one image of a single batch through the model's batcher; the
map is each position's drop in the class's probability, clipped at zero and divided by the
largest drop (all zeros where no position lowers it), a ``[rows, columns]`` grid over the
crop the network saw, row-major, before any upsampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInput
from ..store.metadata import InputMeta

MAX_POSITIONS = 1024  # per image: a 32 x 32 grid at most


@dataclass(frozen=True)
class Occlusion:
    patch: int
    stride: int

    @classmethod
    def for_input(cls, spec: InputMeta, patch: int | None, stride: int | None) -> Occlusion:
        """The request's patch and stride, checked against the input size; by default a patch of a
        seventh of the side (32 pixels of 224, 5 of 32) moved by half of it."""
        size = spec.size
        patch = patch if patch is not None else max(2, round(size / 7))
        if not 1 <= patch <= size:
            raise InvalidInput(f"Invalid parameter: patch={patch} must be from 1 to the input size, {size}")
        stride = stride if stride is not None else max(1, patch // 2)
        if not 1 <= stride <= size:
            raise InvalidInput(f"Invalid parameter: stride={stride} must be from 1 to the input size, {size}")
        occlusion = cls(patch, stride)
        if len(occlusion.offsets(size)) ** 2 > MAX_POSITIONS:
            raise InvalidInput(
                f"patch={patch} with stride={stride} on a {size}x{size} input is {len(occlusion.offsets(size)) ** 2} "
                f"positions, over the limit of {MAX_POSITIONS}: use a larger stride"
            )
        return occlusion

    def offsets(self, size: int) -> list[int]:
        """Where the patch starts along one side: every ``stride``, and flush with the far edge."""
        starts = list(range(0, size - self.patch + 1, self.stride))
        if starts[-1] != size - self.patch:
            starts.append(size - self.patch)
        return starts

    def images(self, image: np.ndarray, fill: np.ndarray) -> np.ndarray:
        """``image`` (uint8 ``[H, W, C]``) as it is, then once per position with the patch over it."""
        offsets = self.offsets(image.shape[0])
        batch = np.repeat(image[None], 1 + len(offsets) ** 2, axis=0)
        k = 1
        for top in offsets:
            for left in offsets:
                batch[k, top : top + self.patch, left : left + self.patch] = fill
                k += 1
        return batch

    def heat(self, probabilities: np.ndarray, index: int, size: int) -> np.ndarray:
        """The map from :meth:`images`' probabilities: the drop of class ``index`` at each position, in [0, 1]."""
        side = len(self.offsets(size))
        drop = np.clip(probabilities[0, index] - probabilities[1:, index], 0.0, None).reshape(side, side)
        largest = float(drop.max())
        return drop / largest if largest > 0 else drop


def fill_pixel(spec: InputMeta) -> np.ndarray:
    """The occluding patch's pixel, uint8 per channel: the dark ground for light-on-dark inputs, else the
    pixel the model's normalisation maps to zero."""
    if spec.polarity == "light-on-dark":
        return np.zeros(spec.channels, dtype=np.uint8)
    return np.clip(np.round(np.asarray(spec.mean) * 255.0), 0, 255).astype(np.uint8)
