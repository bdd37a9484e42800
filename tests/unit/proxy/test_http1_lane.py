"""Plain exchanges in callbacks (``http1._Lane``): the requests a keep-alive connection repeats go
through the pipes' callbacks, and whatever the lane does not finish goes back to ``serve``, before
its request was sent or after, and ends as it would have there. ``http1.serve`` on a socketpair, an
app on a real socket, a router that routes without a wait when an idle connection is at hand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from proxy import framing, h1, http1
from proxy.observe import RequestInfo, RequestResult
from proxy.pipe import Pipe


class Span:
    def __init__(self, info: RequestInfo, spans: list[Span]) -> None:
        self.info = info
        self.results: list[RequestResult] = []
        spans.append(self)

    def trace_headers(self) -> list[tuple[bytes, bytes]] | None:
        return [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]

    def finish(self, result: RequestResult) -> None:
        self.results.append(result)


class Observer:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def start(self, info: RequestInfo) -> Span:
        return Span(info, self.spans)


class Choice:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ToApp:
    """Requests to the app at ``port`` on pooled connections; ``route_now`` (the lane's) when one
    is idle. ``lane=False``: no ``route_now``, every request through ``serve``'s coroutines."""

    def __init__(self, port: int, timeout: float | None = None, retries: int = 0) -> None:
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.idle: list[tuple[Pipe, h1.Connection]] = []
        self.begun = 0
        self.routed = 0  # by ``route``
        self.routed_now = 0  # by ``route_now``
        self.fresh_ones = 0
        self.released: list[tuple[bool, bool | None]] = []
        self.outstanding = 0
        self.choices: list[Choice] = []  # route_now's, for route
        self.chosen: list[Choice] = []  # ... as route got them

    def begin(self, info: RequestInfo) -> float | None:
        self.begun += 1
        return self.timeout

    def route_now(self, request: h1.Request, method: str, path: str) -> http1.Upstream | Choice:
        while self.idle:
            pipe, conn = self.idle.pop()
            if pipe.usable:
                self.routed_now += 1
                self.outstanding += 1
                return http1.Upstream(pipe, conn, reused=True)
        self.choices.append(Choice())
        return self.choices[-1]

    async def route(
        self,
        request: h1.Request,
        info: RequestInfo,
        avoid: Sequence[str] = (),
        chosen: Choice | None = None,
    ) -> http1.Local | http1.Upstream:
        self.routed += 1
        if chosen is not None:
            self.chosen.append(chosen)
        if info.path == "/deny":
            return http1.Local(403, "denied here")
        while self.idle:
            pipe, conn = self.idle.pop()
            if pipe.usable:
                self.outstanding += 1
                return http1.Upstream(pipe, conn, reused=True)
        return await self._connect()

    async def _connect(self) -> http1.Upstream:
        pipe = Pipe(framed=False, name="upstream")
        await asyncio.get_running_loop().create_connection(lambda: pipe, "127.0.0.1", self.port)
        self.outstanding += 1
        return http1.Upstream(pipe, h1.Connection(h1.CLIENT), reused=False)

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        return attempt < self.retries

    def may_reroute(self, attempt: int) -> bool:
        return False

    async def fresh(self, up: http1.Upstream) -> http1.Local | http1.Upstream:
        self.fresh_ones += 1
        self.outstanding -= 1
        return await self._connect()

    def close(self) -> None:
        for pipe, _ in self.idle:
            pipe.close()
        self.idle.clear()

    def release(self, up: http1.Upstream, reusable: bool, ok: bool | None, observe: bool = False) -> None:
        self.outstanding -= 1
        self.released.append((reusable, ok))
        if reusable:
            self.idle.append((up.pipe, up.conn))
        else:
            up.pipe.close()


class CoroutinesOnly(ToApp):
    route_now = None  # type: ignore[assignment]


class App:
    """Answers by path: ``/stream`` a chunked body in two writes, ``/slow`` after 1 s, ``/503-once``
    503 the first time, ``/vanish-once`` not at all the first time (it closes the connection);
    others 200 with the path and the body as the body. Keeps each request's head as received."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.connections = 0
        self.seen_503 = False
        self.vanished = False
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path == b"/stream":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
                elif path == b"/chunks":  # (chunks in one write: one read for the sidecar)
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
                    )
                elif path == b"/slow":
                    await asyncio.sleep(1.0)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
                elif path == b"/503-once" and not self.seen_503:
                    self.seen_503 = True
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                elif path == b"/vanish-once" and not self.vanished:
                    self.vanished = True
                    return
                else:
                    answer = path + b" " + body
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def response(self, timeout: float = 5.0) -> tuple[int, bytes, bytes]:
        """(status, head, body) of the next response (Content-Length or chunked)."""
        loop = asyncio.get_running_loop()

        async def more() -> None:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
            if not data:
                raise ConnectionError(f"closed; have {self.buf!r}")
            self.buf += data

        while b"\r\n\r\n" not in self.buf:
            await more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ")[1])
        fields = {
            n.strip().lower(): v.strip() for n, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        }
        if b"content-length" in fields:
            n = int(fields[b"content-length"])
            while len(self.buf) < n:
                await more()
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, head, body
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                await more()
            size_line, rest = self.buf.split(b"\r\n", 1)
            size = int(size_line, 16)
            while len(rest) < size + 2:
                await more()
                rest = self.buf.split(b"\r\n", 1)[1]
            body += rest[:size]
            self.buf = rest[size + 2 :]
            if size == 0:
                return status, head, body


async def _serving(
    router: ToApp, direction: str = "outbound"
) -> tuple[Pipe, Client, asyncio.Task[None], Observer]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    down = Pipe(framed=False, name="downstream")
    await asyncio.get_running_loop().connect_accepted_socket(lambda: down, ours)
    observer = Observer()
    ctx = http1.Context(direction, observer, idle_timeout=30, draining=lambda: False)  # type: ignore[arg-type]
    return down, Client(theirs), asyncio.create_task(http1.serve(down, router, ctx)), observer


async def _end(task: asyncio.Task[None], down: Pipe, client: Client, router: ToApp) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    down.abort()
    client.sock.close()
    router.close()
    await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def _served(
    router: ToApp, direction: str = "outbound"
) -> AsyncIterator[tuple[Pipe, Client, asyncio.Task[None], Observer]]:
    """``_serving``, ended by ``_end`` however the test ends."""
    down, client, task, observer = await _serving(router, direction)
    try:
        yield down, client, task, observer
    finally:
        await _end(task, down, client, router)


async def _get(client: Client, path: str, extra: bytes = b"") -> tuple[int, bytes, bytes]:
    await client.send(b"GET %s HTTP/1.1\r\nHost: app\r\n%s\r\n" % (path.encode(), extra))
    return await client.response()


@pytest.fixture
async def app() -> AsyncIterator[App]:
    app = App()
    await app.start()
    yield app
    app.close()


def _finished_once(observer: Observer) -> list[RequestResult]:
    assert all(len(span.results) == 1 for span in observer.spans), [s.results for s in observer.spans]
    return [span.results[0] for span in observer.spans]


async def test_the_requests_a_connection_repeats_go_through_the_lane(app: App) -> None:
    """The first request finds no idle connection (``route``: a connect); the next ones go through
    the lane, each begun, observed and released once, as through ``serve``."""
    router = ToApp(app.port)
    async with _served(router) as (_down, client, _task, observer):
        for i in range(5):
            body = b"n=%d" % i
            await client.send(b"POST /p HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\n" + body)
            status, _, answer = await client.response()
            assert (status, answer) == (200, b"/p " + body)
        assert (router.routed, router.routed_now, router.begun) == (1, 4, 5)
        assert router.released == [(True, True)] * 5 and router.outstanding == 0
        # The first request's choice (no idle connection for it) went to route, not made again.
        assert router.chosen == router.choices and len(router.choices) == 1
        results = _finished_once(observer)
        assert [(r.status, r.request_bytes, r.response_bytes, r.error) for r in results] == [
            (200, 3, 6, None)
        ] * 5
        assert len(observer.spans) == 5 and app.connections == 1
        # The app got each request as serve sends it: the span's trace header added.
        assert all(b"\r\ntraceparent: 00-0af7" in head for head in app.heads), app.heads


async def _warm(client: Client) -> None:
    """One request through serve: its connection is pooled, so the next goes to the lane."""
    assert (await _get(client, "/warm"))[0] == 200


async def test_a_response_not_whole_goes_on_in_serve(app: App) -> None:
    """A response streamed in two writes: the lane sent the request and hands the exchange back
    after its send; the response arrives whole, the request was sent once."""
    router = ToApp(app.port)
    async with _served(router) as (_down, client, _task, observer):
        await _warm(client)
        assert await _get(client, "/stream") == (200, _HEAD_CHUNKED, b"firstsecond")
        assert await _get(client, "/after") == (200, _HEAD_AFTER, b"/after ")
        assert router.routed_now == 2 and router.routed == 1
        assert [h.split(b" ")[1] for h in app.heads] == [b"/warm", b"/stream", b"/after"]
        assert [r.status for r in _finished_once(observer)] == [200, 200, 200]
        assert router.released == [(True, True)] * 3 and router.outstanding == 0


_HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked"
_HEAD_AFTER = b"HTTP/1.1 200 OK\r\ncontent-length: 7"


async def test_a_retried_status_goes_on_in_serve(app: App) -> None:
    """A 503 the route may retry: handed back, dropped and sent again (from the body kept)."""
    router = ToApp(app.port, retries=1)  # type: ignore[attr-defined]
    async with _served(router) as (_down, client, _task, observer):
        await _warm(client)
        await client.send(b"POST /503-once HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\nhi")
        status, _, body = await client.response()
        assert (status, body) == (200, b"/503-once hi")
        assert [h.split(b" ")[1] for h in app.heads] == [b"/warm", b"/503-once", b"/503-once"]
        results = _finished_once(observer)
        assert [(r.status, r.retries) for r in results] == [(200, 0), (200, 1)]
        assert router.begun == 2 and router.routed_now == 1 and router.outstanding == 0


async def test_the_deadline_of_a_request_in_the_lane(app: App) -> None:
    """The request's timeout runs in the lane too: a 504 at the deadline, the upstream dropped."""
    router = ToApp(app.port, timeout=0.3)  # type: ignore[attr-defined]
    async with _served(router) as (_down, client, _task, observer):
        await _warm(client)
        start = time.monotonic()
        status, _, _ = await _get(client, "/slow")
        assert status == 504 and 0.25 < time.monotonic() - start < 0.9
        results = _finished_once(observer)
        assert [(r.status, r.error) for r in results] == [(200, None), (504, "timeout")]
        assert router.released[-1] == (False, False) and router.outstanding == 0


async def test_a_pooled_connection_closed_under_a_request_in_the_lane_is_tried_fresh(app: App) -> None:
    """The app closes its pooled connection on the request (no answer): the lane hands back, and
    serve sends the GET once more on a fresh connection, as for a request of its own."""
    router = ToApp(app.port)
    async with _served(router) as (_down, client, _task, observer):
        await _warm(client)
        status, _, body = await _get(client, "/vanish-once")
        assert (status, body) == (200, b"/vanish-once ")
        assert router.fresh_ones == 1 and app.connections == 2
        assert [r.status for r in _finished_once(observer)] == [200, 200]
        assert router.outstanding == 0


async def test_a_client_that_leaves_gives_up_its_request_in_the_lane(app: App) -> None:
    """A FIN while the lane waits for the response: the upstream is dropped (the app's answer
    would go nowhere), the lease given up (ok None), the span finished once, serve ends."""
    router = ToApp(app.port)
    async with _served(router) as (_down, client, task, observer):
        await _warm(client)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        await asyncio.sleep(0.1)
        client.sock.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 2)
        assert router.released[-1] == (False, None) and router.outstanding == 0
        results = _finished_once(observer)
        assert results[-1].status is None and (results[-1].error or "").startswith("downstream")


