"""POST /explain: occlusion maps from the served graph itself, over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from PIL import Image
from tritonclient.utils import InferenceServerException

from export.precision import VariantOptions, export_variant
from service.errors import InvalidInput
from service.runtime.occlusion import Occlusion, fill_pixel
from service.store.layout import ModelStore
from service.store.metadata import InputMeta
from service.store.preprocess import preprocess

from ...helpers import ServiceProcess, metric_samples, running
from ..pictures import held_out_drawings

LENET5 = InputMeta(size=32, channels=1, resize=32, crop=32, mean=[0.5], std=[0.5], polarity="light-on-dark")


def test_the_patch_covers_every_pixel_and_the_far_edge() -> None:
    occlusion = Occlusion.for_input(LENET5, None, None)
    assert (occlusion.patch, occlusion.stride) == (5, 2)  # a seventh of 32, moved by half
    offsets = occlusion.offsets(32)
    assert offsets[0] == 0 and offsets[-1] == 32 - 5 and len(offsets) == 15
    image = np.full((32, 32, 1), 200, dtype=np.uint8)
    assert fill_pixel(LENET5).tolist() == [0]  # light strokes on a dark ground: the ground
    photos = InputMeta(
        size=224, channels=3, resize=256, crop=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )
    assert fill_pixel(photos).tolist() == [124, 116, 104]  # the mean pixel, zero once normalised
    batch = occlusion.images(image, fill_pixel(LENET5))
    assert batch.shape == (1 + 15 * 15, 32, 32, 1) and (batch[0] == 200).all()
    covered = (batch[1:] == 0).any(axis=0)  # the dark ground covers light strokes: the image is blank but for it
    assert covered.all()
    assert (batch[1 + 15 * 15 - 1, 27:, 27:] == 0).all() and (batch[1 + 15 * 15 - 1, :27, :] == 200).all()


def test_the_map_is_the_drop_of_the_class_scaled_to_one() -> None:
    occlusion = Occlusion(patch=16, stride=16)  # 2 x 2 positions on 32 pixels
    probabilities = np.array([[0.1, 0.9], [0.5, 0.5], [0.1, 0.9], [0.2, 0.8], [0.0, 1.0]])
    np.testing.assert_allclose(occlusion.heat(probabilities, 1, 32), [[1.0, 0.0], [0.25, 0.0]])
    np.testing.assert_allclose(occlusion.heat(probabilities, 0, 32), [[0.0, 0.0], [0.0, 1.0]])
    steady = np.tile([[0.3, 0.7]], (5, 1))
    assert not occlusion.heat(steady, 1, 32).any()  # no position lowers the class: all zeros, no division


@pytest.mark.parametrize(
    ("patch", "stride", "why"),
    [(33, None, "patch=33 must be from 1 to the input size, 32"), (1, 1, "1024 positions")],
)
def test_a_patch_that_does_not_fit_is_refused(patch: int, stride: int | None, why: str) -> None:
    if why == "1024 positions":
        Occlusion.for_input(LENET5, 1, 1)  # 32 x 32 = 1024: the limit itself is allowed
        with pytest.raises(InvalidInput, match="over the limit"):
            Occlusion.for_input(InputMeta(size=33, channels=1, resize=33, crop=33, mean=[0.5], std=[0.5]), 1, 1)
    else:
        with pytest.raises(InvalidInput, match=why):
            Occlusion.for_input(LENET5, patch, stride)


def explain(service: ServiceProcess, files: list[bytes], **params: Any) -> httpx.Response:
    parts = [("image", (f"{i}.png", body, "image/png")) for i, body in enumerate(files)]
    return httpx.post(f"{service.url}/explain", params=params, files=parts, timeout=120)


def window_means(pixels: np.ndarray, occlusion: Occlusion) -> np.ndarray:
    """Each patch position's mean of ``pixels`` (a 2-D array), as a grid like the map's."""
    offsets = occlusion.offsets(pixels.shape[0])
    p = occlusion.patch
    return np.array([[pixels[t : t + p, left : left + p].mean() for left in offsets] for t in offsets])


@pytest.mark.integration
def test_a_digits_map_puts_its_mass_on_the_strokes(service: ServiceProcess, model_store: ModelStore) -> None:
    """The map a reader of LeNet-5's answer gets by default (occlusion, as its export recorded)."""
    files, _ = held_out_drawings(30)
    response = explain(service, files, model="lenet5", top_k=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "lenet5" and len(body["results"]) == 30
    version = model_store.latest("lenet5")
    assert version is not None
    spec = InputMeta.model_validate(json.loads((version.directory / "metadata.json").read_text())["input"])
    occlusion = Occlusion.for_input(spec, None, None)
    on_ink, ink = [], []
    for data, result in zip(files, body["results"], strict=True):
        found = result["explanation"]
        assert found["method"] == "occlusion" and found["layer"] == "input"
        assert (found["patch"], found["stride"]) == (occlusion.patch, occlusion.stride)
        assert found["class"]["index"] == result["predictions"][0]["index"]  # the top-1 by default
        heat = np.array(found["map"])
        assert heat.shape == (15, 15) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
        strokes = (preprocess(data, spec, max_pixels=10**8)[..., 0] > 64).astype(float)  # light strokes
        covered = window_means(strokes, occlusion)
        on_ink.append(float((heat * covered).sum() / heat.sum()))
        ink.append(float(covered.mean()))
    print(f"lenet5 occlusion maps of 30 drawn digits: {np.mean(on_ink):.0%} of the map's mass on ink, "
          f"where the ink covers {np.mean(ink):.0%} of the windows")  # fmt: skip
    assert np.mean(on_ink) > 0.5 and np.mean(on_ink) > 1.5 * np.mean(ink)
    assert sum(a > b for a, b in zip(on_ink, ink, strict=True)) >= 27


@pytest.mark.integration
def test_any_class_by_index_or_label_and_the_overlay_as_png(service: ServiceProcess) -> None:
    files, _ = held_out_drawings(1)
    occlusion = {"method": "occlusion"}
    by_index = explain(service, files, model="lenet5", **occlusion, **{"class": "3"}).json()["results"][0]
    by_index = by_index["explanation"]
    by_label = explain(service, files, model="resnet18", **occlusion, **{"class": "tabby"}).json()["results"][0]
    by_label = by_label["explanation"]
    assert by_index["class"]["index"] == 3 and by_index["class"]["label"] == "3"
    assert by_label["class"]["index"] == 281 and by_label["class"]["label"] == "tabby"
    assert np.array(by_label["map"]).shape == (13, 13)  # a 32-pixel patch every 16 over 224

    png = httpx.post(f"{service.url}/explain?model=lenet5", content=files[0],
                     headers={"Content-Type": "image/png", "Accept": "image/png"}, timeout=60)  # fmt: skip
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(png.content))
    assert picture.size == (224, 224) and picture.mode == "RGB"  # 32 pixels enlarged 7 times
    assert png.headers["x-explanation-method"] == "occlusion"  # LeNet-5's default
    json_overlay = explain(service, files, model="lenet5", overlay="true").json()["results"][0]["overlay"]
    assert base64.b64decode(json_overlay) == png.content
    cam = httpx.post(f"{service.url}/explain?model=resnet18", content=files[0],
                     headers={"Content-Type": "image/png", "Accept": "image/png"}, timeout=60)  # fmt: skip
    assert cam.status_code == 200 and cam.headers["x-explanation-method"] == "gradcam"  # ResNet's default


