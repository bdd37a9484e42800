"""OTEL_* settings, trace-context propagation, the dropped-span bookkeeping, labels and route stats."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from proxy.observe import TRACE_HEADERS, RequestInfo, RequestResult
from proxy.routes import BUCKETS, RouteStats, route_of
from proxy.telemetry import identity_label, status_class, succeeded
from proxy.tracing import _UNCHANGED, _unsampled_w3c
from sidemesh import propagation
from sidemesh.propagation import Format
from sidemesh.telemetry import (
    PresetIds,
    SpanCounters,
    TracingSettings,
    make_sampler,
    settings_from_env,
    span_limits,
    start_tracing,
)

EP = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger.sidemesh-system.svc:4317"}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "},
        {**EP, "OTEL_SDK_DISABLED": "true"},
        {**EP, "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_tracing_is_off_without_an_endpoint_or_when_disabled(env: dict[str, str]) -> None:
    assert settings_from_env(env) is None


def test_defaults_with_an_endpoint() -> None:
    s = settings_from_env(EP)
    assert s == TracingSettings(endpoint=EP["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert s.protocol == "grpc" and s.sampler == "parentbased_always_on" and s.timeout == 10.0


@pytest.mark.parametrize(
    ("endpoint", "protocol"),
    [("http://c:4318", "http/protobuf"), ("http://c:4317", "grpc"), ("http://c:9999", "grpc")],
)
def test_without_a_protocol_an_endpoint_on_the_otlp_http_port_gets_otlp_http(
    endpoint: str, protocol: str
) -> None:
    """The injection settings' default endpoint is OTLP/HTTP's :4318 (their protocol follows the port):
    copied into a control-plane process or a local sidecar without a protocol, it got gRPC, sent to
    an HTTP port, and every span was lost."""
    s = settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert s is not None and s.protocol == protocol
    # A protocol given in capitals is read as the SDK reads enum values (it was refused)
    s = settings_from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "HTTP/Protobuf"}
    )
    assert s is not None and s.protocol == "http/protobuf"


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4318/"}, "http://j:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://j:4318/custom"}, "http://j:4318/custom"),
    ],
)
def test_http_protobuf_endpoint_gets_the_traces_path_only_from_the_generic_variable(
    env: dict[str, str], endpoint: str
) -> None:
    s = settings_from_env({**env, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert s is not None and s.protocol == "http/protobuf" and s.endpoint == endpoint


def test_sampler_ratio_timeout_and_queue_are_read() -> None:
    s = settings_from_env(
        {
            **EP,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512",
            "OTEL_SERVICE_NAME": "cart",
        }
    )
    assert s is not None
    assert (s.ratio, s.timeout, s.max_queue_size, s.max_export_batch_size) == (0.01, 2.5, 100, 100)
    assert s.service_name == "cart"
    assert "ParentBased" in make_sampler(s).get_description()
    assert "0.01" in make_sampler(s).get_description()


RATIO = {"OTEL_TRACES_SAMPLER": "traceidratio"}
HTTP = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}


@pytest.mark.parametrize(
    ("env", "variable", "what", "expected"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER", "sampler", "parentbased_always_on"),
        ({**RATIO, "OTEL_TRACES_SAMPLER_ARG": "5"}, "OTEL_TRACES_SAMPLER_ARG", "ratio", 1.0),
        ({**RATIO, "OTEL_TRACES_SAMPLER_ARG": "-0.5"}, "OTEL_TRACES_SAMPLER_ARG", "ratio", 1.0),
        ({**RATIO, "OTEL_TRACES_SAMPLER_ARG": "x"}, "OTEL_TRACES_SAMPLER_ARG", "ratio", 1.0),
        # not finite: nan passed (no trace ever sampled); inf stopped the SDK's export thread
        ({**RATIO, "OTEL_TRACES_SAMPLER_ARG": "nan"}, "OTEL_TRACES_SAMPLER_ARG", "ratio", 1.0),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL", "protocol", "grpc"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER", "protocol", "grpc"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size", 2048),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "nan"}, "OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size", 2048),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "nan"}, "OTEL_EXPORTER_OTLP_TIMEOUT", "timeout", 10.0),
        ({"OTEL_BSP_SCHEDULE_DELAY": "inf"}, "OTEL_BSP_SCHEDULE_DELAY", "schedule_delay_ms", 5000),
        (
            {"OTEL_PROPAGATORS": "jaeger,b3"},
            "OTEL_PROPAGATORS",
            "new_trace_formats",
            (Format.B3_SINGLE,),
        ),
        ({"OTEL_PROPAGATORS": "xray"}, "OTEL_PROPAGATORS", "new_trace_formats", (Format.W3C,)),
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"},
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            "max_export_batch_size",
            100,
        ),
    ],
)
def test_a_bad_value_is_warned_about_and_ignored(
    env: dict[str, str], variable: str, what: str, expected: object, caplog: pytest.LogCaptureFixture
) -> None:
    """As the SDK environment specification says: a bad value is warned about, naming the variable,
    and otherwise ignored (its default is used); tracing configuration never stops a component."""
    with caplog.at_level(logging.WARNING, logger="sidemesh.telemetry"):
        s = settings_from_env({**EP, **env})
    assert s is not None and getattr(s, what) == expected
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"{variable}: ") and "ignored" in warned[0], warned


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "jaeger:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:99999"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318?k=v", **HTTP}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ],
)
def test_a_bad_endpoint_is_warned_about_and_leaves_tracing_off(
    env: dict[str, str], variable: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidemesh.telemetry"):
        assert settings_from_env(env) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"{variable}: ") and "tracing is off" in warned[0], (
        warned
    )


def test_good_values_are_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    env = {
        **EP,
        **RATIO,
        "OTEL_TRACES_SAMPLER_ARG": "0",
        "OTEL_TRACES_SAMPLER": " ",
        "OTEL_PROPAGATORS": "b3,none",
    }
    with caplog.at_level(logging.WARNING, logger="sidemesh.telemetry"):
        s = settings_from_env(env)
    assert (
        s is not None and s.sampler == "parentbased_always_on" and s.new_trace_formats == (Format.B3_SINGLE,)
    )
    assert not caplog.records


# -- propagation ------------------------------------------------------------------------------


def _child_span(ctx: object) -> object:
    tracer = TracerProvider(sampler=DEFAULT_ON).get_tracer("t")
    return tracer.start_span("x", context=ctx)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "fmt", "sampled"),
    [
        ({"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "k=v"}, Format.W3C, True),
        ({"b3": f"{TRACE}-{PARENT}-1"}, Format.B3_SINGLE, True),
        ({"x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-sampled": "1"}, Format.B3_MULTI, True),
        ({"traceparent": f"00-{TRACE}-{PARENT}-00"}, Format.W3C, False),
        # An invalid traceparent falls back to the B3 header next to it.
        ({"traceparent": "garbage", "b3": f"{TRACE}-{PARENT}-1"}, Format.B3_SINGLE, True),
    ],
)
def test_extract_reads_each_format(headers: dict[str, str], fmt: Format, sampled: bool) -> None:
    ctx, got = propagation.extract(headers)
    assert got is fmt and ctx is not None
    span = _child_span(ctx)
    sc = span.get_span_context()  # type: ignore[attr-defined]
    assert f"{sc.trace_id:032x}" == TRACE
    assert sc.trace_flags.sampled is sampled  # parent-based: the caller's decision holds


def test_no_headers_start_a_new_trace_in_w3c() -> None:
    assert propagation.extract({}) == (None, Format.W3C)
    assert propagation.extract({"traceparent": "nonsense"}) == (None, Format.W3C)


@pytest.mark.parametrize(
    ("fmt", "names"),
    [
        (Format.W3C, {b"traceparent"}),
        (Format.B3_SINGLE, {b"b3"}),
        (Format.B3_MULTI, {b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled"}),
    ],
)
def test_inject_writes_the_format_it_is_given(fmt: Format, names: set[bytes]) -> None:
    ctx, _ = propagation.extract({"traceparent": f"00-{TRACE}-{PARENT}-01"})
    span = _child_span(ctx)
    out = dict(propagation.inject(span, fmt))  # type: ignore[arg-type]
    assert set(out) == names
    assert all(name in TRACE_HEADERS for name in out)
    assert TRACE.encode() in b"".join(out.values())
    span_id = f"{span.get_span_context().span_id:016x}".encode()  # type: ignore[attr-defined]
    assert span_id in b"".join(out.values())


@pytest.mark.parametrize("flags", [0x01, 0x03])
def test_w3c_headers_are_what_the_sdks_propagator_writes(flags: int) -> None:
    """``headers_of`` writes W3C by hand (no Context on the request path): the SDK's propagator is
    the reference."""
    state = TraceState([("vendor", "abc"), ("other", "x=1")])
    sc = SpanContext(int(TRACE, 16), int(PARENT, 16), False, TraceFlags(flags), state)
    reference: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(reference, set_span_in_context(NonRecordingSpan(sc)))
    ours = propagation.headers_of(sc, Format.W3C)
    assert ours == [(k.encode(), v.encode()) for k, v in reference.items()]
    assert propagation.headers_of(INVALID_SPAN_CONTEXT, Format.W3C) == []


def test_preset_ids_make_the_next_span_and_only_it() -> None:
    ids = PresetIds()
    tracer = TracerProvider(sampler=DEFAULT_ON, id_generator=ids).get_tracer("t")
    ids.preset(int(TRACE, 16), int(PARENT, 16))
    first = tracer.start_span("a").get_span_context()
    second = tracer.start_span("b").get_span_context()
    assert (first.trace_id, first.span_id) == (int(TRACE, 16), int(PARENT, 16))
    assert second.trace_id not in (0, first.trace_id) and second.span_id not in (0, first.span_id)
    # A span with a parent takes no trace id from the generator: the preset must not outlive it.
    ids.preset(int(TRACE, 16) + 1, int(PARENT, 16) + 1)
    child = tracer.start_span("c", context=set_span_in_context(NonRecordingSpan(first))).get_span_context()
    root = tracer.start_span("d").get_span_context()
    assert child.trace_id == first.trace_id and child.span_id == int(PARENT, 16) + 1
    assert root.trace_id not in (first.trace_id, int(TRACE, 16) + 1)


def test_tracestate_is_carried_on() -> None:
    ctx, _ = propagation.extract({"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "vendor=abc"})
    out = dict(propagation.inject(_child_span(ctx), Format.W3C))  # type: ignore[arg-type]
    assert out[b"tracestate"] == b"vendor=abc"


# -- the dropped-span bookkeeping -------------------------------------------------------------


def _value(registry: CollectorRegistry, reason: str) -> float:
    v = registry.get_sample_value("sidemesh_tracing_spans_dropped_total", {"reason": reason})
    assert v is not None
    return v


def test_a_full_queue_counts_each_span_it_drops() -> None:
    registry = CollectorRegistry()
    counters = SpanCounters(registry)
    for _ in range(5):
        counters.enqueue(capacity=3)
    assert counters.queued == 3 and _value(registry, "queue_full") == 2
    counters.dequeue(2)  # the export thread took a batch
    counters.enqueue(capacity=3)
    assert counters.queued == 2 and _value(registry, "queue_full") == 2
    assert _value(registry, "export_failed") == 0


# -- labels, success, routes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spiffe_id", "label"),
    [
        ("spiffe://cluster.local/ns/shop/sa/cart", "shop/cart"),
        ("unauthenticated", "unauthenticated"),
        (None, "unknown"),
        ("spiffe://cluster.local/some/other/path", "other"),
    ],
)
def test_identity_labels_are_bounded(spiffe_id: str | None, label: str) -> None:
    assert identity_label(spiffe_id, {}) == label


def test_the_identity_cache_stays_bounded() -> None:
    cache: dict[str, str] = {}
    for i in range(5000):
        identity_label(f"spiffe://td/ns/n{i}/sa/s", cache)
    assert len(cache) <= 4096


@pytest.mark.parametrize(
    ("result", "klass", "ok"),
    [
        (RequestResult(200), "2xx", True),
        (RequestResult(404), "4xx", True),
        (RequestResult(503, error="no endpoints"), "5xx", False),
        (RequestResult(None, error="upstream reset"), "reset", False),
        (RequestResult(200, grpc_status=14), "2xx", False),
        (RequestResult(403, decision="deny", reason="no rule"), "4xx", False),
        (RequestResult(200, grpc_status=0), "2xx", True),
        (RequestResult(200, error="downstream: gone"), "2xx", False),
        (RequestResult(500), "5xx", False),
        (RequestResult(499), "4xx", True),
    ],
)
def test_status_class_and_success(result: RequestResult, klass: str, ok: bool) -> None:
    from proxy.metrics import ProxyMetrics
    from proxy.telemetry import ProxyObserver

    assert status_class(result) == klass
    assert succeeded(result) is ok
    # A finished request counts as a success in its route's statistics exactly then (finish
    # decides it without calling ``succeeded``).
    stats = RouteStats()
    obs = ProxyObserver(ProxyMetrics(), stats, "spiffe://cluster.local/ns/shop/sa/cart", None)
    obs.start(RequestInfo("inbound", "http/1.1", "GET", "/x", "cart", [])).finish(result)
    (counters,) = stats.routes.values()
    assert (counters.requests, counters.successes) == (1, int(ok))
    assert counters.denials == int(result.decision == "deny")


def test_route_stats_keep_the_busiest_routes_within_capacity() -> None:
    stats = RouteStats(capacity=3)
    for _ in range(10):
        stats.record("inbound", route_of("GET", "/a?x=1"), 0.002, True, False)
    for _ in range(5):
        stats.record("inbound", "GET /b", 0.5, False, True)
    stats.record("inbound", "GET /c", 0.001, True, False)
    stats.record("inbound", "GET /d", 0.001, True, False)  # evicts /c, the least requested
    snap = stats.snapshot(workload="shop/cart-1")
    routes = {r["route"]: r for r in snap["routes"]}
    assert set(routes) == {"GET /a", "GET /b", "GET /d"} and snap["evicted"] == 1
    a, b = routes["GET /a"], routes["GET /b"]
    assert (a["requests"], a["successes"], a["denials"]) == (10, 10, 0)
    assert (b["requests"], b["successes"], b["denials"]) == (5, 0, 5)
    assert sum(a["latency_buckets"]) == 10
    i = a["latency_buckets"].index(10)
    assert BUCKETS[i] >= 0.002 > (BUCKETS[i - 1] if i else 0)


def test_long_paths_are_cut() -> None:
    assert len(route_of("GET", "/" + "x" * 500)) < 140


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (f"00-{TRACE}-{PARENT}-01", (int(TRACE, 16), int(PARENT, 16), 1)),
        (f"00-{TRACE}-{PARENT}-00", (int(TRACE, 16), int(PARENT, 16), 0)),
        (f"01-{TRACE}-{PARENT}-03-future", (int(TRACE, 16), int(PARENT, 16), 3)),  # a later version
        (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 has no more fields
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),  # lower-case hex only
        ("00-abc-def-01", None),
        ("", None),
    ],
)
def test_parse_traceparent(value: str, parsed: tuple[int, int, int] | None) -> None:
    assert propagation.parse_traceparent(value) == parsed
    if parsed is not None:  # the SDK agrees
        ctx, _ = propagation.extract({"traceparent": value})
        assert ctx is not None


def test_unsampled_headers_in_each_format() -> None:
    t, s = int(TRACE, 16), int(PARENT, 16)
    assert propagation.unsampled_headers(Format.W3C, t, s, "k=v") == [
        (b"traceparent", f"00-{TRACE}-{PARENT}-00".encode()),
        (b"tracestate", b"k=v"),
    ]
    assert propagation.unsampled_headers(Format.W3C, t, s, None, random_ids=True) == [
        (b"traceparent", f"00-{TRACE}-{PARENT}-02".encode())
    ]
    assert propagation.unsampled_headers(Format.B3_SINGLE, t, s, None) == [
        (b"b3", f"{TRACE}-{PARENT}-0".encode())
    ]
    assert dict(propagation.unsampled_headers(Format.B3_MULTI, t, s, None))[b"x-b3-sampled"] == b"0"
    # What the next hop makes of them: the same trace, not sampled.
    for fmt in Format:
        carrier = {k.decode(): v.decode() for k, v in propagation.unsampled_headers(fmt, t, s, None)}
        ctx, got = propagation.extract(carrier)
        assert got is fmt and ctx is not None
        sc = _child_span(ctx).get_span_context()  # type: ignore[attr-defined]
        assert sc.trace_id == t and not sc.trace_flags.sampled


@pytest.mark.parametrize(
    ("value", "unchanged"),
    [
        (f"00-{TRACE}-{PARENT}-00", True),
        (f"00-{TRACE}-{PARENT}-02", True),  # "random" (W3C level 2), not sampled
        (f"00-{TRACE}-{PARENT}-01", False),  # sampled: the general path makes a span
        (f"00-{TRACE}-{PARENT}-03", False),
        (f"00-{'0' * 32}-{PARENT}-00", False),  # invalid ids: the general path starts a new trace
        (f"00-{TRACE}-{'0' * 16}-00", False),
        (f"00-{TRACE.upper()}-{PARENT}-00", False),
        (f"00-{TRACE}-{PARENT}-00-extra", False),
        (f"01-{TRACE}-{PARENT}-00", False),  # a later version: the SDK's parser decides
    ],
)
def test_the_unsampled_fast_path_passes_only_valid_unsampled_parents(value: str, unchanged: bool) -> None:
    info = RequestInfo("inbound", "http/1.1", "GET", "/", "cart", [(b"traceparent", value.encode())])
    tracing = SimpleNamespace(root_ratio=0.0)
    out = _unsampled_w3c(info, tracing)  # type: ignore[arg-type]
    assert (out is _UNCHANGED) == unchanged
    if not unchanged:
        assert out is None


@pytest.mark.parametrize(
    ("environ", "service"),
    [
        ({}, "sidemesh-ca"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=x,service.name=check%20out"}, "check out"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout", "OTEL_SERVICE_NAME": "cart"}, "cart"),
    ],
)
def test_the_service_name_is_taken_in_the_sdks_order(environ: dict[str, str], service: str) -> None:
    """OTEL_SERVICE_NAME, then OTEL_RESOURCE_ATTRIBUTES' service.name, then the component's name."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **environ}
    tracing = start_tracing("sidemesh-ca", CollectorRegistry(), {"k8s.pod.name": "ca-1"}, env)
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == service
    finally:
        tracing.provider.shutdown()