async def test_pipelined_requests_are_answered_in_order(app: App) -> None:
    """Three requests in one write: the lane takes the first whole, serve the others after it."""
    router = ToApp(app.port)
    async with _served(router) as (_down, client, _task, observer):
        await _warm(client)
        await client.send(b"".join(b"GET /q%d HTTP/1.1\r\nHost: app\r\n\r\n" % i for i in range(3)))
        assert [(await client.response())[2] for _ in range(3)] == [b"/q0 ", b"/q1 ", b"/q2 "]
        assert router.routed_now >= 1
        assert [r.status for r in _finished_once(observer)] == [200] * 4 and router.outstanding == 0


async def test_serve_cancelled_with_an_exchange_in_the_lane_gives_it_up(app: App) -> None:
    router = ToApp(app.port)
    async with _served(router) as (_down, client, task, observer):
        await _warm(client)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        await asyncio.sleep(0.1)
        assert router.outstanding == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert router.released[-1] == (False, None) and router.outstanding == 0
        assert len(_finished_once(observer)) == 2


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
async def test_the_app_gets_from_the_lane_what_it_gets_from_serve(app: App, direction: str) -> None:
    """The same requests through the lane and through serve's coroutines alone: the app receives
    the same bytes (inbound: the target normalized once, as the policy saw it)."""
    requests = [
        b"GET /a/./b/../c?x=1 HTTP/1.1\r\nHost: app\r\nX-Thing: 1\r\n\r\n",
        b"GET /a/./b/../c?x=1 HTTP/1.1\r\nHost: app\r\n\r\n",  # (the same target again: kept)
        b"GET /a/./b/../c?x=2 HTTP/1.1\r\nHost: app\r\n\r\n",  # (another: not the kept one)
        b"GET /%2541/%7e%2F HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET http://app/abs?q HTTP/1.1\r\nHost: other\r\n\r\n",
        b"POST /up HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nTraceparent: 00-1-2-01\r\n\r\nabc",
        b"GET /x HTTP/1.1\r\nHost: app\r\nX-Forwarded-Client-Cert: By=evil\r\n\r\n",
    ]
    seen = []
    for router in (ToApp(app.port), CoroutinesOnly(app.port)):
        app.heads.clear()
        async with _served(router, direction) as (_down, client, _task, _):
            await _warm(client)
            for request in requests:
                await client.send(request)
                assert (await client.response())[0] == 200
            seen.append(list(app.heads))
    assert seen[0] == seen[1]


