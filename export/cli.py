"""``python -m export``: build, weight, convert, verify and store the classic CNNs."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from service.store.layout import ModelStore, StoredVersion

from . import versions
from .checkpoint import CheckpointError, InputOverrides, labels_from_folder, read_labels
from .finetune import FinetuneOptions, finetune
from .graph import VerificationError, count_flops
from .pipeline import ExportOptions, export_model
from .precision import VariantOptions, export_variant
from .registry import UnknownModelError, default_models, get_model_spec, list_models
from .weights import WeightsIntegrityError, WeightsUnavailableError

logger = logging.getLogger("export")

EPILOG = """\
commands:
  python -m export NAME [NAME ...]   export these networks (a new version each)
  python -m export default           the first-run set (`make export`): every family but VGG
                                     (LeNet-5, ResNet-18/50, GoogLeNet, AlexNet)
  python -m export all               every registered network whose weights can be had
  python -m export list              the registry as a table, with download and ONNX sizes

examples:
  python -m export lenet5                        # trains on scikit-learn's digits
  python -m export resnet50 googlenet            # torchvision's ImageNet weights
  python -m export resnet50 --weights-file resnet50-0676ba61.pth
  python -m export resnet18 --weights random     # for tests and benchmarks only
  python -m export resnet50 --baseline-dir traffic/  # drift measured against your own images
  python -m export lenet5 --precision int8       # INT8 variant lenet5_int8, checked against FP32
  python -m export resnet50 --precision int8 --calibration-dir photos/  # calibrate on your own images
  python -m export resnet50 --precision fp16     # FP16 variant for CUDA (refused on the CPU provider)

