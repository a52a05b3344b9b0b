"""The gRPC server's channel arguments: message size, connection age and keepalive, from the settings.

Apart from the server (which imports the generated messages) so that they can be tried on a server of their own
in a process that has another copy of those messages registered (tritonclient's, in the tests).
"""

from __future__ import annotations

from ...settings import Settings

# Connections: an idle one is pinged after a minute and closed when 20 s pass without the answer (a peer gone
# without a FIN: a crashed client, a NAT that dropped it), and a client may ping every 10 s, with or without calls
# in flight, where gRPC's default (5 minutes) answers such a client's pings with GOAWAY "too_many_pings"
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message size, connection age and keepalive, from ``settings``."""
    options = [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", settings.max_body_bytes),
        *KEEPALIVE_OPTIONS,
    ]
    if settings.grpc_max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", _milliseconds(settings.grpc_max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _milliseconds(settings.request_timeout_s)),
        ]
    return options


def _milliseconds(seconds: float) -> int:
    """A duration as a channel argument takes it: whole milliseconds, at least 1, at most a C int (24.8 days;
    more raises at the server's start)."""
    return max(1, min(round(min(seconds, 2**31) * 1000), 2**31 - 1))
