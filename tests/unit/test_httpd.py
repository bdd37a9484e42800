"""The small HTTP/1.1 server behind every component's metrics, probe and admin pages."""

from __future__ import annotations

import asyncio
import http.client
import logging

import pytest

from sidemesh.httpd import HTTPServer, json_response

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