your own classes (a checkpoint fine-tuned elsewhere, any head width):
  python -m export resnet18 --weights-file shoes.pt --labels labels.txt --as shoes
  python -m export googlenet --weights-file ckpt.pth --labels-from photos/train --as defects --precision int8
  python -m export resnet50 --weights-file my.pt --labels labels.txt --input-size 160 \\
      --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5       # trained at 160 pixels with another normalisation
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export classic CNN classifiers to verified ONNX graphs in a versioned model store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # whole names only: `--batch 64` was read as --batch-size, past the checks below
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help="model names, 'default', 'all' or 'list'")
    parser.add_argument(
        "--weights",
        choices=["imagenet", "trained", "random"],
        help="imagenet: torchvision's release (default for ImageNet networks); "
        "trained: train now (LeNet-5's default); random: seeded, untrained",
    )
    parser.add_argument("--weights-file", type=Path, help="a state dict in torchvision's format, loaded strictly")
    parser.add_argument("--out", type=Path, default=Path("model_store"), help="the model store (default: %(default)s)")
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits", help="LeNet-5 training data")
    parser.add_argument("--data-dir", type=Path, help="where the MNIST IDX files are or are downloaded to")
    parser.add_argument("--epochs", type=int, help="training epochs: LeNet-5's (default 40), or fine-tuning's (most; "
                                                  "default 10)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed for training and random weights")
    parser.add_argument("--markdown", action="store_true", help="with 'list': a Markdown table")
    parser.add_argument("--baseline-dir", type=Path,
                        help="measure the answers' baseline (for drift) on these images: your own representative "
                             "ones (default: the held-out digits or scikit-image's photos)")  # fmt: skip
    own = parser.add_argument_group("your own model (with --weights-file: a checkpoint of the architecture NAME)")
    labels = own.add_mutually_exclusive_group()
    labels.add_argument("--labels", type=Path, help="its class names, one a line, in the head's order")
    labels.add_argument("--labels-from", type=Path, metavar="DIR",
                        help="its class names: DIR's class folders in sorted order, as torchvision's ImageFolder "
                             "numbers them")  # fmt: skip
    own.add_argument("--as", dest="as_name", metavar="NAME",
                     help="write it as its own model NAME in the store (default: a new version of NAME)")  # fmt: skip
    own.add_argument("--input-size", type=int, help="the side of the square the network saw in training")
    own.add_argument("--resize", type=int, help="the shorter side before the centre crop (default: in the "
                                                "architecture's ratio, 256/224)")  # fmt: skip
    own.add_argument("--mean", type=_floats, help="per-channel mean of pixels in [0, 1], e.g. 0.5,0.5,0.5")
    own.add_argument("--std", type=_floats, help="per-channel standard deviation, e.g. 0.5,0.5,0.5")
    tune = parser.add_argument_group("fine-tuning NAME on your folder of labelled images (DIR/<class>/<image>)")
    tune.add_argument("--finetune", type=Path, metavar="DIR", help="train on DIR's classes, then export (with --as)")
    tune.add_argument("--unfreeze", choices=["head", "last", "all"],
                      help="what trains: the output layer, the last block too, or everything (default: head from "
                           "released weights, all from random ones)")  # fmt: skip
    tune.add_argument("--val-split", type=float, default=0.2,
                      help="the share of each class held out to measure accuracy on (%(default)s)")  # fmt: skip
    tune.add_argument("--augment", choices=["crop,flip", "crop", "flip", "none"], default="crop,flip",
                      help="random resized crops and mirror images in training (%(default)s; "
                           "'crop' for digits and text)")  # fmt: skip
    tune.add_argument("--min-accuracy", type=float,
                      help="refuse to write it below this held-out top-1 (0-1; default: what always answering "
                           "the largest class scores)")  # fmt: skip
    tune.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (%(default)s)")
    tune.add_argument("--batch-size", type=int, default=32, help="images a step (%(default)s)")
    tune.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a better one")
    variant = parser.add_argument_group("lower-precision variants (written as NAME_int8 / NAME_fp16)")
    variant.add_argument("--precision", choices=["int8", "fp16"], help="derive a variant from an FP32 version")
    variant.add_argument("--from-version", type=int, help="the FP32 version to derive from (default: the latest)")
    variant.add_argument("--calibration-dir", type=Path, help="INT8: calibrate on these images (your own traffic)")
    variant.add_argument(
        "--calibration-count", type=int, default=500, help="INT8: most calibration images (%(default)s)"
    )
    variant.add_argument(
        "--calibration-method",
        choices=["minmax", "entropy", "percentile"],
        default="percentile",
        help="INT8: how activation ranges are chosen (default: %(default)s)",
    )
    variant.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        help="refuse below this top-1 agreement with FP32 on held-out images (%(default)s)",
    )
    variant.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.5,
        help="refuse above this accuracy drop in points, where labels exist (%(default)s)",
    )
    variant.add_argument(
        "--recipe",
        choices=["auto", "s8s8", "s8s8_reduced", "u8s8", "u8s8_reduced"],
        default="auto",
        help="INT8: auto times every recipe here and keeps the fastest that passes; or force one (%(default)s)",
    )
    variant.add_argument("--force", action="store_true",
                         help="write a variant, or a fine-tune, that misses its thresholds (marked)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    given = {token.split("=", 1)[0] for token in (sys.argv[1:] if argv is None else argv) if token.startswith("--")}
    for needs, present, options in (
        ("--finetune DIR", args.finetune is not None,
         ("--unfreeze", "--val-split", "--augment", "--min-accuracy", "--lr", "--batch-size", "--patience")),
        ("--precision int8|fp16", args.precision is not None,
         ("--calibration-count", "--calibration-method", "--min-agreement", "--max-accuracy-drop")),
        ("'list'", args.names == ["list"], ("--markdown",)),
        ("LeNet-5 (lenet5, default or all)", bool({"lenet5", *SETS} & set(args.names)), ("--data", "--data-dir")),
    ):  # fmt: skip
        if not present and (stray := [option for option in options if option in given]):
            parser.error(f"{', '.join(stray)} only {'go' if len(stray) > 1 else 'goes'} with {needs}; "
                         "without it nothing reads them")  # fmt: skip
    if args.weights is not None and args.weights_file is not None:
        parser.error("--weights and --weights-file are two sources of weights: give one")
    if args.weights_file is not None and (len(args.names) != 1 or args.names[0] in KEYWORDS):
        parser.error("--weights-file goes with exactly one model name")
    own_model = (args.labels, args.labels_from, args.as_name, args.input_size, args.resize, args.mean, args.std)
    one_name = len(args.names) == 1 and args.names[0] not in KEYWORDS
    if (any(value is not None for value in own_model) or args.finetune) and not one_name:
        parser.error("--labels, --labels-from, --as and the input options go with exactly one model name")
    if args.precision is None and (args.calibration_dir is not None or args.from_version is not None):
        parser.error("--calibration-dir and --from-version go with --precision int8|fp16")
    if args.from_version is not None and args.from_version < 1:
        parser.error("--from-version names a version of the store: 1 or more")
    if any(value is not None and value < 1 for value in (args.input_size, args.resize)):
        parser.error("--input-size and --resize are sides in pixels: 1 or more")
    if args.force and not (args.precision or args.finetune):
        parser.error("--force can only go with --precision int8|fp16 or --finetune DIR")
    elsewhere = args.weights_file or args.labels or args.labels_from or args.weights == "trained"
    if args.finetune is not None and elsewhere:
        parser.error("--finetune takes its classes from DIR and starts from --weights imagenet or random")
    if args.finetune is not None and args.as_name is None:
        parser.error("--finetune DIR needs --as NAME: the name your model will have in the store")
    if (args.epochs is not None and args.epochs < 1) or args.batch_size < 1 or args.patience < 1 or not args.lr > 0:
        parser.error("--epochs, --batch-size and --patience must be at least 1, and --lr above 0")
    if not 0 < args.val_split < 1 or (args.min_accuracy is not None and not 0 <= args.min_accuracy <= 1):
        parser.error("0 < --val-split < 1 and 0 <= --min-accuracy <= 1")
    if args.recipe != "auto" and args.precision != "int8":
        parser.error("--recipe goes with --precision int8")
    if args.calibration_count < 1 or not 0 <= args.min_agreement <= 1 or args.max_accuracy_drop < 0:
        parser.error("--calibration-count >= 1, 0 <= --min-agreement <= 1 and --max-accuracy-drop >= 0")
    return args


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers, e.g. 0.5,0.5,0.5") from None


# Names that stand for a set of networks; with 'list', the words that are no model name.
SETS = {"default": default_models, "all": list_models}
KEYWORDS = (*SETS, "list")


def _mib(value: float) -> str:
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.1f} MiB"


