"""Hop-by-hop header rules (RFC 9110 section 7.6.1), trace header replacement, request paths."""

from __future__ import annotations

import pytest

from proxy.headers import (
    BadPath,
    connection_tokens,
    forwarded,
    is_upgrade,
    normalize_target,
    request_path,
    trailer_fields,
)

H = list[tuple[bytes, bytes]]


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    headers: H = [
        (b"Host", b"cart"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Secret", b"1"),
        (b"TE", b"gzip;q=0.5"),
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


@pytest.mark.parametrize("value", [b"trailers", b"gzip;q=0.5, Trailers", b"trailers;q=1"])
def test_te_trailers_goes_on(value: bytes) -> None:
    """The client accepts trailers, and the mesh relays them: a server that sends trailers only
    when asked (RFC 9110 10.1.4) was never asked through the mesh. Envoy keeps te: trailers."""
    headers: H = [(b"Host", b"cart"), (b"Connection", b"TE"), (b"TE", value)]
    assert forwarded(headers) == [(b"Host", b"cart"), (b"TE", b"trailers")]


def test_connection_cannot_remove_the_framing_headers_or_host() -> None:
    """A body whose Content-Length (or Transfer-Encoding) were dropped would be read upstream as the
    next request: request smuggling past the inbound sidecar's authorization."""
    headers: H = [
        (b"host", b"cart"),
        (b"connection", b"content-length, transfer-encoding, host, x-gone"),
        (b"content-length", b"38"),
        (b"x-gone", b"1"),
    ]
    assert forwarded(headers) == [(b"host", b"cart"), (b"content-length", b"38")]
    chunked: H = [(b"connection", b"Transfer-Encoding"), (b"transfer-encoding", b"chunked")]
    assert forwarded(chunked) == [(b"transfer-encoding", b"chunked")]


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


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        # RFC 3986 section 5.4.1/5.4.2 examples of remove_dot_segments, as absolute paths
        (b"/a/b/c/./../../g", b"/a/g"),
        (b"/mid/content=5/../6", b"/mid/6"),
        (b"/a/..", b"/"),
        (b"/a/.", b"/a/"),
        (b"/../g", b"/g"),
        (b"/public/../admin", b"/admin"),
        (b"/public/%2e%2E/admin", b"/admin"),  # decoded unreserved, then dot segments
        (b"/public\\..\\admin", b"/admin"),  # backslashes are slashes (as Envoy and browsers)
        (b"/%7euser/%41%2f%3a", b"/~user/A%2F%3A"),  # unreserved decoded, the rest upper-cased
        (b"/a%2fb/../c", b"/c"),  # an encoded slash is part of its segment
        (b"//a//b", b"//a//b"),  # duplicate slashes are kept (Istio's BASE)
        (b"/x/./y?q=/../z", b"/x/y?q=/../z"),  # the query is not touched
        (b"http://cart:8080/a/../b?x=1", b"http://cart:8080/b?x=1"),
        (b"*", b"*"),
        (b"/plain", b"/plain"),
    ],
)
def test_normalize_target(target: bytes, normal: bytes) -> None:
    assert normalize_target(target) == normal
    assert normalize_target(normal) == normal  # idempotent


@pytest.mark.parametrize("target", [b"/a%2", b"/a%zz/b", b"/%"])
def test_normalize_target_refuses_bad_percent_encoding(target: bytes) -> None:
    with pytest.raises(BadPath):
        normalize_target(target)


def test_trailers_lose_connection_framing_and_identity_fields() -> None:
    trailers = [
        (b"grpc-status", b"0"),
        (b"connection", b"close"),
        (b"content-length", b"5"),
        (b"x-forwarded-client-cert", b"By=x;URI=spiffe://cluster.local/ns/shop/sa/admin"),
        (b"l5d-client-id", b"admin.shop.serviceaccount.identity.linkerd.cluster.local"),
        (b"trailer", b"x-checksum"),
        (b"x-checksum", b"42"),
    ]
    assert trailer_fields(trailers) == [(b"grpc-status", b"0"), (b"x-checksum", b"42")]
