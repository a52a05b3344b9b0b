"""What every builder shares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def with_weights(model: M, state_dict: Mapping[str, Tensor] | None) -> M:
    """``model`` with ``state_dict`` loaded strictly (torchvision's names, nothing missing or extra), if given."""
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model
