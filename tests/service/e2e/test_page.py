"""The page at ``/`` and ``/docs`` in a real browser: Debian's Chromium driven by Playwright.

Every answer the page shows is checked against ``/classify`` for the same bytes, and
every request the page makes must stay on the service's origin.
"""

from __future__ import annotations

import base64
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright
from skimage import data

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, classified, encode, running
from ..browser import CHROMIUM, Tab, draw_a_one, open_tab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: run `make test-tools` (Debian's chromium package)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def tab(browser: Browser, service: ServiceProcess) -> Iterator[Tab]:
    tab = open_tab(browser, service.url)
    tab.page.wait_for_selector("#model-select:not([disabled])")
    yield tab
    tab.page.context.close()


def shown_predictions(page: Page, selector: str) -> list[dict[str, Any]]:
    return [
        {"label": item.get_attribute("data-label"), "index": int(item.get_attribute("data-index") or -1),
         "score": float(item.get_attribute("data-score") or "nan")}
        for item in page.query_selector_all(f"{selector} .prediction")
    ]  # fmt: skip


def canvas_png(page: Page) -> bytes:
    data_url: str = page.evaluate("document.getElementById('canvas').toDataURL('image/png')")
    return base64.b64decode(data_url.split(",", 1)[1])


def test_the_page_lists_models_with_their_state(tab: Tab) -> None:
    options = {o.get_attribute("value"): o for o in tab.page.query_selector_all("#model-select option")}
    assert set(options) == {"lenet5", "resnet18", "ghost"}
    assert tab.page.input_value("#model-select") == "resnet18"  # DEFAULT_MODEL
    assert options["ghost"].is_disabled() and "failed" in options["ghost"].inner_text()
    reason = tab.page.inner_text("#unavailable li[data-model=ghost]")
    assert reason.startswith("ghost: failed (") and "not in the model store" in reason
    card = tab.page.inner_text("#model-card")
    assert "ResNet" in card and "11.7 M" in card and "fp32" in card
    assert "random weights" in card  # the session store exports resnet18 untrained
    assert tab.page.is_hidden("#draw-panel")  # an RGB model: nothing to draw


def test_an_uploaded_photo_gets_the_answer_classify_gives(tab: Tab, service: ServiceProcess, tmp_path: Path) -> None:
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(encode(data.chelsea(), "JPEG", quality=90))
    with tab.page.expect_request(lambda r: "/classify" in r.url) as sent:
        tab.page.set_input_files("#file-input", str(photo))
    # Chromium does not show Playwright a File body; the headers say it went as the file itself
    headers = sent.value.all_headers()
    assert headers["content-type"] == "image/jpeg" and int(headers["content-length"]) == photo.stat().st_size
    tab.page.wait_for_selector(".result[data-status=done]")

    expected = classified(service, photo.read_bytes(), "resnet18")
    assert shown_predictions(tab.page, ".result") == expected["results"][0]["predictions"]
    meta = tab.page.inner_text(".result .meta")
    assert meta.startswith(f"resnet18 v{expected['version']}") and "ms round trip" in meta
    curl = tab.page.inner_text("#curl")
    assert "--data-binary @chelsea.jpg" in curl and "/classify?model=resnet18&top_k=5" in curl
    assert "Authorization" not in curl  # no token on this service
    assert tab.outside_origin() == []
    assert tab.console_errors == []


def test_a_drawn_digit_is_read_and_matches_classify(
    tab: Tab, service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tab.page.select_option("#model-select", "lenet5")
    tab.page.wait_for_selector("#draw-panel:not([hidden])")
    draw_a_one(tab.page)

    assert tab.classify_requests()[-1].url.endswith("/classify?model=lenet5&top_k=5")
    # Chromium does not show Playwright a Blob body; PNG is lossless, so the canvas read back
    # now decodes to the pixels of the page's last request (sent once the last stroke ended).
    expected = classified(service, canvas_png(tab.page), "lenet5")
    assert shown_predictions(tab.page, "#draw-panel") == expected["results"][0]["predictions"]
    assert tab.page.inner_text("#draw-digit") == "1"
    # LeNet-5's export derived an abstain threshold and a typicality check: the page says what
    # /classify says of this drawing
    result = expected["results"][0]
    assert tab.page.get_attribute("#draw-panel", "data-confident") == str(result["confident"]).lower()
    note = "confident" if result["confident"] else f"not confident: top-1 under {expected['min_confidence'] * 100:.1f}%"
    if not result["typical"]:
        note = "not confident: unlike the images it was trained on"
    assert tab.page.inner_text("#draw-meta").endswith(note)
    assert "--data-binary @digit.png" in tab.page.inner_text("#curl")
    assert tab.outside_origin() == []
    assert tab.console_errors == []
    screenshot = tmp_path_factory.mktemp("page") / "page.png"
    tab.page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")


def uploaded_coffee(tab: Tab, folder: Path) -> tuple[Path, str]:
    """The coffee photo, written into ``folder`` and chosen in the page's file input; and its card, once answered."""
    photo = folder / "coffee.jpg"
    photo.write_bytes(encode(data.coffee(), "JPEG", quality=90))
    tab.page.set_input_files("#file-input", str(photo))
    card = ".result[data-status=done]"
    tab.page.wait_for_selector(card)
    return photo, card


def test_why_lays_the_heat_map_over_the_image_for_any_class(
    tab: Tab, service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    photo, card = uploaded_coffee(tab, tmp_path_factory.mktemp("why"))
    shown = shown_predictions(tab.page, card)
    with tab.page.expect_request(lambda r: "/explain" in r.url) as sent:
        tab.page.click(f"{card} button.why")
    tab.page.wait_for_selector(f"{card}[data-explained='{shown[0]['index']}']")
    assert sent.value.url.endswith(f"/explain?model=resnet18&version=1&class={shown[0]['index']}")
    assert sent.value.all_headers()["accept"] == "image/png"
    # the card now shows the very picture /explain gives for these bytes and this class, pixel for pixel
    pixels: list[int] = tab.page.evaluate(
        "() => { const img = document.querySelector('.result img'); const c = document.createElement('canvas');"
        " c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');"
        " g.drawImage(img, 0, 0); return Array.from(g.getImageData(0, 0, c.width, c.height).data); }"
    )
    direct = httpx.post(f"{service.url}/explain?model=resnet18&class={shown[0]['index']}", content=photo.read_bytes(),
                        headers={"Content-Type": "image/jpeg", "Accept": "image/png"}, timeout=60)  # fmt: skip
    assert direct.status_code == 200
    expected = np.asarray(Image.open(io.BytesIO(direct.content)).convert("RGBA"))
    assert np.array_equal(np.array(pixels, dtype=np.uint8).reshape(expected.shape), expected)
    assert tab.page.get_attribute(f"{card} img", "title") == f"gradcam map of class {shown[0]['index']}"
    screenshot = tmp_path_factory.mktemp("why-page") / "why.png"
    tab.page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    # any other class: a click on its prediction
    other = shown[1]["index"]
    tab.page.click(f"{card} .prediction[data-index='{other}']")
    tab.page.wait_for_selector(f"{card}[data-explained='{other}']")
    assert tab.page.get_attribute(f"{card} .prediction.explained", "data-index") == str(other)
    # and back to the photo
    tab.page.click(f"{card} button.why")
    assert tab.page.get_attribute(card, "data-explained") is None
    assert tab.page.get_attribute(f"{card} img", "title") is None
    assert tab.page.inner_text(f"{card} button.why") == "why?"
    assert tab.outside_origin() == []
    assert tab.console_errors == []


def test_a_heat_map_the_network_did_not_bring_says_so_and_can_be_asked_again(
    tab: Tab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The connection fails as "why?" is asked: the card says why, is not left waiting, and the next click works."""
    _, card = uploaded_coffee(tab, tmp_path_factory.mktemp("why-offline"))
    tab.page.route("**/explain?*", lambda route: route.abort())
    tab.page.click(f"{card} button.why")
    tab.page.wait_for_function(
        "() => document.querySelector('.result .meta').textContent.startsWith('no explanation:')"
    )
    assert (
        tab.page.get_attribute(card, "data-explaining") is None
        and tab.page.get_attribute(card, "data-explained") is None
    )
    tab.page.unroute("**/explain?*")
    tab.page.click(f"{card} button.why")
    tab.page.wait_for_selector(f"{card}[data-explained]")


def test_a_service_that_does_not_answer_at_first_is_asked_again_without_a_reload(
    browser: Browser, service: ServiceProcess
) -> None:
    """/models answers 503 twice (a service still starting): the page says so, asks again by itself, and the
    model list appears with the message gone."""
    context = browser.new_context()
    page = context.new_page()
    refused: list[str] = []

    def starting(route: Any) -> None:
        if len(refused) < 2:
            refused.append(route.request.url)
            route.fulfill(status=503, content_type="application/json", body='{"error": "the service is starting"}')
        else:
            route.continue_()

    try:
        page.route("**/models", starting)
        page.goto(f"{service.url}/")
        page.wait_for_selector("#model-select:not([disabled])", timeout=30_000)
        assert len(refused) == 2 and page.is_hidden("#models-error")
    finally:
        context.close()


def test_a_token_entered_while_the_models_are_asked_again_starts_no_second_loop(
    browser: Browser, service: ServiceProcess
) -> None:
    """/models keeps answering 503; a token entered three times meanwhile asks at once each time, and then one
    reload stays pending (backed off to 8 s), not one per entry asking every second or two."""
    context = browser.new_context()
    page = context.new_page()
    asked: list[float] = []

    def down(route: Any) -> None:
        asked.append(time.monotonic())
        route.fulfill(status=503, content_type="application/json", body='{"error": "the service is starting"}')

    # the three entries in the task after the one that showed the first 503 (the page's own retry is a second
    # away: entered from the test, a round trip each, they could come after it under load)
    page.add_init_script("""
        window.addEventListener("DOMContentLoaded", () => {
          const error = document.getElementById("models-error");
          new MutationObserver((_, observer) => {
            if (error.hidden) return;
            observer.disconnect();
            for (let i = 0; i < 3; i++) {
              document.getElementById("token-input").value = "secret";
              document.getElementById("token-form").requestSubmit();
            }
          }).observe(error, {attributes: true, attributeFilter: ["hidden"]});
        });
    """)
    try:
        page.route("**/models", down)
        page.goto(f"{service.url}/")
        page.wait_for_selector("#models-error:not([hidden])")
        deadline = time.monotonic() + 10
        while len(asked) < 4 and time.monotonic() < deadline:  # the three entries' own requests
            page.wait_for_timeout(50)
        entered = len(asked)
        page.wait_for_timeout(2500)  # one loop waits 8 s now; the four of before asked at 1, 2 and 4 s
        assert entered >= 4 and len(asked) == entered, [round(t - asked[0], 1) for t in asked]
    finally:
        context.close()


def test_what_each_layer_of_lenet5_sees_is_drawn_under_the_canvas(
    tab: Tab, service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tab.page.select_option("#model-select", "lenet5")
    tab.page.wait_for_selector("#draw-panel:not([hidden])")
    assert tab.page.is_hidden("#layers")
    draw_a_one(tab.page)
    tab.page.wait_for_selector("#layers:not([hidden])")
    explained = [r for r in tab.requests if "/explain?" in r.url]
    assert explained and explained[-1].url.endswith("/explain?model=lenet5&version=1&layers=true&top_k=1")
    counts = {name: len(tab.page.query_selector_all(f"#layers [data-layer={name}] canvas"))
              for name in ("C1", "S2", "C3", "S4")}  # fmt: skip
    assert counts == {"C1": 6, "S2": 6, "C3": 16, "S4": 16}
    # the first C3 map, pixel for pixel: the layer's activations for this drawing, scaled to its range
    body = httpx.post(f"{service.url}/explain?model=lenet5&layers=true&top_k=1", content=canvas_png(tab.page),
                      headers={"Content-Type": "image/png"}, timeout=60).json()  # fmt: skip
    c3 = np.array(body["results"][0]["layers"]["C3"])
    assert c3.shape == (16, 10, 10)
    expected = np.floor(255 * (c3[0] - c3.min()) / (c3.max() - c3.min()) + 0.5)  # JavaScript's Math.round
    shown: list[int] = tab.page.evaluate(
        "() => { const c = document.querySelector('#layers [data-layer=C3] canvas');"
        " return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"
    )
    assert np.array(shown).reshape(10, 10, 4)[..., 0].tolist() == expected.astype(int).tolist()
    screenshot = tmp_path_factory.mktemp("layers-page") / "layers.png"
    tab.page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    tab.page.click("#clear-canvas")
    assert tab.page.is_hidden("#layers")
    assert tab.outside_origin() == [] and tab.console_errors == []


def test_dropped_and_pasted_images_are_classified(tab: Tab, service: ServiceProcess) -> None:
    images = {"drop-a.png": encode(data.coffee()), "drop-b.jpg": encode(data.astronaut(), "JPEG"),
              "pasted.png": encode(data.rocket())}  # fmt: skip
    transfer = """([names, contents]) => {
        const transfer = new DataTransfer();
        names.forEach((name, i) => transfer.items.add(new File([new Uint8Array(contents[i])], name)));
        return transfer;
    }"""

    def files(*names: str) -> Any:
        return tab.page.evaluate_handle(transfer, [list(names), [list(images[n]) for n in names]])

    tab.page.dispatch_event("#dropzone", "drop", {"dataTransfer": files("drop-a.png", "drop-b.jpg")})
    pasted = files("pasted.png")
    tab.page.evaluate("(data) => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data}))", pasted)
    tab.page.wait_for_function("() => document.querySelectorAll('.result[data-status=done]').length === 3")

    for name, body in images.items():
        expected = classified(service, body, "resnet18")
        assert shown_predictions(tab.page, f".result[data-name='{name}']") == expected["results"][0]["predictions"]
    assert tab.outside_origin() == []


def test_a_file_that_is_no_image_shows_the_services_message(tab: Tab, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    tab.page.set_input_files("#file-input", str(text))
    tab.page.wait_for_selector(".result[data-status=error]")
    assert "Cannot decode the image" in tab.page.inner_text(".result .meta")


def test_docs_are_served_locally(browser: Browser, service: ServiceProcess) -> None:
    tab = open_tab(browser, service.url, "/docs")
    tab.page.wait_for_selector("text=Classify one or more images")
    assert tab.page.get_by_text("/v2/models/{name}/infer", exact=True).is_visible()
    assert tab.outside_origin() == []
    assert tab.console_errors == []
    tab.page.context.close()


def test_fastapis_cdn_pages_are_gone(service: ServiceProcess) -> None:
    assert httpx.get(f"{service.url}/redoc").status_code == 404
    page = httpx.get(f"{service.url}/").text
    assert "googletagmanager" not in page and "cdn" not in page.lower()


def test_static_files_stay_inside_their_folders(service: ServiceProcess) -> None:
    assert httpx.get(f"{service.url}/page/page.js").status_code == 200
    for escape in ("/page/%2e%2e/__init__.py", "/page/%2e%2e/%2e%2e/settings.py", "/page/..%2f__init__.py",
                   "/docs/assets/%2e%2e/http_app.py", "/page/"):  # fmt: skip
        response = httpx.get(f"{service.url}{escape}")
        assert response.status_code == 404 and "import" not in response.text, escape


@pytest.fixture(scope="module")
def token_service(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("logs") / "token-service.log"
    with running(Path(model_store.root), log, MODELS="lenet5", API_TOKEN="page-secret") as process:
        yield process


def test_with_a_token_the_page_asks_for_it_and_keeps_it_for_the_session(
    browser: Browser, token_service: ServiceProcess
) -> None:
    tab = open_tab(browser, token_service.url)
    page, requests = tab.page, tab.requests
    page.wait_for_selector("#token-panel:not([hidden])")

    page.fill("#token-input", "wrong")
    page.click("#token-form button")
    page.wait_for_selector("#token-error:not([hidden])")
    assert "refused" in page.inner_text("#token-error")

    page.fill("#token-input", "page-secret")
    page.click("#token-form button")
    page.wait_for_selector("#model-select:not([disabled])")
    assert page.is_hidden("#token-panel")
    draw_a_one(page)
    assert page.inner_text("#draw-digit") == "1"
    assert requests[-1].headers["authorization"] == "Bearer page-secret"
    assert 'Bearer $API_TOKEN"' in page.inner_text("#curl")  # a placeholder, never the token itself

    assert page.evaluate("sessionStorage.getItem('cnn-serving-token')") == "page-secret"
    assert page.evaluate("localStorage.length") == 0
    assert all("page-secret" not in r.url for r in requests)
    assert "page-secret" not in page.content()
    assert tab.outside_origin() == []
    tab.page.context.close()
