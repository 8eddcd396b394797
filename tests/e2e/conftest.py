"""Chromium for the end-to-end tests: one browser per session, a fresh page per test.

Debian's Chromium is used as is (``playwright install`` cannot download browsers here).  In CI
(``CI=true``) a missing or broken Chromium fails the tests instead of skipping them, so a green
CI run always means the browser tests ran.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from components import unavailable

CHROMIUM = os.environ.get("TOKENWIRE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]

# Installed before any page script runs: Playwright's "pageerror" covers uncaught exceptions,
# this makes unhandled promise rejections explicit whatever the browser reports.
RECORD_REJECTIONS = """
window.__rejections = [];
window.addEventListener("unhandledrejection", (event) => {
  window.__rejections.push(String(event.reason && event.reason.stack || event.reason));
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install -e '.[test]'", "browser")
    if not os.path.exists(CHROMIUM):
        unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium, or set TOKENWIRE_CHROMIUM", "browser")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as exc:
            unavailable(f"Chromium at {CHROMIUM} did not start: {exc}", "browser")
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageErrors:
    """Everything that went wrong inside the page; a test may allow messages it provokes."""

    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
def page(browser, page_errors: PageErrors) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 900, "height": 700})
    context.set_default_timeout(5_000)
    context.add_init_script(RECORD_REJECTIONS)
    page = context.new_page()
    page.on("pageerror", lambda exc: page_errors.errors.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda msg: page_errors.errors.append(f"console.{msg.type}: {msg.text}")
        if msg.type in ("error", "assert")
        else None,
    )
    try:
        yield page
        if not page.is_closed():
            # Let a rejection from the test's last action surface before reading the list.
            page.wait_for_timeout(50)
            for reason in page.evaluate("window.__rejections || []"):
                page_errors.errors.append(f"unhandledrejection: {reason}")
    finally:
        context.close()
    assert page_errors.unexpected() == [], "errors inside the page"
