"""The store the export writes: versions, metadata, labels, Triton's configuration."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export import versions
from export.pipeline import ExportOptions, export_model
from export.registry import get_model_spec, list_models
from service.store.batch_limit import parse_max_batch_size
from service.store.layout import ModelStore
from service.store.metadata import ModelMetadata
from service.store.policy import VersionPolicy, parse_version_policy, read_version_policy

from ..helpers import ROOT, free_port


def test_metadata_describes_the_graph(model_store: ModelStore) -> None:
    for name in ("lenet5", "resnet18"):
        latest = model_store.latest(name)
        assert latest is not None
        raw = latest.read_metadata()
        metadata = ModelMetadata.model_validate(raw)  # what the service will read
        spec = get_model_spec(name)
        assert metadata.num_params == spec.num_params and metadata.num_classes == len(spec.categories)
        assert metadata.input.size == spec.input.size and list(metadata.input.mean) == list(spec.input.mean)
        assert raw["onnx"]["sha256"] == hashlib.sha256(latest.graph.read_bytes()).hexdigest()
        assert raw["onnx"]["opset"] >= 18 and raw["flops_per_image"] > 0
        assert raw["verification"]["top1_agreement"] == 1.0
        assert raw["verification"]["max_abs_diff_probabilities"] <= 1e-4
        assert raw["architecture"]["paper"] and raw["exported_at"]
        assert model_store.read_labels(name) == list(spec.categories)
        config = (model_store.model_dir(name) / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in config and "dynamic_batching" in config
        assert f"dims: [{spec.input.size}, {spec.input.size}, {spec.input.channels}]" in config
    assert model_store.latest("resnet18").read_metadata()["weights"]["kind"] == "random"  # type: ignore[union-attr]


def test_a_new_export_adds_a_version(tmp_path: Path) -> None:
    """A second export is version 2, readable by other users as the umask allows (the service's image runs as
    another user than the one who exported); the operator's pin and batch limit in config.pbtxt stay; a
    staging folder that an export killed outright left an hour ago is removed; one an export still holds (in
    another container sharing the volume, say), one of another host, or one left a minute ago is not."""
    store = ModelStore(tmp_path)
    previous = os.umask(0o022)
    try:
        first = export_model("lenet5", store, ExportOptions(weights="random", progress=False))
        model_dir = store.model_dir("lenet5")
        config = model_dir / "config.pbtxt"
        edited = (
            config.read_text()
            .replace("max_batch_size: 64", "max_batch_size: 8")
            .replace(
                "version_policy: { latest: { num_versions: 1 } }", "version_policy: {\n  specific: { versions: [1] }\n}"
            )
        )
        config.write_text(edited)
        here = socket.gethostname()
        killed = model_dir / f".staging-4242@{here}-abc"  # its export killed outright: nothing holds it
        running = model_dir / f".staging-4343@{here}-xyz"  # held, by another container's export say
        elsewhere = model_dir / ".staging-4242@another-host-def"  # another host's: its locks are not seen here
        recent = model_dir / f".staging-4242@{here}-jkl"  # left a minute ago
        for left in (killed, running, elsewhere, recent):
            left.mkdir()
            (left / "model.onnx").write_bytes(b"half a graph")
            if left is not recent:
                os.utime(left, (time.time() - 7200, time.time() - 7200))
        holder = os.open(running, os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_EX)  # as an export holds its folder
        second = export_model("lenet5", store, ExportOptions(weights="random", progress=False))
        os.umask(0o027)
        third = export_model("lenet5", store, ExportOptions(weights="random", progress=False))
        os.close(holder)
    finally:
        os.umask(previous)
    assert (first.version, second.version, third.version) == (1, 2, 3)
    assert [v.version for v in store.versions("lenet5")] == [1, 2, 3]
    modes = [oct((model_dir / str(v)).stat().st_mode & 0o777) for v in (1, 2, 3)]
    assert modes == ["0o755", "0o755", "0o750"]
    assert not killed.exists() and all(kept.exists() for kept in (running, elsewhere, recent))
    kept = config.read_text()
    assert "max_batch_size: 8" in kept and "version_policy: { specific: { versions: [1] } }" in kept
    assert kept.count("max_batch_size") == 1 and kept.count("version_policy") == 1 and 'name: "lenet5"' in kept
    assert read_version_policy(config).select([1, 2, 3]) == [1]


def test_the_operators_settings_are_spliced_into_a_config_whatever_its_comments_and_delimiters() -> None:
    """A variant's configuration is its parent's text: its comments and protobuf's < > delimiters stay, and the
    kept policy and limit replace the real fields, not a mention of them in a comment."""
    parent = (
        'name: "resnet50"\n# was version_policy: { all: { } }\n# max_batch_size: 64 was too much\n'
        "max_batch_size: 16\nversion_policy < specific < versions: [3] > >\n"
    )
    out = versions.with_settings(parent, VersionPolicy("latest", num_versions=2), 8)
    assert out.startswith('name: "resnet50"\n# was version_policy: { all: { } }\n# max_batch_size: 64 was too much\n')
    assert parse_version_policy(out) == VersionPolicy("latest", num_versions=2) and parse_max_batch_size(out) == 8
    assert out.count("version_policy") == 2 and out.count("max_batch_size") == 2  # one each, and the comments'


def test_trained_weights_are_refused_for_imagenet_networks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="takes --weights imagenet or random"):
        export_model("resnet18", ModelStore(tmp_path), ExportOptions(weights="trained", progress=False))


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_help_and_list() -> None:
    help_text = _run_cli("--help").stdout
    for option in ("--weights", "--weights-file", "--out", "--data", "--data-dir", "default", "all", "list"):
        assert option in help_text
    table = _run_cli("list").stdout
    for name in list_models():
        assert f"{name} " in table
    assert "25,557,032" in table  # resnet50's parameter count, from the registry
    resnet50 = next(line for line in table.splitlines() if line.startswith("resnet50 "))
    assert "97.8 MiB" in resnet50 and "97.5 MiB" in resnet50 and resnet50.rstrip().endswith("yes")  # download, ONNX


def test_cli_unknown_model_fails_with_the_known_names() -> None:
    result = _run_cli("resnet5", "--out", "/nonexistent")
    assert result.returncode == 2 and "available: lenet5" in result.stderr


def _offline(tmp_path: Path) -> dict[str, str]:
    """No weights can be fetched: the proxy is a closed local port, and the hub cache is empty."""
    closed = f"http://127.0.0.1:{free_port()}"
    return {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": closed, "HTTPS_PROXY": closed}


def test_export_default_offline_is_lenet5_a_reason_per_network_and_what_the_rest_costs(tmp_path: Path) -> None:
    result = _run_cli("default", "--out", str(tmp_path / "store"), "--epochs", "2", "--no-progress",
                      env=_offline(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ModelStore(tmp_path / "store").names() == ["lenet5"]
    for name in ("alexnet", "googlenet", "resnet18", "resnet50"):
        (reason,) = [line for line in result.stderr.splitlines() if line.startswith(f"WARNING export: {name}: ")]
        assert "cannot fetch" in reason and "--weights-file" in reason
    assert "skipped, weights not available here: alexnet, googlenet, resnet18, resnet50" in result.stderr
    assert "vgg" not in result.stderr.split("11 more networks")[0]  # the rest is not attempted
    assert "11 more networks are registered (4.56 GiB to download" in result.stderr
    assert "vgg16 527.8 MiB" in result.stderr and "python -m export all" in result.stderr


def test_export_all_offline_trains_lenet5_and_skips_the_rest_with_reasons(tmp_path: Path) -> None:
    env = _offline(tmp_path)
    result = _run_cli("all", "--out", str(tmp_path / "store"), "--epochs", "2", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    assert ModelStore(tmp_path / "store").names() == ["lenet5"]
    assert "skipped, weights not available here: alexnet" in result.stderr
    assert "--weights-file" in result.stderr and "--weights random" in result.stderr


def test_two_exports_of_one_model_at_once_both_land_as_their_own_versions(tmp_path: Path) -> None:
    """Each picks its version number only once its work is done, under a lock on the model's folder: neither
    fails on the other's number (it did: `Directory not empty` after all its work), and each version's metadata
    names its own folder."""
    command = [sys.executable, "-m", "export", "lenet5", "--weights", "random", "--out", str(tmp_path / "store"),
               "--no-progress"]  # fmt: skip
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    stored = ModelStore(tmp_path / "store").versions("lenet5")
    assert [v.version for v in stored] == [1, 2]
    assert [v.read_metadata()["version"] for v in stored] == [1, 2]
    assert not list((tmp_path / "store" / "lenet5").glob(".staging-*"))


def test_sigterm_mid_export_ends_it_with_one_line_and_no_version_left(tmp_path: Path) -> None:
    """`docker stop` or a pod's end during an export: status 130, one line, the staging folder removed (it was
    left behind, half a gigabyte for a VGG), no version written, and no empty model folder."""
    model_dir = tmp_path / "store" / "lenet5"
    # the real command, held once its graph is written in the staging folder: a random LeNet-5 exports in a
    # second, and a signal sent on a timer could arrive after it had finished (it did, under a loaded CI)
    held = (
        "import sys, time\n"
        "import export.pipeline as pipeline\n"
        "from export.cli import main\n"
        "convert = pipeline.export_onnx\n"
        "def held(*args):\n"
        "    convert(*args)\n"
        "    print('HELD', flush=True)\n"
        "    time.sleep(120)\n"
        "pipeline.export_onnx = held\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = subprocess.Popen([sys.executable, "-c", held, "lenet5", "--weights", "random", "--out",
                            str(tmp_path / "store"), "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert run.stdout is not None
    before = []
    for line in run.stdout:  # ends at the marker, or at the command's end if it never got there
        before.append(line)
        if line.strip() == "HELD":
            break
    assert before and before[-1].strip() == "HELD", "".join(before)
    assert list(model_dir.glob(".staging-*"))  # mid-export: the version under way is on disk
    run.terminate()
    output = "".join(before) + run.communicate(timeout=60)[0]
    assert run.returncode == 130, output
    last = "ERROR export: interrupted: the versions logged as written stand, and no other was written"
    assert output.strip().splitlines()[-1] == last
    assert "Traceback" not in output
    assert not model_dir.exists()  # its first version: no empty folder left either (Triton fails to start on one)


@pytest.mark.parametrize("option", [["--epochs", "0"], ["--epochs", "-2"], ["--batch-size", "0"], ["--lr", "0"],
                                    ["--lr", "nan"], ["--patience", "0"], ["--from-version", "0"],
                                    ["--precision", "int8", "--from-version", "0"], ["--input-size", "0"],
                                    ["--resize", "0"]])  # fmt: skip
def test_numbers_no_training_can_take_are_refused_before_any_work(option: list[str]) -> None:
    """`--epochs 0` trained for 40 epochs, and -2 failed after the data had loaded; `--from-version 0` without
    `--precision` was ignored and a new version exported; `--input-size 0` meant the network's own size."""
    from export.cli import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["lenet5", *option])
    assert info.value.code == 2


