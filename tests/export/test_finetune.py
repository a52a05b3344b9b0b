"""Fine-tuning's folder and its refusals: what cannot be trained on is refused with its reason, nothing written."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.cli import main as export_main
from export.finetune import views
from service.store.layout import ModelStore

from ..helpers import encode


def folder_of(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(encode(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    return root


def tune(folder: Path, store: Path, *more: str) -> int:
    return export_main(["lenet5", "--finetune", str(folder), "--as", "mine", "--out", str(store), "--no-progress",
                        "--epochs", "1", *more])  # fmt: skip


@pytest.mark.parametrize(
    ("counts", "why"),
    [
        ({"only": 5}, "names 1 class(es): a classifier needs at least two"),
        ({"cat": 5, "dog": 1}, "class 'dog' has 1 readable image(s): the split needs at least 3"),
        ({"cat": 5, "dog": 0}, "class 'dog' has 0 readable image(s)"),
    ],
)
def test_a_folder_that_cannot_be_split_is_refused(
    tmp_path: Path, counts: dict[str, int], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        assert tune(folder_of(tmp_path / "photos", counts), tmp_path / "store") == 1
    assert why in caplog.text
    assert ModelStore(tmp_path / "store").names() == []


def test_a_missing_folder_and_a_missing_name_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert tune(tmp_path / "nowhere", tmp_path / "store") == 1
    assert "nowhere is not a folder (expected DIR/<class>/<image files>)" in caplog.text
    with pytest.raises(SystemExit):  # argparse: --finetune needs --as
        export_main(["lenet5", "--finetune", str(tmp_path), "--out", str(tmp_path / "store")])


def test_unreadable_files_are_reported_by_path_and_skipped(
    digits_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "digits"
    shutil.copytree(digits_folder, folder)
    (folder / "3" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "7" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert tune(folder, tmp_path / "store", "--augment", "crop") == 0
    assert "skipped 2 unreadable files" in caplog.text and "3/broken.png" in caplog.text
    version = ModelStore(tmp_path / "store").latest("mine")
    assert version is not None
    data = version.read_metadata()["weights"]["details"]["data"]
    assert data["unreadable_files"] == 2 and data["classes"] == 10
    assert data["train"]["images"] + data["select"]["images"] + data["held_out"]["images"] == 1797


def test_below_the_floor_nothing_is_written_unless_forced(
    digits_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        assert tune(digits_folder, tmp_path / "store", "--min-accuracy", "0.999") == 1
    assert "mine refused: held-out top-1" in caplog.text and "floor 99.90%" in caplog.text
    assert ModelStore(tmp_path / "store").names() == []
    assert tune(digits_folder, tmp_path / "store", "--min-accuracy", "0.999", "--force") == 0
    version = ModelStore(tmp_path / "store").latest("mine")
    assert version is not None
    found = version.read_metadata()["evaluation"]
    assert found["forced"] and not found["passed"] and found["min_top1"] == 0.999


def test_training_views_crop_and_mirror_at_random_and_repeat_with_the_seed() -> None:
    squares = torch.from_numpy(np.tile(np.arange(37, dtype=np.uint8)[None, None, :, None], (4, 37, 1, 3)))
    plain = views(squares, 32, (), 32 / 37, torch.Generator().manual_seed(0))
    assert plain.shape == (4, 32, 32, 3)
    assert torch.all(plain[:, :, 1:, 0] >= plain[:, :, :-1, 0])  # left to right, as the square: no mirror
    mirrored = views(squares, 32, ("flip",), 32 / 37, torch.Generator().manual_seed(0))
    flipped = [bool(torch.all(m[:, 1:, 0] <= m[:, :-1, 0])) for m in mirrored]
    assert any(flipped) and not all(flipped)
    one = views(squares, 32, ("crop", "flip"), 32 / 37, torch.Generator().manual_seed(5))
    again = views(squares, 32, ("crop", "flip"), 32 / 37, torch.Generator().manual_seed(5))
    assert torch.equal(one, again) and not torch.equal(one[0], one[1])


def test_it_starts_from_the_released_weights_with_a_new_head(tmp_path: Path) -> None:
    """GoogLeNet's release (auxiliary heads, transform_input), downloaded by the real code from a file:// mirror:
    every tensor but the heads is the release's, the new head has the folder's width."""
    from export.checkpoint import InputOverrides, adapt
    from export.finetune import _start
    from export.models.googlenet import GoogLeNet
    from export.pipeline import ExportOptions
    from export.registry import get_model_spec

    from .releases import release_file

    torch.manual_seed(1)
    released = GoogLeNet(aux_logits=True, transform_input=True).state_dict()
    (tmp_path / "mirror").mkdir()
    _, release = release_file(tmp_path / "mirror", "googlenet", released)
    base = dataclasses.replace(get_model_spec("googlenet"), released=release)
    spec = adapt(base, ["cat", "dog", "fox"], "pets", InputOverrides())
    options = ExportOptions(progress=False, cache_dir=tmp_path / "cache")
    model, provenance = _start(base, spec, "imagenet", options)
    state = model.state_dict()
    assert provenance.kind == "imagenet" and provenance.file == Path(release.url).name
    assert state["fc.weight"].shape == (3, 1024) and not any(k.startswith("aux") for k in state)
    kept = [k for k in released if k in state and not k.startswith("fc.")]
    assert kept and all(torch.equal(state[k], released[k]) for k in kept)
    assert model.transform_input  # the release's convention, as torchvision's fine-tuning keeps it
    assert sum(not k.startswith("fc.") for k in state) == sum(
        k in released for k in state if not k.startswith("fc.")
    )  # nothing else was left at its initialisation