def model_table(markdown: bool) -> str:
    header = (
        "name",
        "family",
        "parameters",
        "GFLOPs/image",
        "input",
        "weights",
        "ImageNet top-1",
        "download",
        "ONNX",
        "default",
    )
    defaults = default_models()
    rows = []
    for name in list_models():
        spec = get_model_spec(name)
        top1 = f"{spec.released.top1:.2f}%" if spec.released else "-"
        download = _mib(spec.released.file_mib) if spec.released else "-"
        size = f"{spec.input.size}x{spec.input.size}x{spec.input.channels}"
        gflops = f"{count_flops(spec) / 1e9:.3f}"
        row = (
            name,
            spec.family,
            f"{spec.num_params:,}",
            gflops,
            size,
            spec.default_weights,
            top1,
            download,
            _mib(spec.onnx_mib),
            "yes" if name in defaults else "",
        )
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in (header, *rows))


def the_rest(exported_set: list[str]) -> str:
    """What a first run left out, with sizes, and how to get it."""
    rest = [get_model_spec(name) for name in list_models() if name not in exported_set]
    download = sum(spec.released.file_mib for spec in rest if spec.released)
    onnx = sum(spec.onnx_mib for spec in rest)
    each = ", ".join(f"{spec.name} {_mib(spec.released.file_mib if spec.released else 0)}" for spec in rest)
    return (
        f"{len(rest)} more networks are registered ({_mib(download)} to download, {_mib(onnx)} of ONNX): {each}. "
        "Export them all with `python -m export all`, or by name, e.g. `python -m export vgg16 resnet152`; "
        "`python -m export list` shows every size."
    )


def _export_variant(name: str, store: ModelStore, options: ExportOptions, variant: VariantOptions) -> StoredVersion:
    """The variant of ``name`` (or of the user's model made from it), exporting its FP32 version first where the
    store has none, or where the command gives a checkpoint or a model of the user's to export."""
    if options.custom or options.weights_file is not None:
        return export_variant(export_model(name, store, options).name, store, variant)
    if store.latest(name) is None:
        logger.info("%s: no FP32 version in %s yet, exporting one first", name, store.root)
        export_model(name, store, options)
    return export_variant(name, store, variant)


def _finetune(
    name: str, store: ModelStore, options: ExportOptions, tune: FinetuneOptions, variant: VariantOptions | None
) -> StoredVersion:
    """The fine-tuned model, and its variant where asked: calibrated on its training split, gated on its
    held-out split with labels."""
    tuned = finetune(name, store, options, tune)
    if variant is None:
        return tuned.version
    own = dataclasses.replace(variant, calibration_images=tuned.calibration, held_out_images=tuned.held_out)
    if variant.calibration_dir is not None:  # the user's calibration images win over the training split
        own = dataclasses.replace(own, calibration_images=None)
    return export_variant(tuned.version.name, store, own)


def run_exports(
    names: list[str],
    store: ModelStore,
    options: ExportOptions,
    skip_unavailable: bool,
    variant: VariantOptions | None = None,
    tune: FinetuneOptions | None = None,
) -> int:
    exported: list[str] = []
    skipped: list[str] = []
    failed: list[str] = []
    for name in names:
        try:
            if tune is not None:
                version = _finetune(name, store, options, tune, variant)
            elif variant is None:
                version = export_model(name, store, options)
            else:
                version = _export_variant(name, store, options, variant)
        except WeightsUnavailableError as exc:  # skipped in a set (offline, say); a failure where it was named
            (skipped if skip_unavailable else failed).append(name)
            logger.log(logging.WARNING if skip_unavailable else logging.ERROR, "%s: %s", name, exc)
            continue
        except (ValueError, WeightsIntegrityError, VerificationError, OSError) as exc:
            failed.append(name)
            logger.error("%s: %s", name, exc)
            continue
        exported.append(f"{version.name} v{version.version}")
    logger.info("exported: %s", ", ".join(exported) or "none")
    if skipped:
        logger.info("skipped, weights not available here: %s", ", ".join(skipped))
    if failed:
        logger.error("failed: %s", ", ".join(failed))
    return 1 if failed or not exported else 0


