"""LeNet-5 trained at export time reads real handwritten digits."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export import train
from export.train import load_digits_dataset, read_idx
from export.weights import WeightsIntegrityError, WeightsUnavailableError
from service.store.layout import ModelStore


def test_trained_lenet5_reaches_97_percent_on_the_digits_test_split(model_store: ModelStore) -> None:
    latest = model_store.latest("lenet5")
    assert latest is not None
    metadata = latest.read_metadata()
    details = metadata["weights"]["details"]
    assert metadata["weights"]["kind"] == "trained" and details["dataset"] == "scikit-learn digits"

    # Re-measure on the exported graph, not on the figure the export wrote
    data = load_digits_dataset(seed=details["seed"])
    session = ort.InferenceSession(str(latest.graph), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": data.x_test[..., None]})
    accuracy = float((logits.argmax(1) == data.y_test).mean())
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(details["test_accuracy"], abs=1e-3)
    assert details["test_size"] == len(data.y_test) == 360


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)
    (tmp_path / "bad").write_bytes(b"not idx")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")


def test_an_mnist_download_cut_short_is_not_kept_and_a_whole_one_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files fetched from a mirror (a folder here): one cut off mid-way, or whole but not the file MNIST
    publishes (its MD5), is refused and leaves nothing behind, so the next run fetches it again instead of failing
    on it for ever; the published one is kept under its name."""
    mirror, data_dir = tmp_path / "mirror", tmp_path / "data"
    mirror.mkdir()
    labels = np.arange(200, dtype=np.uint8) % 10
    _write_idx(mirror / "t10k-labels-idx1-ubyte.gz", labels)
    whole = (mirror / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    monkeypatch.setattr(train, "MNIST_URL", mirror.as_uri() + "/")
    published = {"t10k-labels-idx1-ubyte": hashlib.md5(whole, usedforsecurity=False).hexdigest()}
    monkeypatch.setattr(train, "MNIST_MD5", published)  # this mirror's file, as MNIST publishes its own
    with pytest.raises(WeightsUnavailableError, match="cannot be fetched"):
        train._find_or_fetch(data_dir, "t10k-labels-idx1-ubyte")
    assert list(data_dir.iterdir()) == []
    _write_idx(mirror / "t10k-labels-idx1-ubyte.gz", labels[::-1].copy())  # whole, but not the published file
    with pytest.raises(WeightsIntegrityError, match="nothing was kept"):
        train._find_or_fetch(data_dir, "t10k-labels-idx1-ubyte")
    assert list(data_dir.iterdir()) == []
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(whole)
    fetched = train._find_or_fetch(data_dir, "t10k-labels-idx1-ubyte")
    assert fetched == data_dir / "t10k-labels-idx1-ubyte.gz" and list(data_dir.iterdir()) == [fetched]
    np.testing.assert_array_equal(read_idx(fetched), labels)


@pytest.mark.slow
def test_mnist_option_trains_from_idx_files(tmp_path: Path) -> None:
    """MNIST-format files (written here from the digits, as 28x28) train through --data mnist."""
    from export.cli import main as export_main

    digits = load_digits_dataset(seed=0)

    def to28(x: np.ndarray) -> np.ndarray:
        return x[:, 2:30, 2:30]  # 32x32 -> 28x28: the loader pads back to 32x32 like MNIST

    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    _write_idx(data_dir / "train-images-idx3-ubyte.gz", to28(digits.x_train))
    _write_idx(data_dir / "train-labels-idx1-ubyte.gz", digits.y_train)
    _write_idx(data_dir / "t10k-images-idx3-ubyte.gz", to28(digits.x_test))
    _write_idx(data_dir / "t10k-labels-idx1-ubyte.gz", digits.y_test)
    args = ["lenet5", "--data", "mnist", "--data-dir", str(data_dir), "--epochs", "15", "--no-progress"]
    assert export_main([*args, "--out", str(tmp_path / "store")]) == 0
    details = ModelStore(tmp_path / "store").latest("lenet5").read_metadata()["weights"]["details"]  # type: ignore[union-attr]
    assert details["dataset"] == "MNIST" and details["train_size"] == len(digits.y_train)
    assert details["test_accuracy"] >= 0.9