@pytest.mark.integration
@pytest.mark.parametrize(
    ("params", "images", "error"),
    [
        ({"class": "cat"}, 1, "Unknown class 'cat' for lenet5"),
        ({"class": "10"}, 1, "class=10 is out of range: lenet5 has classes 0 to 9"),
        ({"class": "1" * 5000}, 1, "class=11111111111111111111... is out of range: lenet5 has classes 0 to 9"),
        ({"method": "lime"}, 1, "Unknown method 'lime'"),
        ({"patch": "40"}, 1, "patch=40 must be from 1 to the input size, 32"),
        ({"overlay": "maybe"}, 1, "overlay"),
        ({"model": "nope"}, 1, "nope"),
        ({"method": "gradcam", "stride": "4"}, 1, "stride applies to method=occlusion, and this one is gradcam"),
        (
            {"method": "occlusion", "layers": "true"},
            1,
            "layers=true shows the layers Grad-CAM reads, and this request asks for method=occlusion",
        ),
        ({"stide": "4"}, 1, "Unknown parameter 'stide': this route takes model, version, class, method, patch, stride"),
    ],
)
def test_a_request_the_service_cannot_explain_is_a_4xx_that_says_why(
    service: ServiceProcess, params: dict[str, str], images: int, error: str
) -> None:
    files, _ = held_out_drawings(images)
    response = explain(service, files, **{"model": "lenet5", **params})
    assert 400 <= response.status_code < 500 and error in response.json()["error"], response.text


