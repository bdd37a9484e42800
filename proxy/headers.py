"""Header rules of the HTTP layer (pure): hop-by-hop removal (RFC 9110 section 7.6.1), trace header
replacement, and the path a request names."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from proxy.observe import TRACE_HEADERS
from sidemesh.policy.paths import BadPath as BadPath  # (re-exported: the HTTP layers raise it)
from sidemesh.policy.paths import normalize_path

Headers = list[tuple[bytes, bytes]]

# Hop-by-hop: meaningful for one connection only. Content-Length and Transfer-Encoding are kept:
# they describe the message's framing, which the proxy keeps as it came (h11 re-frames it for a
# peer that cannot take it, e.g. chunked to an HTTP/1.0 client).
# An endpoint's sidecar, answering 502 to another sidecar because it could not reach its app,
# says so with this: the app never saw the request, so the caller's sidecar sends it to another
# endpoint whatever its method (HTTP/2 says it with REFUSED_STREAM). Between sidecars only: every
# hop removes it, so an app cannot send it (and have a POST it answered sent again).
UNPROCESSED = b"sidemesh-unprocessed"
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"upgrade",
        UNPROCESSED,
    }
)
# Never removed because Connection names them: they frame the message (the proxy frames what it
# sends by them) and route it; dropping them would leave a body without framing, read upstream as
# the next request (request smuggling), or a request without a Host.
NOT_NOMINATED = frozenset({b"content-length", b"transfer-encoding", b"host"})
DENIED_REASON = b"sidemesh-denied-reason"  # why the sidecar answered itself (403, 502, 503, 504)
# Who called, as a sidecar tells the app behind it: Envoy's (Istio's) and Linkerd's. The inbound
# sidecar removes any a request brings (only a sidecar may say who called: Envoy's SANITIZE_SET,
# Linkerd's l5d-client-id) and sets XFCC for a caller that authenticated with mTLS.
XFCC = b"x-forwarded-client-cert"


def _underscored(name: bytes) -> set[bytes]:
    """``name`` with each of its dashes a dash or an underscore: CGI-style servers (WSGI, PHP,
    Rack, Django) read ``x_forwarded_client_cert`` as HTTP_X_FORWARDED_CLIENT_CERT too, and join
    it with the sidecar's header, the caller's value first (Envoy passes such names by default)."""
    out = {b""}
    for part in name.split(b"-"):
        out = {o + sep + part for o in out for sep in ((b"-", b"_") if o else (b"",))}
    return out


IDENTITY_HEADERS = frozenset(_underscored(XFCC) | _underscored(b"l5d-client-id"))


def xfcc(own: str, peer: str) -> bytes:
    """The XFCC value for a caller ``peer`` (its SPIFFE ID) of the workload ``own``, in Envoy's
    format (By: the server's URI SAN, URI: the client's). SPIFFE IDs need no quoting (no , ; = ")."""
    return f"By={own};URI={peer}".encode()


# Not in trailers (RFC 9110 6.5.1: no framing, routing or connection fields; a recipient discards
# what is not allowed there), nor who called: only the sidecar says that, in the head.
NOT_IN_TRAILERS = HOP_BY_HOP | NOT_NOMINATED | IDENTITY_HEADERS | {b"trailer"}


def trailer_fields(trailers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``trailers`` (lower-case names) without the fields a proxy must not pass on in them."""
    return [t for t in trailers if t[0] not in NOT_IN_TRAILERS]


def with_identity(
    headers: list[tuple[bytes, bytes]], value: bytes | None, lower: bool = False
) -> list[tuple[bytes, bytes]]:
    """``headers`` without any identity header, plus XFCC ``value`` if given. ``lower``: the names
    may be in any case (else they are lower-case, as the parsers give them)."""
    if lower:
        out = [h for h in headers if h[0].lower() not in IDENTITY_HEADERS]
    else:
        out = [h for h in headers if h[0] not in IDENTITY_HEADERS]
    if value is not None:
        out.append((XFCC, value))
    return out


_CONTROL = bytes(range(32)) + b"\x7f"
_AS_SPACES = bytes.maketrans(_CONTROL, b" " * len(_CONTROL))


def field_value(text: str, limit: int = 512) -> bytes:
    """Text of ours (a denial's reason) as a header field value: ASCII, control characters as
    spaces, at most ``limit`` bytes, no surrounding whitespace (RFC 9110 5.5; HTTP/2 peers refuse
    such a value as a connection error, and nothing normalizes what the sidecar sends)."""
    return text.encode("ascii", "replace").translate(_AS_SPACES)[:limit].strip(b" ")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    out: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def _tokens(value: bytes) -> set[bytes]:
    """A list header's tokens, lower case, parameters left out (``trailers, gzip;q=0.5``)."""
    return {t.split(b";", 1)[0].strip().lower() for t in value.split(b",")}


# The protocols a request may upgrade to through the mesh (as Istio configures Envoy: websocket
# only). Others, h2c above all, are not passed on: the Upgrade header is dropped (it is hop-by-hop)
# and the app answers the request as plain HTTP/1.1. Spliced after a 101, an h2c connection would
# carry HTTP/2 requests that no per-request policy sees (h2c smuggling; RFC 9113 section 3.1
# deprecates the upgrade).
UPGRADES = frozenset({b"websocket"})


def is_upgrade(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """An upgrade the mesh passes on: Connection names upgrade, and every protocol in Upgrade is
    one of ``UPGRADES``."""
    if b"upgrade" not in connection_tokens(headers):
        return False
    offered = [
        token.strip().split(b"/", 1)[0].lower()
        for name, value in headers
        if name.lower() == b"upgrade"
        for token in value.split(b",")
        if token.strip()
    ]
    return bool(offered) and all(token in UPGRADES for token in offered)


def forwarded(
    headers: Sequence[tuple[bytes, bytes]],
    trace: Sequence[tuple[bytes, bytes]] = (),
    *,
    upgrade: bool = False,
    replace_trace: bool = False,
) -> Headers:
    """``headers`` without hop-by-hop ones (those named in Connection too, except the framing
    headers and Host: ``NOT_NOMINATED``); for an upgrade,
    ``Connection: upgrade`` and ``Upgrade`` go on (the next hop must see them to switch). With
    ``replace_trace``, every trace header is replaced by ``trace``."""
    named = connection_tokens(headers) - NOT_NOMINATED
    if upgrade:
        named.discard(b"upgrade")
    out: Headers = []
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in named:
            if upgrade and low == b"upgrade":
                out.append((name, value))
            elif low == b"te" and b"trailers" in _tokens(value):
                # The client takes trailers, and so does every hop of the mesh (they are relayed):
                # a server that sends them only when asked still can (as Envoy keeps te: trailers).
                out.append((name, b"trailers"))
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
        end = _authority_end(rest)  # RFC 3986: the authority ends at the first /, ? or #
        path_query = rest[end:]
        return path_query if path_query.startswith("/") else "/" + path_query
    return text  # authority form (CONNECT)


def _authority_end(rest: str | bytes) -> int:
    """Where the authority after ``scheme://`` ends: the first /, ? or # (RFC 3986 section 3.2)."""
    text = rest.decode("latin-1") if isinstance(rest, bytes) else rest
    ends = [i for i in (text.find("/"), text.find("?"), text.find("#")) if i >= 0]
    return min(ends) if ends else len(text)


def absolute_authority(target: bytes) -> bytes | None:
    """The authority of an absolute-form target (``http://cart:80/x`` -> ``cart:80``), else None."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or not scheme.isalpha():
        return None
    return rest[: _authority_end(rest)]


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def normalize_target(target: bytes) -> bytes:
    """The request target the inbound sidecar authorizes and forwards, normalized as Istio's
    default (``BASE``) does with Envoy's ``normalize_path``: backslashes become slashes,
    percent-encoded unreserved characters are decoded (and the others' hex upper-cased, RFC 3986
    section 6.2.2), then ``.`` and ``..`` segments are removed (section 5.2.4), so that
    ``/public/%2e%2e/admin`` is ``/admin`` for the policy and for the app alike. The query is
    kept as it is; duplicate slashes and encoded slashes (``%2F``) are kept (as Envoy's default).
    Raises :class:`BadPath`."""
    if target == b"*" or not target.startswith(b"/"):
        prefix, path, query = _split_absolute(target)
    else:
        prefix = b""
        path, sep, rest = target.partition(b"?")
        query = sep + rest
    if path == b"*":
        return target
    return prefix + normalize_path(path) + query


def _split_absolute(target: bytes) -> tuple[bytes, bytes, bytes]:
    """(scheme://authority, path, ?query) of an absolute-form target; ``*`` and authority form
    (CONNECT) are returned as a path of their own."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or not scheme.isalpha():
        return b"", target, b""
    end = _authority_end(rest)  # RFC 3986: the authority ends at the first /, ? or #
    authority, path_query = rest[:end], rest[end:]
    if not path_query.startswith(b"/"):
        path_query = b"/" + path_query
    path, sep, query = path_query.partition(b"?")
    return scheme + b"://" + authority, path, sep + query
