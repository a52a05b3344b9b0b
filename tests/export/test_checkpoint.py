"""Bring your own checkpoint: the wrappers it may come in, its labels, its head's width, its input convention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from export.checkpoint import CheckpointError, InputOverrides, adapt, labels_from_folder, read_labels, unwrap
from export.cli import main as export_main
from export.models.resnet import BasicBlock, ResNet
from export.registry import get_model_spec
from export.weights import read_checkpoint
from service.store.layout import ModelStore

SHOES = ["boot", "sandal", "sneaker", "heel", "loafer", "clog", "slipper"]


def small_state() -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.ones(7, 4), "fc.bias": torch.zeros(7)}


@pytest.mark.parametrize(
    ("saved", "found"),
    [
        (lambda s: s, "a plain state dict"),
        (lambda s: {"epoch": 3, "state_dict": s, "best_acc": 0.9}, "the 'state_dict' entry of a checkpoint dict"),
        (lambda s: {"model": s, "optimizer": {"lr": 0.1}}, "the 'model' entry of a checkpoint dict"),
        (lambda s: {f"module.{k}": v for k, v in s.items()}, "a plain state dict, its 'module.' prefix removed"),
        (
            lambda s: {"model_state_dict": {f"module._orig_mod.{k}": v for k, v in s.items()}},
            "the 'model_state_dict' entry of a checkpoint dict, its 'module.' prefix removed, its '_orig_mod.' "
            "prefix removed",
        ),
    ],
)
def test_the_common_wrappers_are_unwrapped_and_named(tmp_path: Path, saved: object, found: str) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(saved(small_state()), path)  # type: ignore[operator]
    state, said = read_checkpoint(path)
    assert said == found
    assert set(state) == {"fc.weight", "fc.bias"} and torch.equal(state["fc.weight"], torch.ones(7, 4))


def test_a_dict_without_weights_is_refused_with_its_keys() -> None:
    with pytest.raises(CheckpointError, match="its keys: epoch, optimizer"):
        unwrap({"epoch": 3, "optimizer": {"lr": 0.1}}, "x.pt")
    with pytest.raises(CheckpointError, match="is not a state dict"):
        unwrap([torch.zeros(1)], "x.pt")


def test_labels_come_from_a_file_or_an_image_folders_class_folders(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("boot\nsandal\n\n", encoding="utf-8")
    assert read_labels(tmp_path / "labels.txt") == ["boot", "sandal"]
    for name in ("sandal", "boot", "Clog", ".cache"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    assert labels_from_folder(tmp_path / "train") == ["Clog", "boot", "sandal"]  # sorted, as ImageFolder does
    (tmp_path / "twice.txt").write_text("boot\nboot\nclog\n")
    with pytest.raises(CheckpointError, match="names boot more than once"):
        read_labels(tmp_path / "twice.txt")
    (tmp_path / "one.txt").write_text("boot\n")
    with pytest.raises(CheckpointError, match="at least two"):
        read_labels(tmp_path / "one.txt")
    (tmp_path / "gap.txt").write_text("boot\n\nclog\n")
    with pytest.raises(CheckpointError, match="line 2 is empty"):
        read_labels(tmp_path / "gap.txt")
    with pytest.raises(CheckpointError, match="is not a folder"):
        labels_from_folder(tmp_path / "missing")


def test_a_labels_file_as_editors_save_it_is_read_or_refused_with_how_to_save_it(tmp_path: Path) -> None:
    """Notepad's UTF-8 starts with a byte order mark, which became part of the first class's name; PowerShell's
    UTF-16 failed with a traceback; a folder was said not to exist."""
    (tmp_path / "bom.txt").write_text("boot\nsandal\n", encoding="utf-8-sig")
    assert read_labels(tmp_path / "bom.txt") == ["boot", "sandal"]
    (tmp_path / "utf16.txt").write_text("boot\nsandal\n", encoding="utf-16")
    with pytest.raises(CheckpointError, match=r"utf16\.txt is not UTF-8 text: save it as UTF-8, one class a line"):
        read_labels(tmp_path / "utf16.txt")
    with pytest.raises(CheckpointError, match="is a folder: give a file of class names, or --labels-from DIR"):
        read_labels(tmp_path)


def test_the_users_model_has_its_width_name_and_input() -> None:
    base = get_model_spec("resnet18")
    spec = adapt(base, SHOES, "shoes", InputOverrides(size=160, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    assert (spec.name, spec.num_classes, spec.built_on, spec.released) == ("shoes", 7, "resnet18", None)
    assert (spec.input.size, spec.input.resize, spec.input.mean) == (160, 183, (0.5, 0.5, 0.5))  # 160 * 256 / 224
    assert spec.num_params == sum(p.numel() for p in ResNet(BasicBlock, [2, 2, 2, 2], num_classes=7).parameters())
    with pytest.raises(CheckpointError, match="takes 3 value"):
        adapt(base, SHOES, None, InputOverrides(mean=(0.5,)))
    with pytest.raises(CheckpointError, match="lenet5 cannot take 64x64 images"):
        adapt(get_model_spec("lenet5"), SHOES, None, InputOverrides(size=64))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18 with a 7-class head, saved by plain PyTorch code through DataParallel (``module.`` names)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ckpt") / "shoes.pt"
    torch.save(nn.DataParallel(ResNet(BasicBlock, [2, 2, 2, 2], num_classes=7)).state_dict(), path)
    (path.parent / "labels.txt").write_text("\n".join(SHOES) + "\n")
    (path.parent / "six.txt").write_text("\n".join(SHOES[:6]) + "\n")
    return path


def test_a_checkpoint_and_its_labels_become_a_model_of_the_store(checkpoint: Path, tmp_path: Path) -> None:
    args = ["resnet18", "--weights-file", str(checkpoint), "--out", str(tmp_path), "--no-progress"]
    assert export_main([*args, "--labels", str(checkpoint.parent / "labels.txt"), "--as", "shoes"]) == 0
    store = ModelStore(tmp_path)
    version = store.latest("shoes")
    assert version is not None and store.latest("resnet18") is None
    meta = version.read_metadata()
    assert meta["num_classes"] == 7 and meta["architecture"]["built_on"] == "resnet18"
    assert meta["weights"]["kind"] == "file" and meta["weights"]["details"]["found"].endswith(
        "'module.' prefix removed"
    )
    assert "abstain" not in meta  # the photos' ImageNet labels are not its classes
    assert store.read_labels("shoes", version) == SHOES == store.read_labels("shoes")
    assert 'name: "shoes"' in (store.model_dir("shoes") / "config.pbtxt").read_text()
    assert "dims: [7]" in (store.model_dir("shoes") / "config.pbtxt").read_text()
    assert json.loads((version.directory / "metadata.json").read_text())["verification"]["top1_agreement"] == 1.0
    # a model of the store, not of the registry, gets its variants by its own name, with its own labels
    # (random weights agree with their INT8 copy on 97.6% of the photos: below the default 99%)
    int8 = ["--precision", "int8", "--recipe", "u8s8", "--min-agreement", "0.9"]
    assert export_main(["shoes", *int8, "--out", str(tmp_path), "--no-progress"]) == 0
    variant = store.latest("shoes_int8")
    assert variant is not None and store.read_labels("shoes_int8", variant) == SHOES
    assert variant.read_metadata()["architecture"]["built_on"] == "resnet18"


def test_labels_that_do_not_fit_the_head_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    args = ["resnet18", "--weights-file", str(checkpoint), "--out", str(tmp_path), "--no-progress"]
    assert export_main([*args, "--labels", str(checkpoint.parent / "six.txt"), "--as", "shoes"]) == 1
    assert export_main(args) == 1  # 7 classes and no labels: refused, the ImageNet names do not fit
    assert export_main([*args, "--labels", str(checkpoint.parent / "labels.txt"), "--as", "resnet50"]) == 1
    assert ModelStore(tmp_path).names() == []


def test_a_version_with_other_classes_keeps_the_earlier_versions_labels(checkpoint: Path, tmp_path: Path) -> None:
    """Without --as: a new version of resnet18 with seven classes; version 1 still answers with ImageNet's."""
    store = ModelStore(tmp_path)
    assert export_main(["resnet18", "--weights", "random", "--out", str(tmp_path), "--no-progress"]) == 0
    labels = str(checkpoint.parent / "labels.txt")
    args = ["--weights-file", str(checkpoint), "--labels", labels, "--out", str(tmp_path), "--no-progress"]
    assert export_main(["resnet18", *args]) == 0
    first, second = store.versions("resnet18")
    assert len(store.read_labels("resnet18", first)) == 1000 and store.read_labels("resnet18", second) == SHOES
    assert store.read_labels("resnet18") == SHOES  # the model's (Triton's): the latest's
