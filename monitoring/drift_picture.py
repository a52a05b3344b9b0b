"""The documentation's picture of drift (docs/drift.png) rising under out-of-distribution traffic, from the real parts.

Starts the service on a store holding the trained LeNet-5 (``MODELS=lenet5``, one worker,
``DRIFT_WINDOW=100``) and a real Prometheus scraping it every 2 s, sends held-out digits
drawn as the page draws them, then noise, photo patches and printed letters, then digits
again (a few images a second, one phase each ``--phase-seconds``), and draws the
dashboard's "is the model still right?" panels from their own queries::

    python monitoring/drift_picture.py --store model_store --out docs/drift.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from render import render  # noqa: E402

from tests.helpers import prometheus, running  # noqa: E402
from tests.service.pictures import held_out_drawings, out_of_distribution  # noqa: E402

QUALITY_PANELS = "drift|confidence|Unsure"
logger = logging.getLogger("drift_picture")


def send_for(url: str, files: list[bytes], seconds: float, per_request: int = 4) -> None:
    """``files`` in turn, ``per_request`` a request, about five requests a second, for ``seconds``."""
    deadline, i = time.monotonic() + seconds, 0
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            chunk = [files[(i + j) % len(files)] for j in range(per_request)]
            parts = [("image", (f"{j}.png", body, "image/png")) for j, body in enumerate(chunk)]
            client.post("/classify", params={"model": "lenet5"}, files=parts).raise_for_status()
            i += per_request
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "drift.png")
    parser.add_argument("--phase-seconds", type=float, default=120)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    digits, _ = held_out_drawings(360)
    others = out_of_distribution(300)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        with running(args.store, work / "service.log", MODELS="lenet5", WORKERS="1", DRIFT_WINDOW="100") as service:
            config = {"global": {"scrape_interval": "2s"},
                      "scrape_configs": [{"job_name": "cnn-serving",
                                          "static_configs": [{"targets": [f"127.0.0.1:{service.port}"]}]}]}  # fmt: skip
            with prometheus(work, config) as url:
                started = time.monotonic()
                for files in (digits, others, digits):
                    logger.info("sending %s", "digits" if files is digits else "noise, photos and letters")
                    send_for(service.url, files, args.phase_seconds)
                time.sleep(6)  # two more scrapes
                minutes = (time.monotonic() - started) / 60 + 0.2
                title = (f"LeNet-5: held-out digits, then noise, photos and letters, then digits again "
                         f"({args.phase_seconds:.0f} s each, DRIFT_WINDOW=100)")  # fmt: skip
                render(url, minutes, args.out, rate_window="20s", panels_like=QUALITY_PANELS, title=title)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
