"""HTTP/1.x through a sidecar pair as on a direct connection, where an audit (2026-12-07) found them
to differ: each case with real sockets and bytes the test chooses."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, new_mesh
from tests.integration.test_http1 import ALLOW_CART_PATHS, APP, CART, FRONTEND, OUT, raw_app_pair


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path, ALLOW_CART_PATHS)
    yield m
    await m.close()


async def _read_all(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """Until EOF, a reset, or ``timeout`` without bytes (what the client got, whatever the end)."""
    out = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            out += chunk
    return out


# -- A response the app cuts short (or breaks) after its head reaches the client as it came -------


@pytest.mark.parametrize(
    "cut",
    [
        # a chunk, then a malformed chunk size: the app answered, its response is broken mid-body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
        # the app crashes after the head and part of the body (FIN, as a dying process's socket)
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
    ],
    ids=["malformed-chunk", "truncated-length"],
)
async def test_a_response_broken_after_its_head_is_not_sent_again_and_its_head_reaches_the_client(
    mesh: Mesh, cut: bytes
) -> None:
    """Direct, the client gets the app's 200 head and what body came, then the connection ends
    (truncation it can see); through the pair too. The server sidecar relays the head and body
    with ``Pipe.write`` (queued until the end of the loop's turn) and, on the upstream failure in
    the same turn, reset the connection (``down.abort()``), which cleared that queue: the client
    sidecar saw its pooled connection reset before any response byte, took it for "closed under
    the request" and sent the GET again on a fresh connection (the app got it twice), then
    answered 502. RFC 9112 9.3.1
    allows an automatic retry only when no response was received; the app answered. Envoy flushes
    what it relayed and closes (FlushWriteAndDelay) when an upstream fails mid-response."""
    seen: list[str] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                line = head.split(b"\r\n")[0].decode()
                seen.append(line)
                if "/cart/cut" in line:
                    writer.write(cut)
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    async with raw_app_pair(mesh, app) as addr:
        for attempt in range(3):
            seen.clear()
            reader, writer = await asyncio.open_connection(*addr)
            try:
                writer.write(
                    b"GET /cart/warm HTTP/1.1\r\nHost: cart\r\n\r\n"
                )  # the pooled connection: reused
                await asyncio.wait_for(reader.readuntil(b"ok"), 5)
                writer.write(b"GET /cart/cut HTTP/1.1\r\nHost: cart\r\n\r\n")
                got = await _read_all(reader, 3)
            finally:
                writer.close()
            assert seen.count("GET /cart/cut HTTP/1.1") == 1, (attempt, seen)
            assert got.startswith(b"HTTP/1.1 200 "), (attempt, got)


def _line_recording_app(
    lines: list[bytes],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """An app that records each request line it gets and answers 200 ``ok``."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines.append(head.split(b"\r\n")[0])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    return app


# -- An absolute-form target reaches the app in origin form ---------------------------------------


async def test_an_absolute_form_target_reaches_the_app_in_origin_form(mesh: Mesh) -> None:
    """RFC 9112 3.2.1/3.2.2: a client (here the server sidecar) making a request directly to an
    origin server sends origin form; only a proxy gets absolute form. Envoy parses an absolute
    URL into :authority and :path and sends origin form upstream. The sidecar judged the path
    but sent ``GET http://cart.shop/cart/abs?q=1`` as it came: servers that route on the raw
    target (http.server's ``self.path``, many hand-written routers) saw a path that is not one."""
    lines: list[bytes] = []
    app = _line_recording_app(lines)

    async with raw_app_pair(mesh, app) as addr:
        reader, writer = await asyncio.open_connection(*addr)
        try:
            writer.write(b"GET http://cart.shop/cart/abs?q=1 HTTP/1.1\r\nHost: cart.shop\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert lines == [b"GET /cart/abs?q=1 HTTP/1.1"], lines


# -- Request lines of other HTTP versions get 505 -------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GET /cart/a\r\n\r\n",
        b"GET /cart/a HTTP/2.0\r\nHost: cart\r\n\r\n",
        b"GET /cart/a HTTP/3.0\r\nHost: cart\r\n\r\n",
    ],
)
async def test_a_request_line_of_another_http_version_is_not_forwarded_as_http11(
    mesh: Mesh, line: bytes
) -> None:
    """llhttp accepts an HTTP/0.9 request line (no version) and any HTTP/x.y; the sidecar sent
    them to the app as HTTP/1.1 (0.9 with ``Host: localhost`` added) and answered with an HTTP/1.1
    status line and headers, which an HTTP/0.9 client takes as body. RFC 9110 6.2 / RFC 9112 2.3:
    a server answers a major version it does not support with 505; Envoy's HTTP/1 codec refuses
    HTTP/0.9 and a request line claiming HTTP/2 or HTTP/3 (protocol error, 400)."""
    lines: list[bytes] = []
    app = _line_recording_app(lines)

    async with raw_app_pair(mesh, app) as addr:
        reader, writer = await asyncio.open_connection(*addr)
        try:
            writer.write(line)
            got = await _read_all(reader, 2)
        finally:
            writer.close()
    assert lines == [], lines
    assert re.match(rb"HTTP/1\.1 (400|505) ", got), got


