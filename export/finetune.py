"""Fine-tune an architecture of the zoo on a folder of labelled images, then export it like any other model.

``python -m export resnet18 --finetune photos/ --as shoes``: the transfer learning every course on these
networks ends with, ending here in a verified, versioned, measured model of the store.

1. **The folder** (``export/folder.py``): ``DIR/<class>/<image>``, decoded as the service decodes it,
   split three ways by class: train, select (picks the epoch), held out (``--val-split``; never seen).
2. **The start**: the architecture's released ImageNet weights where they can be had, else ``--weights
   random`` (recorded), with a new head for the folder's classes (``export/checkpoint.py``).
3. **Training**: Adam (``--lr``) on the parts ``--unfreeze`` names (``head``: the output layer; ``last``:
   the last block too, ``LAST_BLOCK``; ``all``), frozen parts in eval mode (batch norm statistics kept).
   Augmentation (``--augment``): ``crop``, a random square-ish crop of 25-100% of the resize square's area
   (aspect 3/4 to 4/3) resized to the input, as torchvision's ``RandomResizedCrop``; ``flip``, a mirror
   half of the time (not for digits or text). After each epoch, the select part's accuracy; the best
   epoch's weights are kept, and training stops after ``--patience`` epochs without a better one.
4. **Measured and gated** (``export/evaluation.py``): the exported graph on the held-out part, with
   labels; below ``--min-accuracy`` (default: what always answering the largest class scores) nothing is
   written, unless ``--force``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from service.store.host import cpu_count
from service.store.layout import ModelStore, StoredVersion
from service.store.metadata import InputMeta

from . import checkpoint, evaluation, folder
from .calibration import ImageSet
from .graph import ClassifierGraph
from .pipeline import Built, ExportOptions, write_version
from .registry import get_model_spec
from .spec import ModelSpec
from .weights import Provenance, random_provenance, released_state_dict

logger = logging.getLogger(__name__)

Unfreeze = Literal["head", "last", "all"]
# family -> the last block, which --unfreeze last trains with the head
LAST_BLOCK = {"ResNet": "layer4", "GoogLeNet": "inception5b", "AlexNet": "classifier", "VGG": "classifier",
              "LeNet": "classifier"}  # fmt: skip
CROP_AREA = (0.25, 1.0)  # of the resize square
CROP_ASPECT = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class FinetuneOptions:
    folder: Path
    epochs: int = 10
    unfreeze: Unfreeze | None = None  # None: head from released weights, all from random ones
    held_out: float = 0.2  # --val-split
    augment: tuple[str, ...] = ("crop", "flip")
    batch_size: int = 32
    lr: float = 1e-3
    patience: int = 3
    min_accuracy: float | None = None  # None: better than always answering the largest class
    force: bool = False


@dataclass
class Tuned:
    """What fine-tuning wrote, and the folder's parts a variant is calibrated and gated on."""

    version: StoredVersion
    calibration: ImageSet
    held_out: ImageSet


def _start(base: ModelSpec, spec: ModelSpec, weights: str, options: ExportOptions) -> tuple[nn.Module, Provenance]:
    """``spec``'s network: the base's released weights with a freshly initialised head, or all random."""
    torch.manual_seed(options.seed)
    fresh = spec.build()
    if weights == "random":
        return fresh, random_provenance(options.seed)
    if base.released is None:
        raise ValueError(f"{base.name} has no released weights to start from: use --weights random")
    released, provenance = released_state_dict(base.released, options.cache_dir, options.progress)
    own = fresh.state_dict()
    # every released tensor that fits (all but the head, and GoogLeNet's auxiliary heads, which are dropped)
    state = {k: v for k, v in released.items() if k in own and v.shape == own[k].shape}
    state |= {k: v for k, v in own.items() if k not in state}
    return spec.build(state), provenance


def _trainable(model: nn.Module, spec: ModelSpec, unfreeze: Unfreeze) -> list[nn.Module]:
    """The modules that train; the rest are frozen (no gradient, eval mode)."""
    if unfreeze == "all":
        return [model]
    names = [checkpoint.head_name(spec)] + ([LAST_BLOCK[spec.family]] if unfreeze == "last" else [])
    return [model.get_submodule(name) for name in names]


