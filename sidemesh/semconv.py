"""What OpenTelemetry's semantic conventions ask of HTTP and RPC spans, shared by the sidecar's
spans and the control plane's (no I/O): known methods, which gRPC codes fail a server span, and
addresses split into host and port."""

from __future__ import annotations

import re
from urllib.parse import unquote

# HTTP: a span names and records these methods as they are; any other as "_OTHER" (its original
# in http.request.method_original), so a client cannot mint span names or metric series. The
# HTTP conventions' override, OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS, replaces the list
# (``use_known_methods``, once tracing is configured).
DEFAULT_KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
KNOWN_METHODS_VARIABLE = "OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS"
OTHER_METHOD = "_OTHER"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")  # RFC 9110 9.1: a method is a token
_known = DEFAULT_KNOWN_METHODS

# gRPC status codes that make a SERVER span an error: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
# INTERNAL, UNAVAILABLE, DATA_LOSS (the server failed; NOT_FOUND or PERMISSION_DENIED answer the
# request correctly). A CLIENT span is an error for any code but OK.
GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})
GRPC_UNIMPLEMENTED = 12
# The codes' names (error.type of a failed call, as the RPC conventions write status codes).
GRPC_CODE_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# Span attribute values taken from a request (path, host, method) are cut to this many characters,
# as Envoy cuts its path tag (max_path_tag_length): any caller chooses them, and one span with a
# 64 KiB path made export batches bigger than collectors accept (4 MiB).
MAX_REQUEST_ATTRIBUTE = 256


def known_methods_from(text: str) -> tuple[frozenset[str], list[str]]:
    """The methods OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS lists (comma-separated, case-sensitive,
    a full replacement of the default list), and the entries that are no HTTP method."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    return frozenset(e for e in entries if _TOKEN.fullmatch(e)), [
        e for e in entries if not _TOKEN.fullmatch(e)
    ]


def use_known_methods(methods: frozenset[str]) -> None:
    global _known
    _known = methods


def is_known(method: str) -> bool:
    return method in _known


def method_of(method: str) -> str:
    return method if method in _known else OTHER_METHOD


def _port(text: str) -> int | None:
    if text.isascii() and text.isdigit() and int(text) < 65536:  # ("²".isdigit() is true)
        return int(text)
    return None


def host_port(authority: str) -> tuple[str, int | None]:
    """A Host header or ``:authority`` split into host and port: ``cart:80``, ``[fd00::1]:80``;
    an IPv6 address without brackets (not valid there) is all host."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        return host, _port(rest[1:]) if rest.startswith(":") else None
    host, sep, port = authority.rpartition(":")
    if not sep or ":" in host or _port(port) is None:
        return authority, None
    return host, _port(port)


def peer_port(address: str) -> tuple[str, int | None]:
    """A peer or endpoint as the sidecar writes it, ``address:port``, where an IPv6 address may
    come without brackets (``fd00::1:8080``): the port is what follows the last colon."""
    if address.startswith("["):
        return host_port(address)
    host, sep, port = address.rpartition(":")
    number = _port(port) if sep else None
    return (host, number) if number is not None else (address, None)


def grpc_peer(peer: str) -> tuple[str, int | None]:
    """gRPC's ``context.peer()`` (``ipv4:10.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``, ``unix:/path``)
    as an address and a port."""
    scheme, sep, rest = peer.partition(":")
    if not sep:
        return peer, None
    rest = unquote(rest)
    if scheme in ("ipv4", "ipv6"):
        return peer_port(rest)
    return rest, None
