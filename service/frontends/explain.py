"""``POST /explain``: where the network looked, for each image of a ``/classify`` body.

The same bodies, model choice, limits, tokens and errors as ``/classify``; each image's
result adds its ``explanation``: the method (``gradcam`` from the version's explanation graph,
``runtime/gradcam.py``; ``occlusion`` through the served graph itself, ``runtime/occlusion.py``,
for any model; the default is the one the export recorded, ``default_method``), the class
explained (``class=INDEX_OR_LABEL``, its top-1 by default) with its probability, the layer, and
the map, a 2-D grid of floats in [0, 1]. ``overlay=true`` adds the map drawn over the crop the
network saw as a base64 PNG; ``Accept: image/png`` with one image answers that PNG itself (its
method in ``X-Explanation-Method``).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from ..errors import InvalidInput
from ..runtime.classifier import Explained, top_k
from ..runtime.occlusion import Occlusion
from .body import read_images
from .params import classifier, explain_params, whole_number

OVERLAY_MIN_SIDE = 224  # small inputs (LeNet-5's 32 pixels) are enlarged, pixel for pixel, to at least this


def class_index(text: str | None, labels: list[str], model: str) -> int | None:
    """``class=`` as a class index: a label of the model, or an index into its labels; None when absent."""
    if text is None:
        return None
    wanted = text.strip()
    if wanted in labels:
        return labels.index(wanted)
    if wanted.isascii() and wanted.isdigit():
        index = whole_number(wanted)  # None past 18 digits (int() refuses thousands: a 500 otherwise)
        if index is not None and index < len(labels):
            return index
        shown = wanted if len(wanted) <= 20 else f"{wanted[:20]}..."
        raise InvalidInput(f"class={shown} is out of range: {model} has classes 0 to {len(labels) - 1}")
    examples = ", ".join(repr(label) for label in labels[:3])
    raise InvalidInput(
        f"Unknown class {wanted!r} for {model}: give a label of its labels.txt ({examples}, ...) or an index "
        f"from 0 to {len(labels) - 1}"
    )


def prefers_png(accept: str) -> bool:
    """Whether ``Accept`` asks for ``image/png`` (a quality above 0, and not below ``application/json``'s)."""
    quality: dict[str, float] = {}
    for item in accept.lower().split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for key, _, value in (param.partition("=") for param in params):
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media] = max(quality.get(media, 0.0), q)
    png = quality.get("image/png", 0.0)
    return png > 0 and png >= quality.get("application/json", 0.0)


def hot(heat: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white colour ramp for values in [0, 1], as float RGB."""
    return np.clip(np.stack([3 * heat, 3 * heat - 1, 3 * heat - 2], axis=-1), 0.0, 1.0)


def overlay_png(pixels: np.ndarray, heat: np.ndarray) -> bytes:
    """The map, upsampled bilinearly, over the pixels the network saw (enlarged where small), as PNG."""
    height, width, channels = pixels.shape
    scale = max(1, -(-OVERLAY_MIN_SIDE // min(height, width)))
    base = Image.fromarray(pixels[..., 0] if channels == 1 else pixels).convert("RGB")
    base = base.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    levels = Image.fromarray(np.round(heat * 255).astype(np.uint8)).resize(base.size, Image.Resampling.BILINEAR)
    weight = np.asarray(levels, dtype=np.float32)[..., None] / 255.0
    blended = np.asarray(base, dtype=np.float32) * (1 - 0.7 * weight) + 255 * hot(weight[..., 0]) * 0.7 * weight
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def default_method(graph: tuple[Any, dict[str, Any]] | None, with_layers: bool) -> str:
    """Without ``method=``: what the export chose for the family (Grad-CAM, or occlusion for LeNet-5, whose
    Grad-CAM does not single out the strokes); Grad-CAM for ``layers=true``, which its graph outputs;
    occlusion for a version without an explanation graph."""
    if graph is None:
        return "occlusion"
    return "gradcam" if with_layers else str(graph[1].get("default", "gradcam"))


def explanation(item: Explained, labels: list[str], method: str, how: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method,
        "class": {"index": item.index, "label": labels[item.index], "score": float(item.probabilities[item.index])},
        **how,
        "map": np.round(item.heat.astype(np.float64), 4).tolist(),
    }


async def explain(request: Request) -> Response:
    """``POST /explain`` (see the route's docs)."""
    service = classifier(request)
    settings = service.settings
    query = explain_params(settings.max_top_k).parse(request.query_params)
    wanted, with_overlay, with_layers = query["method"], query["overlay"], query["layers"]
    as_png = prefers_png(request.headers.get("accept", ""))
    with await service.acquire(query["model"], query["version"]) as entry:
        assert entry.model is not None
        meta, labels = entry.model.metadata, entry.model.labels
        occlusion = Occlusion.for_input(meta.input, query["patch"], query["stride"])
        index = class_index(query["class"], labels, entry.name)
        method = wanted or default_method(service.explanation_graph(entry), with_layers)
        if method != "occlusion" and (given := [k for k in ("patch", "stride") if query[k] is not None]):
            verb = "apply" if len(given) > 1 else "applies"
            raise InvalidInput(f"{' and '.join(given)} {verb} to method=occlusion, and this one is {method}: "
                               "ask for method=occlusion, or leave it out")  # fmt: skip
        files = await read_images(request, settings.max_body_bytes, settings.max_images_per_request)
        if as_png and len(files) != 1:
            raise InvalidInput(
                f"Accept: image/png answers one image's overlay, and the request has {len(files)}: send one image, "
                "or ask for JSON with overlay=true"
            )
        if with_layers and not (meta.explanation or {}).get("feature_maps"):
            raise InvalidInput(
                f"layers=true: {entry.name}'s explanation graph does not output its feature maps (LeNet-5's does); "
                "ask without layers"
            )
        if with_layers and method != "gradcam":
            raise InvalidInput(
                f"layers=true shows the layers Grad-CAM reads, and this request asks for method={method}: ask for "
                "method=gradcam, or without layers"
            )
        explained, how = await service.explain(entry, files, index, method, occlusion)
    service.metrics.child(service.metrics.explanations, entry.name, str(entry.version), method).inc(len(explained))
    if as_png:
        return Response(
            overlay_png(explained[0].pixels, explained[0].heat),
            media_type="image/png",
            headers={"X-Explanation-Method": method},
        )
    results = []
    for item in explained:
        result: dict[str, Any] = {
            "predictions": top_k(item.probabilities, labels, query["top_k"]),
            "explanation": explanation(item, labels, method, how),
        }
        if with_overlay:
            result["overlay"] = base64.b64encode(overlay_png(item.pixels, item.heat)).decode("ascii")
        if with_layers:  # each layer's activations, [maps, rows, columns]
            result["layers"] = {
                name: np.round(seen.astype(np.float64), 3).tolist() for name, seen in item.layers.items()
            }
        results.append(result)
    return JSONResponse({"model": entry.name, "version": str(entry.version), "results": results})
