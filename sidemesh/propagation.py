"""Trace context on the wire: W3C ``traceparent``/``tracestate`` and B3 (single and multi header).

All three are read (W3C first); the forwarded request carries every format the request came in
with (when it came with none, the formats OTEL_PROPAGATORS names: W3C by default), so an app that
speaks B3, or B3 and W3C at once (a composite propagator), gets them back. B3 is read here rather
than by OpenTelemetry's propagator, which lost the debug flag, took a missing sampling flag as "no"
(multi-header) or "yes" (single header) where B3 leaves the decision to the receiver, and ignored a
decision sent without ids (``b3: 1``). Baggage is not propagated by the mesh: the app's own
``baggage`` header passes through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidemesh.tracing_settings import Format as Format

_W3C = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class B3:
    """What the B3 headers of a request say (openzipkin/b3-propagation)."""

    fmt: Format
    trace_id: int | None  # None: a sampling decision sent alone (``b3: 1``, ``X-B3-Sampled: 0``)
    span_id: int | None
    sampled: bool | None  # None: the caller left the decision to the receiver
    debug: bool  # "d" / X-B3-Flags: 1 (sampled, and asked to be recorded whatever the rate)


# B3 says lower-case hex; upper case is read too, as OpenTelemetry's and Zipkin's propagators do.
_B3_TRACE = re.compile(r"(?:[0-9a-fA-F]{16}){1,2}")
_B3_SPAN = re.compile(r"[0-9a-fA-F]{16}")


def _b3_ids(trace: str, span: str) -> tuple[int, int] | None:
    if _B3_TRACE.fullmatch(trace) is None or _B3_SPAN.fullmatch(span) is None:
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    return (trace_id, span_id) if trace_id and span_id else None


def parse_b3(carrier: Mapping[str, str]) -> B3 | None:
    """The B3 headers of ``carrier`` (the single header first), or None: none, or invalid."""
    single = carrier.get("b3")
    if single is not None:
        parts = single.strip(" \t").split("-")
        if len(parts) == 1:  # a decision alone: 0, 1 or d
            flag = parts[0]
            return (
                B3(Format.B3_SINGLE, None, None, flag != "0", flag == "d")
                if flag in ("0", "1", "d")
                else None
            )
        if len(parts) > 4 or (len(parts) == 4 and _B3_SPAN.fullmatch(parts[3]) is None):
            return None
        ids = _b3_ids(parts[0], parts[1])
        if ids is None or (len(parts) > 2 and parts[2] not in ("0", "1", "d")):
            return None
        decision = parts[2] if len(parts) > 2 else None
        return B3(Format.B3_SINGLE, *ids, None if decision is None else decision != "0", decision == "d")
    debug = carrier.get("x-b3-flags", "").strip(" \t") == "1"
    text = carrier.get("x-b3-sampled", "").strip(" \t").lower()
    sampled = True if debug or text in ("1", "true") else False if text in ("0", "false") else None
    trace = carrier.get("x-b3-traceid")
    if trace is None:
        return None if sampled is None else B3(Format.B3_MULTI, None, None, sampled, debug)
    ids = _b3_ids(trace.strip(" \t"), carrier.get("x-b3-spanid", "").strip(" \t"))
    return None if ids is None else B3(Format.B3_MULTI, *ids, sampled, debug)


def formats_in(carrier: Mapping[str, str]) -> tuple[Format, ...]:
    """The trace context formats the request carries, W3C first: the next hop gets each of them."""
    found = []
    if "traceparent" in carrier:
        found.append(Format.W3C)
    if "b3" in carrier:
        found.append(Format.B3_SINGLE)
    if "x-b3-traceid" in carrier:
        found.append(Format.B3_MULTI)
    return tuple(found)


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


def extract(
    carrier: Mapping[str, str], decide: Callable[[int], bool] = lambda trace_id: False
) -> tuple[Context | None, Format]:
    """The parent context the headers carry (None: start a new trace) and the format they used.
    A B3 caller that left the sampling decision to the receiver gets ``decide(trace_id)``'s."""
    if "traceparent" in carrier:
        ctx = _W3C.extract(carrier)
        if ctx:
            return ctx, Format.W3C
    b3 = parse_b3(carrier)
    if b3 is None or b3.trace_id is None or b3.span_id is None:
        return None, Format.W3C if b3 is None else b3.fmt
    sampled = decide(b3.trace_id) if b3.sampled is None else b3.sampled
    remote = SpanContext(b3.trace_id, b3.span_id, True, TraceFlags(TraceFlags.SAMPLED if sampled else 0))
    return set_span_in_context(NonRecordingSpan(remote)), b3.fmt


