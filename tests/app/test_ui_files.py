"""Attachments in the web UI: two nodes, two ``haven app`` daemons, two headless chromium
contexts. alice attaches an image and an HTML file in her page; bob's page shows the image's
thumbnail, then (after the download button) the full image, both from ``blob:`` URLs; the HTML
file arrives as a download entry and is never rendered. The file answers of the local API carry
``Content-Disposition: attachment``, ``nosniff`` and a sandboxing CSP.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, sync_playwright

from client.attachments import safe_name
from tests.integration.forkcli import create_node, invite
from tests.integration.harness import NodeProc

from .browser import UiPage, catalog, launch, open_ui
from .daemon import DaemonProc, EventSocket, wait_message

EN = catalog("en")
FILE_CSP = "sandbox; default-src 'none'"
HOSTILE_HTML_NAME = "<img src=x onerror=window.__pwned=1>.html"
HOSTILE_HTML = b"<html><body><script>window.top.__pwned=2</script><h1>hi</h1></body></html>"


@dataclass
class World:
    alice_d: DaemonProc
    bob_d: DaemonProc
    alice_addr: str
    bob_addr: str
    browser: Browser
    alice: UiPage
    bob: UiPage
    tmp: Path
    bob_saves: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("uifiles")
    procs: list[NodeProc | DaemonProc] = []
    bob_saves = tmp / "bob-saves"
    try:
        a = create_node(tmp, "A").start()
        procs.append(a)
        b = create_node(tmp, "B").start()
        procs.append(b)
        saves = ["--save-dir", str(tmp / "alice-saves")]
        alice_d = DaemonProc(tmp / "dev-alice", args=saves).start()
        procs.append(alice_d)
        # bob downloads files up to 20 kB at once: the image waits for his download button
        bob_args = ["--save-dir", str(bob_saves), "--auto-download", "0.02"]
        bob_d = DaemonProc(tmp / "dev-bob", args=bob_args).start()
        procs.append(bob_d)
        alice_d.join(invite(a, "alice"), "Alice")
        bob_d.join(invite(b, "bob"), "Bob")
        alice_d.open_chat(bob_d.address)
        bob_d.open_chat(alice_d.address)
        with sync_playwright() as p:
            browser = launch(p)
            alice = open_ui(browser, alice_d.url, locale="en-US")
            bob = open_ui(browser, bob_d.url, locale="en-US")
            yield World(
                alice_d, bob_d, alice_d.address, bob_d.address, browser, alice, bob, tmp, bob_saves
            )
            browser.close()
    finally:
        for proc in reversed(procs):
            proc.kill()


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels (so it does not compress: well above bob's auto-download)."""
    img = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


class Events:
    """Collect one daemon's events in a thread until ``pred`` matches one (or 60 s pass)."""

    def __init__(self, d: DaemonProc, pred: Any) -> None:
        self.d, self.pred = d, pred
        self.ready = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "event socket did not open"

    def _run(self) -> None:
        async def go() -> None:
            async with EventSocket(self.d) as ws:
                self.ready.set()
                try:
                    await ws.next(self.pred, timeout=60)
                finally:
                    self.events = list(ws.events)

        try:
            asyncio.run(go())
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
            self.ready.set()

    def join(self) -> list[dict[str, Any]]:
        self.thread.join(90)
        assert not self.thread.is_alive(), "no matching event"
        assert self.error is None, repr(self.error)
        return self.events


def file_el(ui: UiPage, msg_id: str) -> str:
    return f'[data-testid=message][data-id="{msg_id}"] [data-testid=file]'


def wait_file_message(d: DaemonProc, address: str, name: str) -> dict[str, Any]:
    return wait_message(
        d,
        address,
        lambda m: m.get("kind") == "file" and m["file"]["name"] == name,
        timeout=60,
        what=f"the file {name}",
    )


def preview_state(ui: UiPage, msg_id: str) -> Any:
    return ui.page.evaluate(
        """(sel) => { const i = document.querySelector(sel + ' [data-testid=file-preview]');
            return i ? {src: i.src, w: i.naturalWidth, complete: i.complete} : null; }""",
        file_el(ui, msg_id),
    )


