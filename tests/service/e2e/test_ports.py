"""A port picked free but taken before the server binds it: the server is started again on fresh ports."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from service.store.layout import ModelStore

from ...helpers import ServiceProcess

pytestmark = pytest.mark.integration


def test_a_grpc_port_taken_before_the_server_binds_it_is_picked_again(model_store: ModelStore, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = ServiceProcess(Path(model_store.root), tmp_path / "service.log", MODELS="lenet5", WORKERS="1")
        service.grpc_port, service.grpc_target, service.env["GRPC_PORT"] = port, f"127.0.0.1:{port}", str(port)
        service.start()
        try:
            assert service.grpc_port != port and service.env["GRPC_PORT"] == str(service.grpc_port)
            assert httpx.get(f"{service.url}/readyz", timeout=10).status_code == 200
            with socket.create_connection(("127.0.0.1", service.grpc_port), timeout=5):
                pass  # the gRPC server listens on the port it was started again with
        finally:
            service.stop()
