"""Protocol detection: the pure classifier, and ``detect`` on real sockets (partial input, silence,
a client that closes, and no busy polling while a ClientHello trickles in)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from proxy import detect
from proxy.detect import Kind, classify
from sidemesh.identity.tls import ALPN

ALPN_WIRE = bytes([len(ALPN)]) + ALPN.encode()


def tls_record(body: bytes) -> bytes:
    return b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("peeked", "kind"),
    [
        (b"", Kind.CLOSED),
        (b"GET / HTTP/1.1\r\n", Kind.HTTP1),
        (b"POST /cart/x?y=1 HTTP/1.0\r\nHost: a\r\n", Kind.HTTP1),
        (b"GET / HTTP/1.1\n", Kind.HTTP1),
        (b"M-SEARCH * HTTP/1.1\r\n", Kind.HTTP1),
        # What llhttp (and the app's server) takes as a request is one: carried as opaque, it reached
        # the app unparsed, with the x-forwarded-client-cert the caller wrote.
        (b"GET / HTTP/2.0\r\n", Kind.HTTP1),  # (the parser answers the version)
        (b"\r\nGET /x HTTP/1.1\r\n", Kind.HTTP1),  # empty lines first (RFC 9112 2.2)
        (b"\r\n\n\r\n", None),
        (b"GET  /x HTTP/1.1\r\n", Kind.HTTP1),  # runs of spaces
        (b"GET /x  HTTP/1.1\r\n", Kind.HTTP1),
        (b"OPTIONS rtsp://cam/ RTSP/1.0\r\n", Kind.HTTP1),  # (RTSP ports: declare them opaque)
        (b"get key\r\n", Kind.OPAQUE),  # memcached's text protocol
        # Node and uvicorn (llhttp) serve these: whatever follows a target, it is a request.
        (b"GET /\r\n", Kind.HTTP1),
        (b"GET /cart/who RTSP/1.0\r\n", Kind.HTTP1),
        (b"GET foo://cart/x HTTP/1.1\r\n", Kind.HTTP1),
        (b"M-SEARCH /\r\n", Kind.HTTP1),
        (b"GET  *\r\n", Kind.HTTP1),
        (b"CONNECT cart:80\r\n", Kind.HTTP1),  # (Node serves it, version-less, to a 'connect' handler)
        (b'CONNECT {"verbose":false}\r\n', Kind.OPAQUE),  # NATS
        (b"OPTIONS icap://cart/avscan ICAP/1.0\r\n", Kind.OPAQUE),  # ICAP: no server takes it as HTTP
        (b"0041git-upload-pack /project.git\x00host=x\x00\x000014command=ls-refs\n", Kind.OPAQUE),  # git://
        (b"INVITE sip:bob@example.org SIP/2.0\r\n", Kind.OPAQUE),  # text protocols' commands
        (b"USER anonymous\r\n", Kind.OPAQUE),
        (b"a1 LOGIN user secret\r\n", Kind.OPAQUE),
        (b"GET", None),  # could still be a request line
        (b"GET /long/path", None),
        (b"P", None),  # POST, PUT, PATCH or the HTTP/2 preface
        (b"PRI * HTTP/2.0\r\n", None),
        (detect.H2_PREFACE, Kind.H2),
        (detect.H2_PREFACE + b"\x00\x00\x12\x04", Kind.H2),
        (b"SSH-2.0-OpenSSH_9.2\r\n", Kind.OPAQUE),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Kind.OPAQUE),  # Postgres SSLRequest
        (b"*1\r\n$4\r\nPING\r\n", Kind.OPAQUE),  # Redis
        (b"G\x00T / HTTP/1.1\r\n", Kind.HTTP1),  # (a method to http.server all the same; answered 400)
        (b"A" * 30, None),  # a method of any length (h11 and Go take any token)
        (b"A" * 30 + b" /admin HTTP/1.1\r\n", Kind.HTTP1),
        (b"PING\r\n", Kind.OPAQUE),
        # Python's servers (http.server, wsgiref, Werkzeug) strip CRs, split on any whitespace, take
        # any first word as the method and `GET <path>` as HTTP/0.9 (headers still read): requests
        # to them, so HTTP here (the sidecar's parser answers 400). Judged once the LF is there.
        (b" GET / HTTP/1.1\r\n", Kind.HTTP1),
        (b"GET\t/x\tHTTP/1.1\r\n", Kind.HTTP1),
        (b"GET /x HTTP/1.1\r\r\n", Kind.HTTP1),
        (b"GET /x HTTP/1.1\r \r\n", Kind.HTTP1),
        (b"GET /x\rHTTP/1.1\r\n", Kind.HTTP1),
        (b"GET\x0b/x\x1cHTTP/1.1\r\n", Kind.HTTP1),
        (b"GET\xa0/x\x85HTTP/1.1\r\n", Kind.HTTP1),
        (b"GET\t/orders\r\n", Kind.HTTP1),  # HTTP/0.9
        (b"GET /x\r\r\n", Kind.HTTP1),
        (b"GET(x) /orders HTTP/1.1\r\n", Kind.HTTP1),  # any first word
        (b"G\xc9T /orders HTTP/1.1\r\n", Kind.HTTP1),
        (
            b"GET key\r\n",
            Kind.HTTP1,
        ),  # HTTP/0.9 to them (Werkzeug routes it as /key); Redis: RESP, 6379 opaque
        (b" ", Kind.OPAQUE),  # (a relay looks again once the first line has ended)
        (b"GET\t/x", Kind.OPAQUE),
        (b"GET\t/x\tRTSP/1.0\r\n", Kind.OPAQUE),
        (b" PING\r\n", Kind.OPAQUE),
        (b"\tUSER anonymous\r\n", Kind.OPAQUE),
        (b"get\tkey\r\n", Kind.OPAQUE),
        (tls_record(b"\x01\x00\x00\x10" + ALPN_WIRE), Kind.MESH),
        (tls_record(b"\x01" + b"\x00" * 40), Kind.TLS),
        (tls_record(b"\x01" + b"\x00" * 40)[:20], None),  # a partial ClientHello
        (b"\x16\x03", None),
    ],
)
def test_classify(peeked: bytes, kind: Kind | None) -> None:
    assert classify(peeked) is kind


def test_a_request_line_longer_than_the_peek_is_http_when_it_starts_as_one() -> None:
    """It was opaque: an app whose server reads lines of 1 MB (Go's default) was told the caller's
    own identity headers. The sidecar's parser answers 414 past its limit."""
    peek = detect.PEEK_BYTES
    long = b"a" * peek
    assert classify((b"GET /" + long)[:peek]) is Kind.HTTP1
    assert classify((b"\r\nPOST  http://cart/" + long)[:peek]) is Kind.HTTP1
    assert classify((b"GET /" + b"a" * (peek - 9) + b" HTT")[:peek]) is Kind.HTTP1  # (the version cut)
    assert classify((b"GET" + b" " * peek)[:peek]) is Kind.HTTP1  # (the target after the peek)
    assert classify((b"GET foo://cart/?" + long)[:peek]) is Kind.HTTP1
    # As many empty lines as llhttp skips, and a method of any length (h11, Go): a request.
    assert classify(b"\r\n" * (peek // 2)) is Kind.HTTP1
    assert classify(b"A" * peek) is Kind.HTTP1


def test_a_first_line_is_judged_as_it_comes_in_little_memory() -> None:
    """A stream without an LF for 64 KiB (any binary one) kept all of it per connection: 4,096 such
    connections were past the memory the connection limit was sized on. About 8 KiB is kept."""
    judge = detect.FirstLine()
    for _ in range(63):
        assert judge.feed(b"x" * 1024) is None and len(judge._kept) <= detect.PEEK_BYTES + 1024
    assert judge.feed(b"x" * 4096) is False  # past http.server's 64 KiB: no request (414)
    padded = detect.FirstLine()
    assert padded.feed(b"GET\t/admin") is None
    for _ in range(40):  # 40 KiB of spaces: still one request line in the making
        assert padded.feed(b" " * 1024) is None
    assert padded.feed(b"HTTP/1.1\r\nx-forwarded-client-cert: forged\r\n") is True
    many = detect.FirstLine()
    assert many.feed(b"a b c d " + b"e" * 9000) is False  # four words: no ending makes it one


def test_a_line_taken_for_opaque_is_judged_when_it_ends_however_long() -> None:
    """http.server reads a request line of up to 64 KiB: `GET\\t/admin`, 8 KiB of spaces, then
    `HTTP/1.1` is `GET /admin HTTP/1.1` to it. The 8 KiB peek decided opaque; the line decides."""
    assert detect.line_verdict(b"\r\n G\x01T /x HTTP/1.1") is None  # not ended yet
    assert detect.line_verdict(b"\r\n G\x01T /x HTTP/1.1\r\n") is True
    padded = b"GET\t/admin" + b" " * 9000 + b"HTTP/1.1\r\n"
    assert classify(padded[: detect.PEEK_BYTES]) is Kind.OPAQUE and detect.line_verdict(padded) is True
    assert detect.line_verdict(b"x" * detect.LINE_MAX) is False  # (http.server: 414)
    assert detect.line_verdict(b"\x00\x01binary\n") is False
    assert classify(b"\x16 /admin HTTP/1.1\r\n") is Kind.HTTP1  # no TLS record: a method to them
    assert classify(b"GET\thttp://cart/admin\r\n") is Kind.HTTP1  # HTTP/0.9, absolute form


@pytest.mark.parametrize(
    ("peeked", "kind"),
    [(b"", Kind.SILENT), (b"GE", Kind.OPAQUE), (b"\x16\x03\x01\x02\x00\x01", Kind.TLS)],
)
def test_undecided_kind_at_the_timeout(peeked: bytes, kind: Kind) -> None:
    assert detect.undecided_kind(peeked) is kind


async def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def test_detect_waits_for_the_rest_of_a_request_line() -> None:
    server, client = await _pair()
    with server, client:
        task = asyncio.create_task(detect.detect(server, 2.0))
        client.send(b"GET /x")
        await asyncio.sleep(0.05)
        assert not task.done()
        client.send(b" HTTP/1.1\r\n")
        assert await asyncio.wait_for(task, 1) is Kind.HTTP1
        assert server.recv(100, socket.MSG_PEEK) == b"GET /x HTTP/1.1\r\n"  # nothing consumed


async def test_detect_silent_ended_and_reset() -> None:
    server, client = await _pair()
    with server, client:
        assert await detect.detect(server, 0.05) is Kind.SILENT
        # A FIN before any byte is a half-close, not an abort: decided, carried as opaque (a
        # server that speaks first still answers; it was refused with a reset).
        client.shutdown(socket.SHUT_WR)
        assert await detect.detect_outcome(server, 1.0) == (Kind.OPAQUE, True)
    with socket.create_server(("127.0.0.1", 0)) as listener:  # (TCP: a reset)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        server.setblocking(False)
        with server:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            assert await detect.detect(server, 1.0) is Kind.CLOSED


async def test_partial_input_times_out_as_opaque() -> None:
    server, client = await _pair()
    with server, client:
        client.send(b"GE")
        assert await detect.detect(server, 0.1) is Kind.OPAQUE


async def test_a_trickling_client_hello_does_not_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reliability finding 9: a partial ClientHello used to be polled every 5 ms. Now each new
    segment wakes the detector once."""
    client = socket.socket()  # TCP: the receive low-water mark is what it relies on
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, client:
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        server.setblocking(False)
        with server:
            peeks = 0
            real = detect._readable

            async def counting(sock: socket.socket, low: int, timeout: float) -> bool:
                nonlocal peeks
                peeks += 1
                return await real(sock, low, timeout)

            monkeypatch.setattr(detect, "_readable", counting)
            task = asyncio.create_task(detect.detect(server, 0.5))
            hello = tls_record(b"\x01" + b"\x00" * 200)
            for i in range(5):
                client.send(hello[i : i + 1])
                await asyncio.sleep(0.02)
            assert await task is Kind.TLS  # the timeout: what came counts as the app's own TLS
            assert peeks <= 7  # one wait per byte sent (plus the first), not one per 5 ms


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT " + b" " * 8180 + b"\x00\n",  # (runs of spaces beside optional parts: quadratic before)
        b"CONNECT" + b" " * 8180 + b"{}\n",
        b"CONNECT " + b"a" * 4000 + b" " * 4000 + b"{\n",
        b"GET /" + b"a" * 4000 + b" " * 4000 + b"\x00\n",
        b"GET" + b" " * 4000 + b"/" + b" " * 4000 + b"x\n",
        b"GET /x" + b" " * 8000 + b"HTTX\n",
    ],
)
def test_classify_takes_linear_time_on_hostile_lines(line: bytes) -> None:
    """Detection runs before TLS, on every connection: an 8 KiB CONNECT line took 0.8 s of the
    sidecar's only event loop (five at once stalled it for 3 s)."""
    import time

    started = time.perf_counter()
    for _ in range(10):
        classify(line[: detect.PEEK_BYTES])
    assert time.perf_counter() - started < 0.05
