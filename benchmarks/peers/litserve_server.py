"""A LitServe server for the exported graph: a LitAPI with batching on, one worker.

``python -m benchmarks.peers.litserve_server VERSION_DIR PORT``. Requests are JSON with the
encoded image in base64 (``{"image": ...}``), as LitServe's image examples take them: a
multipart upload cannot cross LitServe 0.2.19's worker queue (``Can't pickle`` the form). One worker: two workers of
two-threaded ONNX Runtime oversubscribe two cores and measured slower.
"""

# No `from __future__ import annotations`: LitServe compares decode_request's annotation with Request.

import base64
import sys
from typing import Any

import litserve as ls
from fastapi import Request

from benchmarks.peers.common import Classifier

MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.002  # the service's MAX_BATCH_DELAY_MS, 2 ms


class CNNAPI(ls.LitAPI):
    def __init__(self, version_dir: str) -> None:
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
        self.version_dir = version_dir

    def setup(self, device: str) -> None:
        self.classifier = Classifier(self.version_dir)

    def decode_request(self, request: Request) -> bytes:
        # LitServe hands the parsed JSON over (a multipart form's files cannot cross its worker queue)
        return base64.b64decode(request["image"])

    def predict(self, files: list[bytes]) -> list[list[dict[str, Any]]]:
        return self.classifier.classify(list(files))

    def encode_response(self, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"predictions": output}


def main() -> None:
    version_dir, port = sys.argv[1], int(sys.argv[2])
    server = ls.LitServer(CNNAPI(version_dir), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, generate_client_file=False)


if __name__ == "__main__":
    main()
