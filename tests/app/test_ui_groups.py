"""A group chat in the web UI: two nodes, three ``haven app`` daemons (alice and carol on node
A, bob on node B), alice's page in headless chromium. alice creates the group in her page
with bob and carol (typed addresses), sends a message and watches its counter fall 2 → 1 → 0
as bob's and carol's devices read it (through their daemons' local API: real devices, real
nodes, real receipts; carol has read receipts off, so she ends up counted as hidden). The
members screen marks the admin; a rename and a removal done there reach the other members'
devices; an invite code made in the page brings the removed member back through the join
dialog of her (Korean) page; "who can read this" lists the member devices; a text sent with
the CLI through the daemon shows in the open page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.integration.forkcli import create_node, haven, invite
from tests.integration.harness import NodeProc, wait_until

from .browser import UiPage, catalog, launch, open_ui
from .daemon import DaemonProc

EN = catalog("en")
TEXT = "Lunch on Friday? 금요일 점심 어때요?"


@dataclass
class World:
    alice_d: DaemonProc
    bob_d: DaemonProc
    carol_d: DaemonProc
    browser: Browser
    alice: UiPage


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("uigroups")
    procs: list[NodeProc | DaemonProc] = []
    try:
        a = create_node(tmp, "A").start()
        procs.append(a)
        b = create_node(tmp, "B").start()
        procs.append(b)
        people = {}
        for name, node, shown in (("alice", a, "Alice"), ("bob", b, "Bob"), ("carol", a, "Carol")):
            d = DaemonProc(tmp / f"dev-{name}").start()
            procs.append(d)
            d.join(invite(node, name), shown)
            people[name] = d
        with sync_playwright() as p:
            browser = launch(p)
            alice = open_ui(browser, people["alice"].url, locale="en-US")
            alice.wait_connection("online")
            yield World(people["alice"], people["bob"], people["carol"], browser, alice)
            browser.close()
    finally:
        for proc in reversed(procs):
            proc.kill()


def group_path(ref: str, tail: str = "") -> str:
    return f"/api/groups/{quote(ref, safe='')}{tail}"


def chat_path(ref: str, tail: str) -> str:
    return f"/api/chats/{quote(ref, safe='')}{tail}"


def wait_group_message(d: DaemonProc, ref: str, text: str) -> dict[str, Any]:
    """Poll a member's daemon until the group and the message with ``text`` are there."""

    def find() -> dict[str, Any] | None:
        status, msgs = d.api("GET", chat_path(ref, "/messages"), expect=None)
        if status != 200:
            return None  # the group is not on this device yet
        return next((m for m in msgs if m["text"] == text), None)

    found: dict[str, Any] = wait_until(find, 60, f"the group message on {d.home.name}")
    return found


def wait_counter(ui: UiPage, msg_id: str, n: int) -> None:
    ui.wait_js(
        """([id, n]) => {
            const e = document.querySelector(`[data-testid=message][data-id="${id}"]`);
            if (!e || e.dataset.unread !== String(n)) return false;
            const c = e.querySelector('[data-testid=unread-count]');
            return n === 0 ? !c : c?.textContent === String(n); }""",
        [msg_id, n],
        60,
    )