@pytest.mark.integration
def test_png_is_for_one_image_and_explanations_are_counted_apart_from_answers(service: ServiceProcess) -> None:
    files, _ = held_out_drawings(2)
    parts = [("image", (f"{i}.png", body, "image/png")) for i, body in enumerate(files)]
    two = httpx.post(f"{service.url}/explain?model=lenet5", files=parts, headers={"Accept": "image/png"}, timeout=60)
    assert two.status_code == 400 and "send one image" in two.json()["error"]

    def counts() -> tuple[float, float]:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        explained = sum(v for s, v in metric_samples(text, "cnn_explanations_total") if s["model"] == "lenet5")
        answered = sum(v for s, v in metric_samples(text, "cnn_prediction_confidence_count") if s["model"] == "lenet5")
        return explained, answered

    before = counts()
    assert explain(service, files, model="lenet5").status_code == 200
    after = counts()
    # two images explained; their 2 x 226 runs through the graph are not answers to anyone
    assert after[0] - before[0] == 2 and after[1] == before[1]


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values.ravel())).astype(np.float64)


@pytest.mark.integration
def test_lenet5s_default_is_occlusion_and_its_grad_cam_is_what_the_export_verified(
    service: ServiceProcess, model_store: ModelStore
) -> None:
    """LeNet-5's Grad-CAM at C3, and how it compares with occlusion on drawn digits (reported: at C3 this tanh
    network's Grad-CAM does not single out the strokes, where occlusion does, which is why the export records
    occlusion as its default; see docs/concepts/explanations.md)."""
    from scipy.ndimage import map_coordinates

    files, _ = held_out_drawings(30)
    grad = explain(service, files, model="lenet5", top_k=1, method="gradcam").json()["results"]
    occluded = explain(service, files, model="lenet5", top_k=1, method="occlusion").json()["results"]
    version = model_store.latest("lenet5")
    assert version is not None
    meta = json.loads((version.directory / "metadata.json").read_text())
    spec = InputMeta.model_validate(meta["input"])
    assert "and 4 held-out images" in meta["explanation"]["verification"]["against"]
    assert meta["explanation"]["default"] == "occlusion" and "strokes" in meta["explanation"]["default_because"]
    # the served maps are the verified graph's: that file, run here on the same pixels for each top-1
    graph = version.directory / meta["explanation"]["file"]
    assert hashlib.sha256(graph.read_bytes()).hexdigest() == meta["explanation"]["sha256"]
    pixels = np.stack([preprocess(data, spec, max_pixels=10**8) for data in files])
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    expected = session.run(["gradcam"], {"images": pixels, "classes": np.full(len(files), -1, dtype=np.int64)})[0]
    np.testing.assert_allclose(np.array([r["explanation"]["map"] for r in grad]), expected, atol=1e-4)  # 4 decimals
    # C3's 10 x 10 positions sit at input pixels 6.5 + 2i (two 5 x 5 convolutions and a 2 x 2 pooling);
    # occlusion's 15 x 15 at 2 + 2k: both are compared there, at C3's positions
    centres = np.meshgrid(6.5 + 2 * np.arange(10), 6.5 + 2 * np.arange(10), indexing="ij")
    on_occlusion_grid = np.meshgrid(np.arange(10) + 2.25, np.arange(10) + 2.25, indexing="ij")
    on_ink, ink, agreement = [], [], []
    for data, ours, theirs in zip(files, grad, occluded, strict=True):
        found = ours["explanation"]
        assert found["method"] == "gradcam" and found["layer"] == "features.4" and "patch" not in found
        assert found["class"] == theirs["explanation"]["class"]  # both explain the same top-1
        heat = np.array(found["map"])
        assert heat.shape == (10, 10) and heat.min() >= 0 and heat.max() <= 1
        strokes = map_coordinates(
            (preprocess(data, spec, max_pixels=10**8)[..., 0] > 64).astype(float), centres, order=1
        )
        on_ink.append(float((heat * strokes).sum() / max(heat.sum(), 1e-9)))
        ink.append(float(strokes.mean()))
        other = map_coordinates(np.array(theirs["explanation"]["map"]), on_occlusion_grid, order=1)
        agreement.append(float(np.corrcoef(ranks(heat), ranks(other))[0, 1]))  # Spearman's rank correlation
    print(f"lenet5 Grad-CAM at C3 of 30 drawn digits: {np.mean(on_ink):.0%} of the map's mass on ink, which covers "
          f"{np.mean(ink):.0%} of C3's positions; rank correlation with occlusion: median {np.median(agreement):.2f}, "
          f"mean {np.mean(agreement):.2f}")  # fmt: skip


