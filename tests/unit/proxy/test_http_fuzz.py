"""The HTTP/1 and HTTP/2 server sides under arbitrary input (hypothesis): whatever a client sends, the proxy
answers with a well-formed response or closes, never raises, never hangs; and a well-formed request
on the next connection is served. Real sockets; the router answers every request itself (a 200
with the request's method and path), so the parser and the error paths are what runs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import h1, http1, http2
from proxy.detect import H2_PREFACE
from proxy.observe import NullObserver, RequestInfo
from proxy.pipe import Pipe


class AnswerRouter:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def begin(self, info: RequestInfo) -> float | None:
        return None

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        return False

    async def route(
        self, request: h1.Request, info: RequestInfo, avoid: Sequence[str] = ()
    ) -> http1.Local | http1.Upstream:
        self.seen.append(f"{info.method} {info.path}")
        return http1.Local(200, f"{info.method} {info.path}", "allow")

    async def fresh(self, up: http1.Upstream) -> http1.Local | http1.Upstream:
        raise AssertionError("never forwards")

    def release(self, up: http1.Upstream, reusable: bool, ok: bool) -> None:
        raise AssertionError("never forwards")


async def _serve_bytes(payload: bytes, router: AnswerRouter) -> bytes:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    pipe = Pipe(framed=False, name="downstream")
    await loop.connect_accepted_socket(lambda: pipe, a)
    ctx = http1.Context("inbound", NullObserver(), idle_timeout=0.5, draining=lambda: False)
    server = asyncio.create_task(http1.serve(pipe, router, ctx))
    reader, writer = await asyncio.open_connection(sock=b)
    writer.write(payload)
    writer.write_eof()
    try:
        out = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        out = b""
    await asyncio.wait_for(server, 5)  # returns (never raises) once the client is gone
    writer.close()
    return out


def _check(out: bytes) -> None:
    if out:
        assert out.startswith(b"HTTP/1.1 "), out[:80]
        client = h11.Connection(h11.CLIENT)  # every response is well-formed
        client.receive_data(out)
        client.receive_data(b"")


REQUEST = st.builds(
    lambda method, path, headers, body: (
        method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body
    ),
    st.sampled_from([b"GET", b"POST", b"PUT", b"G T", b""]),
    st.binary(max_size=40).map(lambda p: b"/" + p),
    st.lists(
        st.sampled_from(
            [
                b"Content-Length: 5\r\n",
                b"Content-Length: -1\r\n",
                b"Content-Length: 99999999999999999999\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"Transfer-Encoding: gzip\r\n",
                b"Expect: 100-continue\r\n",
                b"Connection: close\r\n",
                b"X: \x00\r\n",
                b" folded\r\n",
                b"NoColon\r\n",
            ]
        ),
        max_size=4,
    ).map(b"".join),
    st.binary(max_size=60),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.one_of(REQUEST, st.binary(max_size=200), REQUEST.map(lambda r: r * 3)))
def test_arbitrary_input_never_crashes_the_http_layer(payload: bytes) -> None:
    async def run() -> None:
        router = AnswerRouter()
        _check(await _serve_bytes(payload, router))
        good = await _serve_bytes(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", router)
        assert good.startswith(b"HTTP/1.1 200") and b"GET /ok" in good

    asyncio.run(run())


def test_pipelined_requests_are_all_answered_in_order() -> None:
    async def run() -> bytes:
        reqs = b"".join(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5))
        return await _serve_bytes(reqs, AnswerRouter())

    out = asyncio.run(run())
    assert [line for line in out.split(b"\n") if line.startswith(b"GET /")] == [
        f"GET /{i}".encode() for i in range(5)
    ]


async def _serve_h2_bytes(payload: bytes) -> bytes:
    """An HTTP/2 connection that denies every stream (no app), fed ``payload`` after the preface."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    pipe = Pipe(framed=False, name="downstream")
    await loop.connect_accepted_socket(lambda: pipe, a)

    async def no_app() -> Pipe:
        raise AssertionError("every stream is denied")

    proxy = http2.H2Proxy(
        pipe, lambda method, path: http2.Denial(403, "denied"), no_app, NullObserver().start, {}
    )
    server = asyncio.create_task(proxy.run(idle_timeout=0.5))
    reader, writer = await asyncio.open_connection(sock=b)
    writer.write(H2_PREFACE + payload)
    writer.write_eof()
    try:
        out = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        out = b""
    await asyncio.wait_for(server, 5)
    writer.close()
    return out


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


FRAME = st.builds(
    _frame,
    st.sampled_from([0, 1, 3, 4, 6, 7, 8, 9, 0x20]),  # DATA HEADERS RST SETTINGS PING GOAWAY WINDOW CONT ?
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 2**31 - 1]),
    st.binary(max_size=30),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(FRAME, max_size=6))
def test_arbitrary_http2_frames_never_crash_the_h2_layer(frames: list[bytes]) -> None:
    async def run() -> None:
        await _serve_h2_bytes(_frame(4, 0, 0, b"") + b"".join(frames))  # a SETTINGS, then the frames

    asyncio.run(run())