async def test_a_request_that_comes_while_the_lane_has_one_in_flight_waits_for_it(app: App) -> None:
    """A second request in its own write while the first waits for its response (pipelined, or
    a client's stray bytes): it waits its turn; serve took it, closed the connection and dropped
    the first."""
    router = ToApp(app.port)
    async with _served(router) as (_down, client, task, observer):
        await _warm(client)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        await asyncio.sleep(0.1)
        await client.send(b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n")
        assert [(await client.response())[2] for _ in range(2)] == [b"slow", b"/next "]
        assert [r.status for r in _finished_once(observer)] == [200] * 3 and router.outstanding == 0
        assert not task.done()


async def test_serve_cancelled_before_it_takes_what_the_lane_handed_back(app: App) -> None:
    """The lane hands an exchange back (its deadline) and serve is cancelled before it runs (a
    drain's end): the exchange is given up all the same, the upstream released, the span ended."""
    router = ToApp(app.port, timeout=0.2)
    async with _served(router) as (down, client, task, observer):
        hand_back = down.hand_back

        def and_cancel(what: object) -> None:
            hand_back(what)
            if isinstance(what, http1._Handed) and what.sent is not None:
                task.cancel()

        await _warm(client)
        down.hand_back = and_cancel  # type: ignore[method-assign]
        await client.send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        assert router.released[-1] == (False, None) and router.outstanding == 0
        assert len(_finished_once(observer)) == 2 and down.handed is None


async def test_a_client_that_closes_between_requests_is_let_go_at_once(app: App) -> None:
    """A FIN after the lane's exchange ends serve at once, as between requests of its own. (An
    exchange of a second spans one of serve's ticks, which found the lane busy: it then waited for
    the next tick, up to a second here and half the idle timeout at most.)"""
    router = ToApp(app.port)
    async with _served(router) as (_down, client, task, _):
        await _warm(client)
        assert (await _get(client, "/slow"))[0] == 200 and router.routed_now == 1
        start = time.monotonic()
        client.sock.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 2)
        assert time.monotonic() - start < 0.2


