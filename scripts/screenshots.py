"""Screenshots of the app's main screens in English and Korean, for docs/app.md.

Drives the same setup as tests/app/test_ui.py (two real nodes, two ``haven app`` daemons, the
system's headless chromium) and writes small PNGs to ``docs/img/`` (900x600, and one narrow
380x700 per language), at device scale 1 so each stays well under 150 KB:

    .venv/bin/python scripts/screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.app.browser import UiPage, launch, open_ui, two_people  # noqa: E402
from tests.app.daemon import DaemonProc  # noqa: E402
from tests.integration.forkcli import invite  # noqa: E402

W, H = 900, 600
LIMIT = 150_000


def shot(ui: UiPage, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    ui.page.screenshot(path=str(path), type="png")
    size = path.stat().st_size
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"{shown}: {size} bytes", file=sys.stderr)
    if size > LIMIT:
        raise SystemExit(f"{path} is {size} bytes (> {LIMIT})")
    return path


def picture(path: Path) -> Path:
    """A small flat drawing (a sun over hills) that stays small in a PNG screenshot."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (200, 120), (187, 222, 251))
    d = ImageDraw.Draw(img)
    d.ellipse((135, 14, 175, 54), fill=(255, 202, 40))
    d.polygon([(0, 120), (0, 76), (58, 48), (125, 88), (200, 64), (200, 120)], fill=(102, 187, 106))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path


def conversation(
    alice: UiPage, bob: UiPage, alice_addr: str, bob_addr: str, tmp: Path | None = None
) -> None:
    """A short exchange in both languages, with a timer, a verified contact and a photo."""
    alice.start_chat(bob_addr)
    alice.type_and_send("Hi Minsu! Did you get home all right?")
    bob.wait_badge(alice_addr, "1")
    bob.open_chat(alice_addr)
    bob.type_and_send("네, 잘 도착했어요. 고마워요! 😊")
    alice.wait_js("() => document.querySelectorAll('[data-testid=message]').length === 2")
    alice.type_and_send("Great. Lunch on Friday?")
    bob.wait_js("() => document.querySelectorAll('[data-testid=message]').length === 3")
    bob.type_and_send("좋아요, 금요일 12시에 만나요.")
    if tmp is not None:  # a photo from alice: a preview on both sides
        alice.wait_js("() => document.querySelectorAll('[data-testid=message]').length === 4")
        alice.page.set_input_files("[data-testid=attach-input]", str(picture(tmp / "hills.png")))
        for ui in (alice, bob):
            ui.wait_js(
                "() => { const i = document.querySelector('[data-testid=file-preview]');"
                " return i && i.complete && i.naturalWidth > 0; }"
            )
        bob.wait_js(
            "() => document.querySelector('[data-testid=file]')?.dataset.downloaded === 'yes'"
        )
    alice.wait_js(
        "() => [...document.querySelectorAll('[data-testid=message].out')]"
        ".every(e => e.dataset.status === 'read')"
    )
    bob.wait_js(
        "() => [...document.querySelectorAll('[data-testid=message].out')]"
        ".every(e => e.dataset.status === 'read')"
    )


def group(alice: UiPage, bob: UiPage, bob_addr: str, carol_addr: str) -> None:
    """A group of three made in alice's page: a message each from alice and bob, read by bob
    (carol has not read: every message still shows "1")."""
    alice.page.click("[data-testid=nav-chats]")
    alice.page.click("[data-testid=group-new]")
    alice.page.fill("[data-testid=group-create-name]", "Friday lunch · 금요일 점심")
    alice.page.check(f'[data-testid=group-create-contact][data-address="{bob_addr}"]')
    alice.page.fill("[data-testid=group-create-addresses]", carol_addr)
    alice.page.click("[data-testid=group-create-submit]")
    alice.page.wait_for_selector("[data-testid=group-history-note]", timeout=60_000)
    alice.type_and_send("Lunch on Friday at noon? The noodle place again?")
    bob.page.click("[data-testid=nav-chats]")
    item = '[data-testid=chat-item][data-kind="group"]'
    bob.page.wait_for_selector(item, timeout=60_000)
    bob.page.click(item)
    bob.wait_js("() => document.querySelectorAll('[data-testid=message]').length === 1", timeout=60)
    bob.type_and_send("좋아요! 12시에 봐요.")
    for ui in (alice, bob):
        ui.wait_js(
            "() => [...document.querySelectorAll('[data-testid=message]')]"
            ".map(e => e.dataset.unread).join() === '1,1'",
            timeout=60,
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="haven-shots-") as tmp:
        # the daemons save received files under ~/Downloads/Haven: keep that in the temp dir
        os.environ["HOME"] = tmp
        return shoot(Path(tmp), out)


def shoot(tmp_path: Path, out: Path) -> int:
    """Every screenshot, with the nodes and daemons under ``tmp_path``."""
    tmp = str(tmp_path)
    with (
        two_people(Path(tmp), "Alice", "김민수") as w,
        sync_playwright() as p,
    ):
        browser = launch(p)
        alice = open_ui(browser, w.alice.url, locale="en-US", width=W, height=H)
        bob = open_ui(browser, w.bob.url, locale="ko-KR", width=W, height=H)
        alice.wait_connection("online")
        bob.wait_connection("online")
        conversation(alice, bob, w.alice_addr, w.bob_addr, Path(tmp))
        for ui, lang in ((alice, "en"), (bob, "ko")):
            ui.page.focus("[data-testid=composer]")
            shot(ui, out, f"chat-{lang}")
            ui.page.click("[data-testid=verify-open]")
            ui.page.wait_for_selector("[data-testid=safety-number] .group")
            shot(ui, out, f"verify-{lang}")
            ui.page.click("[data-testid=nav-settings]")
            ui.page.wait_for_selector("[data-testid=profile-name]")
            shot(ui, out, f"settings-{lang}")
            ui.page.set_viewport_size({"width": 380, "height": 700})
            ui.page.click("[data-testid=nav-chats]")
            ui.page.wait_for_selector("[data-testid=chat-list]", state="visible")
            peer = w.bob_addr if lang == "en" else w.alice_addr
            ui.open_chat(peer)
            shot(ui, out, f"narrow-{lang}")
            ui.page.set_viewport_size({"width": W, "height": H})
        # a group with a third person (carol, on alice's node) who has not read yet
        carol = DaemonProc(Path(tmp) / "dev-carol").start()
        try:
            carol.join(invite(w.a, "carol"), "Carol")
            alice.page.click("[data-testid=nav-chats]")
            group(alice, bob, w.bob_addr, carol.address)
            for ui, lang in ((alice, "en"), (bob, "ko")):
                ui.page.focus("[data-testid=composer]")
                shot(ui, out, f"group-{lang}")
        finally:
            carol.kill()
        # onboarding: a daemon on an empty device home
        new = DaemonProc(Path(tmp) / "dev-new").start()
        try:
            for locale, lang in (("en-US", "en"), ("ko-KR", "ko")):
                ui = open_ui(browser, new.url, locale=locale, width=W, height=H)
                ui.page.wait_for_selector("[data-testid=join-code]")
                ui.page.fill("[data-testid=join-name]", "김민수" if lang == "ko" else "Alice")
                ui.page.focus("[data-testid=join-code]")
                shot(ui, out, f"onboarding-{lang}")
                ui.page.context.close()
        finally:
            new.kill()
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
