"""The small HTTP/1.1 server behind every component's metrics, probe and admin pages."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import re

import pytest

from sidemesh.httpd import HTTPServer, json_response
from tests.support.net import ipv6_loopback

BODY = b"# HELP x a metric\n# TYPE x counter\nx_total 1.0\n"


def _metrics() -> tuple[int, str, bytes]:
    return 200, "text/plain; version=0.0.4; charset=utf-8", BODY


def _exchanges(port: int) -> list[tuple[int, dict[str, str], bytes]]:
    """HEAD, GET, POST and GET again, all on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    out = []
    try:
        for method, path in (
            ("HEAD", "/metrics"),
            ("GET", "/metrics"),
            ("POST", "/metrics"),
            ("GET", "/live"),
        ):
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            resp = conn.getresponse()
            out.append((resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
    finally:
        conn.close()
    return out


async def test_head_and_other_methods_keep_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    server = HTTPServer({"/metrics": _metrics, "/live": lambda: json_response(200, {"live": True})})
    port = await server.start("127.0.0.1", 0)
    try:
        head, get, post, after = await asyncio.to_thread(_exchanges, port)
    finally:
        await server.stop()
    # HEAD: GET's headers, the length of the body it would have, no body (RFC 9110 9.3.2).
    assert head == (200, head[1], b"") and head[1]["content-length"] == str(len(BODY))
    assert get[0] == 200 and get[2] == BODY
    # 405 names the methods that work (RFC 9110 15.5.6).
    assert post[0] == 405 and post[1]["allow"] == "GET, HEAD"
    assert after[0] == 200 and after[2].startswith(b"{")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data`` on a new connection; everything that comes back until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


async def test_requests_it_cannot_read_get_the_status_h11_hints() -> None:
    """RFC 9112 3.2: a request without Host is answered 400; RFC 6585 5: a head too large, 431.
    They were closed without a word. Absolute-form targets are served (RFC 9112 3.2.2), and a
    path that does not exist is 404 whatever the method (405 said it existed)."""
    server = HTTPServer({"/metrics": _metrics}, posts={"/quitquitquit": lambda: json_response(200, {})})
    port = await server.start("127.0.0.1", 0)
    try:
        no_host = await _raw(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        huge = await _raw(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")
        garbage = await _raw(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
        absolute = await _raw(
            port, b"GET http://x/metrics?a=1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        options = await _raw(port, b"OPTIONS /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        crlf_first = await _raw(
            port, b"\r\n\r\nGET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        crlf_after_body = await _raw(
            port,
            b"POST /quitquitquit HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}\r\n"
            b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        post_get = await _raw(port, b"GET /quitquitquit HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    finally:
        await server.stop()
    assert no_host.startswith(b"HTTP/1.1 400 ") and b"connection: close" in no_host.lower(), no_host
    assert huge.startswith(b"HTTP/1.1 431 "), huge[:100]
    assert garbage.startswith(b"HTTP/1.1 400 "), garbage
    assert absolute.startswith(b"HTTP/1.1 200 ") and absolute.endswith(BODY), absolute
    assert options.startswith(b"HTTP/1.1 404 "), options
    assert crlf_first.startswith(b"HTTP/1.1 200 "), crlf_first  # RFC 9112 2.2: empty lines first, ignored
    # ... a CRLF after a POST body, in the same read as the body (was a 400 and a close)
    assert re.findall(rb"HTTP/1\.1 (\d\d\d)", crlf_after_body) == [b"200", b"200"], crlf_after_body
    assert post_get.startswith(b"HTTP/1.1 405 ") and b"allow: post" in post_get.lower(), post_get


async def test_a_trickling_client_is_cut_off_and_held_connections_do_not_keep_probes_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The health port is open to every pod: a client sending a header byte every 20 s held a
    connection (and a file descriptor) as long as it liked, and any number of them. Now a request
    (head and body) must be whole within REQUEST_TIMEOUT, connections are capped, and a new one at
    the cap closes the oldest idle one, so held connections cannot keep the kubelet out."""
    import sidemesh.httpd as httpd

    monkeypatch.setattr(httpd, "REQUEST_TIMEOUT", 0.6)
    server = HTTPServer({"/metrics": _metrics})
    server.max_connections = 4
    port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()

    async def trickle(first: bytes) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = loop.time()

        async def until_closed() -> None:
            with contextlib.suppress(ConnectionError):  # closed with our last bytes unread (reset)
                await reader.read()

        closed = asyncio.ensure_future(until_closed())
        writer.write(first)
        try:
            for _ in range(10):  # a byte every 0.2 s: each read is quick, the request never ends
                await asyncio.sleep(0.2)
                if closed.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(b"x")
            await asyncio.wait_for(closed, 2)
        finally:
            writer.close()
        return loop.time() - started

    try:
        assert await trickle(b"GET /metrics HTTP/1.1\r\n") < 1.5  # a head
        # ... or a body (answered at once, then held by a body that never ends)
        assert await trickle(b"GET /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n") < 1.5

        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await asyncio.sleep(0.05)
        served = await _raw(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert served.startswith(b"HTTP/1.1 200 "), served  # the fifth, at the cap
        oldest_reader = held[0][0]
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(oldest_reader.read(), 2) == b""  # closed to make room
        for _, w in held:
            w.close()
    finally:
        await server.stop()


def test_stop_closes_a_scrapers_keep_alive_connection() -> None:
    """Under plain asyncio (the controller's loop) a scraper's open connection made the loop's
    shutdown log a CancelledError traceback."""

    async def scenario() -> bytes:
        server = HTTPServer({"/metrics": _metrics})
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        await server.stop()
        rest = await asyncio.wait_for(reader.read(), 2)  # the server closed it
        writer.close()
        return rest

    assert asyncio.run(scenario()).startswith(b"HTTP/1.1 200 ")


async def test_clients_that_never_read_their_answers_do_not_keep_a_probe_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pipelined requests from clients that never read held their connections "being answered"
    (stuck writing) for ever, and at the cap every new connection, the kubelet's probe too, was
    refused. An answer stalled for STALLED makes its connection the one closed to make room."""
    import socket
    import threading

    import sidemesh.httpd as httpd

    monkeypatch.setattr(httpd, "STALLED", 0.3, raising=False)
    big = b"m" * 65536  # a big page: the kernel's buffers fill after a few answers
    server = HTTPServer(
        {"/healthz/ready": lambda: (200, "text/plain", b"ok"), "/metrics": lambda: (200, "text/plain", big)}
    )
    server.max_connections = 4
    port = await server.start("127.0.0.1", 0)
    floods: list[socket.socket] = []

    def flood(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n" * 10_000)  # and never reads

    try:
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            floods.append(s)
            threading.Thread(target=flood, args=(s,), daemon=True).start()
        await asyncio.sleep(1.0)
        assert all(since is not None for since in server._writers.values())  # all stuck answering
        probe = await _raw(port, b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert probe.startswith(b"HTTP/1.1 200 ") and probe.endswith(b"ok"), probe
    finally:
        for s in floods:
            s.close()
        await server.stop()


async def test_a_connection_whose_answer_went_out_is_not_shielded_while_its_body_trickles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request with a body is answered at once; its connection then waited for the body and
    counted as "being answered": clients refreshing that every second kept every slot shielded
    and ~90% of the kubelet's probes out. Only an answer still going out shields a connection."""
    server = HTTPServer({"/healthz/ready": lambda: (200, "text/plain", b"ok")})
    server.max_connections = 4
    port = await server.start("127.0.0.1", 0)
    stop = asyncio.Event()

    async def refresher() -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionError):
            while not stop.is_set():
                writer.write(b"GET /x HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n")
                await asyncio.sleep(0.2)
                writer.write(b"y")
                await asyncio.sleep(0.001)
        writer.close()

    attackers = [asyncio.create_task(refresher()) for _ in range(4)]
    try:
        await asyncio.sleep(0.5)
        probes = [
            await _raw(port, b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", wait=2)
            for _ in range(5)
        ]
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
        await server.stop()
    assert all(p.startswith(b"HTTP/1.1 200 ") for p in probes), probes


async def test_stop_ends_a_connection_waiting_on_a_slow_page_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """stop() left the task of a connection awaiting an app probe running; the loop's end then
    cancelled it, and Python 3.11's stream callback logged an ERROR traceback."""
    caplog.set_level(logging.ERROR)

    async def slow(_path: str) -> tuple[int, str, bytes]:
        await asyncio.sleep(5)
        return json_response(200, {})

    server = HTTPServer({}, prefixes={"/app-health/": slow})
    port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /app-health/x HTTP/1.1\r\nhost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    started = asyncio.get_running_loop().time()
    await server.stop()
    assert asyncio.get_running_loop().time() - started < 1.5
    assert not server._tasks
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 on this machine (::1 cannot be bound)")
async def test_the_wildcard_listens_on_both_families_and_guards_see_ipv4_as_ipv4() -> None:
    """Probes without a host go to the pod IP, IPv6 on IPv6-only and IPv6-first clusters: the
    HTTP listeners (15014-15016, 15020, the webhook's 8443) bound 0.0.0.0 only, and every probe
    failed there. The wildcard takes both families now, as grpcio does for the gRPC ports; an
    IPv4 client is still seen as an IPv4 address (a guard such as /quitquitquit's loopback check
    or the controller's --status-from networks), not as ::ffff:a.b.c.d."""
    import urllib.request

    seen: list[str] = []

    def guard(path: str, client: str) -> str | None:
        seen.append(client)
        return None

    server = HTTPServer({"/live": lambda: (200, "text/plain", b"ok\n")}, guard=guard)
    port = await server.start("0.0.0.0", 0)
    try:
        for host in ("127.0.0.1", "[::1]"):
            with await asyncio.to_thread(
                urllib.request.urlopen, f"http://{host}:{port}/live", timeout=5
            ) as r:
                assert r.status == 200
    finally:
        await server.stop()
    assert seen == ["127.0.0.1", "::1"]
