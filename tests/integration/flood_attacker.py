"""The attacker of the flood test, run as its own process so it does not share a CPU-bound
event loop with the legitimate devices it is compared against.

``python -m tests.integration.flood_attacker PORT SOURCES TASKS SECONDS BURST`` prints one JSON
line: the connection attempts made, by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from .rawpeer import CLIENT_PATH, closed_by_node, raw_connect, read_close, ws_client_frame, ws_open

FAILURES = (
    OSError,
    ConnectionError,
    asyncio.IncompleteReadError,
    TimeoutError,
    aiohttp.ClientError,
)
_CLOSED = {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR}


@dataclass
class Flood:
    port: int
    sources: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    attempts: Counter[str] = field(default_factory=Counter)

    async def idle_tcp(self, source: str) -> None:
        r, w = await raw_connect(self.port, source)
        try:
            await closed_by_node(r)
        finally:
            w.close()

    async def idle_ws(self, source: str) -> None:
        conn = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=conn) as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{self.port}{CLIENT_PATH}")
            async with asyncio.timeout(20):
                while (await ws.receive()).type not in _CLOSED:
                    pass

    async def _dribble(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> None:
        """Send ``data`` one byte every 0.3 s until the node closes the stream."""
        closed = asyncio.create_task(closed_by_node(r))
        try:
            for b in data:
                if closed.done():
                    break
                w.write(bytes([b]))
                await asyncio.wait({closed}, timeout=0.3)
            await closed
        finally:
            closed.cancel()
            w.close()

    async def slowloris(self, source: str) -> None:
        r, w = await raw_connect(self.port, source)
        w.write(b"GET /.well-known/haven/node HTTP/1.1\r\nHost: x\r\n")
        await self._dribble(r, w, b"X-Pad: " + b"a" * 200)

    async def half_body(self, source: str) -> None:
        r, w = await raw_connect(self.port, source)
        w.write(
            b"POST /haven/v1/federation/batch HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 2000000\r\n\r\n" + b"\x00" * 65536
        )
        try:
            await closed_by_node(r)
        finally:
            w.close()

    async def trickle_ws(self, source: str) -> None:
        r, w, _ = await ws_open(self.port, source)
        frame = ws_client_frame(b"\x01" * 4000)
        w.write(frame[:8])
        await self._dribble(r, w, frame[8:])

    async def garbage(self, source: str) -> None:
        r, w, _ = await ws_open(self.port, source, rcvbuf=4096)
        junk = ws_client_frame(b"?", opcode=0x1) * 2000
        try:
            with contextlib.suppress(*FAILURES):
                while not self.stop.is_set():
                    w.write(junk)
                    await asyncio.wait_for(w.drain(), 10)
            await read_close(r)
        finally:
            w.close()

    async def loop(self, kind: str, attack: Callable[[str], Awaitable[None]], source: str) -> None:
        while not self.stop.is_set():
            self.attempts[kind] += 1
            with contextlib.suppress(*FAILURES):
                await attack(source)
            await asyncio.sleep(0.1)

    async def burst(self, n: int) -> None:
        async def one(i: int) -> None:
            self.attempts["burst"] += 1
            with contextlib.suppress(*FAILURES):
                await self.idle_tcp(self.source_of(i))

        # connect in waves of 100 (the node's listen backlog is 128), all held open at once
        waves = []
        for start in range(0, n, 100):
            waves.append(asyncio.gather(*(one(i) for i in range(start, min(n, start + 100)))))
            await asyncio.sleep(0.1)
        await asyncio.gather(*waves)

    def source_of(self, i: int) -> str:
        return f"127.0.2.{1 + i % self.sources}"

    def kinds(self) -> dict[str, Callable[[str], Awaitable[None]]]:
        return {
            "idle_tcp": self.idle_tcp,
            "idle_ws": self.idle_ws,
            "slowloris": self.slowloris,
            "half_body": self.half_body,
            "trickle_ws": self.trickle_ws,
            "garbage": self.garbage,
        }

    async def run(self, tasks_per_kind: int, seconds: float, burst: int) -> None:
        await self.burst(burst)
        tasks = [
            asyncio.create_task(self.loop(kind, attack, self.source_of(i)))
            for kind, attack in self.kinds().items()
            for i in range(tasks_per_kind)
        ]
        await asyncio.sleep(seconds)
        self.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def main(argv: list[str]) -> None:
    port, sources, tasks, seconds, burst = argv
    flood = Flood(int(port), int(sources))
    await flood.run(int(tasks), float(seconds), int(burst))
    print(json.dumps(dict(flood.attempts)), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
