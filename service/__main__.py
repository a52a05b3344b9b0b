"""``python -m service``: check the store, then run ``bentoml serve`` with the settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import ValidationError

from .runtime.residency import Residency
from .runtime.sizing import auto_workers
from .settings import Settings, setting_problems
from .store.layout import ModelStore


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        lines = "".join(f"  {line}\n" for line in setting_problems(exc))
        sys.stderr.write(f"Invalid settings (docs/reference/settings.md says what each takes):\n{lines}")
        return 2
    store = ModelStore(settings.model_store)
    if not store.names():
        sys.stderr.write(
            f"The model store {store.root.resolve()} holds no model. Run `make export` first "
            f"(or `python -m export lenet5 --out {store.root}`).\n"
        )
        return 2
    if settings.model_control == "on-demand":  # sizing workers reads every model's metadata: only for this
        workers = settings.workers or auto_workers(settings)[0]
        if (problem := Residency.impossible(settings, store, workers)) is not None:
            sys.stderr.write(problem + "\n")
            return 2
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service.service:CNNClassifier",
        "--host",
        settings.http_host,
        "--port",
        str(settings.http_port),
        "--working-dir",
        str(Path(__file__).resolve().parent.parent),
    ]
    os.execv(sys.executable, command)
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
