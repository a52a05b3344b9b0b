"""The runtime in-process, without a server: a Repository, its ModelControl and (on demand) its Residency on a
store of small real graphs (the session's trained LeNet-5, copied under other names and versions), and the
Classifier and OipHandler over them, built as ``service/service.py`` builds them. Shared by ``runtime/`` and
``frontends/``; their types are in ``runtime/harness.py``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.frontends.v2.handler import OipHandler
from service.metrics import get_metrics
from service.server import Runtime, build_runtime
from service.settings import Settings
from service.store.layout import ModelStore

from .runtime.harness import MiB, RuntimeFactory, Served, StoreFactory


@pytest.fixture
def make_store(model_store: ModelStore, tmp_path: Path) -> StoreFactory:
    """``make_store(name=[versions], ..., estimate_mib=N, policy="...")``: copies of LeNet-5's version 1, each
    recording ``estimate_mib`` (or ``estimates[name]``) as what it takes resident, so that budgets can be
    reasoned about exactly."""
    source = model_store.model_dir("lenet5")

    def make(
        estimate_mib: int = 100, policy: str | None = None, estimates: dict[str, int] | None = None,
        **models: list[int],
    ) -> ModelStore:  # fmt: skip
        store = ModelStore(tmp_path / "store")
        for name, versions in models.items():
            target = store.model_dir(name)
            target.mkdir(parents=True, exist_ok=True)
            for file in ("labels.txt", "config.pbtxt"):
                shutil.copy(source / file, target / file)
            if policy is not None:
                (target / "config.pbtxt").write_text(f'name: "{name}"\nversion_policy: {{ {policy} }}\n')
            for version in versions:
                shutil.copytree(source / "1", target / str(version))
                metadata_path = target / str(version) / "metadata.json"
                metadata = json.loads(metadata_path.read_text())
                metadata["memory"]["resident_estimate_bytes"] = (estimates or {}).get(name, estimate_mib) * MiB
                metadata_path.write_text(json.dumps(metadata))
        return store

    return make


@pytest.fixture
def make_runtime() -> Iterator[RuntimeFactory]:
    """``make_runtime(store, **settings)``: the runtime as one worker builds it (:func:`service.server.build_runtime`:
    its hooks and observers, and on demand its residency), not started."""
    built: list[Runtime] = []

    def make(store: ModelStore, **overrides: Any) -> Runtime:
        options: dict[str, Any] = {"model_store": store.root, "workers": 1, "max_batch_size": 4,
                                   "warmup_batches": (1,), "intra_op_threads": 1} | overrides  # fmt: skip
        runtime = build_runtime(Settings(**options), get_metrics())
        built.append(runtime)
        return runtime

    yield make
    for runtime in built:  # release what the test left loaded
        runtime.residency.shutdown()
        runtime.decoders.shutdown(wait=False)
        repository = runtime.repository
        for versions in list(repository.versions.values()):
            for entry in list(versions.values()):
                if entry.status == "ready":
                    repository.unload(entry)


@pytest.fixture
def served_lenet5(make_store: StoreFactory, make_runtime: RuntimeFactory) -> Iterator[Served]:
    """LeNet-5 (its trained version 1, abstain and typicality thresholds included) loaded as ``lenet5``, and the
    Classifier and OipHandler over it."""
    runtime = make_runtime(make_store(lenet5=[1]))
    runtime.control.reconcile()
    yield Served(runtime.repository, runtime.classifier, OipHandler(runtime.classifier, runtime.control))