# -- Trailers of a chunked request whose body is empty reach the app ------------------------------


async def _recording_app(received: list[bytes], answer: bytes):  # type: ignore[no-untyped-def]
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                message = head
                if b"transfer-encoding: chunked" in head.lower():  # (small bodies: one chunk at most)
                    while (line := await reader.readuntil(b"\r\n")) != b"0\r\n":
                        message += line
                    message += line
                    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # the trailer section
                        message += line
                    message += line
                received.append(message)
                writer.write(answer)
                await writer.drain()
        writer.close()

    return app


async def test_trailers_of_a_chunked_request_with_an_empty_body_reach_the_app(mesh: Mesh) -> None:
    """``0\\r\\nX-Checksum: 42\\r\\n\\r\\n`` right after the head: ``_forward`` reads the request's
    end at once (``first`` is the EndOfMessage, so the body counts as complete) and sends
    ``EndOfMessage(body.trailers)``; ``body.trailers`` was set only by ``_pump_body``, and the
    trailers were dropped (with one byte of body they passed: the pump set them)."""
    received: list[bytes] = []
    app = await _recording_app(received, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with raw_app_pair(mesh, app) as addr:
        reader, writer = await asyncio.open_connection(*addr)
        try:
            writer.write(
                b"POST /cart/t HTTP/1.1\r\nHost: cart\r\nTrailer: X-Checksum\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\nX-Checksum: 42\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"x-checksum: 42" in received[0].lower(), received


# -- An answer before the end of a large upload (a denial, an early 4xx) reaches the client -------


async def _early_answer_app(host: str) -> web.AppRunner:
    """An aiohttp app that answers uploads at once without reading them (aiohttp then drains the
    body and keeps the connection, as most servers do)."""

    async def early(request: web.Request) -> web.Response:
        return web.Response(status=413, text="too big for us")

    async def other(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/cart/early", early)
    app.router.add_route("*", "/{tail:.*}", other)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, APP).start()
    return runner


def _upload(addr: tuple[str, int], path: str, size: int) -> tuple[int, int] | str:
    """http.client (as requests): the whole body is written, then the response read."""
    conn = http.client.HTTPConnection(*addr, timeout=10)
    try:
        conn.request("POST", path, body=b"x" * size)
        first = conn.getresponse()
        first.read()
        conn.request("GET", "/cart/after")
        second = conn.getresponse()
        second.read()
        return first.status, second.status
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)
    finally:
        conn.close()


@pytest.fixture
async def early_pair(mesh: Mesh) -> AsyncIterator[tuple[str, int]]:
    runner = await _early_answer_app(mesh.addr(CART))
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    yield mesh.addr(FRONTEND), OUT
    await runner.cleanup()


@pytest.mark.parametrize(("path", "status"), [("/admin", 403), ("/cart/early", 413)])
async def test_an_answer_before_a_large_upload_ends_reaches_the_client(
    mesh: Mesh, early_pair: tuple[str, int], path: str, status: int
) -> None:
    """Direct, the app's early 413 reaches http.client and the connection goes on (aiohttp reads
    and drops the rest of the body). Through the pair too, and the sidecar's own 403 as well: the
    client sidecar, seeing the response end before the request body, half-closes and drops what
    the client still sends until it stops (``linger_close``). With a cap of 1 MiB it closed with
    unread bytes, a reset that discarded the answer from the client's receive buffer (Envoy has had
    the same loss: envoyproxy/envoy#2929)."""
    size = 8 << 20
    direct = await asyncio.to_thread(_upload, (mesh.addr(CART), APP), path, size)
    if path == "/cart/early":
        assert direct == (413, 200), direct
    meshed = await asyncio.to_thread(_upload, early_pair, path, size)
    assert isinstance(meshed, tuple) and meshed[0] == status, meshed
