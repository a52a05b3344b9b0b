"""A model's largest batch is its config.pbtxt's ``max_batch_size``, the field Triton reads: parsed as Triton's
own ModelConfig parser reads it (tritonclient ships the message), and refused, saying what to write, where
the value cannot serve these graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.store.batch_limit import parse_max_batch_size, read_max_batch_size

AGREED = [
    'name: "m"\nmax_batch_size: 8\ndynamic_batching { }\n',
    'name: "m" max_batch_size: 16 input [{ name: "images" data_type: TYPE_UINT8 dims: [32, 32, 1] }]',
    'name: "m"\nmax_batch_size:64\n',
    'name: "m"\n# max_batch_size: 4 (a comment, not the field)\nmax_batch_size: 2\n',
    'name: "m"\ndynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 100 }\n',
    'name: "m#1" max_batch_size: 8\n',  # a # inside a string is no comment
    'name: "m"\nmax_batch_size: 8\nparameters { key: "note" value { string_value: "max_batch_size: 16" } }\n',
    "name: 'it\\'s' max_batch_size: 4\n",
]


@pytest.mark.parametrize("text", AGREED)
def test_the_largest_batch_is_what_tritons_parser_reads(text: str) -> None:
    config = text_format.Parse(text, mc.ModelConfig())
    expected = config.max_batch_size if config.max_batch_size else None  # proto3: absent reads as 0
    assert parse_max_batch_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_size: 0", "write 1 for one image per call"),
        ("max_batch_size: -1", "-1 is not a decimal whole number"),
        ("max_batch_size: eight", "eight is not a decimal whole number"),
        ("max_batch_size: 032", "032 is not a decimal whole number"),  # protobuf reads octal 26
        ("max_batch_size: 0x20", "0x20 is not a decimal whole number"),
        ("max_batch_size: 4\nmax_batch_size: 8", "given 2 times (4, 8): keep one"),
    ],
)
def test_a_largest_batch_these_graphs_cannot_serve_is_refused_with_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="max_batch_size") as raised:
        parse_max_batch_size(f'name: "m"\n{text}\n')
    assert message in str(raised.value)


def test_a_model_without_a_config_or_the_field_has_none(tmp_path: Path) -> None:
    assert read_max_batch_size(tmp_path / "config.pbtxt") is None
    (tmp_path / "config.pbtxt").write_text('name: "m"\nversion_policy: { all: { } }\n')
    assert read_max_batch_size(tmp_path / "config.pbtxt") is None
