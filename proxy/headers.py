"""Header rules of the HTTP layer (pure): hop-by-hop removal (RFC 9110 section 7.6.1), trace header
replacement, and the path a request names."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from proxy.observe import TRACE_HEADERS

Headers = list[tuple[bytes, bytes]]

# Hop-by-hop: meaningful for one connection only. Content-Length and Transfer-Encoding are kept:
# they describe the message's framing, which the proxy keeps as it came (h11 re-frames it for a
# peer that cannot take it, e.g. chunked to an HTTP/1.0 client).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"upgrade",
    }
)
DENIED_REASON = b"sidemesh-denied-reason"  # why the sidecar answered itself (403, 502, 503, 504)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    out: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def is_upgrade(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return b"upgrade" in connection_tokens(headers) and any(n.lower() == b"upgrade" for n, _ in headers)


def forwarded(
    headers: Sequence[tuple[bytes, bytes]],
    trace: Sequence[tuple[bytes, bytes]] = (),
    *,
    upgrade: bool = False,
    replace_trace: bool = False,
) -> Headers:
    """``headers`` without hop-by-hop ones (those named in Connection too); for an upgrade,
    ``Connection: upgrade`` and ``Upgrade`` go on (the next hop must see them to switch). With
    ``replace_trace``, every trace header is replaced by ``trace``."""
    named = connection_tokens(headers) - {b"upgrade"} if upgrade else connection_tokens(headers)
    out: Headers = []
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in named:
            if upgrade and low == b"upgrade":
                out.append((name, value))
            continue
        if replace_trace and low in TRACE_HEADERS:
            continue
        out.append((name, value))
    if upgrade:
        out.append((b"Connection", b"upgrade"))
    if replace_trace:
        out.extend(trace)
    return out


def request_path(target: bytes) -> str:
    """The path (and query) of a request target: origin form as is, absolute form's path."""
    text = target.decode("latin-1")
    if text.startswith("/") or text == "*":
        return text
    scheme, sep, rest = text.partition("://")
    if sep and scheme.isalpha():
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return text  # authority form (CONNECT)


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None