# -- OTEL_PROPAGATORS: the formats a new trace is written in ----------------------------------------


@pytest.mark.parametrize(
    ("value", "formats"),
    [
        ("", (Format.W3C,)),  # the SDK's default: tracecontext,baggage
        ("b3multi", (Format.B3_MULTI,)),
        (" TraceContext , b3 ,tracecontext", (Format.W3C, Format.B3_SINGLE)),
        ("baggage", ()),
        ("none", ()),
    ],
)
def test_propagators_choose_the_formats_of_a_new_trace(value: str, formats: tuple[Format, ...]) -> None:
    s = settings_from_env({**EP, "OTEL_PROPAGATORS": value})
    assert s is not None and s.new_trace_formats == formats


def test_the_batch_export_timeout() -> None:
    s = settings_from_env({**EP, "OTEL_BSP_EXPORT_TIMEOUT": "1000"})
    assert s is not None and s.export_timeout_ms == 1000
    assert settings_from_env(EP).export_timeout_ms == 30000  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "sampler",
    [
        {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},  # the unsampled fast path
        {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},  # sampled, decided before the SDK
        {"OTEL_TRACES_SAMPLER": "always_on"},  # the SDK decides
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
    ],
)
@pytest.mark.parametrize(
    ("propagators", "names"),
    [
        ("", {b"traceparent"}),
        ("b3multi", {b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled"}),
        ("b3", {b"b3"}),
        ("tracecontext,b3", {b"traceparent", b"b3"}),
        ("none", set()),
    ],
)
def test_a_request_without_trace_headers_goes_on_in_the_configured_formats(
    sampler: dict[str, str], propagators: str, names: set[bytes]
) -> None:
    """A B3-only app (Zipkin's, Istio's old default) behind a sidecar started with OTEL_PROPAGATORS=b3multi
    gets B3 for the traces the mesh starts; a caller's own format still wins (test above)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from proxy.metrics import ProxyMetrics
    from proxy.telemetry import ProxyObserver
    from sidemesh.telemetry import start_tracing

    environ = {**EP, **sampler, "OTEL_PROPAGATORS": propagators}
    tracing = start_tracing(
        "t", CollectorRegistry(), environ=environ, exporter=InMemorySpanExporter(), caller_samples_roots=True
    )
    assert tracing is not None
    obs = ProxyObserver(ProxyMetrics(), RouteStats(), "spiffe://cluster.local/ns/shop/sa/cart", tracing)
    for _ in range(20):  # the 0.5 ratio: both ways
        request = obs.start(RequestInfo("inbound", "http/1.1", "GET", "/", "cart", []))
        headers = request.trace_headers() or []
        assert {name for name, _ in headers} == names
        request.finish(RequestResult(status=200))
    carrier = {k.decode(): v.decode() for k, v in headers}
    if names:  # what the next hop reads: one valid context
        assert propagation.extract(carrier)[0] is not None


@pytest.mark.parametrize("sampler", ["parentbased_always_on", "always_on"])  # our fast path, the SDK's
def test_a_caller_chosen_tracestate_is_bounded_in_the_span_and_dropped_over_the_sdk_limit(
    sampler: str,
) -> None:
    """A tracestate over 8192 characters is dropped, as the SDK's propagator drops it (the parent-based
    path took 16 KiB whole); one under it goes on whole, but the span records at most 512 characters,
    cut as W3C Trace Context says (long entries first): 512 spans with 8 KiB each made an export
    batch bigger than collectors take (4 MiB), and every span in it was lost."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from proxy.metrics import ProxyMetrics
    from proxy.telemetry import ProxyObserver

    exporter = InMemorySpanExporter()
    environ = {**EP, "OTEL_TRACES_SAMPLER": sampler}
    tracing = start_tracing(
        "t", CollectorRegistry(), environ=environ, exporter=exporter, caller_samples_roots=True
    )
    assert tracing is not None
    obs = ProxyObserver(ProxyMetrics(), RouteStats(), "spiffe://cluster.local/ns/shop/sa/cart", tracing)
    short = [f"s{i}=abc" for i in range(5)]
    long = [f"l{i}=" + "v" * 250 for i in range(30)]
    fits = ",".join(short[:3] + long[:27] + short[3:])  # 32 entries (the most), about 6,900 characters
    assert 512 < len(fits) <= 8192
    over = ",".join(f"k{i}=" + "w" * 256 for i in range(32))  # valid, but 8,4xx characters
    assert len(over) > 8192
    forwarded = []
    for state in (fits, over):
        headers = [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode()), (b"tracestate", state.encode())]
        request = obs.start(RequestInfo("inbound", "http/1.1", "GET", "/", "cart", headers))
        forwarded.append(dict(request.trace_headers() or []))
        request.finish(RequestResult(status=200))
    tracing.make_deferred()
    assert tracing.provider.force_flush()
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    assert forwarded[0][b"tracestate"] == fits.encode()  # the next hop gets it whole
    assert spans[0].context.trace_state.to_header() == ",".join(short)  # the short entries, in order
    assert b"tracestate" not in forwarded[1] and not spans[1].context.trace_state
    for ts in (fits, over):  # over the limit, or cut: nothing longer than 512 recorded
        assert all(len(s.context.trace_state.to_header()) <= 512 for s in spans), ts


