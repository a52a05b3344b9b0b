"""The README as a front door, and the documentation site built as CI builds it.

The site is built once, with ``mkdocs build --strict`` (broken links, missing pages and pages
outside the navigation fail it), and the built HTML is read: every setting and every metric the
code declares must be on its reference page, and no page may load anything from outside.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType

import pytest
from markdown.extensions.toc import slugify

from service.settings import Settings

from .helpers import ROOT

README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hook", ROOT / "docs" / "hooks" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(page: Path) -> str:
    """A built page's visible text: tags dropped, entities decoded, white space folded."""
    body = re.sub(r"<script.*?</script>|<[^>]+>", " ", page.read_text(encoding="utf-8"), flags=re.S)
    return " ".join(html.unescape(body).split())


def _squeezed(text: str) -> str:
    """Text without Markdown's code marks or any white space, to compare with a page's text the same way."""
    return re.sub(r"\s+", "", text.replace("`", ""))


def _exposed_metrics() -> dict[str, str]:
    """What ``/metrics`` says of each metric (name: help), from the service's own exposition."""
    from service.metrics import exposition, get_metrics

    get_metrics()
    state = {"models": {"lenet5": {"1": {"status": "ready", "provider": "CPU", "load_seconds": 0.1}}}}
    text = exposition(lambda: [state])().decode()
    # out of multiprocess mode prometheus_client adds a creation time (NAME_created) for every labelled child that
    # exists in this process (other tests create some); the served /metrics, in multiprocess mode, has none
    return {
        name: described
        for name, described in re.findall(r"^# HELP (\S+) ?(.*)$", text, re.M)
        if not name.endswith("_created")
    }