def test_group_create_send_counter_members(world: World) -> None:
    ui, page = world.alice, world.alice.page
    bob, carol = world.bob_d.address, world.carol_d.address

    # create the group in the page: a name and two typed addresses
    page.click("[data-testid=group-new]")
    page.wait_for_selector("[data-testid=group-create-dialog]")
    page.fill("[data-testid=group-create-name]", "Lunch club")
    page.fill("[data-testid=group-create-addresses]", f"{bob}, {carol}")
    page.click("[data-testid=group-create-submit]")
    page.wait_for_selector("[data-testid=chat-title]:has-text('Lunch club')", timeout=60_000)
    item = page.locator('[data-testid=chat-item][data-kind="group"]')
    item.wait_for()
    ref = str(item.get_attribute("data-address"))
    assert ref.startswith("group:") and len(ref) == 6 + 32
    assert item.locator("[data-testid=member-count]").text_content() == " 3"
    note = page.text_content("[data-testid=group-history-note]")
    assert note == EN["group.history_note"]

    # send: the counter shows the two members who have not read it
    ui.type_and_send(TEXT)
    page.wait_for_selector("[data-testid=message].out")
    msg_id = str(page.get_attribute("[data-testid=message].out", "data-id"))
    wait_counter(ui, msg_id, 2)

    # every member sees the counter too (bob's device, before anyone read)
    seen = wait_group_message(world.bob_d, ref, TEXT)
    assert seen["id"] == msg_id and seen["sender"] == world.alice_d.address
    assert seen["unread_by"] == 2
    wait_group_message(world.carol_d, ref, TEXT)

    # bob reads: 2 → 1, without a reload; the sheet names carol only
    assert world.bob_d.api("POST", chat_path(ref, "/read"))[1]["count"] == 1
    wait_counter(ui, msg_id, 1)
    page.click(f'[data-testid=message][data-id="{msg_id}"] [data-testid=unread-count]')
    page.wait_for_selector("[data-testid=unread-dialog]")
    unread = page.eval_on_selector_all(
        "[data-testid=unread-member]", "els => els.map(e => e.dataset.address)"
    )
    assert unread == [carol]
    page.click("[data-testid=unread-dialog] [data-testid=dialog-cancel]")

    # carol has read receipts off: once she reads, her devices tell the group only that she
    # hides them; she no longer counts as unread (1 → 0), and counts as "receipts off"
    world.carol_d.api("PUT", "/api/settings", {"read_receipts": "off"})
    world.carol_d.api("POST", chat_path(ref, "/read"))
    wait_counter(ui, msg_id, 0)
    hidden = page.get_attribute(
        f'[data-testid=message][data-id="{msg_id}"]', "data-receipts-hidden"
    )
    assert hidden == "1"

    # "who can read this": the member devices (each of the three accounts has one)
    page.click("[data-testid=group-readers]")
    page.wait_for_selector("[data-testid=reader]")
    readers = page.eval_on_selector_all(
        "[data-testid=reader]", "els => els.map(e => e.querySelector('.reader-addr').textContent)"
    )
    assert set(readers) >= {bob, carol}
    page.click("[data-testid=readers-dialog] [data-testid=dialog-cancel]")

    # the members screen: alice is the admin, the others are not
    page.click("[data-testid=group-open-members]")
    page.wait_for_selector("[data-testid=member]")
    admins = page.eval_on_selector_all(
        "[data-testid=member]", "els => els.map(e => [e.dataset.address, e.dataset.admin])"
    )
    assert dict(admins) == {world.alice_d.address: "yes", bob: "no", carol: "no"}

    # rename: the page and bob's device show the new name
    page.fill("[data-testid=group-rename-input]", "Friday lunch")
    page.click("[data-testid=group-rename-save]")
    page.wait_for_selector("[data-testid=group-title]:has-text('Friday lunch')")
    wait_until(
        lambda: world.bob_d.api("GET", group_path(ref))[1]["name"] == "Friday lunch",
        60,
        "the rename on bob's device",
    )

    # remove carol: gone from the list here, and carol's device knows it is out
    page.click(f'[data-testid=member][data-address="{carol}"] [data-testid=member-remove]')
    page.click("[data-testid=confirm-dialog] [data-testid=dialog-confirm]")
    ui.wait_js(
        "() => document.querySelectorAll('[data-testid=member]').length === 2",
    )
    wait_until(
        lambda: world.carol_d.api("GET", group_path(ref))[1]["active"] is False,
        60,
        "carol's device to learn it was removed",
    )
    # bob is no admin: his rename is refused with a stable code
    status, err = world.bob_d.api(
        "PUT", group_path(ref, "/name"), {"name": "mine now"}, expect=None
    )
    assert status == 403 and err["error"] == "not_admin", (status, err)

    # an invite code made in alice's page
    page.click("[data-testid=group-invite]")
    code = str(page.text_content("[data-testid=group-invite-code]"))
    assert code.startswith("haven:group:")
    assert page.locator("[data-testid=group-invite-qr]").count() == 1

    # carol's page (Korean): the group stays readable, but says she is out and has no
    # composer; she joins again with the code in the join dialog, alice's device adds her,
    # and both pages show it without a reload
    ko = catalog("ko")
    cui = open_ui(world.browser, world.carol_d.url, locale="ko-KR")
    cpage = cui.page
    cpage.click(f'[data-testid=chat-item][data-address="{ref}"]')
    cpage.wait_for_selector("[data-testid=message]")
    assert cpage.text_content("[data-testid=group-history-note]") == ko["group.left_note"]
    assert cpage.locator("form.composer").is_hidden()
    cpage.click("[data-testid=group-join-open]")
    cpage.fill("[data-testid=group-join-code]", code)
    cpage.click("[data-testid=group-join-submit]")
    status_text = ko["group.join_requested"].replace("{name}", "Friday lunch")
    cpage.wait_for_selector(f"[data-testid=group-join-status]:has-text('{status_text}')")
    cpage.click("[data-testid=group-join-dialog] [data-testid=dialog-cancel]")
    page.wait_for_selector(f'[data-testid=member][data-address="{carol}"]', timeout=60_000)
    cpage.wait_for_selector("form.composer", state="visible", timeout=60_000)
    assert cpage.text_content("[data-testid=group-history-note]") == ko["group.history_note"]
    assert cui.errors == [] and cui.csp == []
    cpage.context.close()

    page.click("[data-testid=back]")
    page.wait_for_selector("[data-testid=chat-title]:has-text('Friday lunch')")

    # a text sent with the CLI through alice's daemon shows in her open page, counter included
    haven("send", "--home", str(world.alice_d.home), ref, "from the terminal")
    ui.wait_js(
        """() => [...document.querySelectorAll('[data-testid=message].out')].some(e =>
            e.querySelector('[data-testid=message-text]')?.textContent === 'from the terminal'
            && e.dataset.unread === '2')"""
    )
    assert "Traceback" not in page.content()
    assert ui.errors == [] and ui.csp == []


def test_group_api_bad_input(world: World) -> None:
    """Bad requests get stable codes and change nothing; never a traceback or class name."""
    d = world.alice_d
    before = d.api("GET", "/api/chats")[1]
    cases = [
        ("POST", "/api/groups", {"name": "", "members": []}, 400, "bad_request"),
        ("POST", "/api/groups", {"name": "x", "members": "bob"}, 400, "bad_request"),
        ("POST", "/api/groups", {"name": "x", "members": ["not an address"]}, 400, "bad_request"),
        ("GET", group_path("group:" + "0" * 32), None, 404, "unknown_group"),
        ("GET", group_path("group:xyz"), None, 400, "bad_request"),
        ("POST", "/api/groups/join", {"code": "haven:group:nonsense"}, 400, "invalid_group_invite"),
    ]
    for method, path, body, status, code in cases:
        got, err = d.api(method, path, body, expect=None)
        assert got == status, (path, got, err)
        assert isinstance(err, dict) and isinstance(err.get("error"), str), err
        if code is not None:
            assert err["error"] == code, (path, err)
        assert "Traceback" not in str(err) and "Error'" not in str(err), err
    assert d.api("GET", "/api/chats")[1] == before