def test_image_attached_in_one_ui_shows_as_preview_in_the_other(world: World) -> None:
    alice, bob = world.alice, world.bob
    png = noise_png(400, 300)
    path = world.tmp / "photo.png"
    path.write_bytes(png)
    alice.start_chat(world.bob_addr)
    # the daemon reports the upload's progress while it runs (to the end) on its event feed
    ev = Events(
        world.alice_d,
        lambda e: (
            e["type"] == "progress" and e.get("phase") == "upload" and e["done"] == e["total"]
        ),
    )
    alice.page.set_input_files("[data-testid=attach-input]", str(path))
    events = ev.join()
    ups = [e for e in events if e["type"] == "progress" and e.get("phase") == "upload"]
    assert ups and ups[-1]["total"] >= len(png) and ups[-1]["upload"], ups[-1:]
    assert all(e["chat"] == world.bob_addr for e in ups)

    sent = wait_file_message(world.alice_d, world.bob_addr, "photo.png")
    assert sent["outgoing"] and sent["file"]["mime"] == "image/png"
    assert sent["file"]["size"] == len(png) and sent["file"]["thumb"] is True
    alice.page.wait_for_selector(file_el(alice, sent["id"]))

    got = wait_file_message(world.bob_d, world.alice_addr, "photo.png")
    assert got["file"]["downloaded"] is False and got["file"]["state"] == "pending"  # > 20 kB
    bob.open_chat(world.alice_addr)
    # the sender's thumbnail first: a blob: URL that decoded (longest edge 320 px)
    bob.wait_js(
        """(sel) => { const i = document.querySelector(sel + ' [data-testid=file-preview]');
            return i && i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0; }""",
        file_el(bob, got["id"]),
    )
    thumb = preview_state(bob, got["id"])
    assert thumb["src"].startswith("blob:") and 0 < thumb["w"] <= 320, thumb
    assert (
        bob.page.text_content(file_el(bob, got["id"]) + " [data-testid=file-name]") == "photo.png"
    )
    # then the download button: the full image (400 px wide), saved in bob's save folder
    bob.page.click(file_el(bob, got["id"]) + " [data-testid=file-download]")
    bob.wait_js(
        """(sel) => { const f = document.querySelector(sel);
            const i = f && f.querySelector('[data-testid=file-preview]');
            return f && f.dataset.downloaded === 'yes' && i && i.src.startsWith('blob:')
                && i.complete && i.naturalWidth === 400; }""",
        file_el(bob, got["id"]),
        timeout=60,
    )
    assert (world.bob_saves / "photo.png").read_bytes() == png
    assert bob.page.is_visible(file_el(bob, got["id"]) + " [data-testid=file-save]")

    # the file's answer on the local API: attachment, nosniff, sandbox CSP; the image type kept
    status, headers, body = world.bob_d.request(
        "GET", f"/api/messages/{got['id']}/file", headers={"X-Haven-Key": world.bob_d.secret}
    )
    assert status == 200 and body == png
    assert headers["content-type"] == "image/png"
    assert headers["content-disposition"].startswith("attachment;")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-security-policy"] == FILE_CSP
    status, headers, body = world.bob_d.request(
        "GET", f"/api/messages/{got['id']}/thumb", headers={"X-Haven-Key": world.bob_d.secret}
    )
    assert status == 200 and body[:3] == b"\xff\xd8\xff" and len(body) <= 16 * 1024
    assert headers["content-security-policy"] == FILE_CSP
    assert headers["content-disposition"].startswith("attachment;")
    # without the key: nothing
    status, _, body = world.bob_d.request("GET", f"/api/messages/{got['id']}/file")
    assert status == 401 and png[:100] not in body
    assert bob.errors == [] and alice.errors == []


