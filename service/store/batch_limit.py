"""How many images one ONNX Runtime call of a model takes: Triton's ``max_batch_size``, read from the
model's ``config.pbtxt``.

The export writes it and Triton's dynamic batcher reads it, so the service reads it too instead of
restating it in a setting: a model's batches are at most its ``max_batch_size`` images, and the
``MAX_BATCH_SIZE`` setting, where set, overrides every model's (an operator's cap for one machine).

    max_batch_size: 32     # at most 32 images per call
                           # absent: MAX_BATCH_SIZE below, as the export writes it

Triton's ``max_batch_size: 0`` (a model without a batch dimension) does not fit these graphs, whose
first dimension is the batch, so it is refused with what to write instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from .policy import without_comments

# What the export writes, and what a model whose config.pbtxt names none runs at (the service's
# MAX_BATCH_SIZE default when it was a setting only)
MAX_BATCH_SIZE = 32
LARGEST = 1024  # the most this service takes (a batch of 1024 ImageNet images is 154 MB of uint8 input)

_FIELD = re.compile(r"(?<![\w.])max_batch_size\s*:\s*([^\s,;{}\]]+)")


def parse_max_batch_size(text: str) -> int | None:
    """The ``max_batch_size`` of a ``config.pbtxt``'s text; None where it names none.

    Raises ``ValueError`` naming what is wrong and what would be right.
    """
    found = _FIELD.findall(without_comments(text))
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"max_batch_size is given {len(found)} times ({', '.join(found)}): keep one")
    value = found[0]
    if not value.isdigit():
        raise ValueError(f"max_batch_size: {value} is not a whole number: write the most images per call, e.g. 32")
    size = int(value)
    if size == 0:
        raise ValueError(
            "max_batch_size: 0 declares a model without a batch dimension, but these graphs take a batch first: "
            "write 1 for one image per call, or more to batch"
        )
    if size > LARGEST:
        raise ValueError(f"max_batch_size: {size} is above the {LARGEST} images this service runs at once: lower it")
    return size


def read_max_batch_size(config: Path) -> int | None:
    """The ``max_batch_size`` of a ``config.pbtxt``; None where the file or the field is absent."""
    try:
        text = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse_max_batch_size(text)
