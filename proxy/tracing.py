"""The sidecar's spans: the traced half of ``proxy.telemetry``'s per-request observer.

Imported only when tracing is on (``proxy.telemetry.ProxyObserver`` with a ``Tracing``): a sidecar
with tracing off does not load OpenTelemetry's API or SDK (1.3 MB of its RSS). Outbound requests
get a CLIENT span and inbound requests a SERVER span, parented on the trace context the request
carries (W3C or B3, answered in the same format); an unsampled request costs the context parsing
and at most one header write, no span.
"""

from __future__ import annotations

import random
import re
import time
from functools import partial
from typing import TYPE_CHECKING, Literal

from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)

from proxy.observe import TRACE_HEADERS, RequestInfo, RequestResult
from proxy.telemetry import _Request
from sidemesh import propagation
from sidemesh.semconv import (
    GRPC_CODE_NAMES,
    GRPC_SERVER_ERRORS,
    GRPC_UNIMPLEMENTED,
    MAX_REQUEST_ATTRIBUTE,
    host_port,
    is_known,
    method_of,
    peer_port,
)
from sidemesh.telemetry import Tracing

if TYPE_CHECKING:
    from proxy.telemetry import ProxyObserver

# Span attribute names (docs/observability.md): OpenTelemetry's where one exists, ours otherwise.
SOURCE_ID = "sidemesh.source.id"
DESTINATION_ID = "sidemesh.destination.id"
DECISION = "sidemesh.authz.decision"
REASON = "sidemesh.authz.reason"
POLICY = "sidemesh.authz.policy"
SERVICE = "sidemesh.destination.service"
ERROR = "sidemesh.error"
RETRIES = "http.request.resend_count"
# A valid version-00 traceparent whose caller said "not sampled" (ids not all zero, flag bit 0 clear).
_UNSAMPLED_00 = re.compile(rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f][02468ace]")
_random = random.random
_getrandbits = random.getrandbits
_SAMPLED, _RANDOM = TraceFlags.SAMPLED, TraceFlags.RANDOM_TRACE_ID
_NEW_SAMPLED_TRACE: list[tuple[bytes, bytes]] = []  # markers, compared by identity
_UNCHANGED: list[tuple[bytes, bytes]] = []