STRAY = [
    ["lenet5", "--unfreeze", "all"],
    ["lenet5", "--lr=5"],
    ["resnet18", "--calibration-method", "entropy"],
    ["resnet18", "--data", "mnist"],
    ["lenet5", "--markdown"],
    ["resnet18", "--weights", "random", "--weights-file", "x"],
]


@pytest.mark.parametrize("argv", STRAY)
def test_options_nothing_would_read_are_refused_not_ignored(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """They were accepted and dropped without a word (`lenet5 --lr 5` exported as if it were not there)."""
    from export.cli import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert "nothing reads them" in capsys.readouterr().err or argv[-2] == "--weights-file"
    assert parse_args(["lenet5", "--data", "mnist", "--epochs", "3"]).data == "mnist"  # where they are read: kept
    assert parse_args(["resnet18", "--precision", "int8", "--calibration-method", "entropy"]).precision == "int8"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--baseline-dir", "{tmp}/no-such"], "--baseline-dir {tmp}/no-such is not a folder: give a folder of images"),
        (["--precision", "int8", "--calibration-dir", "{tmp}/no-such"], "--calibration-dir {tmp}/no-such is not a"),
    ],
    ids=["baseline", "calibration"],
)
def test_folders_that_are_not_there_are_said_before_any_training(tmp_path: Path, argv: list[str], says: str) -> None:
    """They were found missing after the training (or with --precision after an FP32 version had been written)."""
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    result = _run_cli("lenet5", "--out", str(tmp_path / "store"), "--no-progress", *argv)
    assert result.returncode == 2 and says.replace("{tmp}", str(tmp_path)) in result.stderr, result.stderr
    assert "training" not in result.stderr and "Traceback" not in result.stderr
    assert ModelStore(tmp_path / "store").names() == []


