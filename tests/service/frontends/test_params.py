"""The query parameters of /classify and /explain: the API reference documents the bounds that parsing enforces."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.datastructures import QueryParams

from service.errors import InvalidInput
from service.frontends.app import create_app
from service.frontends.params import Params, classify_params, explain_params

MAX_TOP_K = 7  # not the default, so that a documented bound that ignores the setting shows


def documented(path: str) -> dict[str, dict[str, Any]]:
    operation = create_app(max_top_k=MAX_TOP_K).openapi()["paths"][path]["post"]
    return {p["name"]: p["schema"] for p in operation["parameters"] if p["in"] == "query"}


def parse(params: Params, **query: object) -> dict[str, Any]:
    return params.parse(QueryParams({k: str(v) for k, v in query.items()}))


@pytest.mark.parametrize(
    ("path", "params"), [("/classify", classify_params(MAX_TOP_K)), ("/explain", explain_params(MAX_TOP_K))]
)
def test_each_documented_parameter_is_enforced_within_its_documented_bounds(path: str, params: Params) -> None:
    schemas = documented(path)
    assert list(schemas) == [param.name for param in params]
    defaults = parse(params)
    for name, schema in schemas.items():
        assert defaults[name] == schema.get("default"), name  # absent: the documented default, or None
        if "minimum" in schema:
            assert parse(params, **{name: schema["minimum"]})[name] == schema["minimum"]
            below = schema["minimum"] - (1 if schema["type"] == "integer" else 0.01)
            with pytest.raises(InvalidInput, match=name):
                parse(params, **{name: below})
        if "maximum" in schema:
            assert parse(params, **{name: schema["maximum"]})[name] == schema["maximum"]
            above = schema["maximum"] + (1 if schema["type"] == "integer" else 0.01)
            with pytest.raises(InvalidInput, match=name):
                parse(params, **{name: above})
        for wrong in {"integer": ["x", "1.5"], "number": ["x", "nan"], "boolean": ["maybe"]}.get(schema["type"], []):
            with pytest.raises(InvalidInput, match=name):
                parse(params, **{name: wrong})
        for allowed in schema.get("enum", []):
            assert parse(params, **{name: allowed})[name] == allowed
        if "enum" in schema:
            with pytest.raises(InvalidInput, match=f"use {' or '.join(schema['enum'])}"):
                parse(params, **{name: "lime"})


def test_top_k_and_min_confidence_are_documented_with_the_limits_of_the_settings() -> None:
    for path in ("/classify", "/explain"):
        assert documented(path)["top_k"] == {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 5}
    assert documented("/classify")["min_confidence"] == {"type": "number", "minimum": 0, "maximum": 1}
    with pytest.raises(InvalidInput, match=rf"top_k={MAX_TOP_K + 1} is over the limit: use 1 to {MAX_TOP_K} \(MAX_TOP"):
        parse(classify_params(MAX_TOP_K), top_k=MAX_TOP_K + 1)
    with pytest.raises(InvalidInput, match=r"min_confidence='1\.5' is not a probability; use a number from 0 to 1"):
        parse(classify_params(MAX_TOP_K), min_confidence=1.5)


def test_values_are_read_as_the_service_always_read_them() -> None:
    params = explain_params(MAX_TOP_K)
    got = parse(params, model="lenet5", version="+2", top_k=" 3 ", method=" GradCAM", overlay="yes", layers="off")
    assert got == {"model": "lenet5", "version": 2, "class": None, "method": "gradcam", "patch": None,
                   "stride": None, "overlay": True, "layers": False, "top_k": 3}  # fmt: skip
    with pytest.raises(InvalidInput, match=r"top_k=10{20} is out of range; use 1 to 7"):
        parse(params, top_k=10**20)
    assert parse(classify_params(MAX_TOP_K), min_confidence="0")["min_confidence"] == 0.0


def test_a_parameter_given_twice_is_refused_not_guessed() -> None:
    params = classify_params(MAX_TOP_K)
    with pytest.raises(InvalidInput, match=r"Parameter model is given 2 times \('lenet5', 'resnet50'\): give it once"):
        params.parse(QueryParams("model=lenet5&model=resnet50"))
    with pytest.raises(InvalidInput, match=r"Parameter top_k is given 3 times"):
        params.parse(QueryParams("top_k=1&top_k=2&top_k=3"))
    assert params.parse(QueryParams("model=lenet5&top_k=2"))["top_k"] == 2


@pytest.mark.parametrize(
    ("value", "said"),
    [("-1", "top_k=-1 is out of range; use 1 to 7"), ("０", "top_k='０' is not an integer"),
     ("٣", "top_k='٣' is not an integer"), ("-abc", "top_k='-abc' is not an integer")],
)  # fmt: skip
def test_an_integer_below_the_range_is_out_of_range_and_only_ascii_digits_are_one(value: str, said: str) -> None:
    """-1 was "not an integer"; full-width and Arabic-Indic digits were taken as numbers."""
    with pytest.raises(InvalidInput, match=said):
        parse(classify_params(MAX_TOP_K), top_k=value)
