"""A user's own classes, served: checkpoints with 7-class heads saved by plain PyTorch code (ResNet-18 through
DataParallel, GoogLeNet with its auxiliary heads inside a training checkpoint dict), exported by the real CLI with
their labels, answer over HTTP what the checkpoints answer in PyTorch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as photos
from torch import nn

from export.cli import main as export_main
from export.models.googlenet import GoogLeNet
from export.models.resnet import BasicBlock, ResNet
from service.store.layout import ModelStore
from service.store.metadata import InputMeta
from service.store.preprocess import preprocess

from ...helpers import ServiceProcess, classified, encode, running

SHOES = ["boot", "sandal", "sneaker", "heel", "loafer", "clog", "slipper"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, which they trained with


def trained_looking(model: nn.Module, head: nn.Linear) -> nn.Module:
    """Random weights with a head scaled up, so that the answers are far from uniform, as a trained head's are."""
    with torch.no_grad():
        head.weight.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, nn.Module]]:
    folder = tmp_path_factory.mktemp("own")
    torch.manual_seed(7)
    resnet = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=7)
    trained_looking(resnet, resnet.fc)
    torch.save(nn.DataParallel(resnet).state_dict(), folder / "shoes.pt")
    googlenet = GoogLeNet(num_classes=7, aux_logits=True, transform_input=True)
    trained_looking(googlenet, googlenet.fc)
    torch.save({"epoch": 12, "state_dict": googlenet.state_dict(), "best_acc1": 91.5}, folder / "defects.pth")
    (folder / "labels.txt").write_text("\n".join(SHOES) + "\n")
    return folder, {"shoes": resnet, "defects": googlenet}


@pytest.fixture(scope="module")
def own_store(checkpoints: tuple[Path, dict[str, nn.Module]]) -> ModelStore:
    folder, _ = checkpoints
    labels = ["--labels", str(folder / "labels.txt"), "--out", str(folder / "store"), "--no-progress"]
    assert export_main(["resnet18", "--weights-file", str(folder / "shoes.pt"), "--as", "shoes", *labels]) == 0
    assert export_main(["googlenet", "--weights-file", str(folder / "defects.pth"), "--as", "defects", *labels]) == 0
    return ModelStore(folder / "store")


@pytest.fixture(scope="module")
def own_service(own_store: ModelStore) -> Iterator[ServiceProcess]:
    with running(own_store.root, own_store.root.parent / "service.log", MODELS="shoes,defects") as service:
        yield service


def pytorch_probabilities(model: nn.Module, crop: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0].numpy()


@pytest.mark.integration
@pytest.mark.parametrize("name", ["shoes", "defects"])
def test_a_checkpoints_answers_are_served_with_its_labels(
    name: str, own_service: ServiceProcess, own_store: ModelStore, checkpoints: tuple[Path, dict[str, nn.Module]]
) -> None:
    version = own_store.latest(name)
    assert version is not None
    spec = InputMeta.model_validate(version.read_metadata()["input"])
    tops = set()
    for picture in (photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket()):
        body = encode(picture, "JPEG", quality=90)
        answer = classified(own_service, body, name)
        assert answer["model"] == name
        (result,) = answer["results"]
        served = {p["label"]: p["score"] for p in result["predictions"]}
        assert set(served) <= set(SHOES) and len(served) == 5
        expected = pytorch_probabilities(checkpoints[1][name], preprocess(body, spec, max_pixels=10**8))
        for label, score in served.items():
            assert score == pytest.approx(float(expected[SHOES.index(label)]), abs=1e-4), label
        assert result["predictions"][0]["label"] == SHOES[int(expected.argmax())]
        tops.add(result["predictions"][0]["label"])
    print(f"{name}: top-1 of 4 photos {sorted(tops)}, each within 1e-4 of the checkpoint in PyTorch")
