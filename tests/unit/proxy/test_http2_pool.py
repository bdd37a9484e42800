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
from proxy.retry import Failure, RoutePolicy, retryable


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
    """Every stream to the upstream on ``port``, plain HTTP/2; retries as a Service without a retry
    policy has them (only streams the upstream never got)."""

    direction = "outbound"
    source = None
    service = "up"
    retries = True

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

    def report(self, target: Target, ok: bool, latency: float | None = None) -> None:
        pass

    def release(self, target: Target, ok: bool) -> None:
        pass

    def abandon(self, target: Target, observe: bool) -> None:
        pass

    def may_retry(
        self,
        method: str,
        failure: Failure | None,
        attempt: int,
        status: int | None = None,
        grpc: int | None = None,
    ) -> bool:
        policy = RoutePolicy()
        return attempt < policy.retries_for(failure) and retryable(method, status, failure, policy, grpc)


async def start_proxy(
    port: int, pool: Pool[object], tcp: bool = False, small_buffers: bool = False
) -> tuple[H2Proxy, asyncio.Task[None], socket.socket, Pipe]:
    """An H2Proxy on one end of a socket pair (the app's connection) and running: the other end.
    ``tcp``: a loopback TCP connection (else a Unix socket pair); ``small_buffers``: 4 KiB for the
    app's receive buffer and the proxy's send buffer, so that what the app does not read soon
    stays in the proxy."""
    if tcp:
        with socket.create_server(("127.0.0.1", 0)) as server:
            b = socket.socket()
            if small_buffers:  # (before the connection: the window it advertises)
                b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            b.connect(server.getsockname())
            a, _ = server.accept()
    else:
        a, b = socket.socketpair()
        if small_buffers:
            b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if small_buffers:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    b.setblocking(False)
    down = Pipe(framed=False, name="app")
    await asyncio.get_running_loop().connect_accepted_socket(lambda: down, a)
    proxy = H2Proxy(down, None, None, NullObserver().start, {}, router=Router(port), pool=pool)  # type: ignore[arg-type]
    return proxy, asyncio.create_task(proxy.run(30)), b, down


async def call(app_sock: socket.socket, method: str = "GET") -> int:
    """One request on a new HTTP/2 connection from the app's end: the response's status."""
    reader, writer = await asyncio.open_connection(sock=app_sock)
    app = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    app.initiate_connection()
    head = [(":method", method), (":scheme", "http"), (":authority", "up"), (":path", "/a.B/C")]
    app.send_headers(1, head, end_stream=True)
    writer.write(app.data_to_send())
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the proxy closed the app's connection"
            for event in app.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[b":status"])
                assert not isinstance(event, h2.events.StreamReset), event
            writer.write(app.data_to_send())
    finally:
        writer.close()


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
    _, run, b, down = await start_proxy(port, pool)
    b.setblocking(True)
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


@pytest.mark.parametrize(("method", "status", "opened"), [("GET", 200, 2), ("POST", 502, 1)])
async def test_a_pooled_connection_whose_peer_closes_as_it_is_taken_costs_no_call(
    method: str, status: int, opened: int
) -> None:
    """The peer closes (no GOAWAY: a crash) an idle pooled connection just as the next app
    connection sends a request on it; the close crosses the stream. As with HTTP/1.1's pool, a
    GET counts as never reached and goes once more on a fresh connection. A POST does not: nothing
    proves the peer did not act on it (RFC 9113 8.7; a peer that crashed after acting on a long
    call looks the same); it got sent twice. The caller gets 502 instead."""
    up = Upstream(delay=0)
    port = await up.start()
    pool: Pool[object] = Pool()
    _, run, app_sock, _ = await start_proxy(port, pool)
    assert await call(app_sock) == 200
    await asyncio.wait_for(run, 5)
    assert pool.idle_count() == 1
    pipe, pooled, _ = pool._idle[("plain", port)][-1]
    flush = pooled.try_flush

    def flush_then_the_peer_is_gone() -> None:  # what the next stream's HEADERS meet
        flush()
        pipe.flush()
        asyncio.get_running_loop().call_soon(pipe.eof_received)

    pooled.try_flush = flush_then_the_peer_is_gone  # type: ignore[method-assign]
    _, run, app_sock, _ = await start_proxy(port, pool)
    assert await call(app_sock, method) == status
    await asyncio.wait_for(run, 5)
    assert (pool.opened, pool.reused) == (opened, 1)
    pool.close()
    up.server.close()
    await up.server.wait_closed()
    await asyncio.sleep(0.05)


