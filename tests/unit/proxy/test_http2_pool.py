"""HTTP/2 upstream connections and the pool, at the level of one H2Proxy between a raw h2 client
(the app) and a raw h2 server (the upstream), over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import h2.config
import h2.connection
import h2.events
import pytest

from proxy.http2 import H2Proxy, Target
from proxy.observe import NullObserver, RequestInfo
from proxy.pipe import Pipe
from proxy.pool import Pool
from proxy.retry import Failure


class Upstream:
    """An h2 server answering every request "ok" after ``delay``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requests: list[int] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())

        async def answer(sid: int) -> None:
            await asyncio.sleep(self.delay)
            conn.send_headers(sid, [(":status", "200")])
            conn.send_data(sid, b"ok", end_stream=True)
            writer.write(conn.data_to_send())

        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.requests.append(event.stream_id)
                        task = asyncio.create_task(answer(event.stream_id))
                        self.tasks.add(task)
                        task.add_done_callback(self.tasks.discard)
                writer.write(conn.data_to_send())
        writer.close()


class Router:
    """Every stream to the upstream on ``port``, plain HTTP/2; no retries."""

    direction = "outbound"
    source = None
    service = "up"
    retries = False

    def __init__(self, port: int) -> None:
        self.port = port

    async def connect(self) -> Pipe:
        pipe = Pipe(framed=False, name="upstream")
        await asyncio.get_running_loop().create_connection(lambda: pipe, "127.0.0.1", self.port)
        return pipe

    def begin(self, info: RequestInfo) -> float | None:
        return None

    def route(self, info: RequestInfo, tried: list[Target]) -> Target:
        return Target(("plain", self.port), self.connect)

    def report(self, target: Target, ok: bool) -> None:
        pass

    def release(self, target: Target, ok: bool) -> None:
        pass

    def may_retry(self, method: str, failure: Failure | None, attempt: int, *_: object) -> bool:
        return False


async def test_the_apps_connection_lost_while_an_answer_comes_leaves_the_upstream_one_to_the_pool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The app's connection goes away and the upstream reader runs before the downstream one notices
    (forced here): its failing write toward the app is not an upstream failure. The upstream
    connection is neither logged as failed nor closed, and goes to the pool."""
    caplog.set_level(logging.INFO, "sidemesh.proxy.http2")
    up = Upstream(delay=0.2)
    port = await up.start()
    pool: Pool[object] = Pool()
    a, b = socket.socketpair()
    a.setblocking(False)
    down = Pipe(framed=False, name="app")
    await asyncio.get_running_loop().connect_accepted_socket(lambda: down, a)
    proxy = H2Proxy(down, None, None, NullObserver().start, {}, router=Router(port), pool=pool)  # type: ignore[arg-type]
    run = asyncio.create_task(proxy.run(30))
    app = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    app.initiate_connection()
    app.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "up"), (":path", "/")], True)
    b.sendall(app.data_to_send())
    for _ in range(100):
        if up.requests:
            break
        await asyncio.sleep(0.01)
    # The app's socket is gone, but H2Proxy.run is not woken yet: the upstream answer comes first.
    down._closed = down._eof = True
    await asyncio.sleep(0.4)
    down._wake()
    await asyncio.wait_for(run, 5)
    b.close()
    assert "HTTP/2 connection upstream failed" not in caplog.text
    assert pool.idle_count() == 1
    pool.close()
    up.server.close()
    await up.server.wait_closed()  # (its connection's handler ends with the pooled connection)
    await asyncio.sleep(0.05)  # the transports finish closing in this loop, not in the next test's
