"""Playwright helpers for the UI tests, the screenshots and the ``ui_latency`` benchmark.

Always the system's headless chromium (``/usr/bin/chromium``; never a downloaded build), one
browser context per person (its own sessionStorage, locale and viewport). A :class:`UiPage`
records page errors and JavaScript dialogs, so a test can assert that hostile content ran
nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Playwright

from tests.integration.forkcli import create_node, invite
from tests.integration.harness import NodeProc

from .daemon import DaemonProc

CHROMIUM = "/usr/bin/chromium"
STATIC = Path(__file__).resolve().parents[2] / "client" / "app" / "static"


def launch(p: Playwright) -> Browser:
    """Headless system chromium."""
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


def catalog(lang: str) -> dict[str, str]:
    """The UI's message catalog for ``lang`` (en or ko)."""
    data: dict[str, str] = json.loads((STATIC / "i18n" / f"{lang}.json").read_text("utf-8"))
    return data


@dataclass
class UiPage:
    """One person's browser tab on a daemon's UI."""

    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)  # Content-Security-Policy violations

    # ---- waiting -------------------------------------------------------------------------------

    def wait_connection(self, *states: str, timeout: float = 30) -> str:
        """Wait until the connection indicator shows one of ``states``; returns it."""
        sel = ", ".join(f'[data-testid=connection-state][data-state="{s}"]' for s in states)
        self.page.wait_for_selector(sel, timeout=timeout * 1000)
        return str(self.page.get_attribute("[data-testid=connection-state]", "data-state"))

    def wait_js(self, expression: str, arg: Any = None, timeout: float = 30) -> Any:
        """Poll a JavaScript predicate (a function source) until it is truthy."""
        return self.page.wait_for_function(expression, arg=arg, timeout=timeout * 1000).json_value()

    # ---- reading -------------------------------------------------------------------------------

    def messages(self) -> list[dict[str, Any]]:
        """The message elements of the open conversation: id, status, text, direction."""
        result: list[dict[str, Any]] = self.page.eval_on_selector_all(
            "[data-testid=message]",
            """els => els.map(e => ({
                id: e.dataset.id, status: e.dataset.status ?? null,
                outgoing: e.classList.contains('out'),
                text: e.querySelector('[data-testid=message-text]')?.textContent ?? ''}))""",
        )
        return result

    def badge(self, address: str) -> str | None:
        """The unread badge text of the chat item for ``address`` (None when there is none)."""
        loc = self.page.locator(
            f'[data-testid=chat-item][data-address="{address}"] [data-testid=unread-badge]'
        )
        return loc.text_content() if loc.count() else None

    def wait_badge(self, address: str, text: str | None, timeout: float = 30) -> None:
        """Wait until the unread badge of ``address`` reads ``text`` (None: no badge)."""
        self.wait_js(
            """([a, t]) => {
                const b = document.querySelector(
                    `[data-testid=chat-item][data-address="${a}"] [data-testid=unread-badge]`);
                const item = document.querySelector(`[data-testid=chat-item][data-address="${a}"]`);
                return t === null ? Boolean(item) && !b : b?.textContent === t; }""",
            [address, text],
            timeout,
        )

    # ---- acting ------------------------------------------------------------------------------

    def open_chat(self, address: str) -> None:
        self.page.click(f'[data-testid=chat-item][data-address="{address}"]')
        self.page.wait_for_selector("[data-testid=composer]")

    def start_chat(self, address: str) -> None:
        """Start (or open) a chat through the new-chat form."""
        self.page.fill("[data-testid=new-chat-address]", address)
        self.page.click("[data-testid=new-chat-submit]")
        self.page.wait_for_selector(f'[data-testid=chat-item][data-address="{address}"]')
        self.page.wait_for_selector("[data-testid=composer]")

    def type_and_send(self, text: str, enter: bool = False) -> None:
        """Type ``text`` in the composer; send with Enter or the send button."""
        self.page.fill("[data-testid=composer]", text)
        if enter:
            self.page.press("[data-testid=composer]", "Enter")
        else:
            self.page.click("[data-testid=send]")


def open_ui(
    browser: Browser,
    url: str,
    *,
    locale: str = "en-US",
    width: int = 1000,
    height: int = 700,
    init_script: str | None = None,
) -> UiPage:
    """A new context (locale, viewport at scale 1) with one page on the daemon's URL."""
    ctx = browser.new_context(
        locale=locale,
        viewport={"width": width, "height": height},
        device_scale_factor=1,
        extra_http_headers={"Accept-Language": locale},
    )
    if init_script:
        ctx.add_init_script(init_script)
    page = ctx.new_page()
    ui = UiPage(page)
    page.on("pageerror", lambda exc: ui.errors.append(str(exc)))

    def on_dialog(d: Dialog) -> None:
        ui.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)

    def on_console(msg: ConsoleMessage) -> None:
        if "Content Security Policy" in msg.text:
            ui.csp.append(msg.text)

    page.on("console", on_console)
    page.goto(url)
    page.wait_for_selector("[data-testid=connection-state]")
    return ui


@dataclass
class People:
    """Two nodes and two joined daemons: alice on node ``a``, bob on node ``b``."""

    a: NodeProc
    b: NodeProc
    alice: DaemonProc
    bob: DaemonProc
    alice_addr: str
    bob_addr: str


@contextmanager
def two_people(tmp: Path, alice_name: str = "Alice", bob_name: str = "김민수") -> Iterator[People]:
    """Start two federating nodes and two ``haven app`` daemons onboarded through the API;
    everything is killed on exit."""
    procs: list[NodeProc | DaemonProc] = []
    try:
        a = create_node(tmp, "A").start()
        procs.append(a)
        b = create_node(tmp, "B").start()
        procs.append(b)
        alice = DaemonProc(tmp / "dev-alice").start()
        procs.append(alice)
        bob = DaemonProc(tmp / "dev-bob").start()
        procs.append(bob)
        alice.join(invite(a, "alice"), alice_name)
        bob.join(invite(b, "bob"), bob_name)
        yield People(a, b, alice, bob, alice.address, bob.address)
    finally:
        for proc in reversed(procs):
            proc.kill()
