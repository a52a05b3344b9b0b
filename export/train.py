"""Training LeNet-5 at export time, deterministically, on real handwritten digits.

Offline default: scikit-learn's bundled digits (1,797 8x8 images, 16 grey levels),
upscaled to 32x32 with white strokes on black like MNIST. ``data="mnist"`` reads the
MNIST IDX files from ``data_dir``, downloading them first where they are missing.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .download import download
from .weights import Provenance, WeightsIntegrityError, WeightsUnavailableError

logger = logging.getLogger(__name__)

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# the MD5s torchvision's MNIST publishes for the mirror's .gz files: a download is checked against them
MNIST_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


@dataclass
class Dataset:
    """uint8 images N x 32 x 32 (light on dark) and int64 labels, split into train and test."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    split: str


def _to_32x32(images: np.ndarray, scale: float) -> np.ndarray:
    """N x h x w grey levels in [0, scale] -> N x 32 x 32 uint8, bilinear."""
    x = torch.from_numpy(images.astype(np.float32) * (255.0 / scale)).unsqueeze(1)
    if x.shape[-1] != 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def load_digits_dataset(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = _to_32x32(digits.images, scale=16.0)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    split = f"stratified {1 - test_fraction:.0%}/{test_fraction:.0%} train/test, random_state={seed}"
    return Dataset("scikit-learn digits", x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), split)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_or_fetch(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    target = data_dir / f"{stem}.gz"
    partial = target.with_name(f"{target.name}.{secrets.token_hex(4)}.partial")  # one per export running
    data_dir.mkdir(parents=True, exist_ok=True)
    try:  # under another name until whole: an interrupted download is not found as the file next time
        try:
            download(MNIST_URL + target.name, partial, progress=False)
            with gzip.open(partial) as whole:  # a body cut short fails here, not in every later run
                while whole.read(1 << 20):
                    pass
        except (OSError, EOFError, http.client.HTTPException) as exc:  # gzip's BadGzipFile is an OSError
            raise WeightsUnavailableError(
                f"{stem} is not in {data_dir} and cannot be fetched from {MNIST_URL} ({type(exc).__name__}: "
                f"{exc}); put the MNIST IDX files there, or use --data digits"
            ) from exc
        digest = hashlib.md5(partial.read_bytes(), usedforsecurity=False).hexdigest()
        if digest != MNIST_MD5[stem]:
            raise WeightsIntegrityError(
                f"{MNIST_URL}{target.name} downloaded with MD5 {digest}, but MNIST publishes it with "
                f"{MNIST_MD5[stem]}; nothing was kept: try again, or put the MNIST IDX files in {data_dir}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)  # however it ended, Ctrl-C included
    return target


def load_mnist_dataset(data_dir: Path) -> Dataset:
    arrays = {key: read_idx(_find_or_fetch(data_dir, stem)) for key, stem in MNIST_FILES.items()}
    # 28x28 digits centred in 32x32, as LeNet-5's input layer expects
    pad = ((0, 0), (2, 2), (2, 2))
    return Dataset(
        "MNIST",
        np.pad(arrays["train_images"], pad),
        arrays["train_labels"].astype(np.int64),
        np.pad(arrays["test_images"], pad),
        arrays["test_labels"].astype(np.int64),
        "MNIST's own 60,000/10,000 train/test split",
    )


def _pixels(x: np.ndarray) -> Tensor:
    return torch.from_numpy(x).float().unsqueeze(1) / 255.0  # N x 1 x 32 x 32 in [0, 1]


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random zoom-out (digits drawn smaller, with a margin), shifts and slight rotations.

    Applied to pixels in [0, 1] so that the area uncovered is the black ground. Without
    it the network only knows digits that fill the frame, and reads a digit drawn with a
    margin on a canvas at about 70%.
    """
    n = x.shape[0]
    zoom = torch.empty(n).uniform_(0.95, 1.7, generator=generator)  # > 1: the digit shrinks
    angle = torch.empty(n).uniform_(-0.17, 0.17, generator=generator)  # about +-10 degrees
    shift = torch.empty(n, 2).uniform_(-0.2, 0.2, generator=generator)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augmented_views(x: np.ndarray, copies: int, seed: int = 0) -> np.ndarray:
    """``copies`` views of each uint8 image (N x 32 x 32) as training augments them, as served: uint8 NHWC."""
    generator = torch.Generator().manual_seed(seed)
    views = _augment(_pixels(x).repeat(copies, 1, 1, 1), generator)
    return (views * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((predictions == y).float().mean())


def train_lenet(
    model: nn.Module,
    data: Dataset,
    mean: float,
    std: float,
    *,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> Provenance:
    """Train ``model`` in place with Adam and a cosine schedule; returns what to record."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = _pixels(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = (_pixels(data.x_test) - mean) / std, torch.from_numpy(data.y_test)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch)
    bar = tqdm(range(epochs), desc=f"training lenet5 on {data.name}", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            inputs = (_augment(x_train[batch], generator) - mean) / std
            loss = F.cross_entropy(model(inputs), y_train[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    accuracy = evaluate(model, x_test, y_test)
    logger.info("lenet5: test accuracy %.4f on %s", accuracy, data.name)
    return Provenance(
        kind="trained",
        source=f"trained at export time on {data.name}",
        details={
            "dataset": data.name,
            "split": data.split,
            "train_size": len(x_train),
            "test_size": len(x_test),
            "test_accuracy": round(accuracy, 4),
            "epochs": epochs,
            "seed": seed,
        },
    )