def denied(carrier: Mapping[str, str]) -> bool:
    """B3's sampling decision "deny" sent without ids (``b3: 0``, or ``X-B3-Sampled: 0`` without a
    trace id): the caller asks that nobody downstream record the request. Such a request takes no
    part in tracing and its headers pass on unchanged, as for a caller that said "not sampled"."""
    b3 = parse_b3(carrier) if "b3" in carrier or "x-b3-sampled" in carrier else None
    return b3 is not None and b3.trace_id is None and b3.sampled is False


def inject(span: Span, fmt: Format) -> list[tuple[bytes, bytes]]:
    """The headers that carry ``span`` as the parent of the next hop, in ``fmt``."""
    return headers_of(span.get_span_context(), fmt)


def headers_in(sc: SpanContext, formats: Iterable[Format], debug: bool = False) -> list[tuple[bytes, bytes]]:
    """``headers_of`` in each of ``formats`` (the caller's, or OTEL_PROPAGATORS' for a new trace)."""
    return [header for fmt in formats for header in headers_of(sc, fmt, debug)]


def headers_of(sc: SpanContext, fmt: Format, debug: bool = False) -> list[tuple[bytes, bytes]]:
    """The headers that carry the span ``sc`` as the parent of the next hop, in ``fmt``;
    ``debug``: B3's debug flag goes on (the caller set it)."""
    if not sc.is_valid:
        return []
    trace, span = b"%032x" % sc.trace_id, b"%016x" % sc.span_id
    if fmt is Format.W3C:  # written here as the SDK's propagator writes it, without a Context
        out = [(b"traceparent", b"00-%s-%s-%02x" % (trace, span, sc.trace_flags))]
        if sc.trace_state:
            out.append((b"tracestate", sc.trace_state.to_header().encode("latin-1")))
        return out
    flag = b"d" if debug and sc.trace_flags.sampled else b"1" if sc.trace_flags.sampled else b"0"
    if fmt is Format.B3_SINGLE:
        return [(b"b3", b"%s-%s-%s" % (trace, span, flag))]
    decision = (b"x-b3-flags", b"1") if flag == b"d" else (b"x-b3-sampled", flag)
    return [(b"x-b3-traceid", trace), (b"x-b3-spanid", span), decision]


# -- the unsampled fast path ----------------------------------------------------------------------
# Most requests are not sampled (1% is typical). For them no span is made: the next hop only needs
# headers that carry the trace on with the "not sampled" flag, which is cheap to write by hand.

# A tracestate longer than this (all its fields together) is dropped whole, as OpenTelemetry's W3C
# propagator drops it: the hop's span and the next hop get none.
TRACESTATE_MAX = 8192
# What a span records of its tracestate (OTLP Span.trace_state): any caller chooses it, and 512
# spans of 8 KiB each made an export batch bigger than collectors accept (4 MiB). W3C Trace
# Context asks for at least 512 characters and says how to cut: entries over 128 characters
# first, then from the end. The next hop still gets the tracestate whole.
TRACESTATE_RECORDED = 512
_ENTRY_KEPT = 128


def trace_state(value: str) -> TraceState | None:
    """A request's (combined) tracestate, or None when it is over ``TRACESTATE_MAX``; an invalid
    one is empty, as the SDK reads it."""
    if len(value) > TRACESTATE_MAX:
        return None
    return TraceState.from_header([value])


def recorded_state(state: TraceState) -> TraceState:
    """``state`` cut to ``TRACESTATE_RECORDED`` characters the way W3C Trace Context says."""
    entries = list(state.items())

    def size(kept: list[tuple[str, str]]) -> int:
        return sum(len(k) + 1 + len(v) for k, v in kept) + max(len(kept) - 1, 0)

    if size(entries) <= TRACESTATE_RECORDED:
        return state
    entries = [(k, v) for k, v in entries if len(k) + 1 + len(v) <= _ENTRY_KEPT]
    while size(entries) > TRACESTATE_RECORDED:
        entries.pop()
    return TraceState(entries)


def recorded_parent(parent: Context) -> Context:
    """``parent`` with its tracestate cut as a span records it (``recorded_state``): a span takes
    its parent's. The next hop's headers are written from the uncut one."""
    sc = get_current_span(parent).get_span_context()
    if not sc.trace_state or len(sc.trace_state.to_header()) <= TRACESTATE_RECORDED:
        return parent
    cut = SpanContext(sc.trace_id, sc.span_id, sc.is_remote, sc.trace_flags, recorded_state(sc.trace_state))
    return set_span_in_context(NonRecordingSpan(cut))


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