def _before_any_work(args: argparse.Namespace, names: list[str], store: ModelStore) -> str | None:
    """What would fail only after the training or the download: a folder of images that is none, a version the
    store lacks (where the variant's parent is one the store has, not one this run exports first)."""
    for option, folder in (("--baseline-dir", args.baseline_dir), ("--calibration-dir", args.calibration_dir)):
        if folder is not None and not folder.is_dir():
            return f"{option} {folder} is not a folder: give a folder of images (searched recursively)"
    own = (args.finetune, args.weights_file, args.as_name, args.labels, args.labels_from, args.input_size,
           args.resize, args.mean, args.std)  # fmt: skip
    if args.from_version is not None and all(value is None for value in own):
        for name in (name for name in names if store.latest(name) is not None):
            held = sorted(v.version for v in store.versions(name))
            if args.from_version not in held:
                return f"--from-version {args.from_version}: {name} has versions {held} in {store.root}"
    return None


def _labels(args: argparse.Namespace) -> tuple[str, ...] | None:
    if args.labels is not None:
        return tuple(read_labels(args.labels))
    if args.labels_from is not None:
        return tuple(labels_from_folder(args.labels_from))
    return None


def main(argv: list[str] | None = None) -> int:
    """The command; Ctrl-C and SIGTERM (``docker stop``, Kubernetes) end it with one line and status 130 once the
    step under way returns (a VGG's conversion to ONNX, a minute, is one step), the version under way removed or,
    where it was being put in place, finished (``versions.uninterrupted``)."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = {signum: signal.signal(signum, versions.interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(argv)
    except KeyboardInterrupt:
        logger.error("interrupted: the versions logged as written stand, and no other was written")
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.names == ["list"]:
        print(model_table(args.markdown))  # noqa: T201 - the command's output
        return 0
    keyword = args.names[0] if len(args.names) == 1 and args.names[0] in SETS else None
    names = SETS[keyword]() if keyword else args.names
    store = ModelStore(args.out)
    try:
        for name in names:
            if not (args.precision and store.latest(name) is not None):  # a variant of a model of the store
                get_model_spec(name)
        labels = _labels(args)
    except (UnknownModelError, CheckpointError) as exc:
        logger.error("%s", exc)
        return 2
    try:  # before any download or training: a store that cannot take the result is said at once
        store.root.mkdir(parents=True, exist_ok=True)
        if not os.access(store.root, os.W_OK | os.X_OK):
            raise PermissionError(f"{store.root} is not writable by this user")
    except OSError as exc:
        logger.error("--out %s cannot take a model: %s", store.root, exc)
        return 2
    if (problem := _before_any_work(args, names, store)) is not None:
        logger.error("%s", problem)
        return 2
    options = ExportOptions(
        weights=args.weights,
        weights_file=args.weights_file,
        data=args.data,
        data_dir=args.data_dir,
        seed=args.seed,
        epochs=40 if args.epochs is None else args.epochs,
        progress=not args.no_progress,
        baseline_dir=args.baseline_dir,
        labels=labels,
        as_name=args.as_name,
        inputs=InputOverrides(args.input_size, args.resize, args.mean, args.std),
    )
    variant = None
    if args.precision:
        variant = VariantOptions(
            precision=args.precision,
            from_version=args.from_version,
            calibration_dir=args.calibration_dir,
            calibration_count=args.calibration_count,
            method=args.calibration_method,
            min_agreement=args.min_agreement,
            max_accuracy_drop=args.max_accuracy_drop,
            force=args.force,
            seed=args.seed,
            recipe=args.recipe,
        )
    tune = None
    if args.finetune is not None:
        tune = FinetuneOptions(
            folder=args.finetune,
            epochs=10 if args.epochs is None else args.epochs,
            unfreeze=args.unfreeze,
            held_out=args.val_split,
            augment=tuple(args.augment.split(",")) if args.augment != "none" else (),
            batch_size=args.batch_size,
            lr=args.lr,
            patience=args.patience,
            min_accuracy=args.min_accuracy,
            force=args.force,
        )
    status = run_exports(names, store, options, keyword is not None, variant, tune)
    if keyword == "default":
        logger.info("%s", the_rest(names))
    return status


if __name__ == "__main__":
    sys.exit(main())
