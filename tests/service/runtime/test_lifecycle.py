"""The lifecycle in-process: a served version whose files go bad (issue #34's defect 7)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.metrics import ModelStateCollector
from service.runtime.lifecycle import unknown_in_settings
from service.settings import Settings

from .harness import RuntimeFactory, StoreFactory


def _files_changed(state: dict[str, object]) -> dict[tuple[str, ...], float]:
    families = {family.name: family for family in ModelStateCollector(lambda: [state]).collect()}
    return {tuple(sample.labels.values()): sample.value for sample in families["cnn_model_files_changed"].samples}


def test_a_served_version_whose_files_go_bad_keeps_serving_and_says_so(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """MODEL_CONTROL=poll, version 2 serving (the policy: the latest one). Its model.onnx is truncated on disk:
    it keeps serving what it verified at its load (no fall-back to version 1, nothing leaked), /models and a metric
    name the problem; once the file is restored the problem clears."""
    store = make_store(lenet=[1, 2])
    runtime = make_runtime(store, model_control="poll", poll_interval_s=0.05)
    repository, control = runtime.repository, runtime.control
    control.reconcile()
    served = repository.versions["lenet"][2]
    assert served.status == "ready" and set(repository.versions["lenet"]) == {2}
    graph = store.model_dir("lenet") / "2" / "model.onnx"
    intact = graph.read_bytes()
    graph.write_bytes(intact[: len(intact) // 2])

    for _ in range(3):  # incomplete at first (a copy in progress?), then, once settled, not what was verified
        control.reconcile()
        time.sleep(0.06)
    control.reconcile()
    assert repository.versions["lenet"] == {2: served} and served.status == "ready"
    assert served.files_problem is not None and "sha256" in served.files_problem
    assert repository.state()["models"]["lenet"]["2"]["files_problem"] == served.files_problem
    assert _files_changed(repository.state()) == {("lenet", "2"): 1.0}

    async def classify() -> int:
        with await runtime.classifier.acquire("lenet") as entry:
            assert entry.batcher is not None
            await entry.batcher.infer(np.zeros((1, 32, 32, 1), np.uint8))
            return entry.version

    assert asyncio.run(classify()) == 2

    graph.write_bytes(intact)
    control.reconcile()
    assert served.files_problem is None and _files_changed(repository.state()) == {("lenet", "2"): 0.0}


def test_a_lone_served_version_whose_files_go_bad_keeps_serving(
    make_store: StoreFactory, make_runtime: RuntimeFactory
) -> None:
    """The same with a single version: it must not turn into 503s."""
    store = make_store(lenet=[1])
    runtime = make_runtime(store, model_control="poll", poll_interval_s=0.05)
    repository, control = runtime.repository, runtime.control
    control.reconcile()
    (store.model_dir("lenet") / "1" / "metadata.json").unlink()
    for _ in range(3):
        control.reconcile()
        time.sleep(0.06)
    entry = repository.serving("lenet")
    assert entry is not None and entry.version == 1
    assert entry.files_problem is not None and "metadata.json is missing" in entry.files_problem


def test_a_config_pbtxt_edited_wrong_takes_nothing_down_and_says_why(
    make_store: StoreFactory, make_runtime: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """MODEL_CONTROL=poll, version 2 serving. An operator's edit leaves config.pbtxt's version_policy unreadable:
    version 2 keeps serving (it used to be unloaded: the model went offline for a typo), and the problem is named; once
    fixed (in protobuf's other form, angle brackets), the policy applies again."""
    store = make_store(lenet=[1, 2])
    runtime = make_runtime(store, model_control="poll", poll_interval_s=0.05)
    repository, control = runtime.repository, runtime.control
    control.reconcile()
    assert set(repository.versions["lenet"]) == {2}
    config = store.model_dir("lenet") / "config.pbtxt"
    config.write_text('name: "lenet"\nversion_policy: { lastest: { num_versions: 2 } }\n')
    control.reconcile()
    entry = repository.serving("lenet")
    assert entry is not None and entry.version == 2 and entry.status == "ready"
    problem = repository.state()["models"]["lenet"][""]
    assert "unknown version_policy 'lastest'" in problem["reason"] and "the versions serving go on" in problem["reason"]
    control.reconcile()  # logged once, not at every pass
    assert caplog.text.count("unknown version_policy 'lastest'") == 1
    config.write_text('name: "lenet"\nversion_policy < latest < num_versions: 2 > >\n')
    control.reconcile()
    assert sorted(repository.versions["lenet"]) == [1, 2] and "" not in repository.state()["models"]["lenet"]


def test_settings_naming_models_the_store_lacks_are_said_at_start(make_store: StoreFactory) -> None:
    """A typo in a setting that names models is otherwise silent (PINNED, INSTANCES, a canary's candidate) or only a
    failed model in /models (MODELS): each setting gets one line naming what the store lacks, and what it holds."""
    store = make_store(lenet5=[1, 2], twin=[1])
    settings = Settings(
        model_store=store.root, models="lenet5:3,lenet6", default_model="lenet5", pinned="lenet7,twin",
        instances="2,lenet8:2,twin:2", shadow="lenet5:twin@4:0.1", canary="lenet5@2:lenet9:0.5",
    )  # fmt: skip
    lines = unknown_in_settings(settings, store)
    said = {line.split(" ", 1)[0]: line for line in lines if " names " in line}
    assert sorted(said) == ["CANARY", "INSTANCES", "MODELS", "PINNED", "SHADOW"], lines
    assert said["MODELS"].startswith("MODELS names lenet5:3, lenet6, which the model store ")
    assert said["PINNED"].startswith("PINNED names lenet7, ") and "twin" not in said["PINNED"].split("(")[0]
    assert said["INSTANCES"].startswith("INSTANCES names lenet8, ")
    assert said["SHADOW"].startswith("SHADOW names twin@4, ") and said["CANARY"].startswith("CANARY names lenet9, ")
    assert "(it holds lenet5, twin)" in said["MODELS"]
    assert [line for line in lines if line.startswith("PINNED applies")] == [
        "PINNED applies with MODEL_CONTROL=on-demand only (here none): ignored"
    ]

    exact = Settings(model_store=store.root, models="lenet5:2", pinned="twin", model_control="on-demand")
    assert unknown_in_settings(exact, store) == []
    # a default the store holds but MODELS does not serve: requests naming no model would all get 404
    lines = unknown_in_settings(Settings(model_store=store.root, models="lenet5", default_model="twin"), store)
    assert len(lines) == 1 and lines[0].startswith("DEFAULT_MODEL twin is not among the models MODELS serves"), lines
    assert (
        unknown_in_settings(
            Settings(model_store=store.root, models="lenet5", default_model="twin", model_control="on-demand"), store
        )
        == []
    )  # loaded by its first request
    assert (
        unknown_in_settings(
            Settings(model_store=store.root, models="lenet5", canary="lenet5:twin:0.1", default_model="twin"), store
        )
        == []
    )  # a canary's models are served too
    # what the service reads as no pin, no name or nothing pinned is not a name the store lacks
    assert unknown_in_settings(Settings(model_store=store.root, models="lenet5:0", instances=":2", pinned=" , "),
                               store) == []  # fmt: skip


def test_the_start_up_check_of_the_settings_raises_nothing(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It runs where the server starts: a MODELS entry the workers reject, or a store it cannot read, is one line
    more, and the server starts as it did without the check."""
    store = make_store(lenet5=[1])
    lines = unknown_in_settings(Settings(model_store=store.root, models="lenet5:v2"), store)
    assert len(lines) == 1 and "'lenet5:v2'" in lines[0] and "positive integer" in lines[0], lines

    def unreadable(name: str) -> list[object]:
        raise PermissionError(13, "Permission denied", str(store.root / name))

    monkeypatch.setattr(store, "versions", unreadable)
    lines = unknown_in_settings(Settings(model_store=store.root, pinned="lenet5", model_control="on-demand"), store)
    assert len(lines) == 1 and "cannot be read to check the settings' models" in lines[0], lines
    assert "Permission denied" in lines[0]
