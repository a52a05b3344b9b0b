"""What the service reads from a version's metadata.json: a version the service cannot use fails its load with
why, instead of loading and failing each request."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.runtime.session import ModelLoadError, load_model
from service.settings import Settings
from service.store.layout import ModelStore

BROKEN = [
    ({"abstain": {"source": "held-out"}}, "abstain.threshold must be a number from 0 to 1, got None"),
    ({"abstain": {"threshold": 1.5}}, "abstain.threshold must be a number from 0 to 1, got 1.5"),
    ({"typicality": {"threshold": None}}, "typicality.threshold must be a number from 0 to inf, got None"),
    ({"typicality": {"threshold": "3"}}, "typicality.threshold must be a number from 0 to inf, got '3'"),
    ({"num_classes": 0}, "num_classes: Input should be greater than 0"),
]


@pytest.mark.parametrize(("change", "says"), BROKEN, ids=[next(iter(c)) + ":" + s[-12:] for c, s in BROKEN])
def test_a_version_whose_metadata_the_service_cannot_use_fails_its_load_with_why(
    model_store: ModelStore, tmp_path: Any, change: dict[str, Any], says: str
) -> None:
    stored = model_store.latest("lenet5")
    assert stored is not None
    store = ModelStore(tmp_path)
    version = store.model_dir("lenet5") / "1"
    version.mkdir(parents=True)
    for item in stored.directory.iterdir():
        (version / item.name).symlink_to(item)
    (version / "metadata.json").unlink()
    (version / "metadata.json").write_text(json.dumps(stored.read_metadata() | change))
    copy = store.latest("lenet5")
    assert copy is not None
    with pytest.raises(ModelLoadError) as failed:
        load_model(store, copy, Settings(providers="cpu"))
    assert says in str(failed.value) and "metadata.json is invalid" in str(failed.value)
