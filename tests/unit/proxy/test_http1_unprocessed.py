"""HTTP/1.1: a request that endpoint sidecars say their apps never saw (502 with
sidemesh-unprocessed) goes elsewhere as after a failed connect: at most max(retries, 2) more
times, each from the retry budget (it went to every endpoint, without the budget)."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Sequence

import pytest

from proxy import h1, http1
from proxy.observe import NullObserver, RequestInfo
from proxy.pipe import Pipe
from tests.support.pipes import pipe_and_peer

ENDPOINTS = 10


async def _endpoint_sidecar(pipe: Pipe, hits: list[str], name: str) -> None:
    """An endpoint sidecar whose app is down: 502 + sidemesh-unprocessed to every request."""
    conn = h1.Connection(h1.SERVER)
    while True:
        data = await pipe.read()
        if not data:
            return
        conn.receive_data(data)
        while (event := conn.next_event()) is not h1.NEED_DATA:
            if isinstance(event, h1.Request):
                hits.append(name)
            if isinstance(event, h1.EndOfMessage):
                pipe.write(
                    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 3\r\nsidemesh-unprocessed: 1\r\n\r\nbad"
                )
                pipe.flush()
            if isinstance(event, (h1.EndOfMessage, h1.ConnectionClosed)) or event is h1.PAUSED:
                break


class Router:
    def __init__(self) -> None:
        self.routes = 0
        self.budget_withdrawals = 0
        self.hits: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def begin(self, info: RequestInfo) -> float | None:
        return None

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        return False  # retries: 0

    def may_reroute(self, attempt: int) -> bool:
        self.budget_withdrawals += 1
        return attempt < 2  # (CONNECT_RETRIES; the budget allows it)

    async def route(self, request: h1.Request, info: RequestInfo, avoid: Sequence[str] = ()):  # type: ignore[no-untyped-def]
        self.routes += 1
        names = [f"10.0.0.{i}:8080" for i in range(ENDPOINTS)]
        name = next((n for n in names if n not in avoid), names[0])
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        up, there = Pipe(framed=True, name="up"), Pipe(framed=True, name="there")
        await loop.connect_accepted_socket(lambda: up, a)
        await loop.connect_accepted_socket(lambda: there, b)
        self.tasks.append(asyncio.create_task(_endpoint_sidecar(there, self.hits, name)))
        return http1.Upstream(up, h1.Connection(h1.CLIENT), False, name, name)

    async def fresh(self, up: http1.Upstream):  # type: ignore[no-untyped-def]
        raise AssertionError

    def release(self, up: http1.Upstream, reusable: bool, ok: bool | None, observe: bool = False) -> None:
        up.pipe.close()


def _post(router: Router) -> bytes:
    """One POST from an app through an outbound ``http1.serve`` on ``router``: what it got."""

    async def run() -> bytes:
        down, b = await pipe_and_peer("downstream")
        ctx = http1.Context("outbound", NullObserver(), idle_timeout=2, draining=lambda: False)
        server = asyncio.create_task(http1.serve(down, router, ctx))
        reader, writer = await asyncio.open_connection(sock=b)
        writer.write(b"POST /pay HTTP/1.1\r\nHost: cart\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        out = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await asyncio.wait_for(server, 10)
        for task in router.tasks:
            task.cancel()
        return out

    return asyncio.run(run())


def test_unprocessed_retries_are_bounded_like_connect_failures() -> None:
    router = Router()
    out = _post(router)
    assert out.startswith(b"HTTP/1.1 502 "), out
    assert b"sidemesh-unprocessed" not in out.lower()  # (between sidecars only)
    assert router.hits == ["10.0.0.0:8080", "10.0.0.1:8080", "10.0.0.2:8080"]
    assert router.budget_withdrawals == 3  # (the third said no)


class OneEndpoint(Router):
    def __init__(self) -> None:
        super().__init__()
        self.released: list[tuple[str, bool, bool | None]] = []

    def release(self, up, reusable, ok, observe=False):  # type: ignore[no-untyped-def]
        self.released.append((up.endpoint, reusable, ok))
        super().release(up, reusable, ok, observe)


def test_with_no_other_endpoint_no_retry_is_taken_from_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """One endpoint, its app gone: its 502 goes to the client; the budget is not asked (it was,
    for a re-route that never happened) and the connection taken meanwhile goes back unused."""
    monkeypatch.setattr(sys.modules[__name__], "ENDPOINTS", 1)
    router = OneEndpoint()
    out = _post(router)
    assert out.startswith(b"HTTP/1.1 502 "), out
    assert router.hits == ["10.0.0.0:8080"]
    assert router.budget_withdrawals == 0
    assert router.released == [("10.0.0.0:8080", True, False), ("10.0.0.0:8080", True, None)]
