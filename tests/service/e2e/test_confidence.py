"""What every answer knows about itself: `confident`, `min_confidence`, and the confidence and entropy histograms."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, metric_samples
from ..pictures import held_out_drawings, out_of_distribution

pytestmark = pytest.mark.integration


def classify(service: ServiceProcess, files: list[bytes], **params: Any) -> httpx.Response:
    parts = [("image", (f"{i}.png", body, "image/png")) for i, body in enumerate(files)]
    return httpx.post(f"{service.url}/classify", params={"top_k": 1, **params}, files=parts, timeout=60)


def stored_threshold(store: ModelStore, name: str, check: str = "abstain") -> float | None:
    version = store.latest(name)
    assert version is not None
    found = json.loads((version.directory / "metadata.json").read_text()).get(check)
    return None if found is None else float(found["threshold"])


def test_each_digit_says_whether_it_clears_the_threshold_the_export_derived(
    service: ServiceProcess, model_store: ModelStore
) -> None:
    files, labels = held_out_drawings(60)
    response = classify(service, files, model="lenet5")
    assert response.status_code == 200, response.text
    body = response.json()
    least = stored_threshold(model_store, "lenet5")
    assert least is not None and body["min_confidence"] == least
    top1 = np.array([r["predictions"][0]["score"] for r in body["results"]])
    confident = np.array([r["confident"] for r in body["results"]])
    typical = np.array([r["typical"] for r in body["results"]])
    assert typical.all()  # digits like the held-out ones: 1% of those are over the typicality threshold
    assert np.array_equal(confident, top1 >= least)
    right = np.array([int(r["predictions"][0]["label"]) for r in body["results"]]) == labels
    print(f"lenet5: {confident.sum()} of {len(files)} drawn digits confident (threshold {least:.4f}); "
          f"accuracy {right[confident].mean():.3f} of those, {right.mean():.3f} of all")  # fmt: skip
    assert confident.mean() > 0.8 and right[confident].mean() >= right.mean()


def test_a_client_asks_for_its_own_threshold(service: ServiceProcess) -> None:
    files, _ = held_out_drawings(8)
    for wanted in ("0", "0.0"):
        body = classify(service, files, model="lenet5", min_confidence=wanted).json()
        assert body["min_confidence"] == 0.0 and all(r["confident"] is r["typical"] for r in body["results"])
    body = classify(service, files, model="lenet5", min_confidence="1").json()
    assert all(r["confident"] == (r["predictions"][0]["score"] >= 1.0) for r in body["results"])
    # a model without a derived threshold (random weights) says none applies, unless asked
    plain = classify(service, files[:1], model="resnet18").json()
    assert plain["min_confidence"] is None and {"confident", "typical"}.isdisjoint(plain["results"][0])
    asked = classify(service, files[:1], model="resnet18", min_confidence="0.5").json()
    assert asked["min_confidence"] == 0.5
    assert asked["results"][0]["confident"] == (asked["results"][0]["predictions"][0]["score"] >= 0.5)


def test_noise_photos_and_letters_are_not_typical_so_not_confident_however_sure_the_softmax(
    service: ServiceProcess, model_store: ModelStore
) -> None:
    files = out_of_distribution(60)  # noise, photos, letters, in turn
    body = classify(service, files, model="lenet5").json()
    least = stored_threshold(model_store, "lenet5")
    assert least is not None
    top1 = np.array([r["predictions"][0]["score"] for r in body["results"]])
    typical = np.array([r["typical"] for r in body["results"]])
    confident = np.array([r["confident"] for r in body["results"]])
    kinds = {"noise": slice(0, None, 3), "photos": slice(1, None, 3), "letters": slice(2, None, 3)}
    print("lenet5 on 20 each of " + ", ".join(
        f"{kind}: softmax over the abstain threshold {(top1[at] >= least).mean():.0%}, typical {typical[at].mean():.0%}"
        for kind, at in kinds.items()))  # fmt: skip
    assert (top1[kinds["noise"]] >= least).any()  # the softmax alone would trust some of the noise
    assert not confident[kinds["noise"]].any() and not typical[kinds["noise"]].any()
    assert typical.mean() <= 0.05
    assert np.array_equal(confident, (top1 >= least) & typical)
    # counted, per model and version, for the dashboard and alerts
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    atypical = sum(v for labels, v in metric_samples(text, "cnn_prediction_atypical_total")
                   if labels["model"] == "lenet5")  # fmt: skip
    assert atypical >= (~typical).sum()
    listed = httpx.get(f"{service.url}/models", timeout=10).json()
    (lenet5,) = [m for m in listed["models"] if m["name"] == "lenet5"]
    assert lenet5["quality"]["typicality_threshold"] == stored_threshold(model_store, "lenet5", "typicality")


def test_the_distance_behind_typical_is_an_output_over_the_open_inference_protocol(
    service: ServiceProcess, model_store: ModelStore
) -> None:
    files = held_out_drawings(3)[0] + out_of_distribution(3)
    typical = [r["typical"] for r in classify(service, files, model="lenet5").json()["results"]]
    grpc = triton_grpc.InferenceServerClient(service.grpc_target)
    tensor = triton_grpc.InferInput("image_bytes", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    asked = [triton_grpc.InferRequestedOutput("distance")]
    distances = grpc.infer("lenet5", [tensor], outputs=asked).as_numpy("distance")
    threshold = stored_threshold(model_store, "lenet5", "typicality")
    assert threshold is not None and distances.shape == (6,)
    assert list(distances <= threshold) == typical == [True] * 3 + [False] * 3
    with pytest.raises(InferenceServerException, match="one value per image"):
        grpc.infer("lenet5", [tensor], outputs=[triton_grpc.InferRequestedOutput("distance", class_count=2)])
    with pytest.raises(InferenceServerException, match="Unknown output 'distance'"):
        grpc.infer("resnet18", [tensor], outputs=asked)  # no check, no such output


@pytest.mark.parametrize("wanted", ["-0.1", "1.5", "high", "nan", ""])
def test_a_threshold_that_is_no_probability_is_a_400_that_says_so(service: ServiceProcess, wanted: str) -> None:
    files, _ = held_out_drawings(1)
    response = classify(service, files, model="lenet5", min_confidence=wanted)
    assert response.status_code == 400
    assert "min_confidence" in response.json()["error"] and "from 0 to 1" in response.json()["error"]


def test_every_image_served_on_any_protocol_is_in_the_confidence_and_entropy_histograms(
    service: ServiceProcess,
) -> None:
    def totals() -> dict[str, float]:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        return {
            name: sum(v for labels, v in metric_samples(text, name) if labels.get("model") == "lenet5")
            for name in ("cnn_prediction_confidence_count", "cnn_prediction_confidence_sum",
                         "cnn_prediction_entropy_count", "cnn_prediction_entropy_sum")
        }  # fmt: skip

    files, _ = held_out_drawings(20)
    before = totals()
    body = classify(service, files, model="lenet5", top_k=10).json()
    grpc = triton_grpc.InferenceServerClient(service.grpc_target)
    tensor = triton_grpc.InferInput("image_bytes", [5], "BYTES")
    tensor.set_data_from_numpy(np.array(files[:5], dtype=object))
    probabilities = grpc.infer("lenet5", [tensor]).as_numpy("probabilities")
    after = totals()
    # the answers' own probabilities, all ten classes of each
    rows = [np.array([p["score"] for p in r["predictions"]]) for r in body["results"]] + list(probabilities)
    top1 = np.array([row.max() for row in rows])
    entropy = np.array([-(row * np.log(np.clip(row, 1e-12, 1))).sum() / np.log(10) for row in rows])
    assert after["cnn_prediction_confidence_count"] - before["cnn_prediction_confidence_count"] == 25
    assert after["cnn_prediction_entropy_count"] - before["cnn_prediction_entropy_count"] == 25
    seen = after["cnn_prediction_confidence_sum"] - before["cnn_prediction_confidence_sum"]
    assert seen == pytest.approx(top1.sum(), abs=1e-3)
    spread = after["cnn_prediction_entropy_sum"] - before["cnn_prediction_entropy_sum"]
    assert spread == pytest.approx(entropy.sum(), abs=1e-3)
