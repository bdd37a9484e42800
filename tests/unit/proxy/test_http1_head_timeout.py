"""A request head must arrive whole within the head timeout of its first byte (slow clients,
slowloris): the sidecar answers 408 and closes, and counts it; a normal client is unaffected.
An idle keep-alive connection is closed after the idle timeout (checked by the pipe's ticks, not a
timer per request), and a request that comes before it is served."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence

import pytest

from proxy import h1, http1
from proxy.observe import NullObserver, RequestInfo
from proxy.pipe import Pipe


class Answer:
    async def route(
        self, request: h1.Request, info: RequestInfo, avoid: Sequence[str] = ()
    ) -> http1.Local | http1.Upstream:
        return http1.Local(200, f"{info.method} {info.path}", "allow")

    def begin(self, info: RequestInfo) -> float | None:
        return None

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        return False

    async def fresh(self, up: http1.Upstream) -> http1.Local | http1.Upstream:
        raise AssertionError("never forwards")

    def release(self, up: http1.Upstream, reusable: bool, ok: bool) -> None:
        raise AssertionError("never forwards")


async def _serve(
    refused: list[str], idle_timeout: float = 30, head_timeout: float = 0.4
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    pipe = Pipe(framed=False, name="downstream")
    await loop.connect_accepted_socket(lambda: pipe, a)
    ctx = http1.Context(
        "inbound",
        NullObserver(),
        idle_timeout=idle_timeout,
        draining=lambda: False,
        head_timeout=head_timeout,
        on_refused=refused.append,
    )
    task = asyncio.create_task(http1.serve(pipe, Answer(), ctx))
    reader, writer = await asyncio.open_connection(sock=b)
    return reader, writer, task


@pytest.mark.parametrize(
    ("idle_timeout", "head_timeout", "at_least"),
    [
        (30, 0.4, 0.3),
        (0.1, 0.6, 0.55),  # the idle ticks (every 0.05 s) wake the reader: the head wait still lasts
    ],
    ids=["quiet", "idle-ticks"],
)
async def test_a_head_that_stops_midway_gets_408(
    idle_timeout: float, head_timeout: float, at_least: float
) -> None:
    refused: list[str] = []
    reader, writer, task = await _serve(refused, idle_timeout=idle_timeout, head_timeout=head_timeout)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    started = time.monotonic()
    out = await asyncio.wait_for(reader.read(), 5)
    assert out.startswith(b"HTTP/1.1 408 "), out
    assert at_least < time.monotonic() - started < 3
    assert refused == ["head"]
    await asyncio.wait_for(task, 5)
    writer.close()


async def test_a_trickling_head_gets_408_although_bytes_keep_coming() -> None:
    refused: list[str] = []
    reader, writer, task = await _serve(refused)
    line = b"GET /slow HTTP/1.1\r\nX-Pad: " + b"a" * 100

    async def trickle() -> None:
        for byte in line:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)

    sender = asyncio.create_task(trickle())
    try:
        out = await asyncio.wait_for(reader.read(), 5)
    except (ConnectionResetError, BrokenPipeError):  # the next trickled byte hit the closed socket
        # before we read (a reset or EPIPE, as the timing falls)
        out = b""
    sender.cancel()
    assert out.startswith(b"HTTP/1.1 408 ") or out == b"", out
    assert refused == ["head"]
    await asyncio.wait_for(task, 5)
    writer.close()


async def test_keep_alive_requests_each_get_their_own_head_time() -> None:
    refused: list[str] = []
    reader, writer, task = await _serve(refused)
    for i in range(3):  # idle between requests is the idle timeout's business, not the head's
        await asyncio.sleep(0.5)
        writer.write(f"GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert (await reader.readexactly(length)).startswith(f"GET /r{i}".encode())
    assert refused == []
    writer.close()
    await asyncio.wait_for(task, 5)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> None:
    reader, writer, task = await _serve([], idle_timeout=0.4)
    for i in range(3):  # requests inside the idle timeout keep the connection
        assert (await _get(reader, writer, f"/r{i}")).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.25)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing more sent
    idle = time.monotonic() - started + 0.25
    assert 0.35 < idle < 0.9, idle  # the ticks check every idle/2: closed within 1.5x the timeout
    await asyncio.wait_for(task, 5)
    writer.close()
