"""The baseline a user would otherwise write: the network in PyTorch eager mode behind a minimal HTTP server.

``python -m benchmarks.baseline --model resnet50 --port 8500``: one request, one forward
pass, no batching; the same decoding and preprocessing as the service (``service.store.preprocess``),
the normalisation written out in torch, ``torch.set_num_threads(cores)``.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from export.registry import get_model_spec
from service.store.host import cpu_count
from service.store.metadata import InputMeta
from service.store.preprocess import preprocess


def make_handler(name: str) -> type[BaseHTTPRequestHandler]:
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    meta = InputMeta(**{k: v for k, v in spec.input.to_dict().items() if k not in ("layout", "dtype")})
    mean = torch.tensor(spec.input.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.input.std).view(1, -1, 1, 1)
    lock = threading.Lock()  # one forward pass at a time, as a plain script would do

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as every other server measured
        disable_nagle_algorithm = True  # headers and body go out as written (TCP_NODELAY), as elsewhere

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            pixels = preprocess(body, meta, max_pixels=100_000_000)
            x = (torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float() / 255 - mean) / std
            with lock, torch.inference_mode():
                probabilities = torch.softmax(model(x), dim=1)[0]
            top = torch.topk(probabilities, 5)
            answer = json.dumps({"indices": top.indices.tolist(), "scores": top.values.tolist()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="PyTorch-eager baseline server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(cpu_count())
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.model))
    server.serve_forever()


if __name__ == "__main__":
    main()