def views(squares: Tensor, size: int, augment: tuple[str, ...], served: float, generator: torch.Generator) -> Tensor:
    """Training views (float NHWC, 0-255) of uint8 NHWC resize squares: random crops and flips where asked,
    else the centre crop the service takes (``served``: its side as a fraction of the square's)."""
    n = squares.shape[0]
    x = squares.permute(0, 3, 1, 2).float()

    def uniform(low: float, high: float) -> Tensor:
        return torch.empty(n).uniform_(low, high, generator=generator)

    if "crop" in augment:
        area, aspect = uniform(*CROP_AREA), torch.exp(uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
        w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # of the square's side
        cx, cy = (1 - w) * uniform(-1, 1), (1 - h) * uniform(-1, 1)
    else:
        w = h = torch.full((n,), served)
        cx = cy = torch.zeros(n)
    mirror = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if "flip" in augment else torch.ones(n)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([w * mirror, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).permute(0, 2, 3, 1)


def _accuracy(graph: ClassifierGraph, images: np.ndarray, labels: np.ndarray, batch: int = 64) -> float:
    graph.model.eval()
    with torch.no_grad():
        answers = [graph.model(graph.normalise(torch.from_numpy(images[i : i + batch]))).argmax(1)
                   for i in range(0, len(images), batch)]  # fmt: skip
    return float((torch.cat(answers).numpy() == labels).mean())


def fit(model: nn.Module, spec: ModelSpec, data: folder.LabelledFolder, tune: FinetuneOptions, unfreeze: Unfreeze,
        seed: int, progress: bool) -> dict[str, Any]:  # fmt: skip
    """Train ``model`` in place; the best epoch's weights are kept. Returns what the metadata records."""
    torch.manual_seed(seed)
    torch.set_num_threads(cpu_count())
    generator = torch.Generator().manual_seed(seed)
    graph = ClassifierGraph(model, spec.input)
    trained = _trainable(model, spec, unfreeze)
    model.requires_grad_(False)
    for part in trained:
        part.requires_grad_(True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=tune.lr)
    squares, labels = torch.from_numpy(data.train.images), torch.from_numpy(data.train.labels)
    served = spec.input.size / spec.input.resize
    best, best_accuracy, best_epoch, history = copy.deepcopy(model.state_dict()), -1.0, 0, []
    bar = tqdm(range(1, tune.epochs + 1), desc=f"fine-tuning {spec.name}", unit="epoch", disable=not progress)
    for epoch in bar:
        started, losses = time.perf_counter(), []
        model.eval()
        for part in trained:
            part.train()
        for batch in torch.randperm(len(squares), generator=generator).split(tune.batch_size):
            x = views(squares[batch], spec.input.size, tune.augment, served, generator)
            loss = F.cross_entropy(model((x.permute(0, 3, 1, 2) - graph.mean) / graph.std), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        accuracy = _accuracy(graph, data.select.images, data.select.labels)
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "select_top1": round(accuracy, 4),
                        "seconds": round(time.perf_counter() - started, 2)})  # fmt: skip
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", select_top1=f"{accuracy:.1%}")
        if accuracy > best_accuracy:
            best, best_accuracy, best_epoch = copy.deepcopy(model.state_dict()), accuracy, epoch
        elif epoch - best_epoch >= tune.patience:
            logger.info("%s: no better epoch in %d, stopping at %d", spec.name, tune.patience, epoch)
            break
    model.load_state_dict(best)
    model.eval()
    logger.info("%s: epoch %d kept (select top-1 %.2f%%)", spec.name, best_epoch, 100 * best_accuracy)
    return {"unfreeze": unfreeze, "augment": list(tune.augment), "optimiser": f"Adam, lr {tune.lr}",
            "batch_size": tune.batch_size, "epochs_run": len(history), "epoch_kept": best_epoch,
            "select_top1": round(best_accuracy, 4), "threads": torch.get_num_threads(), "seed": seed,
            "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2),
            "history": history}  # fmt: skip


def finetune(name: str, store: ModelStore, options: ExportOptions, tune: FinetuneOptions) -> Tuned:
    """Fine-tune ``name`` on ``tune.folder`` and write it as ``options.as_name`` (or a version of ``name``)."""
    started = time.perf_counter()
    base = get_model_spec(name)
    checkpoint.check_name(base, options.as_name)
    served = InputMeta.model_validate(options.inputs.apply(base.input).to_dict())
    data = folder.read(tune.folder, served, tune.held_out, options.seed)
    spec = checkpoint.adapt(base, data.classes, options.as_name, options.inputs)
    weights = options.weights or ("imagenet" if base.released else "random")
    model, start = _start(base, spec, weights, options)
    unfreeze = tune.unfreeze or ("head" if weights == "imagenet" else "all")
    logger.info("%s: %d classes, %d/%d/%d images to train/select/measure, from %s weights, training %s",
                spec.name, len(data.classes), len(data.train.files), len(data.select.files),
                len(data.held_out.files), weights, unfreeze)  # fmt: skip
    record = fit(model, spec, data, tune, unfreeze, options.seed, options.progress)
    provenance = Provenance(
        kind="finetuned",
        source=f"fine-tuned here from {base.name}'s {weights} weights on {tune.folder}",
        url=start.url,
        file=start.file,
        sha256=start.sha256,
        details={"start": start.to_dict(), "data": data.describe(tune.held_out, options.seed), "training": record},
    )
    held_out = data.held_out.as_image_set(tune.folder)

    def gate(graph: Path) -> dict[str, Any]:
        found = evaluation.measure(graph, held_out, data.classes)
        checked = evaluation.gate(found, tune.min_accuracy, tune.force, spec.name)
        logger.info("%s: %s", spec.name, checked["summary"])
        data.write_split(graph.parent / folder.SPLIT_FILE)
        return {"evaluation": checked}

    version = write_version(Built(model, spec, provenance), store, options, started, held_out=held_out, gate=gate)
    return Tuned(version, _calibration(data, spec), held_out)


def _calibration(data: folder.LabelledFolder, spec: ModelSpec) -> ImageSet:
    """The training part's centre crops, close to what the service takes, to calibrate INT8 on."""
    offset = (spec.input.resize - spec.input.size) // 2
    crops = data.train.images[:, offset : offset + spec.input.size, offset : offset + spec.input.size]
    return ImageSet(f"the training split of {data.directory}", np.ascontiguousarray(crops), data.train.labels)
