"""The seam between the HTTP data path and telemetry (traces, per-request metrics, access log).

The HTTP layer calls ``observer.start(info)`` once per request, as soon as the request's headers are
parsed (on the inbound side: before authorization, so that denied requests are observed too). It
removes every header named in ``TRACE_HEADERS`` from the request it forwards and adds
``span.trace_headers()`` in their place (None: the request's own trace headers go on unchanged),
then calls ``span.finish(result)`` exactly once: when the response is complete, or when the
request failed or was denied.

``NullObserver`` is what runs when telemetry is off: trace headers pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

# W3C trace context and B3 (single and multi header), lower case as on the wire in HTTP/2.
TRACE_HEADERS = frozenset(
    {
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)


@dataclass(slots=True)
class RequestInfo:
    direction: Literal["inbound", "outbound"]
    protocol: str  # "http/1.1", "h2" or "grpc"
    method: str
    path: str  # as received, with the query
    authority: str  # Host or :authority
    headers: Sequence[tuple[bytes, bytes]]  # lower-case names, as received
    source: str | None = None  # caller's SPIFFE ID (inbound: the peer's, "unauthenticated" for plaintext)
    destination: str | None = None  # callee's SPIFFE ID (outbound: known once an endpoint is chosen)
    service: str | None = None  # outbound: the destination service, e.g. "cart.shop:80"
    peer_address: str | None = None  # "ip:port" of the other side of the connection
    traced: bool = True  # a TRACE_HEADERS header may be among ``headers`` (False: the parser saw none)


@dataclass(slots=True)
class RequestResult:
    status: int | None  # status sent to the caller; None when no response was sent (reset)
    grpc_status: int | None = None
    # audit_deny: allowed, but an audit-mode policy would have refused it (docs/policy.md);
    # refused: answered by the sidecar before any policy was asked (a malformed request, a request
    # target it cannot normalize, an HTTP/1.1 head it cannot parse or that did not come in time)
    decision: Literal["allow", "deny", "audit_deny", "refused"] = "allow"
    reason: str = ""  # the authorization reason (Decision.reason), or why the proxy failed it
    policy: str | None = None  # the ServiceAuthorization that decided, "namespace/name"
    retries: int = 0
    endpoint: str | None = None  # outbound: "ip:port" of the endpoint that answered
    destination: str | None = None  # outbound: the SPIFFE ID of that endpoint
    error: str | None = None  # e.g. "timeout", "no endpoints", "upstream reset"
    request_bytes: int = 0  # body bytes
    response_bytes: int = 0


class RequestSpan(Protocol):
    def trace_headers(self) -> list[tuple[bytes, bytes]] | None:
        """The trace headers to put on the forwarded request (replacing every TRACE_HEADERS one), or
        None: the request's own trace headers go on unchanged."""
        ...

    def finish(self, result: RequestResult) -> None: ...


class Observer(Protocol):
    def start(self, info: RequestInfo) -> RequestSpan: ...


class _PassThrough:
    __slots__ = ()

    def trace_headers(self) -> None:
        return None

    def finish(self, result: RequestResult) -> None:
        pass


_PASS_THROUGH = _PassThrough()


class NullObserver:
    """Telemetry off: the incoming trace headers are forwarded as they came."""

    def start(self, info: RequestInfo) -> RequestSpan:
        return _PASS_THROUGH
