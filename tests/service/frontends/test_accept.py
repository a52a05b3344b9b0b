"""/explain answers its overlay as PNG where Accept prefers image/png, as content negotiation reads the header."""

from __future__ import annotations

import pytest

from service.frontends.explain import prefers_png


@pytest.mark.parametrize(
    ("accept", "png"),
    [
        ("image/png", True),
        ("IMAGE/PNG", True),
        ("image/png, application/json;q=0.9", True),
        ("image/png; q=0.8, application/json; q=0.8", True),  # a tie: the PNG the client named
        ("image/png;q=0", False),  # 'not acceptable', which a substring test read as a request for PNG
        ("application/json, image/png;q=0.5", False),
        ("image/png;q=abc", False),
        ("", False),
        ("*/*", False),
    ],
)
def test_png_only_where_accept_prefers_it(accept: str, png: bool) -> None:
    assert prefers_png(accept) is png
