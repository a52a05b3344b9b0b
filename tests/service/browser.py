"""What the browser tests share: Debian's Chromium, a tab that records what it requested and logged, and a hand
that draws on the page's canvas."""

from __future__ import annotations

from dataclasses import dataclass, field

from playwright.sync_api import Browser, Page, Request

CHROMIUM = "/usr/bin/chromium"  # Debian's package (make test-tools); Playwright's own download needs the internet


@dataclass
class Tab:
    """A page with everything it requested and every console error it logged."""

    page: Page
    origin: str
    requests: list[Request] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def outside_origin(self) -> list[str]:
        return [r.url for r in self.requests if not r.url.startswith((self.origin + "/", "blob:", "data:"))]

    def classify_requests(self) -> list[Request]:
        return [r for r in self.requests if r.url.startswith(f"{self.origin}/classify")]


def open_tab(browser: Browser, origin: str, path: str = "/") -> Tab:
    """A fresh browser context (its own session storage) on ``origin + path``, recording as it goes."""
    page = browser.new_context(viewport={"width": 1100, "height": 1300}).new_page()
    tab = Tab(page, origin)
    page.on("request", lambda request: tab.requests.append(request))
    page.on("console", lambda message: message.type == "error" and tab.console_errors.append(message.text))
    page.goto(f"{origin}{path}")
    return tab


def draw_a_one(page: Page) -> None:
    """A vertical stroke down the middle of the canvas, with the mouse; returns once its answer is shown."""
    box = page.locator("#canvas").bounding_box()
    assert box is not None
    x, top = box["x"] + box["width"] / 2, box["y"] + 50
    page.mouse.move(x, top)
    page.mouse.down()
    for step in range(1, 21):
        page.mouse.move(x, top + step * 9)
    page.mouse.up()
    page.wait_for_function("() => !drawing.busy && !drawing.again")
