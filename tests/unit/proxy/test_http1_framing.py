"""Framing survives hop-by-hop removal: a client or an upstream that names Content-Length or
Transfer-Encoding in Connection must not make the sidecar send a body without framing (the bytes
would be read as the next message: request smuggling, or a desynced client connection)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import h11

from proxy import h1, http1
from proxy.observe import NullObserver, RequestInfo
from proxy.pipe import Pipe

SMUGGLED = b"DELETE /admin HTTP/1.1\r\nHost: cart\r\n\r\n"


class ToUpstream:
    """Every request goes to one upstream connection (a socket pair)."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    def begin(self, info: RequestInfo) -> float | None:
        return None

    async def route(
        self, request: h1.Request, info: RequestInfo, avoid: Sequence[str] = ()
    ) -> http1.Local | http1.Upstream:
        return http1.Upstream(self.pipe, h1.Connection(h1.CLIENT), reused=False)

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        return False

    async def fresh(self, up: http1.Upstream) -> http1.Local | http1.Upstream:
        raise AssertionError("no retries here")

    def release(self, up: http1.Upstream, reusable: bool, ok: bool) -> None:
        pass


async def _pipe(sock: socket.socket) -> Pipe:
    pipe = Pipe(framed=False)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: pipe, sock)
    return pipe


async def _exchange(request: bytes, response: bytes) -> tuple[list[object], bytes]:
    """``request`` through ``http1.serve`` to an upstream that answers ``response``: what the
    upstream (h11 as the server) read, and the bytes the client got."""
    down_a, down_b = socket.socketpair()
    up_a, up_b = socket.socketpair()
    for s in (down_a, up_a):
        s.setblocking(False)
    down, up = await _pipe(down_a), await _pipe(up_a)
    ctx = http1.Context("inbound", NullObserver(), idle_timeout=30, draining=lambda: False)
    task = asyncio.create_task(http1.serve(down, ToUpstream(up), ctx))
    server_r, server_w = await asyncio.open_connection(sock=up_b)
    client_r, client_w = await asyncio.open_connection(sock=down_b)
    client_w.write(request)
    upstream = h11.Connection(h11.SERVER)
    seen: list[object] = []
    while not any(isinstance(e, h11.EndOfMessage) for e in seen):
        event = upstream.next_event()
        if event is h11.NEED_DATA:
            upstream.receive_data(await asyncio.wait_for(server_r.read(65536), 5))
        else:
            seen.append(event)
    server_w.write(response)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    out = b""
    while not out.endswith(b"hello") and len(out) < 1000:
        out += await asyncio.wait_for(client_r.read(65536), 5)
    try:
        late = await asyncio.wait_for(server_r.read(65536), 0.2)
    except TimeoutError:
        late = b""
    client_w.close()
    server_w.close()
    await asyncio.wait_for(task, 5)
    up.close()
    down.close()
    await asyncio.sleep(0.01)  # the transports' close callbacks
    extra = upstream.trailing_data[0] + late
    assert extra == b"", extra  # nothing after the request: no second request upstream
    return seen, out


async def test_a_content_length_named_in_connection_still_frames_the_request_body() -> None:
    head = b"POST /cart/1 HTTP/1.1\r\nHost: cart\r\nConnection: content-length\r\n"
    seen, _ = await _exchange(
        head + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    )
    assert isinstance(seen[0], h11.Request) and seen[0].target == b"/cart/1"
    body = b"".join(bytes(e.data) for e in seen if isinstance(e, h11.Data))
    assert body == SMUGGLED  # a body, not a request


async def test_a_transfer_encoding_named_in_connection_still_chunks_the_request_body() -> None:
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    seen, _ = await _exchange(
        b"POST /cart/1 HTTP/1.1\r\nHost: cart\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    )
    assert b"".join(bytes(e.data) for e in seen if isinstance(e, h11.Data)) == SMUGGLED


async def test_a_response_with_its_framing_named_in_connection_is_still_framed() -> None:
    _, out = await _exchange(
        b"GET /cart/1 HTTP/1.1\r\nHost: cart\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
    )
    head = out.split(b"\r\n\r\n", 1)[0].lower()
    assert b"content-length: 5" in head or b"transfer-encoding: chunked" in head, out


async def test_a_host_named_in_connection_is_still_sent() -> None:
    seen, _ = await _exchange(
        b"GET /cart/1 HTTP/1.1\r\nHost: cart\r\nConnection: host\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    )
    assert isinstance(seen[0], h11.Request) and (b"host", b"cart") in list(seen[0].headers)
