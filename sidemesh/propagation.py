"""Trace context on the wire: W3C ``traceparent``/``tracestate`` and B3 (single and multi header).

All three are read; the forwarded request carries the format the request came in with (when it
came with none, the formats OTEL_PROPAGATORS names: W3C by default), so an app that speaks B3 gets
B3 back. Baggage is not propagated by the mesh:
the app's own ``baggage`` header passes through untouched.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_W3C = TraceContextTextMapPropagator()
_B3_SINGLE = B3SingleFormat()
_B3_MULTI = B3MultiFormat()  # its extract reads the single header too


class Format(enum.Enum):
    W3C = "w3c"
    B3_SINGLE = "b3"
    B3_MULTI = "b3multi"


def carrier_of(headers: Iterable[tuple[bytes, bytes]], names: frozenset[bytes]) -> dict[str, str]:
    """The trace headers among ``headers`` (lower-case names), as a text map; a header that comes
    more than once is one comma-separated list (RFC 9110 section 5.3; W3C tracestate may be split,
    and two traceparent headers make one invalid value: a new trace)."""
    return combined((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k in names)


def combined(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header (or gRPC metadata) pairs as a text map, repeated names joined with commas."""
    out: dict[str, str] = {}
    for name, value in pairs:
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def extract(carrier: Mapping[str, str]) -> tuple[Context | None, Format]:
    """The parent context the headers carry (None: start a new trace) and the format they used."""
    if "traceparent" in carrier:
        ctx = _W3C.extract(carrier)
        if ctx:
            return ctx, Format.W3C
    if "b3" in carrier:
        return _B3_MULTI.extract(carrier) or None, Format.B3_SINGLE
    if "x-b3-traceid" in carrier:
        return _B3_MULTI.extract(carrier) or None, Format.B3_MULTI
    return None, Format.W3C


def denied(carrier: Mapping[str, str]) -> bool:
    """B3's sampling decision "deny" sent without ids (``b3: 0``, or ``X-B3-Sampled: 0`` without a
    trace id): the caller asks that nobody downstream record the request. Such a request takes no
    part in tracing and its headers pass on unchanged, as for a caller that said "not sampled"."""
    single = carrier.get("b3")
    if single is not None:
        return single.strip(" \t") == "0"
    if "x-b3-traceid" in carrier:
        return False  # with ids: the extractor reads the sampled flag
    return carrier.get("x-b3-sampled", "").strip(" \t").lower() in ("0", "false")


def inject(span: Span, fmt: Format) -> list[tuple[bytes, bytes]]:
    """The headers that carry ``span`` as the parent of the next hop, in ``fmt``."""
    return headers_of(span.get_span_context(), fmt)


def headers_in(sc: SpanContext, formats: Iterable[Format]) -> list[tuple[bytes, bytes]]:
    """``headers_of`` in each of ``formats`` (a new trace: OTEL_PROPAGATORS may name several)."""
    return [header for fmt in formats for header in headers_of(sc, fmt)]


def headers_of(sc: SpanContext, fmt: Format) -> list[tuple[bytes, bytes]]:
    """The headers that carry the span ``sc`` as the parent of the next hop, in ``fmt``."""
    if not sc.is_valid:
        return []
    if fmt is Format.W3C:  # written here as the SDK's propagator writes it, without a Context
        out = [(b"traceparent", b"00-%032x-%016x-%02x" % (sc.trace_id, sc.span_id, sc.trace_flags))]
        if sc.trace_state:
            out.append((b"tracestate", sc.trace_state.to_header().encode("latin-1")))
        return out
    carrier: dict[str, str] = {}
    ctx = set_span_in_context(NonRecordingSpan(sc))
    if fmt is Format.B3_SINGLE:
        _B3_SINGLE.inject(carrier, ctx)
    else:
        _B3_MULTI.inject(carrier, ctx)
    return [(k.encode(), v.encode("latin-1")) for k, v in carrier.items()]


# -- the unsampled fast path ----------------------------------------------------------------------
# Most requests are not sampled (1% is typical). For them no span is made: the next hop only needs
# headers that carry the trace on with the "not sampled" flag, which is cheap to write by hand.

_HEX = frozenset("0123456789abcdef")


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a ``traceparent``, or None when invalid. Surrounding
    spaces and tabs (HTTP's optional whitespace, which parsers keep at a value's end) are not part
    of it; a later version may carry more fields, each after a dash (W3C Trace Context 4.3)."""
    value = value.strip(" \t")
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace, span, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if version == "ff" or not _HEX.issuperset(version + trace + span + flags):
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


def new_unsampled_headers(
    formats: Iterable[Format], trace_id: int, span_id: int
) -> list[tuple[bytes, bytes]]:
    """The headers of a new trace that is not sampled, its ids drawn at random, in each of ``formats``."""
    return [h for fmt in formats for h in unsampled_headers(fmt, trace_id, span_id, None, random_ids=True)]


def unsampled_headers(
    fmt: Format, trace_id: int, span_id: int, tracestate: str | None, *, random_ids: bool = False
) -> list[tuple[bytes, bytes]]:
    """The headers of an unsampled hop ``span_id`` in trace ``trace_id``, in ``fmt``;
    ``random_ids``: a new trace whose ids were drawn at random (W3C's flag 02, as the SDK sets it)."""
    trace, span = f"{trace_id:032x}", f"{span_id:016x}"
    if fmt is Format.W3C:
        flags = "02" if random_ids else "00"  # W3C level 2: the trace id is random; not sampled
        out = [(b"traceparent", f"00-{trace}-{span}-{flags}".encode())]
        if tracestate:
            out.append((b"tracestate", tracestate.encode("latin-1")))
        return out
    if fmt is Format.B3_SINGLE:
        return [(b"b3", f"{trace}-{span}-0".encode())]
    return [(b"x-b3-traceid", trace.encode()), (b"x-b3-spanid", span.encode()), (b"x-b3-sampled", b"0")]