async def test_a_request_the_lane_could_not_write_is_sent_by_serve(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request head cannot be written (``LocalProtocolError``: a CR or LF in a field, which
    no parser lets through today): serve sends it itself, as it would have, rather than wait for
    the answer to a request that never went out."""
    router = ToApp(app.port)
    send_whole = h1.Connection.send_whole
    failed: list[bool] = []

    def once(self: h1.Connection, head: h1.Request | h1.Response, body: bytes = b"") -> bytes:
        if not failed and isinstance(head, h1.Request):
            failed.append(True)
            raise h1.LocalProtocolError("cannot be sent")
        return send_whole(self, head, body)

    async with _served(router) as (_, client, _, observer):
        await _warm(client)
        monkeypatch.setattr(h1.Connection, "send_whole", once)
        status, _, body = await _get(client, "/once-more")
        assert (status, body) == (200, b"/once-more ") and failed == [True]
        assert [r.status for r in _finished_once(observer)] == [200, 200] and router.outstanding == 0


class CountingPipe(Pipe):
    """Counts the wake-ups of a waiting reader (``serve``'s task)."""

    wakes = 0

    def _wake(self) -> None:
        if self._reader is not None and not self._reader.done():
            self.wakes += 1
        super()._wake()


async def test_serve_is_not_woken_for_the_lanes_exchanges_on_a_framed_connection(app: App) -> None:
    """A client sidecar's pooled connection (`sidemesh/1` DATA frames): the requests the lane
    proxies wake no task (each woke serve for nothing: a future and a task step per request)."""
    router = ToApp(app.port)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    down = CountingPipe(framed=True, name="downstream")
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: down, ours)
    ctx = http1.Context("inbound", Observer(), idle_timeout=30, draining=lambda: False)
    task = asyncio.create_task(http1.serve(down, router, ctx))
    client = Client(theirs)
    request = b"GET /framed HTTP/1.1\r\nHost: app\r\n\r\n"
    try:
        for i in range(6):
            await client.send(framing.data_header(len(request)) + request)
            answer = b""
            while not answer.endswith(b"/framed "):
                data = await asyncio.wait_for(loop.sock_recv(theirs, 65536), 5)
                assert data
                answer += data
            assert answer.startswith(framing.data_header(len(answer) - 5)) and b" 200 OK\r\n" in answer
            if i == 0:
                woken = down.wakes
        assert router.routed_now == 5 and down.wakes == woken
    finally:
        await _end(task, down, client, router)


@pytest.mark.parametrize("lane", [True, False])
async def test_a_request_answered_by_the_sidecar_counts_its_body(app: App, lane: bool) -> None:
    """A request the lane took whole and gave back (it closes its connection), answered by the
    sidecar (a denial): its body is counted as serve counts one it reads and drops."""
    router = ToApp(app.port) if lane else CoroutinesOnly(app.port)
    async with _served(router) as (_down, client, _task, observer):
        await _warm(client)
        await client.send(
            b"POST /deny HTTP/1.1\r\nHost: app\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody"
        )
        assert (await client.response())[0] == 403
        results = _finished_once(observer)
        assert [(r.status, r.request_bytes) for r in results] == [(200, 0), (403, 4)]


async def test_a_chunked_response_whole_in_its_read_is_finished_in_the_lane(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response in several chunks that came in one read is whole: the lane sends it on (its
    chunks joined in one), nothing handed back; one in two reads goes on in serve."""
    given_back: list[bool] = []
    give_back = http1._Lane.give_back

    def counted(self: http1._Lane) -> None:
        given_back.append(True)
        give_back(self)

    monkeypatch.setattr(http1._Lane, "give_back", counted)
    router = ToApp(app.port)
    async with _served(router) as (_down, client, _task, observer):
        await _warm(client)
        assert await _get(client, "/chunks") == (200, _HEAD_CHUNKED, b"abcde")
        assert given_back == [] and router.routed_now == 1
        assert await _get(client, "/stream") == (200, _HEAD_CHUNKED, b"firstsecond")
        assert given_back == [True]
        assert [r.status for r in _finished_once(observer)] == [200] * 3 and router.outstanding == 0