class TracedRequest(_Request):
    """A request of a sidecar with tracing on: its trace headers decided at the start, its span
    ended (or made, when deferred) at the end."""

    __slots__ = ()

    def __init__(self, observer: ProxyObserver, info: RequestInfo) -> None:
        super().__init__(observer, info)
        tracer = observer.tracer
        assert tracer is not None
        tracing = observer.tracing
        assert tracing is not None
        parent: Context | Literal[False] | None
        if tracing.fast_sampling:
            quick = _unsampled_w3c(info, tracing)
            if quick is _NEW_SAMPLED_TRACE:  # no trace headers, and the ratio sampled a new trace
                parent, self._fmt = None, None
            elif quick is _UNCHANGED:
                return  # the caller said "not sampled": no span, its headers go on
            elif quick is not None:
                self._headers = quick
                return  # not sampled: no span (most requests)
            else:
                parent = self._decide(propagation.carrier_of(info.headers, TRACE_HEADERS), tracing)
                if parent is False:
                    return  # not sampled: no span, the headers were written by _decide
            self._defer_span(parent)
            return
        carrier = propagation.carrier_of(info.headers, TRACE_HEADERS)
        parent, _ = propagation.extract(carrier, tracing.sample_root)
        b3 = propagation.parse_b3(carrier)
        self._debug = b3 is not None and b3.debug
        forced = b3 is not None and b3.trace_id is None and b3.sampled  # "sample this" sent alone
        if parent is not None:  # (None: a new trace, in the configured formats)
            self._fmt = propagation.formats_in(carrier)
        elif forced:
            assert b3 is not None
            self._fmt = (b3.fmt,)
        if parent is None and propagation.denied(carrier):
            return  # B3 "deny": no span, the caller's headers go on
        span = tracer.start_span(
            _span_name(info),
            context=None if parent is None else propagation.recorded_parent(parent),
            kind=SpanKind.CLIENT if info.direction == "outbound" else SpanKind.SERVER,
            attributes=_start_attributes(info, observer.own_identity),
        )
        self.span = span
        decided_here = b3 is not None and b3.sampled is None and "traceparent" not in carrier
        if span.is_recording() or decided_here:  # (a B3 hop that decided says so downstream)
            ours = span.get_span_context()
            if parent is not None and (state := get_current_span(parent).get_span_context().trace_state):
                ours = SpanContext(ours.trace_id, ours.span_id, False, ours.trace_flags, state)  # uncut
            self._headers = self._headers_of(ours, tracing)
        elif forced:
            pass  # the SDK's sampler said no to "sample this": the caller's header goes on, not a "0"
        elif not (parent and get_current_span(parent).get_span_context().is_valid):
            self._headers = self._headers_of(span.get_span_context(), tracing)
        # else: a caller's trace this hop does not record: its headers pass on unchanged.

    def _defer_span(self, parent: Context | None) -> None:
        """A sampled hop (sampling decided here, parent-based): its ids are chosen now, for the next
        hop's headers, as the SDK would choose them; the span itself is made when the request has
        ended, with other ended requests' spans (``Tracing.defer``): the SDK's code then runs for
        a batch of spans at a time, not once in a while between thousands of unsampled requests,
        which costs it about three times as much (bench/results/tracing.md)."""
        sc = get_current_span(parent).get_span_context() if parent is not None else None
        if sc is not None and sc.is_valid:
            trace_id, state, flags = sc.trace_id, sc.trace_state, (sc.trace_flags & _RANDOM) | _SAMPLED
        else:  # a new trace: random ids, flagged so (W3C Trace Context level 2), as the SDK does
            trace_id, state, flags = _getrandbits(128) or 1, None, _RANDOM | _SAMPLED
        ctx = SpanContext(trace_id, _getrandbits(64) or 1, False, TraceFlags(flags), state)
        self._sampled = (ctx, parent, time.time_ns())
        self._headers = self._headers_of(ctx, self.observer.tracing)

    def _headers_of(self, ctx: SpanContext, tracing: Tracing | None) -> list[tuple[bytes, bytes]]:
        """The next hop's trace headers: in each of the caller's formats, or a new trace's
        configured ones."""
        if self._fmt is not None:
            return propagation.headers_in(ctx, self._fmt, self._debug)
        assert tracing is not None
        return propagation.headers_in(ctx, tracing.settings.new_trace_formats, self._debug)

    def _make_span(self, result: RequestResult, destination: str | None, end_ns: int) -> None:
        """The deferred span of a sampled hop, with its recorded times and ids (Tracing.defer)."""
        assert self._sampled is not None
        tracing, info = self.observer.tracing, self.info
        assert tracing is not None
        ctx, parent, start_ns = self._sampled
        tracing.ids.preset(ctx.trace_id, ctx.span_id)
        try:
            span = tracing.tracer.start_span(
                _span_name(info, result),
                context=None if parent is None else propagation.recorded_parent(parent),
                kind=SpanKind.CLIENT if info.direction == "outbound" else SpanKind.SERVER,
                attributes=_start_attributes(info, self.observer.own_identity),
                start_time=start_ns,
            )
        finally:
            tracing.ids.preset(0, 0)  # whatever happened, no later span takes these ids
        _end_span(span, result, destination, info.direction == "outbound", end_ns)

    def _decide(self, carrier: dict[str, str], tracing: Tracing) -> Context | Literal[False] | None:
        """Parent-based sampling before any SDK call: the parent context for a sampled span, or
        False after writing the unsampled hop's headers (most requests: no span at all). The next
        hop gets every format the request came with (W3C and B3 both, from a composite
        propagator)."""
        self._fmt = propagation.formats_in(carrier)
        b3 = (
            propagation.parse_b3(carrier)
            if "b3" in carrier
            or "x-b3-sampled" in carrier
            or "x-b3-traceid" in carrier
            or "x-b3-flags" in carrier
            else None
        )
        self._debug = b3 is not None and b3.debug
        parsed = None
        if "traceparent" in carrier:
            parsed = propagation.parse_traceparent(carrier["traceparent"])
        if parsed is None and b3 is not None:
            if b3.trace_id is None or b3.span_id is None:  # a decision sent alone
                if not b3.sampled:
                    return False  # B3 "deny": no part in the trace, its headers pass on
                self._fmt = (b3.fmt,)
                return None  # "sample this" (b3: 1 or d): a new sampled trace, in B3
            if b3.sampled is None:  # no sampling flag: B3 leaves the decision to the receiver
                if not tracing.sample_root(b3.trace_id):  # "no", said downstream (as Envoy and Brave do)
                    self._headers = propagation.unsampled_headers(b3.fmt, b3.trace_id, b3.span_id, None)
                    return False
            elif not b3.sampled:
                return False  # no part in the trace, its headers pass on unchanged
            remote = SpanContext(b3.trace_id, b3.span_id, True, TraceFlags(_SAMPLED))
            return set_span_in_context(NonRecordingSpan(remote))
        if parsed is None:
            if propagation.denied(carrier):
                return False  # B3 "deny" without ids: no part in the trace, its headers pass on
            self._fmt = None  # a new trace: in the formats OTEL_PROPAGATORS names
            if tracing.sample_root():
                return None  # a new sampled trace
            self._headers = propagation.new_unsampled_headers(
                tracing.settings.new_trace_formats, random.getrandbits(128) or 1, random.getrandbits(64) or 1
            )
            return False
        trace_id, span_id, flags = parsed
        if not flags & 1:  # the caller said no: no part in the trace, its headers pass on unchanged
            return False
        state = propagation.trace_state(carrier["tracestate"]) if "tracestate" in carrier else None
        remote = SpanContext(trace_id, span_id, True, TraceFlags(flags), state)
        return set_span_in_context(NonRecordingSpan(remote))

    def _end_trace(self, result: RequestResult, destination: str | None, outbound: bool) -> None:
        span, sampled, info = self.span, self._sampled, self.info
        if sampled is not None:
            assert self.observer.tracing is not None
            self.observer.tracing.defer(partial(self._make_span, result, destination, time.time_ns()))
        elif span is not None and span.is_recording():
            if info.protocol == "grpc":  # named once the outcome is known (_span_name)
                span.update_name(_span_name(info, result))
            _end_span(span, result, destination, outbound)
        elif span is not None:
            span.end()


