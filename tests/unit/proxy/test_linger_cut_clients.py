"""A client the sidecar cuts off (the HTTP/1.1 head timeout; an HTTP/2 protocol error) gets the
short linger (1 s), not the one an upload answered early gets (up to 30 s while it sends); a
denied upload gets that one."""

from __future__ import annotations

import asyncio
import contextlib
import time

from proxy import http1
from proxy.detect import H2_PREFACE
from proxy.observe import NullObserver
from proxy.pipe import Pipe
from tests.support.pipes import denying_h2_proxy, pipe_and_peer
from tests.unit.proxy.test_http2_fields import _frame
from tests.unit.proxy.test_http_fuzz import AnswerRouter


def test_a_slow_head_is_cut_near_the_head_timeout() -> None:
    async def run() -> tuple[float, bytes]:
        pipe, b = await pipe_and_peer("downstream")
        ctx = http1.Context(
            "outbound", NullObserver(), idle_timeout=60, draining=lambda: False, head_timeout=1.0
        )
        server = asyncio.create_task(http1.serve(pipe, AnswerRouter(), ctx))
        reader, writer = await asyncio.open_connection(sock=b)
        writer.write(b"GET / HTTP/1.1\r\n")
        start, got = time.monotonic(), b""
        while not server.done() and time.monotonic() - start < 6:
            with contextlib.suppress(Exception):
                writer.write(b"X")  # one byte of a header line every half second
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):
                got += await asyncio.wait_for(reader.read(65536), 0.01)
        held = time.monotonic() - start
        server.cancel()
        writer.close()
        return held, got

    held, got = asyncio.run(run())
    assert b"408" in got
    assert held < 3, f"a slow client's connection was held {held:.1f} s with a 1 s head timeout"


def test_a_client_cut_off_for_a_protocol_error_is_closed_soon() -> None:
    async def run() -> float:
        server, reader, writer = await denying_h2_proxy(60)
        # a SETTINGS frame on a stream: a connection error (GOAWAY PROTOCOL_ERROR), then the linger
        writer.write(H2_PREFACE + _frame(4, 0, 0, b"") + _frame(4, 0, 1, b""))
        start = time.monotonic()
        while not server.done() and time.monotonic() - start < 6:
            writer.write(b"\0" * 16384)  # whatever: the sidecar reads and drops it
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(65536), 0.01)
        held = time.monotonic() - start
        server.cancel()
        writer.close()
        return held

    held = asyncio.run(run())
    assert held < 3, f"the flagged client's connection was still open after {held:.1f} s"


class Deny(AnswerRouter):
    async def route(self, request, info, avoid=()):  # type: ignore[no-untyped-def]
        return http1.Local(403, "denied", "deny")


def test_a_denied_upload_with_expect_keeps_being_drained() -> None:
    """A denial answered to an ``Expect: 100-continue`` upload whose client sends its body anyway
    (RFC 9110 10.1.1 allows it) is an answer before the upload's end too: the long linger (it was
    cut after 1 MiB, the denial reset away from a client that writes before it reads)."""

    async def run() -> tuple[float, bool]:
        ctx = http1.Context("inbound", NullObserver(), idle_timeout=60, draining=lambda: False)

        done = asyncio.Event()

        def factory() -> Pipe:
            pipe = Pipe(framed=False, name="downstream")
            task = asyncio.get_running_loop().create_task(http1.serve(pipe, Deny(), ctx))
            task.add_done_callback(lambda _: done.set())
            return pipe

        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = 4 << 20
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % size
        )
        start = time.monotonic()
        sent = 0
        try:
            while sent < size and not done.is_set():  # 2 MiB/s, not reading meanwhile
                writer.write(b"x" * 65536)
                sent += 65536
                await writer.drain()
                await asyncio.sleep(65536 / (2 << 20))
        except ConnectionError:
            pass
        held = time.monotonic() - start
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        server.close()
        return held, sent >= size

    held, whole = asyncio.run(run())
    assert whole, f"the upload was cut after {held:.1f} s (a 1 s / 1 MiB linger after the 403)"