def _pings(n: int, request: bool = False) -> bytes:
    """A client connection's opening, a GET if ``request``, then ``n`` PINGs (as many acks to read)."""
    app = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    app.initiate_connection()
    if request:
        head = [(":method", "GET"), (":scheme", "http"), (":authority", "up"), (":path", "/a.B/C")]
        app.send_headers(1, head, end_stream=True)
    for i in range(n):
        app.ping(i.to_bytes(8, "big"))
    return app.data_to_send()


async def _send_all(sock: socket.socket, data: bytes, task: asyncio.Task[None]) -> None:
    sent = 0
    while sent < len(data) and not task.done():
        with contextlib.suppress(BlockingIOError):
            sent += sock.send(data[sent : sent + 65536])
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_a_client_that_reads_nothing_is_reset_after_the_stall_time(
    monkeypatch: pytest.MonkeyPatch, tcp: bool
) -> None:
    """PINGs sent and their acks never read: the proxy's reader waited for the client's socket to
    take them, for good, and held what the client sent meanwhile (up to the 256 KiB read limit,
    about 11 MB while 1-byte DATA frames were kept apart), indefinitely. Now the connection is
    reset once its socket took nothing for CLIENT_STALL_S; the upstream connection of the call
    that was answered meanwhile goes back to the pool (the wait had cancelled the future the
    upstream's reader waited on too: a healthy connection closed, its endpoint blamed)."""
    monkeypatch.setattr("proxy.http2.CLIENT_STALL_S", 0.5)
    upstream = Upstream(delay=0.2)  # (answers once the client has stopped reading)
    pool: Pool[object] = Pool()
    _, task, app_sock, down = await start_proxy(await upstream.start(), pool, tcp=tcp, small_buffers=True)
    loop = asyncio.get_running_loop()
    try:
        await _send_all(app_sock, _pings(40_000, request=True), task)  # 680 KB of acks to write
        started = loop.time()
        await asyncio.wait_for(task, 5)  # (it waited for good before)
        assert loop.time() - started < 3
        assert down.lost
        assert upstream.requests == [1]
        assert pool.idle_count() == 1
    finally:
        app_sock.close()
        pool.close()
        upstream.server.close()
        await upstream.server.wait_closed()
        await asyncio.sleep(0.05)  # the transports finish closing in this loop


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_a_client_that_reads_slowly_is_not_cut(monkeypatch: pytest.MonkeyPatch, tcp: bool) -> None:
    """The stall is nothing taken at all, not a drain slower than the stall time (the transport
    waits to fall from its high-water mark to its low one: a reader taking 4 KiB every 50 ms was
    cut after a second)."""
    monkeypatch.setattr("proxy.http2.CLIENT_STALL_S", 0.3)
    pool: Pool[object] = Pool()
    _, task, app_sock, down = await start_proxy(1, pool, tcp=tcp, small_buffers=True)
    loop = asyncio.get_running_loop()
    sending = asyncio.create_task(_send_all(app_sock, _pings(40_000), task))
    try:
        until = loop.time() + 2.0
        while loop.time() < until and not task.done():
            with contextlib.suppress(BlockingIOError):
                app_sock.recv(4096)
            await asyncio.sleep(0.05)
        assert down.backpressured  # (the client is slower than what is written to it)
        assert not task.done() and not down.lost
        await asyncio.wait_for(task, 3)  # it stops reading: reset after the stall time
        assert down.lost
    finally:
        sending.cancel()
        app_sock.close()
        pool.close()