def _unsampled_w3c(info: RequestInfo, tracing: Tracing) -> list[tuple[bytes, bytes]] | None:
    """The common unsampled hops, on bytes and in one pass: no trace header (a new trace that the
    ratio does not sample: a new traceparent with flags 02, random ids not sampled) or a version-00 ``traceparent`` (and
    any ``tracestate``) whose caller said no: this hop takes no part in the trace
    (``_UNCHANGED``: its trace headers pass on as they came, as ``_Request._decide`` passes them).
    ``_NEW_SAMPLED_TRACE``: no trace header and the ratio sampled a new trace. None: anything else
    (a sampled caller, B3, a tracestate alone, invalid), for the general path."""
    value = None
    if info.traced:
        seen_state = False
        for name, v in info.headers:
            if name in TRACE_HEADERS:
                if name == b"traceparent" and value is None:
                    value = v
                elif name == b"tracestate":
                    seen_state = True
                else:
                    return None
        if value is None and seen_state:
            return None
    if value is None:
        ratio = tracing.root_ratio  # Tracing.sample_root, inline: this runs for most requests
        if ratio >= 1.0 or (ratio > 0.0 and _random() < ratio):
            return _NEW_SAMPLED_TRACE  # decided here: the general path must not draw again
        if tracing.w3c_only:
            return [(b"traceparent", b"00-%032x-%016x-02" % (_getrandbits(128) or 1, _getrandbits(64) or 1))]
        return propagation.new_unsampled_headers(
            tracing.settings.new_trace_formats, _getrandbits(128) or 1, _getrandbits(64) or 1
        )
    if _UNSAMPLED_00.fullmatch(value) is None:  # invalid, or the caller said "sampled": the general path
        return None
    return _UNCHANGED


def _rpc_of(path: str) -> tuple[str, str]:
    """(package.Service, Method) of a gRPC path, each cut to MAX_REQUEST_ATTRIBUTE; ("", "") if
    the path is not of that form."""
    service, _, method = path.split("?", 1)[0].lstrip("/").rpartition("/")
    if not service or not method:
        return "", ""
    return service[:MAX_REQUEST_ATTRIBUTE], method[:MAX_REQUEST_ATTRIBUTE]


def _span_name(info: RequestInfo, result: RequestResult | None = None) -> str:
    """Low-cardinality names only: never the Host header, which any client chooses. A gRPC span is
    named after its method (package.Service/Method) only once the call was let through and the
    server knew the method (not UNIMPLEMENTED, not an HTTP error): any caller chooses the path, and
    every name it made up would be one more operation for Jaeger to index; other calls are "grpc"."""
    if info.protocol == "grpc":
        if (
            result is not None
            and result.decision in ("allow", "audit_deny")
            and result.status is not None
            and result.status < 400
            and result.grpc_status != GRPC_UNIMPLEMENTED
        ):
            service, method = _rpc_of(info.path)
            if service:
                return f"{service}/{method}"
        return "grpc"
    method = info.method if is_known(info.method) else "HTTP"
    return f"{method} {info.service}" if info.service else method