def test_an_oversized_traceparent_or_tracestate_is_dropped_without_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OTel's W3C propagator warned for each traceparent over 512 characters and each tracestate
    over 8192 (the control plane's servers, and sidecars on a sampler that is not parent-based,
    read headers through it): anyone could write a log line per request."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sidemesh.telemetry import start_tracing

    tracing = start_tracing("t", CollectorRegistry(), environ=EP, exporter=InMemorySpanExporter())
    assert tracing is not None
    long_parent = f"01-{'1' * 32}-{'2' * 16}-01-" + "x" * 600  # (a future version may carry more)
    valid = f"00-{'1' * 32}-{'2' * 16}-01"
    with caplog.at_level(logging.DEBUG):
        for carrier in (
            {"traceparent": long_parent},
            {"traceparent": valid, "tracestate": "a=" + "b" * 9000},
        ):
            propagation.extract(carrier)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


def test_the_grpc_exporters_own_words_reach_the_warning_every_time_and_the_log_when_it_is_made(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The gRPC exporter's logger drops a record like the one before it within 20 s (the SDK's
    DuplicateFilter): the next failed batch's warning said "no reason given". And what it logs while
    it is made (a certificate file it cannot read) went nowhere once its logger was taken over."""
    import logging

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")
    with caplog.at_level(logging.INFO):
        tracing = start_tracing(
            "t", CollectorRegistry(), environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "https://localhost:4317"}
        )
    assert tracing is not None
    try:
        exporter_log = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter")
        assert not [f for f in exporter_log.filters if type(f).__name__ == "DuplicateFilter"]
        assert "/nonexistent/ca.pem" in caplog.text
    finally:
        tracing.provider.shutdown()


@pytest.mark.parametrize(
    ("env", "span_length", "span_attributes", "warned"),
    [
        ({}, 1024, 128, []),
        ({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "64"}, 64, 128, []),
        (
            {"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "1k"},
            1024,
            128,
            ["OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"],
        ),
        ({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "-1"}, 1024, 128, ["OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"]),
        (
            {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "abc", "OTEL_ATTRIBUTE_COUNT_LIMIT": "7"},
            1024,
            7,
            ["OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"],
        ),
        ({"OTEL_SPAN_EVENT_COUNT_LIMIT": "1.5"}, 1024, 128, ["OTEL_SPAN_EVENT_COUNT_LIMIT"]),
        (
            {"OTEL_SPAN_EVENT_COUNT_LIMIT": "²"},
            1024,
            128,
            ["OTEL_SPAN_EVENT_COUNT_LIMIT"],
        ),  # (isdigit, not int)
        ({"OTEL_ATTRIBUTE_COUNT_LIMIT": "+5"}, 1024, 5, []),  # (the SDK takes it)
    ],
)
def test_a_bad_span_limit_is_warned_about_and_ignored(
    env: dict[str, str],
    span_length: int,
    span_attributes: int,
    warned: list[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SDK's SpanLimits raised on a bad OTEL_*_LIMIT (read from the process environment), and
    every component stopped with an internal error."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # (where the SDK would read it)
    with caplog.at_level(logging.WARNING, logger="sidemesh.telemetry"):
        limits = span_limits(env)
    assert (limits.max_span_attribute_length, limits.max_span_attributes) == (span_length, span_attributes)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == warned


def test_a_warning_says_what_is_used_instead(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidemesh.telemetry"):
        settings_from_env({**EP, "OTEL_PROPAGATORS": "jaeger"})
        settings_from_env({**EP, "OTEL_PROPAGATORS": "jaeger,b3"})
    said = [r.getMessage() for r in caplog.records]
    assert said[0].endswith("the default tracecontext,baggage is used") and said[1].endswith(
        "the others are used"
    )


@pytest.mark.parametrize(
    ("variable", "value", "warning"),
    [
        # read by the SDK when it is imported (it raised: the component stopped at import)
        ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "abc", "'abc' is not an integer from 0 to 2147483647"),
        # past what the SDK's per-span deques hold: every span (and so every CA call) failed
        (
            "OTEL_SPAN_EVENT_COUNT_LIMIT",
            "99999999999999999999",
            "'99999999999999999999' is not an integer from 0 to 2147483647",
        ),
        ("OTEL_PROPAGATORS", " ", None),  # blank: unset, no warning
        ("OTEL_ATTRIBUTE_COUNT_LIMIT", " ", None),  # blank: as if unset (the SDK raised on it too)
        # read by the gRPC exporter itself (float(), and gzip only: "none" raised too)
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "abc", "'abc' is not a number"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "bogus", "'bogus' is not one of gzip, none"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none", None),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "GZIP", None),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "", None),  # blank: unset (the exporter float()ed it)
        # read by the SDK's batch processor and tracer (it raised when they were made)
        ("OTEL_PYTHON_METER_PROVIDER", "bogus", None),
        # past what the SDK can hold (its deque overflowed; a delay killed the export thread)
        ("OTEL_BSP_MAX_QUEUE_SIZE", "1e20", "1e20 is above 2147483647"),
        ("OTEL_BSP_SCHEDULE_DELAY", "1e20", "1e20 is above 2147483647"),
        # read by OpenTelemetry's API when imported (FastAPI imports it): an unknown name raised
        (
            "OTEL_PROPAGATORS",
            "tracecontext,xray",
            "'xray' is not one of tracecontext, b3, b3multi, baggage, none",
        ),
        ("OTEL_PROPAGATORS", "TraceContext", None),  # (the API looked the name up as given)
    ],
)
def test_a_value_the_sdk_or_exporter_would_raise_on_is_warned_about_once_and_tracing_starts(
    variable: str, value: str, warning: str | None
) -> None:
    """The SDK environment specification: warn and ignore. A fresh interpreter, as a component
    starts: the SDK reads the span limits when it is imported."""
    import json
    import os
    import subprocess
    import sys

    code = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s|%(variable)s|%(problem)s", stream=sys.stdout)
import ca.server, controller.server, injector.server  # (each imports the SDK)
from prometheus_client import CollectorRegistry
from sidemesh.telemetry import start_tracing
tracing = start_tracing("svc", CollectorRegistry())
tracing.tracer.start_span("a span").end()  # (a huge span limit failed here: every CA call with it)
exporter = tracing.provider._active_span_processor._span_processors[0].span_exporter
inner = getattr(exporter, "inner", exporter)
compression = getattr(inner, "_compression", None)
print(json.dumps({"on": tracing is not None, "compression": getattr(compression, "name", str(compression))}))
tracing.provider.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", variable: value})
    # (with the SDK's internal metrics on, the exporters too looked the meter provider up)
    env["OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"] = "true"
    env.setdefault("OTEL_EXPORTER_OTLP_TIMEOUT", "300")  # (the span goes nowhere: give up fast)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    *lines, last = out.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["on"] is True
    warned = [line for line in lines if f"|{variable}|" in line]
    assert [line.split("|")[2] for line in warned] == ([warning] if warning else []), out.stdout
    if "COMPRESSION" in variable:
        assert result["compression"].endswith("Gzip" if value.lower() == "gzip" else "NoCompression")


def test_a_sidecar_reads_the_settings_before_the_sdk_and_still_warns_once() -> None:
    """The sidecar reads OTEL_* first and imports the SDK only when tracing is on."""
    import os
    import subprocess
    import sys

    code = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(variable)s", stream=sys.stdout)
from prometheus_client import CollectorRegistry
from proxy.telemetry import start_sidecar_tracing
tracing = start_sidecar_tracing("shop/cart-1", "spiffe://cluster.local/ns/shop/sa/cart", CollectorRegistry())
print("on" if tracing is not None else "off")
tracing.provider.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "abc"}
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "on"], out.stdout


def test_the_cli_takes_out_what_opentelemetry_would_raise_on_before_any_command_imports_it() -> None:
    """`sidemesh injector ...` imports FastAPI, which imports OpenTelemetry's propagators: an
    OTEL_PROPAGATORS name the API cannot load (xray, jaeger, a typo) stopped the injector at start,
    tracing on or off."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_PROPAGATORS": "tracecontext,xray", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "abc"})
    code = """
import contextlib
from sidemesh.cli import main
with contextlib.suppress(SystemExit):
    main(["--version"])  # (every command's start: `injector serve` imports FastAPI after it)
import fastapi, injector.server  # (FastAPI imports OpenTelemetry's propagators)
print("imported")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.split()[-1] == "imported", out.stderr
