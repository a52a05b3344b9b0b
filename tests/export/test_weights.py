"""Weight files: torchvision's format loads strictly, hashes are checked, pickles are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.cli import main as export_main
from export.graph import ClassifierGraph, random_images
from export.models.googlenet import GoogLeNet
from export.registry import get_model_spec
from export.spec import ReleasedWeights
from export.weights import (
    WeightsIntegrityError,
    WeightsUnavailableError,
    fetch_released,
    load_state_dict,
)
from service.store.layout import ModelStore

from .releases import release_file


def _served_probabilities(store: ModelStore, name: str, images: np.ndarray) -> np.ndarray:
    latest = store.latest(name)
    assert latest is not None
    session = ort.InferenceSession(str(latest.graph), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": images})[0]


def test_weights_file_in_torchvision_format_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(7)
    reference = get_model_spec("resnet18").build().eval()
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)

    assert export_main(["resnet18", "--weights-file", str(weights), "--out", str(tmp_path / "store")]) == 0

    store = ModelStore(tmp_path / "store")
    metadata = store.latest("resnet18").read_metadata()  # type: ignore[union-attr]
    assert metadata["weights"]["kind"] == "file"
    assert metadata["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    spec = get_model_spec("resnet18")
    images = random_images(spec.input, batch=2, seed=3)
    with torch.no_grad():
        expected = ClassifierGraph(reference, spec.input)(torch.from_numpy(images))[1].numpy()
    np.testing.assert_allclose(_served_probabilities(store, "resnet18", images), expected, atol=1e-5)


def test_googlenet_release_with_auxiliary_heads_loads(tmp_path: Path) -> None:
    torch.manual_seed(3)
    release = GoogLeNet(aux_logits=True, transform_input=True).eval()
    state = release.state_dict()
    assert any(key.startswith("aux1.") for key in state)  # the release format carries them
    weights = tmp_path / "googlenet.pth"
    torch.save(state, weights)

    assert export_main(["googlenet", "--weights-file", str(weights), "--out", str(tmp_path / "store")]) == 0

    spec = get_model_spec("googlenet")
    images = random_images(spec.input, batch=2, seed=4)
    with torch.no_grad():
        expected = ClassifierGraph(release, spec.input)(torch.from_numpy(images))[1].numpy()
    np.testing.assert_allclose(_served_probabilities(ModelStore(tmp_path / "store"), "googlenet", images), expected,
                               atol=1e-5)  # fmt: skip


def test_weights_file_with_wrong_keys_is_refused(tmp_path: Path) -> None:
    state = get_model_spec("resnet18").build().state_dict()
    state["fc.extra"] = torch.zeros(1)
    weights = tmp_path / "bad.pth"
    torch.save(state, weights)
    assert export_main(["resnet18", "--weights-file", str(weights), "--out", str(tmp_path / "store")]) == 1
    assert ModelStore(tmp_path / "store").latest("resnet18") is None  # nothing half-written


def test_pickled_objects_are_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": Path("/etc/passwd")}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_state_dict(path)


def test_release_download_is_hash_checked(tmp_path: Path) -> None:
    source = tmp_path / "mirror"
    source.mkdir()
    path, release = release_file(source, "tiny", {"w": torch.arange(4.0)})
    cache = tmp_path / "cache"

    fetched = fetch_released(release, cache_dir=cache, progress=False)
    assert fetched == cache / path.name and fetched.read_bytes() == path.read_bytes()
    assert torch.equal(load_state_dict(fetched)["w"], torch.arange(4.0))

    # A tampered copy in the cache is refused, not loaded
    content = bytearray(fetched.read_bytes())
    content[len(content) // 2] ^= 0xFF
    fetched.write_bytes(bytes(content))
    with pytest.raises(WeightsIntegrityError, match="published with prefix"):
        fetch_released(release, cache_dir=cache, progress=False)


def test_tampered_download_is_refused(tmp_path: Path) -> None:
    path, release = release_file(tmp_path, "tiny", {"w": torch.ones(3)})
    torch.save({"w": torch.zeros(3)}, path)  # the content changes, the published name stays
    with pytest.raises(WeightsIntegrityError, match="nothing was kept"):
        fetch_released(release, cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # the next run fetches it again, not fails on it


def test_unreachable_release_names_the_alternatives(tmp_path: Path) -> None:
    release = ReleasedWeights(url=(tmp_path / "absent-0123abcd.pth").as_uri(), top1=0.0)
    with pytest.raises(WeightsUnavailableError) as info:
        fetch_released(release, cache_dir=tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "--weights-file" in message and "--weights random" in message and "\n" not in message


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", r"is not a whole torch checkpoint \(EOFError"),
        ("half", r"is not a whole torch checkpoint \(RuntimeError"),
        (b"hello world\n", r"is not a file torch.save wrote \(its first bytes are b'hello wo'\)"),
        (bytes(range(7, 256)) * 20, r"is not a file torch.save wrote \(its first bytes are b'\\x07"),  # noise
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", r"is not a file torch.save wrote \(a JPEG image\)"),
        ("npy", r"is not a file torch.save wrote \(a NumPy .npy file\)"),
        ("pickle noise", r"is not a whole torch checkpoint|holds more than tensors"),  # 0x80, then no pickle
        ("safetensors", r"is not a file torch.save wrote \(a safetensors file: load it with safetensors"),
        ("protocol 1", r"was saved with pickle protocol 0 or 1, which torch.load reads only by unpickling code"),
    ],
    ids=["empty", "cut short", "text", "noise", "jpeg", "npy", "pickle noise", "safetensors", "protocol 1"],
)
def test_a_weights_file_that_is_no_whole_checkpoint_is_a_one_line_error(
    tmp_path: Path, content: bytes | str, says: str
) -> None:
    """Empty, cut short, text, noise, another format: a line naming the file, and the export fails (with others
    named, they go on)."""
    path = tmp_path / "weights.pth"
    if content == "half":
        torch.save({"w": torch.zeros(1000)}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    elif content == "npy":
        with open(path, "wb") as stream:
            np.save(stream, np.zeros(3))
        content = path.read_bytes()
    elif content == "pickle noise":
        content = b"\x80\x02" + bytes(range(256)) * 4
    elif content == "safetensors":  # as safetensors.torch.save_file lays it out; a header of 264 bytes starts 0x08
        header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(264)
        content = len(header).to_bytes(8, "little") + header + bytes(8)
    elif content == "protocol 1":
        torch.save({"w": torch.zeros(2)}, path, pickle_protocol=1, _use_new_zipfile_serialization=False)
        content = path.read_bytes()
    path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"weights.pth " + says) as info:
        load_state_dict(path)
    assert "\n" not in str(info.value)
    assert export_main(["resnet18", "--weights-file", str(path), "--out", str(tmp_path / "store"),
                        "--no-progress"]) == 1  # fmt: skip