def _peer_attributes(attrs: dict[str, str | int], address: str) -> None:
    host, port = peer_port(address)
    attrs["network.peer.address"] = host
    if port is not None:
        attrs["network.peer.port"] = port


def _start_attributes(info: RequestInfo, own_identity: str) -> dict[str, str | int]:
    outbound = info.direction == "outbound"
    source = info.source if not outbound else own_identity
    destination = info.destination if outbound else own_identity
    path = info.path.split("?", 1)[0]
    host, port = host_port(info.authority) if info.authority else ("", None)
    limit = MAX_REQUEST_ATTRIBUTE  # what the caller chose is cut (semconv.MAX_REQUEST_ATTRIBUTE)
    attrs: dict[str, str | int] = {
        "http.request.method": method_of(info.method),
        "url.path": path[:limit],
        "url.scheme": "http",
        "network.protocol.version": "2" if info.protocol in ("h2", "grpc") else "1.1",
    }
    if not is_known(info.method):
        attrs["http.request.method_original"] = info.method[:limit]
    if host:
        attrs["server.address"] = host[:limit]
        if port is not None:
            attrs["server.port"] = port
        elif outbound:  # required on CLIENT spans: the scheme's default
            attrs["server.port"] = 80
        if outbound:  # the query is left out: it may carry credentials
            attrs["url.full"] = f"http://{info.authority}{path}"[:limit]
    if source:
        attrs[SOURCE_ID] = source
    if destination:
        attrs[DESTINATION_ID] = destination
    if info.service:
        attrs[SERVICE] = info.service
    if info.peer_address and not outbound:  # outbound: the endpoint that answered, set at the end
        _peer_attributes(attrs, info.peer_address)
    if info.protocol == "grpc":
        attrs["rpc.system"] = "grpc"
        service, method = _rpc_of(path)
        if service:
            attrs["rpc.service"], attrs["rpc.method"] = service, method
    return attrs


# error.type of a request that failed before (or while) its response came: a low-cardinality
# identifier (HTTP semantic conventions), from the sidecar's own error texts; "_OTHER" for the rest.
_ERROR_TYPES = {
    "timeout": "timeout",
    "no endpoints": "no_endpoints",
    "upstream reset": "upstream_reset",
    "connection lost": "upstream_reset",
    "connection closed": "connection_closed",
    "reset by the client": "client_reset",
}


def _error_type(result: RequestResult, outbound: bool) -> str | None:
    """The request's error.type, None when it did not fail. As the HTTP conventions have it, 4xx
    fails a CLIENT span only (a denial, a 400 is the caller's error, not the server's); a gRPC
    status fails a CLIENT span unless OK, a SERVER span for the server's errors only."""
    status = result.status
    if status is None or (status < 400 and result.error):  # no response, or one cut short
        error = result.error or ""
        return _ERROR_TYPES.get(error) or (
            "malformed_response" if error.startswith("malformed response") else "_OTHER"
        )
    if status >= 500 or (outbound and status >= 400):
        return str(status)
    grpc = result.grpc_status
    if grpc not in (None, 0) and (outbound or grpc in GRPC_SERVER_ERRORS):
        return GRPC_CODE_NAMES[grpc] if 0 <= grpc < len(GRPC_CODE_NAMES) else str(grpc)
    return None


def _end_span(
    span: Span, result: RequestResult, destination: str | None, outbound: bool, end_ns: int | None = None
) -> None:
    attrs: dict[str, str | int] = {DECISION: result.decision}
    if result.reason:
        attrs[REASON] = result.reason
    if result.policy:
        attrs[POLICY] = result.policy
    if result.status is not None:
        attrs["http.response.status_code"] = result.status
    if result.grpc_status is not None:
        attrs["rpc.grpc.status_code"] = result.grpc_status
    if result.retries:
        attrs[RETRIES] = result.retries
    if result.endpoint:
        _peer_attributes(attrs, result.endpoint)
    if destination:
        attrs[DESTINATION_ID] = destination
    if result.error:
        attrs[ERROR] = result.error
    error_type = _error_type(result, outbound)
    if error_type is not None:
        attrs["error.type"] = error_type
    span.set_attributes(attrs)
    if error_type is not None:
        # No description where http.response.status_code or rpc.grpc.status_code says it all (the
        # HTTP conventions); a denial's reason and a failure's error say more.
        why = f"denied: {result.reason}" if result.decision == "deny" else result.error or None
        span.set_status(Status(StatusCode.ERROR, why))
    span.end(end_ns)
