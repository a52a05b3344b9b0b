"""The model registry: the only way the CLI, the service's tests and the docs enumerate networks."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .spec import Builder, ModelSpec

_MODELS: dict[str, ModelSpec] = {}
_FAMILIES = ("lenet", "alexnet", "vgg", "googlenet", "resnet")

# What `make export` writes for a first run: every family but VGG, whose graphs are 500 MiB each (LeNet-5 is
# trained here; the others download about 425 MiB).
DEFAULT_MODELS = ("lenet5", "resnet18", "resnet50", "googlenet", "alexnet")


class UnknownModelError(KeyError):
    """Raised for a name that no family registered; the message lists the known names."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Unknown model {name!r}; available: {', '.join(list_models())}")

    def __str__(self) -> str:
        return str(self.args[0])


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry; a name can be registered once."""
    if spec.name in _MODELS:
        raise ValueError(f"A model named {spec.name!r} is already registered")
    _MODELS[spec.name] = spec
    return spec


def register_model(**spec_fields: Any) -> Callable[[Builder], Builder]:
    """Decorator form of :func:`register` for a family with one network per builder."""

    def decorator(builder: Builder) -> Builder:
        register(ModelSpec(builder=builder, **spec_fields))
        return builder

    return decorator


def _load_families() -> None:
    for family in _FAMILIES:
        importlib.import_module(f"{__package__}.models.{family}")


def list_models() -> list[str]:
    """Registered names, family by family (small networks first), whatever imported a family first."""
    _load_families()
    order = {family: i for i, family in enumerate(_FAMILIES)}
    return sorted(_MODELS, key=lambda name: order.get(_MODELS[name].family.lower(), len(order)))


def default_models() -> list[str]:
    """The first-run set, in :func:`list_models` order."""
    return [name for name in list_models() if name in DEFAULT_MODELS]


def get_model_spec(name: str) -> ModelSpec:
    _load_families()
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(name) from None
