"""Hop-by-hop header rules (RFC 9110 section 7.6.1), trace header replacement, request paths."""

from __future__ import annotations

import pytest

from proxy.headers import connection_tokens, forwarded, is_upgrade, request_path

H = list[tuple[bytes, bytes]]


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    headers: H = [
        (b"Host", b"cart"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Secret", b"1"),
        (b"TE", b"trailers"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Content-Length", b"3"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Keep", b"yes"),
    ]
    assert forwarded(headers) == [
        (b"Host", b"cart"),
        (b"Content-Length", b"3"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Keep", b"yes"),
    ]


def test_an_upgrade_keeps_upgrade_and_says_connection_upgrade_once() -> None:
    headers: H = [
        (b"Connection", b"Upgrade, keep-alive"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"k"),
    ]
    assert is_upgrade(headers)
    assert forwarded(headers, upgrade=True) == [
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"k"),
        (b"Connection", b"upgrade"),
    ]
    assert not is_upgrade([(b"Upgrade", b"websocket")])  # not named in Connection: not an upgrade


def test_trace_headers_are_replaced() -> None:
    headers: H = [(b"traceparent", b"old"), (b"B3", b"x"), (b"accept", b"*/*")]
    out = forwarded(headers, [(b"traceparent", b"new")], replace_trace=True)
    assert out == [(b"accept", b"*/*"), (b"traceparent", b"new")]


def test_connection_tokens() -> None:
    assert connection_tokens([(b"connection", b" Close ,x-a,, "), (b"Connection", b"X-B")]) == {
        b"close",
        b"x-a",
        b"x-b",
    }


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/cart/1?q=2", "/cart/1?q=2"),
        (b"*", "*"),
        (b"http://cart.shop/cart/1?x", "/cart/1?x"),
        (b"http://cart.shop", "/"),
        (b"cart.shop:443", "cart.shop:443"),
    ],
)
def test_request_path(target: bytes, path: str) -> None:
    assert request_path(target) == path
