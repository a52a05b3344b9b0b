"""How many images one ONNX Runtime call of a model may take: Triton's ``max_batch_size``, read from the
model's ``config.pbtxt``.

The export writes it and Triton's dynamic batcher reads it, so the service reads it too instead of
restating it: it is the most a model's batches hold. The ``MAX_BATCH_SIZE`` setting is this machine's
cap on every model (memory, latency), so a model batches up to the lower of the two::

    max_batch_size: 64     # the model takes up to 64 images per call
                           # absent: no limit of the model's own, MAX_BATCH_SIZE alone

Triton's ``max_batch_size: 0`` (a model without a batch dimension) does not fit these graphs, whose
first dimension is the batch (Triton refuses such a config against them as well), so it is refused
with what to write instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from .policy import config_text, without_strings_and_comments

# What the export writes into config.pbtxt: Triton batches exported models up to it, this service up to
# it or MAX_BATCH_SIZE (32 by default), whichever is lower
MODEL_MAX_BATCH_SIZE = 64

LIMIT_FIELD = re.compile(r"(?<![\w.])max_batch_size\s*:\s*([^\s,;{}\]\[]+)")


def parse_max_batch_size(text: str) -> int | None:
    """The ``max_batch_size`` of a ``config.pbtxt``'s text; None where it names none.

    Raises ``ValueError`` naming what is wrong and what would be right.
    """
    found = LIMIT_FIELD.findall(without_strings_and_comments(text))
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"max_batch_size is given {len(found)} times ({', '.join(found)}): keep one")
    value = found[0]
    if value == "0":
        raise ValueError(
            "max_batch_size: 0 declares a model without a batch dimension, but these graphs take a batch first: "
            "write 1 for one image per call, or more to batch"
        )
    if not re.fullmatch(r"[1-9]\d*", value):  # protobuf would read 032 as octal and 0x20 as hex
        raise ValueError(f"max_batch_size: {value} is not a decimal whole number: write the most images per call, "
                         "e.g. 32")  # fmt: skip
    return int(value)


def read_max_batch_size(config: Path) -> int | None:
    """The ``max_batch_size`` of a ``config.pbtxt``; None where the file or the field is absent."""
    return parse_max_batch_size(config_text(config))
