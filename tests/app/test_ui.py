"""Browser tests of the web UI: two nodes, two ``haven app`` daemons, two headless chromium
contexts (alice in en-US, bob in ko-KR) driving the real UI.

One module-scoped world keeps the module near a minute; the tests run in file order and each
leaves the world usable for the next (stated where it matters).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.integration.forkcli import haven, invite
from tests.integration.harness import NodeProc, wait_until

from .browser import UiPage, catalog, launch, open_ui, two_people
from .daemon import DaemonProc

EN, KO = catalog("en"), catalog("ko")
HOSTILE_IMG = '<img src=x onerror="window.__pwned=1">'
HOSTILE_SCRIPT = "<script>window.__pwned=2</script>"
HOSTILE_NAME = "<script>window.__pwned=3</script><img src=x onerror=alert(4)>"  # ≤ 64


@dataclass
class World:
    a: NodeProc
    b: NodeProc
    alice_d: DaemonProc
    bob_d: DaemonProc
    alice_addr: str
    bob_addr: str
    browser: Browser
    alice: UiPage
    bob: UiPage
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("ui")
    with two_people(tmp, "Alice", "김민수") as w, sync_playwright() as p:
        browser = launch(p)
        alice = open_ui(browser, w.alice.url, locale="en-US")
        bob = open_ui(browser, w.bob.url, locale="ko-KR")
        yield World(w.a, w.b, w.alice, w.bob, w.alice_addr, w.bob_addr, browser, alice, bob, tmp)
        browser.close()


def test_secret_moves_out_of_the_address_bar(world: World) -> None:
    for ui, d in ((world.alice, world.alice_d), (world.bob, world.bob_d)):
        assert "#k=" not in ui.page.url and d.secret not in ui.page.url
        assert ui.page.evaluate("sessionStorage.getItem('haven.key')") == d.secret
        ui.wait_connection("online")
    # a reload keeps working from sessionStorage
    world.alice.page.reload()
    world.alice.wait_connection("online")
    # a tab without the key, or with a wrong one, says how to get the right link
    for url in (world.alice_d.base + "/", world.alice_d.base + "/#k=not-the-key"):
        ui = open_ui(world.browser, url, locale="en-US")
        ui.page.wait_for_selector(f'[data-testid=no-key]:text-is("{EN["error.unauthorized"]}")')
        assert not ui.page.is_visible("[data-testid=chat-list]")
        ui.page.context.close()


def test_live_message_ticks_and_unread_badge(world: World) -> None:
    alice, bob = world.alice, world.bob
    bob.page.evaluate("window.__noReload = 1")
    alice.start_chat(world.bob_addr)
    alice.type_and_send("hello bob", enter=True)
    # bob's list gets the new chat live, with one unread
    bob.wait_badge(world.alice_addr, "1")
    alice.type_and_send("second")
    alice.type_and_send("third, 안녕하세요")
    bob.wait_badge(world.alice_addr, "3")
    # alice's ticks: delivered (bob's device got them) but not read yet
    alice.wait_js(
        "() => { const m = [...document.querySelectorAll('[data-testid=message]')];"
        " return m.length === 3 && m.every(e => e.dataset.status === 'delivered'); }"
    )
    bob.open_chat(world.alice_addr)
    bob.wait_js("() => document.querySelectorAll('[data-testid=message]').length === 3")
    assert [m["text"] for m in bob.messages()] == ["hello bob", "second", "third, 안녕하세요"]
    assert all(m["status"] is None and not m["outgoing"] for m in bob.messages())
    bob.wait_badge(world.alice_addr, None)
    wait_until(
        lambda: [c["unread"] for c in world.bob_d.api("GET", "/api/chats")[1]] == [0],
        20,
        "bob's daemon to count the chat read",
    )
    # opening the chat sent read receipts
    alice.wait_js(
        "() => [...document.querySelectorAll('[data-testid=message]')]"
        ".every(e => e.dataset.status === 'read')"
    )
    # with the chat open, the next message appears in bob's conversation with no reload
    alice.type_and_send("live one")
    bob.wait_js("() => document.querySelectorAll('[data-testid=message]').length === 4")
    assert bob.messages()[-1]["text"] == "live one"
    assert bob.page.evaluate("window.__noReload") == 1
    assert bob.badge(world.alice_addr) is None
    ids = [m["id"] for m in alice.messages()]
    assert ids == [m["id"] for m in bob.messages()]
    assert alice.errors == [] and bob.errors == []


def test_korean_ui_text(world: World) -> None:
    bob, alice = world.bob, world.alice
    assert bob.page.evaluate("document.documentElement.lang") == "ko"
    assert bob.page.text_content("[data-testid=nav-chats]") == KO["nav.chats"]
    assert bob.page.text_content("[data-testid=send]") == KO["composer.send"]
    assert (
        bob.page.get_attribute("[data-testid=composer]", "placeholder")
        == KO["composer.placeholder"]
    )
    assert bob.page.text_content("[data-testid=connection-state]") == KO["connection.online"]
    assert alice.page.evaluate("document.documentElement.lang") == "en"
    assert alice.page.text_content("[data-testid=send]") == EN["composer.send"]
    # the switch changes the language at once, and back
    alice.page.select_option("[data-testid=lang-switch]", "ko")
    alice.page.wait_for_selector(f'[data-testid=send]:text-is("{KO["composer.send"]}")')
    assert alice.page.evaluate("document.documentElement.lang") == "ko"
    alice.page.select_option("[data-testid=lang-switch]", "en")
    alice.page.wait_for_selector(f'[data-testid=send]:text-is("{EN["composer.send"]}")')
    assert world.alice_d.state()["settings"]["language"] == "en"


def test_korean_glyphs_render(world: World) -> None:
    widths = world.bob.page.evaluate(
        """() => {
            const ctx = document.createElement('canvas').getContext('2d');
            ctx.font = getComputedStyle(document.body).font;
            const page = [ctx.measureText('한').width, ctx.measureText('\\u{10FFFD}').width];
            ctx.font = '16px "Noto Sans CJK KR"';
            return [...page, ctx.measureText('한').width];
        }"""
    )
    hangul, missing, noto = widths
    # with no Hangul font both are the same box; the page draws Hangul with Noto Sans CJK KR
    assert hangul != missing, widths
    assert hangul == noto, widths


def test_verify_screen_matches_on_both_sides(world: World) -> None:
    numbers = []
    for ui in (world.alice, world.bob):
        ui.page.click("[data-testid=verify-open]")
        ui.page.wait_for_selector("[data-testid=safety-number] .group")
        text = ui.page.text_content("[data-testid=safety-number]") or ""
        groups = text.split()
        assert len(groups) == 12 and all(len(g) == 5 and g.isdigit() for g in groups), text
        dark = ui.page.evaluate(
            """() => { const c = document.querySelector('[data-testid=verify-qr]');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 128) n++; return n; }"""
        )
        assert dark > 100  # the QR was drawn
        numbers.append(text)
        ui.page.click("[data-testid=back]")  # back to the chat (narrow button; always clickable)
        ui.page.wait_for_selector("[data-testid=composer]")
    assert numbers[0] == numbers[1]


def test_hostile_content_is_only_text(world: World) -> None:
    alice, bob = world.alice, world.bob
    alice.type_and_send(HOSTILE_IMG)
    alice.type_and_send(HOSTILE_SCRIPT)
    # a hostile display name too, set in alice's settings screen
    alice.page.click("[data-testid=nav-settings]")
    alice.page.fill("[data-testid=profile-name]", HOSTILE_NAME)
    alice.page.click("[data-testid=profile-save]")
    bob.wait_js(
        "t => [...document.querySelectorAll('[data-testid=message-text]')]"
        ".some(e => e.textContent === t)",
        HOSTILE_SCRIPT,
    )
    texts = [m["text"] for m in bob.messages()]
    assert texts[-2:] == [HOSTILE_IMG, HOSTILE_SCRIPT]
    bob.wait_js(
        "n => [...document.querySelectorAll('[data-testid=chat-item] .chat-name')]"
        ".some(e => e.textContent === n)",
        HOSTILE_NAME,
    )
    bob.wait_js(
        "n => document.querySelector('[data-testid=chat-title]')?.textContent === n",
        HOSTILE_NAME,
    )
    for ui in (alice, bob):
        assert ui.page.evaluate("typeof window.__pwned") == "undefined"
        assert ui.page.evaluate("document.querySelectorAll('#app img, #app script').length") == 0
        assert ui.dialogs == [] and ui.errors == []
    # and the page itself never needed anything the strict CSP forbids
    assert alice.csp == [] and bob.csp == []
    alice.page.click("[data-testid=nav-chats]")
    alice.open_chat(world.bob_addr)


def test_node_restart_mid_conversation(world: World) -> None:
    alice, bob = world.alice, world.bob
    before_a, before_b = len(alice.messages()), len(bob.messages())
    stop_together(world.a, world.b)
    assert alice.wait_connection("offline", "connecting") in ("offline", "connecting")
    assert bob.wait_connection("offline", "connecting") in ("offline", "connecting")
    alice.type_and_send("typed while the node was down (alice)")
    bob.type_and_send("노드가 꺼져 있을 때 쓴 메시지 (bob)", enter=True)
    alice.wait_js(
        "() => document.querySelector('[data-testid=message]:last-of-type')"
        "?.dataset.status === 'pending'"
    )
    bob.wait_js(
        "() => document.querySelector('[data-testid=message]:last-of-type')"
        "?.dataset.status === 'pending'"
    )
    a_id = alice.messages()[-1]["id"]
    b_id = bob.messages()[-1]["id"]
    world.a.start()
    world.b.start()
    alice.wait_connection("online", timeout=45)
    bob.wait_connection("online", timeout=45)
    # each side's outage message arrives once in the other's open conversation
    bob.wait_js(
        'id => document.querySelectorAll(`[data-testid=message][data-id="${id}"]`).length === 1',
        a_id,
        timeout=45,
    )
    alice.wait_js(
        'id => document.querySelectorAll(`[data-testid=message][data-id="${id}"]`).length === 1',
        b_id,
        timeout=45,
    )
    # and the senders see them delivered (or already read: both chats are open)
    for ui, mid in ((alice, a_id), (bob, b_id)):
        ui.wait_js(
            "id => ['delivered', 'read'].includes(document.querySelector("
            '`[data-testid=message][data-id="${id}"]`)?.dataset.status)',
            mid,
            timeout=45,
        )
    # exactly once: one element per id, and the API agrees with what the pages show
    wait_until(lambda: len(alice.messages()) == before_a + 2, 20, "alice's two new messages")
    wait_until(lambda: len(bob.messages()) == before_b + 2, 20, "bob's two new messages")
    for ui, d, peer in (
        (alice, world.alice_d, world.bob_addr),
        (bob, world.bob_d, world.alice_addr),
    ):
        shown = [m["id"] for m in ui.messages()]
        assert len(shown) == len(set(shown))
        assert sorted(shown) == sorted(m["id"] for m in d.messages(peer))
        assert [m["text"] for m in ui.messages()].count(
            "typed while the node was down (alice)"
        ) == 1
    assert alice.errors == [] and bob.errors == []


def test_edit_delete_timer_and_nickname_reach_the_other_side(world: World) -> None:
    alice, bob = world.alice, world.bob
    alice.type_and_send("to be edited")
    alice.type_and_send("to be deleted")
    bob.wait_js(
        "() => [...document.querySelectorAll('[data-testid=message-text]')]"
        ".some(e => e.textContent === 'to be deleted')"
    )
    edited_id, deleted_id = (m["id"] for m in alice.messages()[-2:])
    # edit: the dialog, then bob's copy changes in place and says "edited" (in Korean)
    alice.page.click(f'[data-testid=message][data-id="{edited_id}"] [data-testid=message-edit]')
    alice.page.fill("[data-testid=edit-text]", "edited text")
    alice.page.click("[data-testid=edit-save]")
    sel = f'[data-testid=message][data-id="{edited_id}"]'
    bob.page.wait_for_selector(f'{sel} [data-testid=message-text]:text-is("edited text")')
    assert bob.page.text_content(f"{sel} .edited") == KO["message.edited"]
    # delete for everyone, after a confirmation
    alice.page.click(f'[data-testid=message][data-id="{deleted_id}"] [data-testid=message-delete]')
    alice.page.click("[data-testid=dialog-confirm]")
    for ui in (alice, bob):
        ui.page.wait_for_selector(
            f'[data-testid=message][data-id="{deleted_id}"]', state="detached"
        )
    # the disappearing timer is shared: bob's header follows alice's choice
    alice.page.select_option("[data-testid=timer-select]", "300000")
    bob.page.wait_for_function(
        "() => document.querySelector('[data-testid=timer-select]')?.value === '300000'"
    )
    alice.page.select_option("[data-testid=timer-select]", "0")
    bob.page.wait_for_function(
        "() => document.querySelector('[data-testid=timer-select]')?.value === '0'"
    )
    # a nickname stays on bob's device and names the chat there
    bob.page.click("[data-testid=nav-contacts]")
    item = f'[data-testid=contact-item][data-address="{world.alice_addr}"]'
    bob.page.fill(f"{item} [data-testid=nickname-input]", "앨리스 (회사)")
    bob.page.click(f"{item} [data-testid=nickname-save]")
    bob.page.click("[data-testid=nav-chats]")
    bob.page.wait_for_selector(
        f'[data-testid=chat-item][data-address="{world.alice_addr}"] '
        '.chat-name:text-is("앨리스 (회사)")'
    )
    bob.open_chat(world.alice_addr)
    assert alice.errors == [] and bob.errors == []


def test_onboarding_then_unlock_through_the_ui(world: World) -> None:
    carol_d = DaemonProc(world.tmp / "dev-carol").start()
    try:
        ui = open_ui(world.browser, carol_d.url, locale="en-US")
        ui.page.fill("[data-testid=join-code]", invite(world.a, "carol"))
        ui.page.fill("[data-testid=join-name]", "최지우")
        ui.page.fill("[data-testid=join-passphrase]", "correct horse")
        ui.page.click("[data-testid=join-submit]")
        ui.page.wait_for_selector("[data-testid=welcome-continue]", timeout=60_000)
        assert ui.page.input_value("[data-testid=my-address]") == f"carol@{world.a.host}"
        assert carol_d.state()["me"]["display_name"] == "최지우"
        ui.page.context.close()
        carol_d.stop()
        # a protected home, no HAVEN_PASSPHRASE, no terminal: the app starts locked
        carol_d.start()
        ui = open_ui(world.browser, carol_d.url, locale="ko-KR")
        ui.page.fill("[data-testid=unlock-passphrase]", "wrong horse")
        ui.page.click("[data-testid=unlock-submit]")
        ui.page.wait_for_selector(
            f'[data-testid=error]:text-is("{KO["error.wrong_passphrase"]}")', timeout=60_000
        )
        ui.page.fill("[data-testid=unlock-passphrase]", "correct horse")
        ui.page.click("[data-testid=unlock-submit]")
        ui.page.wait_for_selector("[data-testid=chat-list]", timeout=60_000)
        ui.wait_connection("online")
        # and the passphrase can be removed again in the settings
        ui.page.click("[data-testid=nav-settings]")
        ui.page.click("[data-testid=passphrase-remove]")
        ui.page.wait_for_selector(
            f'[data-testid=passphrase-status]:text-is("{KO["settings.passphrase_removed"]}")',
            timeout=60_000,
        )
        assert carol_d.state()["protection"] == "none"
        assert ui.errors == [] and ui.dialogs == []
        ui.page.context.close()
    finally:
        carol_d.kill()


def test_link_a_device_then_remove_it(world: World) -> None:
    alice = world.alice
    alice.page.click("[data-testid=nav-devices]")
    alice.page.wait_for_selector("[data-testid=device-item]")
    assert alice.page.locator("[data-testid=device-item]").count() == 1
    alice.page.click("[data-testid=link-device]")
    alice.page.wait_for_selector("[data-testid=link-qr]")
    code = alice.page.input_value("[data-testid=link-code]")
    laptop_d = DaemonProc(world.tmp / "dev-alice-laptop").start()
    try:
        laptop = open_ui(world.browser, laptop_d.url, locale="en-US")
        laptop.page.fill("[data-testid=join-code]", code)
        laptop.page.fill("[data-testid=join-name]", "Alice")
        laptop.page.click("[data-testid=join-submit]")
        laptop.page.wait_for_selector("[data-testid=welcome-continue]", timeout=60_000)
        assert laptop.page.input_value("[data-testid=my-address]") == world.alice_addr
        # the linking page hears the outcome and lists the new device
        alice.page.wait_for_function(
            "() => document.querySelectorAll('[data-testid=device-item]').length === 2"
        )
        status = alice.page.text_content("[data-testid=link-status]") or ""
        assert status.startswith(EN["devices.link_done"].split("{")[0]), status
        alice.page.click("[data-testid=device-remove]")
        alice.page.click("[data-testid=dialog-confirm]")
        alice.page.wait_for_function(
            "() => document.querySelectorAll('[data-testid=device-item]').length === 1"
        )
        assert alice.errors == [] and laptop.errors == []
        laptop.page.context.close()
    finally:
        laptop_d.kill()
    alice.page.click("[data-testid=nav-chats]")
    alice.open_chat(world.bob_addr)


def stop_together(*nodes: NodeProc) -> None:
    """SIGTERM every node, then wait for each: their graceful shutdowns (seconds each, with
    clients connected) overlap instead of adding up."""
    for n in nodes:
        assert n.proc is not None
        n.proc.send_signal(signal.SIGTERM)
    for n in nodes:
        assert n.proc is not None
        n.proc.wait(timeout=20)
        n.proc = None


UNLABELLED = """() => [...document.querySelectorAll('button, input, select, textarea')]
    .filter(e => e.type !== 'hidden' && !e.closest('[hidden]'))
    .filter(e => !(e.getAttribute('aria-label')
                   || (e.labels && e.labels.length && e.labels[0].textContent.trim())
                   || (e.tagName === 'BUTTON' && e.textContent.trim())))
    .map(e => e.outerHTML.slice(0, 120))"""


def test_every_control_is_labelled(world: World) -> None:
    page = world.bob.page
    for nav, ready in (
        ("nav-contacts", "[data-testid=contact-item]"),
        ("nav-devices", "[data-testid=device-item]"),
        ("nav-settings", "[data-testid=profile-name]"),
        ("nav-chats", "[data-testid=chat-item]"),
    ):
        page.click(f"[data-testid={nav}]")
        page.wait_for_selector(ready)
        assert page.evaluate(UNLABELLED) == [], nav
        if nav == "nav-settings":  # the receipt switches reach the daemon
            for want in ("off", "on"):
                page.click("[data-testid=setting-read-receipts]")
                world.bob_d.wait_state(lambda s, w=want: s["settings"]["read_receipts"] == w)
    world.bob.open_chat(world.alice_addr)
    assert page.evaluate(UNLABELLED) == []


def test_narrow_window_is_one_pane(world: World) -> None:
    page = world.bob.page
    page.set_viewport_size({"width": 380, "height": 700})
    page.click("[data-testid=back]")
    page.wait_for_selector("[data-testid=chat-list]", state="visible")
    assert not page.is_visible("[data-testid=composer]")
    world.bob.open_chat(world.alice_addr)
    page.wait_for_selector("[data-testid=composer]", state="visible")
    assert not page.is_visible("[data-testid=chat-list]")
    # keyboard: Esc closes a dialog and focus comes back
    page.click("[data-testid=message-readers] >> nth=0")
    page.wait_for_selector("[data-testid=reader]")
    page.keyboard.press("Escape")
    page.wait_for_selector("[data-testid=readers-dialog]", state="detached")
    page.set_viewport_size({"width": 1000, "height": 700})


def test_changed_key_warns_and_shows_the_new_number_first(world: World) -> None:
    """Last: bob reinstalls (same address, new identity key); alice's UI holds her message,
    warns in the chat, and shows the new safety number before she accepts it."""
    alice = world.alice
    alice.page.click("[data-testid=nav-chats]")
    alice.start_chat(world.bob_addr)
    alice.page.click("[data-testid=verify-open]")
    alice.page.wait_for_selector("[data-testid=safety-number] .group")
    old_number = alice.page.text_content("[data-testid=safety-number]")
    alice.page.click("[data-testid=back]")
    alice.page.wait_for_selector("[data-testid=composer]")
    haven("node", "remove-account", "--home", str(world.b.home), "bob")
    haven("join", invite(world.b, "bob"), "--home", str(world.tmp / "dev-bob-reinstalled"))
    alice.type_and_send("held until the new key is accepted")
    alice.page.wait_for_selector(
        '[data-testid=message-text]:text-is("held until the new key is accepted")'
    )
    mid = alice.messages()[-1]["id"]
    sel = f'[data-testid=message][data-id="{mid}"]'
    alice.page.wait_for_selector(
        f'{sel} [data-testid=message-error]:text-is("{EN["error.identity_changed"]}")'
    )
    alice.page.wait_for_selector("[data-testid=chat-key-changed]", state="visible")
    alice.page.click("[data-testid=verify-open]")
    alice.page.wait_for_selector("[data-testid=key-changed]")
    new_number = alice.page.text_content("[data-testid=new-safety-number]")
    assert alice.page.text_content("[data-testid=safety-number]") == old_number
    assert new_number and len(new_number.split()) == 12 and new_number != old_number
    alice.page.click("[data-testid=accept-new-key]")
    alice.page.click("[data-testid=dialog-confirm]")
    alice.page.wait_for_selector("[data-testid=key-changed]", state="detached")
    assert alice.page.text_content("[data-testid=safety-number]") == new_number
    assert alice.errors == [] and alice.dialogs == []
