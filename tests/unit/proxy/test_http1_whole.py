"""Messages taken whole (``h1.Connection.rest_of_message``, one write each way): the relay still
holds back for a client that does not read, and a client that half-closes after a whole request
gives it up whatever its body, as after one without a body. ``http1.serve`` on a socketpair, an
app on a real socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from proxy import h1, http1
from proxy.observe import NullObserver, RequestInfo
from proxy.pipe import Pipe

SIZE = 16 * 1024


class ToApp:
    """Every request to the app at ``port``, on one pooled connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pipe: Pipe | None = None
        self.released: list[tuple[bool, bool | None]] = []

    def begin(self, info: RequestInfo) -> float | None:
        return None

    async def route(
        self, request: h1.Request, info: RequestInfo, avoid: Sequence[str] = ()
    ) -> http1.Local | http1.Upstream:
        reused = self.pipe is not None and self.pipe.usable
        if not reused:
            self.pipe = Pipe(framed=False, name="upstream")
            await asyncio.get_running_loop().create_connection(lambda: self.pipe, "127.0.0.1", self.port)
        assert self.pipe is not None
        return http1.Upstream(self.pipe, h1.Connection(h1.CLIENT), reused=reused)

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        return False

    def may_reroute(self, attempt: int) -> bool:
        return False

    async def fresh(self, up: http1.Upstream) -> http1.Local | http1.Upstream:
        raise AssertionError("no retries here")

    def release(self, up: http1.Upstream, reusable: bool, ok: bool | None, observe: bool = False) -> None:
        self.released.append((reusable, ok))
        if not reusable:
            up.pipe.close()


async def _app(delay: float = 0.0) -> tuple[asyncio.Server, int]:
    """Answers every request (bodies skipped by their Content-Length) with SIZE bytes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                await asyncio.sleep(delay)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE + b"x" * SIZE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _serving(router: ToApp) -> tuple[Pipe, socket.socket, asyncio.Task[None]]:
    ours, client = socket.socketpair()
    ours.setblocking(False)
    client.setblocking(False)
    down = Pipe(framed=False, name="downstream")
    await asyncio.get_running_loop().connect_accepted_socket(lambda: down, ours)
    ctx = http1.Context("outbound", NullObserver(), idle_timeout=30, draining=lambda: False)
    return down, client, asyncio.create_task(http1.serve(down, router, ctx))


async def test_responses_wait_for_a_client_that_does_not_read() -> None:
    """500 pipelined GETs from a client that never reads, each answered with 16 KiB (8 MB in all):
    the sidecar holds back at its write buffer's mark, not the whole 8 MB in memory (each response
    taken whole was written without looking at the buffer: 32 MB for 2,000)."""
    server, port = await _app()
    down, client, task = await _serving(ToApp(port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        await asyncio.get_running_loop().sock_sendall(client, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * 500)
        peak = 0
        for _ in range(40):
            await asyncio.sleep(0.025)
            assert down.transport is not None
            peak = max(peak, down.transport.get_write_buffer_size())
        assert 0 < peak < 2 * 1024 * 1024, peak
        assert not task.done()
    finally:
        task.cancel()
        client.close()
        server.close()


async def test_a_client_that_half_closes_after_a_whole_request_gives_it_up() -> None:
    """No half-close for HTTP (as Envoy): a FIN after the request gives the request up, with a
    body as without one; before, a body taken by the pump got its answer when the FIN came first,
    and not when it came a moment later. The app's connection is dropped, not pooled."""
    server, port = await _app(delay=0.05)
    try:
        for request in (
            b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        ):
            router = ToApp(port)
            _, client, task = await _serving(router)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(client, request)
            client.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(task, 5)
            assert await asyncio.wait_for(loop.sock_recv(client, 65536), 5) == b"", request
            assert router.released and router.released[0][0] is False, router.released
            client.close()
    finally:
        server.close()
