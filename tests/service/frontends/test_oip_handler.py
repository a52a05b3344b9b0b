"""The Open Inference Protocol's handler in-process (what its REST and gRPC transports both call): inference on
encoded files and on pixels, the errors that say what is right, and the model's metadata."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import numpy as np
import pytest

from service.errors import InvalidInput
from service.frontends.v2.handler import (
    INLINE_PARSE_BYTES,
    VALUES_CHUNK,
    RequestedOutput,
    Tensor,
    serialize_bytes,
    tensor_from_raw,
    tensor_from_values,
)
from service.frontends.v2.rest import parse_infer_request

from ..pictures import held_out_drawings
from ..runtime.harness import Served


def infer(served: Served, inputs: list[Tensor], requested: list[RequestedOutput] | None = None) -> list[Tensor]:
    async def run() -> list[Tensor]:
        with served.oip.track("http") as record, await served.oip.lease("lenet5") as entry:
            return await served.oip.infer(entry, inputs, requested or [], record)

    return asyncio.run(run())


def pixels(served: Served, files: list[bytes]) -> np.ndarray:
    """The files decoded as the service decodes them: UINT8 [N, 32, 32, 1]."""

    async def run() -> np.ndarray:
        with await served.classifier.acquire("lenet5") as entry:
            return await served.classifier.preprocess(entry, files)

    return asyncio.run(run())


def image_bytes(files: list[bytes]) -> Tensor:
    return Tensor("image_bytes", "BYTES", [len(files)], np.array(files, dtype=object))


def test_encoded_files_and_their_pixels_get_the_same_answers(served_lenet5: Served) -> None:
    files, labels = held_out_drawings(6)
    logits, probabilities = infer(served_lenet5, [image_bytes(files)])
    assert (logits.name, logits.datatype, logits.shape) == ("logits", "FP32", [6, 10])
    assert (probabilities.name, probabilities.datatype, probabilities.shape) == ("probabilities", "FP32", [6, 10])
    np.testing.assert_allclose(probabilities.data.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities.data.argmax(axis=1) == labels).mean() >= 5 / 6

    images = pixels(served_lenet5, files)
    assert images.shape == (6, 32, 32, 1) and images.dtype == np.uint8
    (again,) = infer(served_lenet5, [Tensor("images", "UINT8", list(images.shape), images)],
                     [RequestedOutput("probabilities")])  # fmt: skip
    np.testing.assert_allclose(again.data, probabilities.data, rtol=1e-5, atol=1e-6)


def test_classification_answers_the_best_classes_as_score_index_label(served_lenet5: Served) -> None:
    files, _ = held_out_drawings(2)
    (probabilities,) = infer(served_lenet5, [image_bytes(files)], [RequestedOutput("probabilities")])
    (ranked,) = infer(served_lenet5, [image_bytes(files)], [RequestedOutput("probabilities", classification=3)])
    assert (ranked.datatype, ranked.shape) == ("BYTES", [2, 3])
    for row, expected in zip(ranked.data, probabilities.data, strict=True):
        parsed = [item.decode().split(":") for item in row]
        assert [int(index) for _, index, _ in parsed] == list(np.argsort(-expected)[:3])
        assert [label for _, index, label in parsed] == [index for _, index, _ in parsed]  # LeNet-5's labels: 0-9
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], np.sort(expected)[::-1][:3], rtol=1e-6)


@pytest.mark.parametrize(
    ("tensor", "says"),
    [
        (Tensor("images", "FP32", [1, 32, 32, 1], np.zeros((1, 32, 32, 1), np.float32)),
         "Input 'images' must be UINT8, got FP32"),
        (Tensor("images", "UINT8", [1, 28, 28, 1], np.zeros((1, 28, 28, 1), np.uint8)),
         r"Input 'images' must have shape \[N, 32, 32, 1\], got \[1, 28, 28, 1\]"),
        (Tensor("image_bytes", "UINT8", [1], np.zeros(1, np.uint8)), r"'image_bytes' must be BYTES \[N\]"),
        (Tensor("pixels", "UINT8", [1], np.zeros(1, np.uint8)), r"'images' \(UINT8\) or 'image_bytes' \(BYTES\)"),
    ],
)  # fmt: skip
def test_a_wrong_input_is_refused_with_what_is_right(served_lenet5: Served, tensor: Tensor, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        infer(served_lenet5, [tensor])


def test_an_unknown_output_is_refused_with_those_there_are(served_lenet5: Served) -> None:
    files, _ = held_out_drawings(1)
    with pytest.raises(InvalidInput, match="Unknown output 'scores'; the model has logits, probabilities, distance"):
        infer(served_lenet5, [image_bytes(files)], [RequestedOutput("scores")])


def test_model_metadata_describes_the_inputs_and_outputs_it_takes(served_lenet5: Served) -> None:
    meta: dict[str, Any] = asyncio.run(served_lenet5.oip.metadata("lenet5"))
    assert (meta["name"], meta["versions"], meta["platform"]) == ("lenet5", ["1"], "onnxruntime_onnx")
    assert meta["inputs"] == [
        {"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 1]},
        {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
    ]
    outputs = {output["name"]: (output["datatype"], output["shape"]) for output in meta["outputs"]}
    assert outputs["logits"] == outputs["probabilities"] == ("FP32", [-1, 10])
    assert outputs["distance"] == ("FP32", [-1])  # the export fitted LeNet-5 a typicality check
    assert meta["parameters"]["precision"] == "fp32"
    with pytest.raises(InvalidInput, match="positive integer, got 'x'"):
        asyncio.run(served_lenet5.oip.metadata("lenet5", "x"))


def test_bytes_elements_past_the_shape_stop_the_parse_and_too_few_are_named() -> None:
    many = serialize_bytes([b""] * 1_000_000)  # 4 MB of empty elements
    with pytest.raises(InvalidInput, match=r"more than the 1 BYTES elements its shape holds were sent"):
        tensor_from_raw("image_bytes", "BYTES", [1], many)
    with pytest.raises(InvalidInput, match=r"shape \[3\] needs 3 BYTES elements, got 2"):
        tensor_from_raw("image_bytes", "BYTES", [3], serialize_bytes([b"a", b"b"]))
    assert tensor_from_raw("image_bytes", "BYTES", [2], serialize_bytes([b"a", b""])).data.tolist() == [b"a", b""]


@pytest.mark.parametrize("size", ["4", 4.0, -1, True])
def test_a_binary_data_size_that_is_no_byte_count_says_so(size: Any) -> None:
    header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": size}}]}).encode()  # fmt: skip
    with pytest.raises(InvalidInput, match=r"binary_data_size must be a whole number of bytes"):
        parse_infer_request(header + serialize_bytes([b"ab"]), str(len(header)))


@pytest.mark.parametrize(
    ("datatype", "values"), [("INT64", [2**63]), ("INT64", [2**64 - 1]), ("UINT64", [-1]), ("INT8", [-129])]
)
def test_integers_past_their_type_are_refused_not_wrapped(datatype: str, values: list[int]) -> None:
    with pytest.raises(InvalidInput, match=rf"values out of range for {datatype}"):
        tensor_from_values("x", datatype, [1], values)


def test_integer_data_keeps_every_value_exact() -> None:
    assert tensor_from_values("x", "UINT64", [1], [2**64 - 1]).data.tolist() == [2**64 - 1]
    assert tensor_from_values("x", "INT64", [2], [1.0, 2**60 + 1]).data.tolist() == [1, 2**60 + 1]  # not via float64
    assert tensor_from_values("x", "BOOL", [2], [True, False]).data.tolist() == [True, False]


def _request(*inputs: dict[str, Any], binary: bytes = b"") -> tuple[bytes, str]:
    header = json.dumps({"inputs": list(inputs)}).encode()
    return header + binary, str(len(header))


def test_a_scalar_shape_extra_bytes_and_an_input_given_twice_are_refused_by_name() -> None:
    image = serialize_bytes([b"ab"])
    files = {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(image)}}
    with pytest.raises(InvalidInput, match=r"shape \[\] is a scalar; an input has a batch dimension"):
        parse_infer_request(*_request({"name": "images", "datatype": "UINT8", "shape": [], "data": [0]}))
    with pytest.raises(InvalidInput, match=r"2 bytes follow the last input's binary data"):
        parse_infer_request(*_request(files, binary=image + b"zz"))
    with pytest.raises(InvalidInput, match=r'has both "data" and a binary_data_size parameter: give one of them'):
        parse_infer_request(*_request({**files, "data": ["x"]}, binary=image))
    _, tensors = parse_infer_request(*_request(files, binary=image))
    assert tensors[0].data.tolist() == [b"ab"]


def test_a_large_body_is_read_on_a_decoding_thread_and_a_small_one_in_place(served_lenet5: Served) -> None:
    """Tensor values parse at tens of milliseconds a MiB: past INLINE_PARSE_BYTES they leave the event loop (which
    serves every other request of the worker), with the same tensors and the same refusals as in place."""
    seen: list[str] = []

    def parse(body: bytes, length: str | None) -> tuple[dict[str, Any], list[Tensor]]:
        seen.append(threading.current_thread().name)
        return parse_infer_request(body, length)

    async def read(body: bytes) -> tuple[str, list[int]]:
        _, (tensor,) = await served_lenet5.oip.parse(len(body), parse, body, None)
        return threading.current_thread().name, tensor.data.ravel().tolist()

    def body(values: list[int]) -> bytes:
        return json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [len(values)],
                                       "data": values}]}).encode()  # fmt: skip

    small, large = list(range(256)), [i % 256 for i in range(INLINE_PARSE_BYTES)]
    assert len(body(small)) <= INLINE_PARSE_BYTES < len(body(large))
    loop_thread, values = asyncio.run(read(body(small)))
    assert seen == [loop_thread] and values == small
    loop_thread, values = asyncio.run(read(body(large)))
    assert seen[1] != loop_thread and seen[1].startswith("decode") and values == large
    with pytest.raises(InvalidInput, match=r"values out of range for UINT8"):
        asyncio.run(read(body([*large[:-1], 256])))
    assert len(seen) == 3 and seen[2].startswith("decode")


@pytest.mark.parametrize("nested", [False, True])
def test_long_value_lists_read_a_step_at_a_time_keep_every_value_and_every_refusal(nested: bool) -> None:
    """Lists past VALUES_CHUNK (and nested ones, an element a step) come out as the whole list would: the same
    type and values, the same refusals wherever in the list the wrong value sits."""
    count = 5 * (VALUES_CHUNK // 5 * 3 + 1)  # past three chunks, in five rows
    values = [(i * 7) % 256 for i in range(count)]

    def shaped(items: list[Any]) -> Any:
        return [items[i : i + count // 5] for i in range(0, count, count // 5)] if nested else items

    shape = [5, count // 5] if nested else [count]
    assert tensor_from_values("x", "UINT8", shape, shaped(values)).data.ravel().tolist() == values
    exact = tensor_from_values("x", "UINT64", shape, shaped([*values[:-1], 2**64 - 1])).data.ravel()
    assert exact[-1] == 2**64 - 1 and exact[:-1].tolist() == values[:-1]
    with pytest.raises(InvalidInput, match=r"values out of range for UINT8"):
        tensor_from_values("x", "UINT8", shape, shaped([*values[:-1], 256]))
    with pytest.raises(InvalidInput, match=r"takes whole numbers, not fractions"):
        tensor_from_values("x", "UINT8", shape, shaped([*values[:-1], 0.5]))
    with pytest.raises(InvalidInput, match=r"strings or true/false where numbers belong"):
        tensor_from_values("x", "UINT8", shape, shaped([*values[:-1], "1"]))


def test_json_numpy_or_python_cannot_take_is_a_400_not_a_500() -> None:
    """Past numpy's 64 dimensions (each step of the conversion fits, the whole does not) and past Python's
    4,300-digit integers: the request's fault, said as such."""
    deep: Any = [0] * (VALUES_CHUNK + 1)
    for _ in range(64):
        deep = [deep]
    with pytest.raises(InvalidInput, match=r"data is not a list of UINT8 numbers"):
        tensor_from_values("images", "UINT8", [1], deep)
    digits = b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": [' + b"1" * 5000 + b"]}]}"
    with pytest.raises(InvalidInput, match=r"not valid JSON"):
        parse_infer_request(digits, None)


def test_a_request_id_no_utf_8_can_carry_is_echoed_escaped_not_a_500() -> None:
    """`"id": "\\ud800"` is valid JSON (an escape) and read as a lone surrogate, which UTF-8 cannot write."""
    from service.frontends.v2.rest import encode_response

    probabilities = Tensor("probabilities", "FP32", [1, 2], np.array([[0.25, 0.75]], dtype=np.float32))
    answer = encode_response("lenet5", "1", "\ud800", [probabilities], [], False)
    assert json.loads(answer.body) == {"model_name": "lenet5", "model_version": "1", "id": "\ud800", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}]}  # fmt: skip
    assert json.loads(encode_response("lenet5", "1", "r-1", [probabilities], [], False).body)["id"] == "r-1"
