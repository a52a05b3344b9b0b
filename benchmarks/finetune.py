"""What fine-tuning costs here: seconds per epoch and training images per second, per network and ``--unfreeze``.

    python -m benchmarks.finetune [--models resnet18,resnet50] [--images 96] [--size 224] [--out DIR]

A folder of ``--images`` 256-pixel photo crops in four classes (scikit-image's photos: real pixels, offline) is
fine-tuned for one epoch per configuration through the export stage's own code (``export/finetune.py``:
the same decoding, augmentation, optimiser and threads), from seeded random weights (the released ones
cannot be downloaded here; the arithmetic is the same). Prints a table with the CPU and its flags, and
writes ``finetune.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, get_args

import numpy as np
from PIL import Image
from skimage import data as photos

from export import checkpoint, folder
from export.finetune import FinetuneOptions, Unfreeze, _start, fit
from export.pipeline import ExportOptions
from export.registry import get_model_spec, list_models
from service.store.metadata import InputMeta

from .arguments import models_problem
from .host import machine

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # one class each


def photo_folder(root: Path, images: int, seed: int = 0) -> Path:
    """``images`` random 256 x 256 crops of four photos, as ``root/<photo>/<n>.jpg``."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        name = PHOTOS[i % len(PHOTOS)]
        pixels = getattr(photos, name)()
        top, left = rng.integers(0, pixels.shape[0] - 255), rng.integers(0, pixels.shape[1] - 255)
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[top : top + 256, left : left + 256]).convert("RGB").save(root / name / f"{i}.jpg")
    return root


def one(name: str, unfreeze: Unfreeze, directory: Path, size: int) -> dict[str, Any]:
    base = get_model_spec(name)
    inputs = checkpoint.InputOverrides(size=size)
    served = InputMeta.model_validate(inputs.apply(base.input).to_dict())
    data = folder.read(directory, served)
    spec = checkpoint.adapt(base, data.classes, f"bench-{name}", inputs)
    model, _ = _start(base, spec, "random", ExportOptions(progress=False))
    record = fit(model, spec, data, FinetuneOptions(directory, epochs=1), unfreeze, seed=0, progress=False)
    seconds = record["seconds_per_epoch"]
    return {"model": name, "unfreeze": unfreeze, "size": size, "train_images": len(data.train.files),
            "seconds_per_epoch": seconds, "images_per_s": round(len(data.train.files) / seconds, 2),
            "threads": record["threads"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--unfreeze", type=_parts, default="head,last", help="comma-separated: head, last, all")
    parser.add_argument("--images", type=int, default=96, help="photo crops in the folder (%(default)s)")
    parser.add_argument("--size", type=int, default=224, help="input size (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if problem := models_problem(args.models, list_models()):
        parser.error(f"--models {args.models}: {problem}")
    logging.basicConfig(level=logging.WARNING)
    host = machine()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = photo_folder(Path(scratch) / "photos", args.images)
        for name in [model for model in args.models.split(",") if model]:
            for unfreeze in args.unfreeze:
                rows.append(one(name, unfreeze, directory, args.size))
                row = rows[-1]
                line = (f"{name:10} {unfreeze:5} {args.size}px: {row['seconds_per_epoch']:8.2f} s per epoch of "
                        f"{row['train_images']} images, {row['images_per_s']:7.2f} images/s, "
                        f"{row['threads']} threads")  # fmt: skip
                print(line)  # noqa: T201
    print(f"on {host['cpu']}, {host['cores']} cores, flags {', '.join(host['cpu_flags'])}")  # noqa: T201
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune.json").write_text(json.dumps({"machine": host, "runs": rows}, indent=2) + "\n")
    return 0


def _parts(text: str) -> list[str]:
    parts, known = text.split(","), get_args(Unfreeze)
    if unknown := [part for part in parts if part not in known]:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))}: choose among {', '.join(known)}")
    return parts


if __name__ == "__main__":
    raise SystemExit(main())
