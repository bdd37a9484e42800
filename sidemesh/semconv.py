"""What OpenTelemetry's semantic conventions ask of HTTP and RPC spans, shared by the sidecar's
spans and the control plane's (no I/O): known methods, which gRPC codes fail a server span, and
addresses split into host and port."""

from __future__ import annotations

from urllib.parse import unquote

# HTTP: a span names and records these methods as they are; any other as "_OTHER" (its original
# in http.request.method_original), so a client cannot mint span names or metric series.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
OTHER_METHOD = "_OTHER"

# gRPC status codes that make a SERVER span an error: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
# INTERNAL, UNAVAILABLE, DATA_LOSS (the server failed; NOT_FOUND or PERMISSION_DENIED answer the
# request correctly). A CLIENT span is an error for any code but OK.
GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


def method_of(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def host_port(address: str) -> tuple[str, int | None]:
    """``host[:port]`` split: a Host header or ``:authority`` (an IPv6 host in brackets), or a
    peer's ``address:port`` as the sidecar writes it (IPv6 with or without brackets)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            return address, None
    if port.isdigit() and int(port) < 65536:
        return host, int(port)
    return (host if address.startswith("[") else address), None


def grpc_peer(peer: str) -> tuple[str, int | None]:
    """gRPC's ``context.peer()`` (``ipv4:10.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``, ``unix:/path``)
    as an address and a port."""
    scheme, sep, rest = peer.partition(":")
    if not sep:
        return peer, None
    rest = unquote(rest)
    if scheme in ("ipv4", "ipv6"):
        return host_port(rest)
    return rest, None