def test_a_version_the_store_lacks_is_said_before_any_work_where_the_store_holds_the_model(tmp_path: Path) -> None:
    """Where this run would export the parent first (an empty store, --as), the version it writes may be the one
    named: not refused."""
    store = ModelStore(tmp_path / "store")
    export_model("lenet5", store, ExportOptions(weights="random", progress=False))
    result = _run_cli("lenet5", "--out", str(store.root), "--no-progress", "--precision", "int8", "--from-version", "7")
    assert result.returncode == 2 and f"--from-version 7: lenet5 has versions [1] in {store.root}" in result.stderr
    assert [v.version for v in store.versions("lenet5")] == [1]
    from export.cli import _before_any_work, parse_args

    empty = ModelStore(tmp_path / "empty")
    first = parse_args(["lenet5", "--precision", "int8", "--from-version", "1"])
    assert _before_any_work(first, ["lenet5"], empty) is None  # v1 is what this run exports first
    held = parse_args(["lenet5", "--as", "digits", "--labels", "x", "--precision", "int8", "--from-version", "2"])
    assert _before_any_work(held, ["lenet5"], store) is None  # digits v2's parent is what this run exports


def test_a_store_that_cannot_be_written_is_said_before_any_training(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = _run_cli("lenet5", "--out", str(tmp_path / "a-file" / "store"), "--no-progress")
    assert result.returncode == 2 and "cannot take a model" in result.stderr, result.stderr
    assert "training" not in result.stderr and "Traceback" not in result.stderr


def test_a_signal_while_a_version_is_put_in_place_waits_for_it_to_end() -> None:
    """Between the version's folder renamed into place and the model's labels and configuration replaced, a
    SIGTERM would leave a version without them (the CLI said none was written): it is held back to the end of
    that step, and raised there; elsewhere it is raised at once."""
    with pytest.raises(KeyboardInterrupt):
        versions.interrupt(15, None)
    done = []
    with pytest.raises(KeyboardInterrupt), versions.uninterrupted():
        versions.interrupt(15, None)
        done.append("published")
        with versions.uninterrupted():  # nested: raised only where the outermost ends
            versions.interrupt(2, None)
        done.append("labels")
    assert done == ["published", "labels"]
    with versions.uninterrupted():  # nothing left held back
        pass


def test_abbreviated_options_are_not_taken_for_whole_ones() -> None:
    """`--batch 64` was read as --batch-size, past the check that refuses it without --finetune."""
    from export.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["lenet5", "--batch", "64"])
