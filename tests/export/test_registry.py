from __future__ import annotations

import pytest
import torch

from export.registry import UnknownModelError, get_model_spec, list_models, register
from export.spec import imagenet_categories

# The parameter counts the networks must have: the figures torchvision publishes and LeNet-5's 61,706.
EXPECTED_PARAMS = {
    "lenet5": 61_706,
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
    "googlenet": 6_624_904,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def test_registry_lists_every_network() -> None:
    assert sorted(list_models()) == sorted(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_network_builds_with_declared_parameter_count(name: str) -> None:
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = spec.build()
    counted = sum(p.numel() for p in model.parameters())
    assert counted == EXPECTED_PARAMS[name]
    assert spec.num_params == counted  # the metadata tells the truth


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_output_width_equals_label_count(name: str) -> None:
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = spec.build().eval()
        out = model(torch.empty(2, spec.input.channels, spec.input.size, spec.input.size))
    assert tuple(out.shape) == (2, len(spec.categories))


def test_imagenet_categories_are_the_1000_classes() -> None:
    names = imagenet_categories()
    assert len(names) == 1000 and len(set(names)) >= 998  # two ImageNet names repeat ('crane', 'maillot')
    assert names[0] == "tench" and names[281] == "tabby"


def test_duplicate_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(get_model_spec("resnet18"))


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model_spec("resnet5")
    message = str(info.value)
    assert "'resnet5'" in message
    assert all(name in message for name in ("lenet5", "alexnet", "googlenet", "resnet50"))
