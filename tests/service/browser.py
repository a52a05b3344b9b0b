"""What the browser tests share: Debian's Chromium, and a tab that records what it requested and logged."""

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