def test_html_file_arrives_as_a_download_and_is_never_rendered(world: World) -> None:
    alice, bob = world.alice, world.bob
    bob.open_chat(world.alice_addr)
    alice.open_chat(world.bob_addr)  # the attach input sends to the open chat
    alice.page.set_input_files(
        "[data-testid=attach-input]",
        files=[{"name": HOSTILE_HTML_NAME, "mimeType": "text/html", "buffer": HOSTILE_HTML}],
    )
    shown = safe_name(HOSTILE_HTML_NAME)
    assert wait_file_message(world.alice_d, world.bob_addr, shown)["outgoing"]  # sent, first
    got = wait_file_message(world.bob_d, world.alice_addr, shown)
    assert got["file"]["mime"] == "text/html" and got["file"]["preview"] is False
    sel = file_el(bob, got["id"])
    # small: downloaded at once into bob's save folder, shown as an entry with a save button
    bob.page.wait_for_selector(
        sel + '[data-downloaded="yes"] [data-testid=file-save]', timeout=60000
    )
    assert bob.page.text_content(sel + " [data-testid=file-name]") == shown  # as text
    assert bob.page.locator(sel + " [data-testid=file-preview]").count() == 0
    frames = bob.page.evaluate(
        "() => document.querySelectorAll('iframe, object, embed, frame').length"
    )
    assert frames == 0 and len(bob.page.frames) == 1
    assert bob.page.evaluate("() => window.__pwned") is None
    assert alice.page.evaluate("() => window.__pwned") is None
    assert bob.page.locator("img[src='x']").count() == 0
    assert bob.dialogs == [] and bob.errors == [] and alice.errors == []
    saved = list(world.bob_saves.iterdir())
    assert [p.read_bytes() for p in saved if p.name == shown] == [HOSTILE_HTML]

    # served as opaque bytes: never text/html, always attachment + nosniff + sandbox CSP
    status, headers, body = world.bob_d.request(
        "GET", f"/api/messages/{got['id']}/file", headers={"X-Haven-Key": world.bob_d.secret}
    )
    assert status == 200 and body == HOSTILE_HTML
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith("attachment;")
    assert "<" not in headers["content-disposition"].split("filename*=")[0]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-security-policy"] == FILE_CSP
    # an HTML file has no thumbnail, and nothing of it is offered as one
    status, _, _ = world.bob_d.request(
        "GET", f"/api/messages/{got['id']}/thumb", headers={"X-Haven-Key": world.bob_d.secret}
    )
    assert status == 404


def test_a_file_gone_from_the_nodes_says_why_it_is_unavailable(world: World) -> None:
    """After bob's download the nodes deleted the blob (his device was its only recipient).
    With his saved copy removed, the download button tries again and the message explains."""
    bob = world.bob
    got = wait_file_message(world.bob_d, world.alice_addr, "photo.png")
    assert got["file"]["downloaded"] is True
    (world.bob_saves / "photo.png").unlink()
    bob.page.reload()
    bob.wait_connection("online")
    bob.open_chat(world.alice_addr)
    sel = file_el(bob, got["id"])
    bob.page.click(sel + '[data-downloaded="no"] [data-testid=file-download]')
    note = bob.page.wait_for_selector(sel + " [data-testid=file-unavailable]", timeout=60000)
    assert note.text_content() == EN["file.unavailable"]
    assert bob.page.get_attribute(sel, "data-state") == "failed"
    assert bob.page.locator(sel + " [data-testid=file-download]").count() == 0
    # the thumbnail (inside the message itself) still shows
    bob.wait_js(
        """(sel) => { const i = document.querySelector(sel + ' [data-testid=file-preview]');
            return i && i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0; }""",
        sel,
    )
    status, obj = world.bob_d.api("POST", f"/api/messages/{got['id']}/download", {}, expect=None)
    assert status == 404 and obj["error"] == "not_found"
    assert not (world.bob_saves / "photo.png").exists()


def test_a_stale_upload_copy_is_removed_at_start(tmp_path: Path) -> None:
    """A daemon killed mid-upload leaves the page's temporary copy; the next start removes it."""
    from client.app.core import AppCore

    folder = tmp_path / "dev" / "app-uploads"
    folder.mkdir(parents=True)
    (folder / "up-stale").write_bytes(b"plaintext of an interrupted upload")

    async def start_and_close() -> AppCore:
        core = AppCore(str(tmp_path / "dev"), save_dir=str(tmp_path / "saves"))
        await core.start()  # an empty home: no device yet, but the leftovers go
        await core.close()
        return core

    # in a thread of its own: the module's Playwright (sync API) owns this thread's loop
    cores: list[AppCore] = []
    t = threading.Thread(target=lambda: cores.append(asyncio.run(start_and_close())))
    t.start()
    t.join(60)
    assert len(cores) == 1
    core = cores[0]
    assert list(folder.iterdir()) == []
    assert core.save_dir == str(tmp_path / "saves")