def test_every_setting_and_metric_has_a_description() -> None:
    assert not [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    metrics = _exposed_metrics()
    assert any(name.startswith("cnn_") for name in metrics)
    assert not [name for name, text in metrics.items() if not text.strip()]


def test_settings_page_lists_every_setting(site: Path) -> None:
    page = _text(site / "reference" / "settings" / "index.html")
    for name, field in Settings.model_fields.items():
        assert f"{name.upper()} " in page, name
        assert _squeezed(field.description or "") in _squeezed(page), name
    # what each takes, beside its default: the ports' range, MAX_BATCH_SIZE's, a choice's values
    assert "variable default takes meaning" in page
    assert "HTTP_PORT 3000 1 to 65,535" in page and "MAX_BATCH_SIZE 32 1 to 1,024" in page
    assert "PROVIDERS auto auto , cuda , cpu" in page and "ORT_SPINNING false true , false" in page


def test_metrics_page_lists_every_metric(site: Path) -> None:
    page = _text(site / "reference" / "metrics" / "index.html")
    for name, documentation in _exposed_metrics().items():
        if name.startswith("python_"):  # prometheus_client's interpreter facts, not the service's
            continue
        assert f"{name} " in page, name
        assert _squeezed(documentation) in _squeezed(page), name


def test_reference_pages_are_generated_from_the_code(site: Path) -> None:
    http_api = _text(site / "reference" / "http-api" / "index.html")
    for path in ("POST /classify", "POST /explain", "GET /models", "POST /v2/models/{name}/infer"):
        assert path in http_api
    grpc = _text(site / "reference" / "oip" / "index.html")
    assert "inference.GRPCInferenceService/ModelInfer" in grpc and "service GRPCInferenceService" in grpc
    cli = _text(site / "reference" / "cli" / "index.html")
    assert "usage: python -m export" in cli and "usage: python -m client" in cli and "--finetune" in cli
    operating = _text(site / "operating" / "index.html")
    for alert in re.findall(r"- alert: (\w+)", (ROOT / "monitoring" / "alerts.yml").read_text()):
        assert alert in operating, alert
    networks = _text(site / "concepts" / "models" / "index.html")
    assert "resnet50 ResNet 25,557,032" in networks


def _bounds(takes: str) -> list[tuple[str, float]]:
    """The settings page's "takes" cell as (operator, number) pairs: `1 to 1,024`, `>= 0`, `> 0, <= 1`."""
    number = r"(-?[\d,]+(?:\.\d+)?)"
    if match := re.fullmatch(rf"{number} to {number}", takes):
        return [(">=", float(match[1].replace(",", ""))), ("<=", float(match[2].replace(",", "")))]
    return [(op, float(value.replace(",", ""))) for op, value in re.findall(rf"(>=|>|<=|<) {number}", takes)]


def _accepts(name: str, value: float) -> bool:
    try:
        Settings(**{name: value})
    except ValueError:
        return False
    return True


@pytest.mark.usefixtures("no_settings_in_the_environment")
def test_the_documented_range_of_every_number_is_the_one_enforced(hook: ModuleType) -> None:
    """Each bound the settings page shows holds exactly: its edge is taken (or refused, for > and <), one step past
    it refused (a step is 1 for a whole number, 0.5 otherwise)."""
    checked = []
    for variable, _, takes, _ in hook.settings():
        name = variable.lower()
        integral = Settings.model_fields[name].annotation is int
        step = 1 if integral else 0.5
        for op, edge in _bounds(takes):
            edge_value: float = int(edge) if integral else edge
            inward = {">=": 0, ">": step, "<=": 0, "<": -step}[op]
            outward = {">=": -step, ">": 0, "<=": step, "<": 0}[op]
            assert _accepts(name, edge_value + inward), f"{variable}: {takes} documented, {edge_value + inward} refused"
            assert not _accepts(name, edge_value + outward), f"{variable}: {takes}, {edge_value + outward} taken"
            checked.append(variable)
    assert {"MAX_BATCH_SIZE", "HTTP_PORT", "TRACE_SAMPLE_RATIO", "CANARY_SAMPLE", "MAX_BODY_BYTES"} <= set(checked)


@pytest.mark.usefixtures("no_settings_in_the_environment")
def test_a_choice_setting_documents_every_value_it_takes(hook: ModuleType) -> None:
    for variable, _, takes, _ in hook.settings():
        choices = re.findall(r"`([^`]+)`", takes)
        if variable in ("PROVIDERS", "MODEL_CONTROL", "SESSION_HOST"):
            assert choices, variable
        for choice in choices:
            assert Settings(**{variable.lower(): choice}), f"{variable}={choice} documented and refused"
    with pytest.raises(ValueError, match="gpu"):
        Settings(providers="gpu")


def test_an_unknown_generated_section_fails_the_build(hook: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"unknown generated section 'setings'.*settings"):
        hook.expand("text\n<!-- generated: setings -->\n", "reference/x.md")


def test_the_site_loads_nothing_from_outside(site: Path) -> None:
    external = re.compile(r"<(?:script|img|link|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.I)
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 20
    offending = [str(page.relative_to(site)) for page in pages if external.search(page.read_text(encoding="utf-8"))]
    assert not offending
    css = [path for path in site.rglob("*.css") if re.search(r"url\((['\"]?)https?:", path.read_text(errors="ignore"))]
    assert not css


def test_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    for command in ("make serve", "make test", "curl ", "python -m client", "make docs"):
        assert command in text, command
    assert "docs/reference/settings.md" in text  # where every setting is


def _anchors(markdown: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown.read_text(encoding="utf-8"), flags=re.S)
    return {slugify(heading.strip(), "-") for heading in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize(
    "source", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
)
def test_relative_links_resolve(source: str, hook: ModuleType) -> None:
    """Every relative link of the README and of the site's pages names a file, and an anchor it has."""
    path = ROOT / source
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if source == "docs/benchmarks.md" and any(fnmatch(file, pattern) for pattern in hook.PUBLISHED):
            linked = ROOT / file  # published into the site from outside docs/, at the same path
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{source}: {broken}"
