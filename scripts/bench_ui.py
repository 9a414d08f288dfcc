"""UI benchmark ``ui_latency``: send in one UI, measure until it renders in the other.

Two real nodes, two ``haven app`` daemons and two pages of the system's headless chromium
(tests/app/browser.py). Alice's page sends ``--n`` messages (paced, ``--pace-ms`` apart) by
typing into the composer and clicking send; it notes ``Date.now()`` at each click. Bob's page
has his chat with alice open; a MutationObserver notes ``Date.now()`` when each message element
is added to the DOM. Both pages run on the same machine, so the clock is shared. Per message:
render time in bob's page minus click time in alice's: through alice's daemon (durable queue,
Olm, sealed sender), node A, federation to node B, bob's daemon (decrypt, store), its
WebSocket event and the page's render.

Prints ONE JSON object on stdout: ``{"ui_latency": {"n", "p50_ms", "p99_ms", "max_ms",
"render_p50_ms", "render_p99_ms"}}`` (progress on stderr); ``render_*`` is the page's own share,
from the WebSocket event's arrival in bob's page to the message element in its DOM.

    .venv/bin/python scripts/bench_ui.py [--n 200] [--pace-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.app.browser import launch, open_ui, two_people  # noqa: E402

# before the page's own scripts: note when each benchmark message's WebSocket event arrives, so
# the page's own share (event → DOM) can be told apart from the daemons' and nodes'
WS_PROBE = """(() => {
    window.__events = {};
    const Native = window.WebSocket;
    window.WebSocket = function (url, protocols) {
        const ws = new Native(url, protocols);
        ws.addEventListener('message', (ev) => {
            const now = Date.now();
            const m = /"text": ?"bench:(\\d+)"/.exec(ev.data);
            if (m && /"type": ?"message"/.test(ev.data) && !(m[1] in window.__events)) {
                window.__events[m[1]] = now;
            }
        });
        return ws;
    };
    window.WebSocket.prototype = Native.prototype;
})()"""

OBSERVE = """() => {
    window.__arrivals = {};
    new MutationObserver((records) => {
        const now = Date.now();
        for (const r of records) for (const node of r.addedNodes) {
            if (!(node instanceof Element) || node.dataset.testid !== 'message') continue;
            const text = node.querySelector('[data-testid=message-text]')?.textContent || '';
            const m = /^bench:(\\d+)$/.exec(text);
            if (m && !(m[1] in window.__arrivals)) window.__arrivals[m[1]] = now;
        }
    }).observe(document.body, { childList: true, subtree: true });
}"""

SEND = """async ([n, pace]) => {
    const sent = {};
    const composer = document.querySelector('[data-testid=composer]');
    const send = document.querySelector('[data-testid=send]');
    for (let i = 0; i < n; i++) {
        composer.value = `bench:${i}`;
        sent[i] = Date.now();
        send.click();
        await new Promise((r) => setTimeout(r, pace));
    }
    return sent;
}"""


def pct(sorted_ms: list[float], p: float) -> float:
    i = min(len(sorted_ms) - 1, max(0, round(p / 100 * len(sorted_ms) + 0.5) - 1))
    return sorted_ms[i]


async def run_section(n: int = 200, pace_ms: int = 50) -> dict[str, Any]:
    """The ``ui_latency`` section of ``scripts/bench``: this script in a subprocess (the sync
    Playwright API cannot run inside the bench's event loop); returns its figures."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "bench_ui.py"),
        "--n",
        str(n),
        "--pace-ms",
        str(pace_ms),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench_ui.py exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out)["ui_latency"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--pace-ms", type=int, default=50)
    args = ap.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="haven-bench-ui-") as tmp,
        two_people(Path(tmp), "Alice", "Bob") as w,
        sync_playwright() as p,
    ):
        browser = launch(p)
        alice = open_ui(browser, w.alice.url, locale="en-US")
        bob = open_ui(browser, w.bob.url, locale="en-US", init_script=WS_PROBE)
        alice.wait_connection("online")
        bob.wait_connection("online")
        alice.start_chat(w.bob_addr)
        alice.type_and_send("warm-up")  # Olm session, pinned keys, federation link
        bob.wait_badge(w.alice_addr, "1", timeout=60)
        bob.open_chat(w.alice_addr)
        bob.wait_js("() => document.querySelectorAll('[data-testid=message]').length === 1")
        bob.page.evaluate(OBSERVE)
        print(f"sending {args.n} messages, {args.pace_ms} ms apart", file=sys.stderr)
        t0 = time.monotonic()
        sent = alice.page.evaluate(SEND, [args.n, args.pace_ms])
        bob.wait_js(
            "n => Object.keys(window.__arrivals).length === n",
            args.n,
            timeout=60 + args.n * 0.5,
        )
        arrivals = bob.page.evaluate("window.__arrivals")
        events = bob.page.evaluate("window.__events")
        print(f"all rendered after {time.monotonic() - t0:.1f} s", file=sys.stderr)
        lat = sorted(float(arrivals[k] - sent[k]) for k in sent)
        render = sorted(float(arrivals[k] - events[k]) for k in sent if k in events)
        browser.close()
    out = {
        "ui_latency": {
            "n": len(lat),
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "max_ms": lat[-1],
            # the page's own share: WebSocket event received → message element in the DOM
            "render_p50_ms": pct(render, 50) if render else None,
            "render_p99_ms": pct(render, 99) if render else None,
        }
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