@pytest.fixture(scope="module")
def older_store(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """LeNet-5 as a store written before explanations (no `explanation` in its metadata), and an INT8 variant
    exported while it still had one: explained by its parent's graph."""
    root = tmp_path_factory.mktemp("older")
    shutil.copytree(model_store.model_dir("lenet5"), root / "store" / "lenet5")
    store = ModelStore(root / "store")
    export_variant("lenet5", store, VariantOptions("int8", recipe="u8s8"))
    metadata = root / "store" / "lenet5" / "1" / "metadata.json"
    older = json.loads(metadata.read_text())
    del older["explanation"]
    metadata.write_text(json.dumps(older))
    with running(root / "store", root / "service.log", MODELS="lenet5,lenet5_int8", WORKERS="1") as service:
        yield service


@pytest.mark.integration
def test_a_model_without_a_graph_falls_back_to_occlusion_and_a_variant_uses_its_parents(
    older_store: ServiceProcess,
) -> None:
    files, _ = held_out_drawings(2)
    plain = explain(older_store, files, model="lenet5")
    assert plain.status_code == 200 and plain.json()["results"][0]["explanation"]["method"] == "occlusion"
    refused = explain(older_store, files, model="lenet5", method="gradcam")
    assert refused.status_code == 400
    assert "lenet5 v1 has no explanation graph" in refused.json()["error"] and "method=occlusion" in refused.text
    variant = explain(older_store, files, model="lenet5_int8", method="gradcam").json()["results"][0]["explanation"]
    assert variant["method"] == "gradcam" and variant["explained_by"] == {"model": "lenet5", "version": 1}


@pytest.mark.integration
def test_grad_cam_is_an_output_of_the_open_inference_protocol(service: ServiceProcess) -> None:
    files, _ = held_out_drawings(4)
    found = explain(service, files, model="lenet5", method="gradcam").json()["results"]
    maps = [np.array(r["explanation"]["map"]) for r in found]
    grpc = triton_grpc.InferenceServerClient(service.grpc_target)
    tensor = triton_grpc.InferInput("image_bytes", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    asked = [triton_grpc.InferRequestedOutput("gradcam"), triton_grpc.InferRequestedOutput("probabilities")]
    result = grpc.infer("lenet5", [tensor], outputs=asked)
    got = result.as_numpy("gradcam")
    assert got.shape == (4, 10, 10) and result.as_numpy("probabilities").shape == (4, 10)
    np.testing.assert_allclose(got, np.stack(maps), atol=1e-4)  # the JSON's maps are rounded to 4 decimals
    with pytest.raises(InferenceServerException, match="a map per image"):
        grpc.infer("lenet5", [tensor], outputs=[triton_grpc.InferRequestedOutput("gradcam", class_count=3)])


@pytest.mark.integration
def test_concurrent_occlusions_share_the_queue_instead_of_filling_it(service: ServiceProcess) -> None:
    """Eight explanations of 226 copies each are 1,808 images, over MAX_QUEUE_IMAGES (512): sent a batch's worth
    at a time, they all answer, and so do the classifications between them."""
    files, _ = held_out_drawings(8)

    async def load() -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
            headers = {"Content-Type": "image/png"}
            occlusions = [client.post("/explain?model=lenet5&method=occlusion", content=f, headers=headers)
                          for f in files]  # fmt: skip
            answers = [client.post("/classify?model=lenet5", content=f, headers=headers) for f in files]
            return [r.status_code for r in await asyncio.gather(*occlusions, *answers)]

    assert asyncio.run(load()) == [200] * 16
