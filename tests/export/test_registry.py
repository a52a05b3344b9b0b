from __future__ import annotations

import pytest
import torch

from export.models.googlenet import GoogLeNet
from export.registry import UnknownModelError, default_models, get_model_spec, list_models, register
from export.spec import imagenet_categories
from service.store.layout import ModelStore

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


def _release_format_bytes(name: str) -> int:
    """What a torchvision release file of this network holds: every tensor of its state dict."""
    with torch.device("meta"):
        # GoogLeNet's release carries the two training-only auxiliary heads, which export drops
        model = GoogLeNet(aux_logits=True) if name == "googlenet" else get_model_spec(name).build()
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("name", [n for n in list_models() if get_model_spec(n).released])
def test_published_download_size_is_the_tensors_the_file_holds(name: str) -> None:
    released = get_model_spec(name).released
    assert released is not None
    assert released.file_mib == pytest.approx(_release_format_bytes(name) / 2**20, rel=0.01)


def test_onnx_size_estimate_matches_the_exported_graphs(model_store: ModelStore) -> None:
    for name in model_store.names():
        latest = model_store.latest(name)
        assert latest is not None
        actual_mib = latest.graph.stat().st_size / 2**20
        assert get_model_spec(name).onnx_mib == pytest.approx(actual_mib, rel=0.03), name


def test_the_default_set_is_small_and_covers_the_families() -> None:
    defaults = [get_model_spec(name) for name in default_models()]
    assert [spec.name for spec in defaults] == ["lenet5", "alexnet", "googlenet", "resnet18", "resnet50"]
    assert {spec.family for spec in defaults} == {"LeNet", "AlexNet", "GoogLeNet", "ResNet"}
    assert sum(spec.released.file_mib for spec in defaults if spec.released) < 500  # VGG alone is 507-548 MiB
