"""The sidecar's observer against a real OTLP/gRPC receiver: spans, propagation, the slow collector.

The observer is driven the way the HTTP data path drives it (proxy/observe.py): ``start`` when the
request's headers are parsed, ``trace_headers`` onto the forwarded request (None: the request's
own go on), ``finish`` once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from proxy.metrics import ProxyMetrics
from proxy.observe import TRACE_HEADERS, RequestInfo, RequestResult, RequestSpan
from proxy.routes import RouteStats
from proxy.telemetry import ProxyObserver
from sidemesh import semconv
from sidemesh.telemetry import DEFER_BATCH, DEFER_S, Tracing, start_tracing
from tests.support.otlp import ReceivedSpan, Receiver

A = "spiffe://cluster.local/ns/shop/sa/frontend"
B = "spiffe://cluster.local/ns/shop/sa/cart"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "20", "OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


Make = Callable[..., tuple[ProxyObserver, ProxyMetrics]]


@pytest.fixture(params=["fast", "sdk"])
async def observers(receiver: Receiver, request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Observers as the sidecar makes them ("fast": sampling decided before the SDK is called, no
    span for an unsampled request) and with the SDK deciding everything."""
    started: list[Tracing] = []

    def make(
        identity: str = A, endpoint: str | None = None, **env: str
    ) -> tuple[ProxyObserver, ProxyMetrics]:
        metrics = ProxyMetrics()
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint or receiver.endpoint, **FAST, **env}
        tracing = start_tracing(
            identity.rsplit("/", 1)[-1],
            metrics.registry,
            {},
            environ,
            caller_samples_roots=request.param == "fast",
        )
        assert tracing is not None
        started.append(tracing)
        return ProxyObserver(metrics, RouteStats(), identity, tracing), metrics

    yield make
    for tracing in started:
        await tracing.close(timeout=1)


def outbound(headers: list[tuple[bytes, bytes]], path: str = "/cart/1") -> RequestInfo:
    return RequestInfo(
        "outbound", "http/1.1", "GET", path, "cart.shop:80", headers, service="cart.shop:80", destination=B
    )


def inbound(headers: list[tuple[bytes, bytes]], path: str = "/cart/1") -> RequestInfo:
    return RequestInfo(
        "inbound", "http/1.1", "GET", path, "cart.shop:80", headers, source=A, peer_address="127.0.0.1:5000"
    )


def sent(request: RequestSpan, info: RequestInfo) -> list[tuple[bytes, bytes]]:
    """The trace headers the forwarded request carries, as the HTTP layer puts them on."""
    hop = request.trace_headers()
    return [(k, v) for k, v in info.headers if k in TRACE_HEADERS] if hop is None else hop


def sampled(traceparent: bytes) -> bool:
    return bool(int(traceparent.rsplit(b"-", 1)[1], 16) & 1)  # bit 1 is "random" (W3C level 2)


def one(spans: list[ReceivedSpan], kind: str) -> ReceivedSpan:
    found = [s for s in spans if s.kind == kind]
    assert len(found) == 1, spans
    return found[0]


async def test_w3c_in_w3c_out_one_trace_client_then_server(receiver: Receiver, observers: Make) -> None:
    client_side, _ = observers(A)
    server_side, _ = observers(B)
    app_headers = [(b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode()), (b"accept", b"*/*")]
    client = client_side.start(outbound(app_headers))
    hop = client.trace_headers()
    assert [k for k, _ in hop] == [b"traceparent"]
    server = server_side.start(inbound(hop))
    to_app = dict(server.trace_headers())
    server.finish(RequestResult(200, policy="shop/cart-allow", reason="shop/cart-allow rule 0"))
    client.finish(RequestResult(200, endpoint="127.0.0.9:15006", destination=B))

    spans = await receiver.wait_for(lambda s: len(s) >= 2)
    c, s = one(spans, "CLIENT"), one(spans, "SERVER")
    assert c.trace_id == s.trace_id == TRACE  # the app's own trace, continued
    assert c.parent_id == APP_SPAN and s.parent_id == c.span_id
    assert to_app[b"traceparent"].startswith(f"00-{TRACE}-{s.span_id}-".encode())  # the server span's child
    assert (c.service, s.service) == ("frontend", "cart")
    assert c.attributes["sidemesh.source.id"] == s.attributes["sidemesh.source.id"] == A
    assert c.attributes["sidemesh.destination.id"] == s.attributes["sidemesh.destination.id"] == B
    assert c.attributes["http.request.method"] == "GET" and c.attributes["url.path"] == "/cart/1"
    assert c.attributes["http.response.status_code"] == 200
    # Semantic conventions: the address alone, the port in its own attribute.
    assert c.attributes["network.peer.address"] == "127.0.0.9"
    assert c.attributes["network.peer.port"] == 15006
    assert "server.port" not in c.attributes or isinstance(c.attributes["server.port"], int)
    assert s.attributes["sidemesh.authz.decision"] == "allow"
    assert s.attributes["sidemesh.authz.policy"] == "shop/cart-allow"
    assert (c.status, s.status) == ("UNSET", "UNSET")


@pytest.mark.parametrize(
    ("app_headers", "names"),
    [
        ([(b"b3", f"{TRACE}-{APP_SPAN}-1".encode())], [b"b3"]),
        (
            [(b"x-b3-traceid", TRACE.encode()), (b"x-b3-spanid", APP_SPAN.encode()), (b"x-b3-sampled", b"1")],
            [b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled"],
        ),
    ],
)
async def test_b3_in_b3_out(
    receiver: Receiver, observers: Make, app_headers: list[tuple[bytes, bytes]], names: list[bytes]
) -> None:
    observer, _ = observers(A)
    request = observer.start(outbound(app_headers))
    hop = request.trace_headers()
    assert sorted(k for k, _ in hop) == sorted(names)
    request.finish(RequestResult(200))
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
    assert span.trace_id == TRACE and span.parent_id == APP_SPAN
    assert span.span_id.encode() in b" ".join(v for _, v in hop)


async def test_no_trace_headers_start_a_new_trace(receiver: Receiver, observers: Make) -> None:
    observer, _ = observers(A)
    request = observer.start(outbound([]))
    (name, value), *rest = request.trace_headers()
    assert name == b"traceparent" and not rest
    request.finish(RequestResult(200))
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
    assert span.parent_id == "" and value.startswith(f"00-{span.trace_id}-{span.span_id}-".encode())
    assert sampled(value)


async def test_an_unsampled_request_sends_nothing_and_says_so_downstream(
    receiver: Receiver, observers: Make
) -> None:
    observer, _ = observers(A, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
    for headers in ([], [(b"traceparent", f"00-{TRACE}-{APP_SPAN}-00".encode())]):
        info = outbound(headers)
        request = observer.start(info)
        assert not sampled(dict(sent(request, info))[b"traceparent"])
        request.finish(RequestResult(200))
    kept = observer.start(outbound([(b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode())]))
    kept.finish(RequestResult(200))  # the caller decided: parent-based sampling keeps it
    spans = await receiver.wait_for(lambda s: len(s) >= 1)
    await asyncio.sleep(0.2)
    assert len(spans) == 1 and spans[0].trace_id == TRACE


async def test_spans_still_waiting_to_be_made_are_exported_at_close(
    receiver: Receiver, observers: Make
) -> None:
    """The sidecar makes a sampled request's span a little after the request ended, with others
    (Tracing.defer); a drain right after that request must not lose it."""
    observer, _ = observers(A)
    request = observer.start(outbound([]))
    (_, value), *_ = request.trace_headers() or []
    request.finish(RequestResult(200))
    assert observer.tracing is not None
    await observer.tracing.close()
    assert [s.span_id for s in receiver.spans] == [value.split(b"-")[2].decode()]


async def test_the_span_carries_what_its_headers_said_and_the_requests_own_times(
    receiver: Receiver, observers: Make
) -> None:
    observer, _ = observers(A)
    app_headers = [
        (b"traceparent", f"00-{TRACE}-{APP_SPAN}-03".encode()),  # sampled, random trace id
        (b"tracestate", b"vendor=1"),
        (b"tracestate", b"other=2"),  # one list, split over two header lines
    ]
    began = time.time_ns()
    request = observer.start(outbound(app_headers))
    hop = dict(request.trace_headers() or [])
    await asyncio.sleep(0.05)
    request.finish(RequestResult(200))
    ended = time.time_ns()
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
    assert hop[b"traceparent"] == f"00-{TRACE}-{span.span_id}-03".encode()
    assert hop[b"tracestate"] == b"vendor=1,other=2" == span.trace_state.encode()
    assert began <= span.start_ns and span.start_ns + 50_000_000 <= span.end_ns <= ended


async def test_deferred_spans_wait_their_time_after_a_full_batch(receiver: Receiver, observers: Make) -> None:
    """A full batch is made at once; a span after it waits its own DEFER_S (the first span's timer
    must not make it early)."""
    observer, _ = observers(A)
    tracing = observer.tracing
    assert tracing is not None
    made: list[int] = []
    tracing.defer(lambda: made.append(0))
    await asyncio.sleep(DEFER_S * 0.6)
    for i in range(1, DEFER_BATCH):
        tracing.defer(lambda i=i: made.append(i))  # type: ignore[misc]
    assert len(made) == DEFER_BATCH  # the full batch, at once
    tracing.defer(lambda: made.append(-1))
    await asyncio.sleep(DEFER_S * 0.6)  # past the first span's DEFER_S
    assert made[-1] != -1
    await asyncio.sleep(DEFER_S * 0.6)
    assert made[-1] == -1


async def test_new_traces_are_sampled_at_the_configured_ratio(receiver: Receiver, observers: Make) -> None:
    # One draw per new trace: a second draw on the way would sample ratio squared (0.25 here).
    observer, _ = observers(A, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.5")
    kept = 0
    for _ in range(2000):
        request = observer.start(outbound([]))
        kept += sampled(dict(request.trace_headers())[b"traceparent"])
        request.finish(RequestResult(200))
    assert 850 <= kept <= 1150, kept  # binomial(2000, 0.5): sd 22


async def test_a_denied_request_gets_a_span_with_the_reason(receiver: Receiver, observers: Make) -> None:
    """HTTP semantic conventions: a 4xx leaves a SERVER span's status unset (the caller's error,
    not the service's: error-rate tools such as Jaeger's SPM counted every denial as a failure of
    the service called); the decision and reason are attributes."""
    observer, metrics = observers(B)
    request = observer.start(inbound([]))
    request.finish(
        RequestResult(
            403,
            decision="deny",
            reason="no rule of shop/cart-allow allows shop/frontend",
            policy="shop/cart-allow",
        )
    )
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "SERVER")
    assert span.status == "UNSET" and "error.type" not in span.attributes
    assert span.attributes["sidemesh.authz.decision"] == "deny"
    assert span.attributes["sidemesh.authz.reason"] == "no rule of shop/cart-allow allows shop/frontend"
    r = metrics.registry
    labels = {"direction": "inbound", "source": "shop/frontend", "destination": "shop/cart"}
    assert (
        r.get_sample_value(
            "sidemesh_proxy_requests_total",
            {**labels, "status_class": "4xx", "decision": "deny", "grpc_status": ""},
        )
        == 1
    )


async def test_failures_and_retries_are_on_the_span(receiver: Receiver, observers: Make) -> None:
    observer, _ = observers(A)
    request = observer.start(
        RequestInfo("outbound", "grpc", "POST", "/shop.Cart/Get", "cart", [], destination=B)
    )
    request.finish(RequestResult(200, grpc_status=14, retries=2))
    failed = observer.start(outbound([]))
    failed.finish(RequestResult(None, error="upstream reset"))
    spans = await receiver.wait_for(lambda s: len(s) >= 2)
    by_name = {s.name: s for s in spans}
    rpc = by_name["shop.Cart/Get"]
    assert rpc.status == "ERROR" and rpc.attributes["rpc.grpc.status_code"] == 14
    assert rpc.attributes["http.request.resend_count"] == 2 and rpc.attributes["rpc.system"] == "grpc"
    reset = by_name["GET cart.shop:80"]
    assert reset.status == "ERROR" and reset.attributes["sidemesh.error"] == "upstream reset"


def _dropped(registry: CollectorRegistry) -> float:
    return sum(
        registry.get_sample_value("sidemesh_tracing_spans_dropped_total", {"reason": r}) or 0
        for r in ("queue_full", "export_failed")
    )


async def test_collector_down_requests_unaffected_and_drops_counted(
    receiver: Receiver, observers: Make
) -> None:
    await receiver.stop()  # nothing listens on its port any more
    observer, metrics = observers(A, endpoint=receiver.endpoint, OTEL_BSP_MAX_QUEUE_SIZE="50")
    started = time.perf_counter()
    for i in range(500):
        request = observer.start(outbound([], path=f"/item/{i % 7}"))
        request.trace_headers()
        request.finish(RequestResult(200))
    per_request = (time.perf_counter() - started) / 500
    # An export that blocked a request would take the exporter's retry backoff (a second and more);
    # 10 ms leaves room for a loaded machine (typical: 0.1 ms).
    assert per_request < 0.01, f"{per_request * 1e6:.0f} us per request with the collector down"
    assert _dropped(metrics.registry) >= 400  # a 50-span queue cannot hold 500 spans
    assert (
        metrics.registry.get_sample_value(
            "sidemesh_proxy_requests_total",
            {
                "direction": "outbound",
                "source": "shop/frontend",
                "destination": "shop/cart",
                "status_class": "2xx",
                "decision": "allow",
                "grpc_status": "",
            },
        )
        == 500
    )


@pytest.mark.parametrize(("status", "said"), [(404, "code: 404"), (413, "code: 413")])
def test_the_export_warning_says_what_the_collector_answered(
    status: int, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A collector's 404 (an endpoint given with /v1/traces already on it: /v1/traces/v1/traces) was
    warned about as "is the collector up?" and nothing more: the exporters' own words were silenced.
    The once-a-minute warning now carries them; the exporters still write no line of their own."""
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}/v1/traces",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        registry = CollectorRegistry()
        tracing = start_tracing("t", registry, environ=env)
        assert tracing is not None
        seen: list[logging.LogRecord] = []  # what reaches the root logger (the log)
        to_log = logging.Handler(logging.DEBUG)
        to_log.emit = seen.append  # type: ignore[method-assign]
        logging.getLogger().addHandler(to_log)
        try:
            with caplog.at_level(logging.DEBUG):
                for _ in range(2):  # (the second batch: counted, not warned about again)
                    tracing.tracer.start_span("s").end()
                    assert tracing.provider.force_flush()
        finally:
            logging.getLogger().removeHandler(to_log)
        tracing.provider.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    warnings = [r for r in seen if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "spans not exported (counted in sidemesh_tracing_spans_dropped_total): is the collector up, and is "
        "the endpoint its OTLP port and path?"
    ]
    assert said in warnings[0].reason and warnings[0].endpoint.endswith("/v1/traces/v1/traces")  # type: ignore[attr-defined]
    assert registry.get_sample_value("sidemesh_tracing_spans_dropped_total", {"reason": "export_failed"}) == 2


async def test_a_slow_collector_does_not_slow_requests(receiver: Receiver, observers: Make) -> None:
    receiver.delay = 1.0  # each export takes a second
    observer, metrics = observers(A, OTEL_BSP_MAX_QUEUE_SIZE="20", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="5")
    loop = asyncio.get_running_loop()
    took = []
    for _ in range(200):
        t = loop.time()
        observer.start(outbound([])).finish(RequestResult(200))
        await asyncio.sleep(0)
        took.append(loop.time() - t)
    # Waiting for an export would take the collector's whole second (and this loop serves the
    # collector too): the slowest request stays far below that, the typical one is unaffected.
    assert max(took) < 0.5, f"a request took {max(took) * 1000:.1f} ms with a slow collector"
    assert sorted(took)[100] < 0.005, f"median {sorted(took)[100] * 1000:.2f} ms"
    await asyncio.sleep(0.1)
    assert _dropped(metrics.registry) > 0


@pytest.mark.parametrize(
    "app_headers",
    [
        [(b"traceparent", f"00-{TRACE}-{APP_SPAN}-00".encode()), (b"tracestate", b"vendor=1")],
        [(b"traceparent", f"00-{TRACE}-{APP_SPAN}-00".encode())],
        [(b"b3", f"{TRACE}-{APP_SPAN}-0".encode())],
        [(b"x-b3-traceid", TRACE.encode()), (b"x-b3-spanid", APP_SPAN.encode()), (b"x-b3-sampled", b"0")],
        # B3's "deny" without ids: nobody downstream records the request.
        [(b"b3", b"0")],
        [(b"x-b3-sampled", b"0")],
        # HTTP parsers keep whitespace at the end of a value: the caller's "no" still counts.
        [(b"traceparent", f"00-{TRACE}-{APP_SPAN}-00 \t".encode())],
    ],
)
async def test_a_callers_no_passes_its_trace_headers_on_unchanged(
    receiver: Receiver, observers: Make, app_headers: list[tuple[bytes, bytes]]
) -> None:
    """A hop that records nothing takes no part in the trace (W3C Trace Context: unmodified
    propagation, as proxies do; Linkerd's proxy does the same): the next hop's parent is the
    caller's own span, not one that was never recorded."""
    for direction in ("outbound", "inbound"):
        observer, _ = observers(A)  # samples every new trace, but the caller said no
        info = outbound(app_headers)
        info.direction = direction  # type: ignore[assignment]
        request = observer.start(info)
        out = sent(request, info)
        request.finish(RequestResult(200))
        assert out == app_headers, direction
    await asyncio.sleep(0.2)
    assert receiver.spans == []


@pytest.mark.parametrize(
    ("traceparent", "continued"),
    [
        (f"00-{TRACE}-{APP_SPAN}-01 \t ", True),  # trailing whitespace is not part of the value
        (f"cc-{TRACE}-{APP_SPAN}-01-what-the-future-will-be-like", True),  # a later version's fields
        (f"cc-{TRACE}-{APP_SPAN}-01.what-the-future-will-be-like", False),  # not after a dash: invalid
        (f"cc-{TRACE}-{APP_SPAN}-01,cc-{TRACE}-{APP_SPAN}-01", False),  # two headers: invalid
    ],
)
async def test_traceparent_as_the_w3c_test_suite_reads_it(
    receiver: Receiver, observers: Make, traceparent: str, continued: bool
) -> None:
    observer, _ = observers(A)
    request = observer.start(outbound([(b"traceparent", traceparent.encode())]))
    request.finish(RequestResult(200))
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
    assert (span.trace_id == TRACE and span.parent_id == APP_SPAN) is continued, span


async def test_span_status_names_and_addresses_follow_the_semantic_conventions(
    receiver: Receiver, observers: Make
) -> None:
    """HTTP: 4xx is an error of the CLIENT span only. gRPC: a SERVER span is an error only for the
    codes that say the server failed. Names never come from the Host header (any client sets it)
    and an unknown method is "_OTHER"; addresses and ports are separate attributes."""
    observer, _ = observers(B)
    cases = [
        ("c404", outbound([], path="/c404"), RequestResult(404), "ERROR"),
        ("s404", inbound([], path="/s404"), RequestResult(404), "UNSET"),
        ("cg5", RequestInfo("outbound", "grpc", "POST", "/p.S/C5", "cart", [], destination=B), 5, "ERROR"),
        ("sg5", RequestInfo("inbound", "grpc", "POST", "/p.S/S5", "cart", [], source=A), 5, "UNSET"),
        ("sg13", RequestInfo("inbound", "grpc", "POST", "/p.S/S13", "cart", [], source=A), 13, "ERROR"),
    ]
    for _, info, result, _ in cases:
        observer.start(info).finish(
            result if isinstance(result, RequestResult) else RequestResult(200, grpc_status=result)
        )
    odd = RequestInfo(
        "inbound",
        "h2",
        "FOO123",
        "/x?secret=1",
        "evil-1.example:1",
        [],
        source=A,
        peer_address="[fd00::7]:5000",
    )
    observer.start(odd).finish(RequestResult(200))
    spans = await receiver.wait_for(lambda s: len(s) >= len(cases) + 1)
    by_path = {s.attributes["url.path"]: s for s in spans}
    for name, info, _, status in cases:
        assert by_path[info.path].status == status, name
        # The HTTP conventions: no description where the status code says it ("status 404" was one).
        assert by_path[info.path].status_message == "", (name, by_path[info.path].status_message)
    other = by_path["/x"]
    assert other.name == "HTTP" and other.kind == "SERVER"
    assert other.attributes["http.request.method"] == "_OTHER"
    assert other.attributes["http.request.method_original"] == "FOO123"
    assert (other.attributes["server.address"], other.attributes["server.port"]) == ("evil-1.example", 1)
    assert (other.attributes["network.peer.address"], other.attributes["network.peer.port"]) == (
        "fd00::7",
        5000,
    )
    assert other.attributes["url.scheme"] == "http"
    client = by_path["/c404"]
    assert client.name == "GET cart.shop:80"  # the destination service from the mesh's config
    assert client.attributes["url.full"] == "http://cart.shop:80/c404"
    assert (client.attributes["server.address"], client.attributes["server.port"]) == ("cart.shop", 80)


async def test_w3c_and_b3_both_go_on(receiver: Receiver, observers: Make) -> None:
    """An app with a composite propagator (tracecontext,b3multi) sends both: a B3-only service
    downstream lost the trace when only the W3C headers went on."""
    observer, _ = observers(A)
    app_headers = [
        (b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode()),
        (b"x-b3-traceid", TRACE.encode()),
        (b"x-b3-spanid", APP_SPAN.encode()),
        (b"x-b3-sampled", b"1"),
    ]
    request = observer.start(outbound(app_headers))
    hop = dict(request.trace_headers())
    request.finish(RequestResult(200))
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
    assert hop[b"traceparent"].startswith(f"00-{TRACE}-{span.span_id}-".encode())
    assert (hop[b"x-b3-traceid"], hop[b"x-b3-spanid"], hop[b"x-b3-sampled"]) == (
        TRACE.encode(),
        span.span_id.encode(),
        b"1",
    )


@pytest.mark.parametrize(
    "app_headers",
    [
        [(b"x-b3-traceid", TRACE.encode()), (b"x-b3-spanid", APP_SPAN.encode())],
        [(b"b3", f"{TRACE}-{APP_SPAN}".encode())],
    ],
    ids=["multi", "single"],
)
@pytest.mark.parametrize("ratio", ["1", "0"])
async def test_b3_without_a_sampling_flag_leaves_the_decision_here(
    receiver: Receiver, observers: Make, app_headers: list[tuple[bytes, bytes]], ratio: str
) -> None:
    """B3: with no sampling flag the receiver decides. The multi-header form was taken as "no" and
    the single one as "yes" (OpenTelemetry's propagator): now both follow this hop's own sampler."""
    observer, _ = observers(A, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=ratio)
    info = outbound(app_headers)
    request = observer.start(info)
    out = sent(request, info)
    request.finish(RequestResult(200))
    if ratio == "1":
        span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
        assert span.trace_id == TRACE and span.parent_id == APP_SPAN
        assert span.span_id.encode() in b" ".join(v for _, v in out)
    else:  # "no", said downstream (as Envoy and Brave do): later hops do not draw again
        await asyncio.sleep(0.2)
        assert receiver.spans == []
        said = dict(out)
        if b"b3" in said:
            assert said[b"b3"].startswith(TRACE.encode()) and said[b"b3"].endswith(b"-0"), out
        else:
            assert (said[b"x-b3-traceid"], said[b"x-b3-sampled"]) == (TRACE.encode(), b"0"), out


async def test_the_known_methods_are_what_the_variable_lists(receiver: Receiver, observers: Make) -> None:
    """OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS (the HTTP conventions' override, a full list): a
    WebDAV service's PROPFIND is named as it is, and what the list leaves out becomes _OTHER."""
    try:
        observer, _ = observers(B, OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS="GET, PROPFIND,,bad method")
        for method, path in (("PROPFIND", "/dav"), ("POST", "/post")):
            info = RequestInfo("inbound", "http/1.1", method, path, "cart:80", [], source=A)
            observer.start(info).finish(RequestResult(207))
        spans = await receiver.wait_for(lambda s: len(s) >= 2)
        by_path = {s.attributes["url.path"]: s for s in spans}
        assert (
            by_path["/dav"].name == "PROPFIND"
            and by_path["/dav"].attributes["http.request.method"] == "PROPFIND"
        )
        assert "http.request.method_original" not in by_path["/dav"].attributes
        assert (
            by_path["/post"].name == "HTTP" and by_path["/post"].attributes["http.request.method"] == "_OTHER"
        )
        assert semconv.method_of("POST") == "_OTHER"  # (the control plane's spans and labels too)
    finally:
        semconv.use_known_methods(semconv.DEFAULT_KNOWN_METHODS)


@pytest.mark.parametrize("single", [True, False], ids=["single", "multi"])
async def test_b3_without_a_sampling_flag_is_decided_by_the_trace_id(
    receiver: Receiver, observers: Make, single: bool
) -> None:
    """The receiver's decision is TraceIdRatioBased's, a function of the trace id: every hop of one
    trace decides alike (a coin per request split a fanned-out trace into recorded and lost
    branches), and as an SDK with the same ratio does."""
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

    observer, _ = observers(A, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.5")
    sdk = TraceIdRatioBased(0.5)
    decided = {}
    for n in range(40):
        trace = f"{(n * 0x9E3779B97F4A7C15 + 12345) % (1 << 128):032x}"
        headers = (
            [(b"b3", f"{trace}-{APP_SPAN}".encode())]
            if single
            else [(b"x-b3-traceid", trace.encode()), (b"x-b3-spanid", APP_SPAN.encode())]
        )
        outcomes = set()
        for _ in range(3):  # the same trace, three times: one decision
            info = outbound(headers)
            request = observer.start(info)
            said = b" ".join(v for k, v in sent(request, info) if k in (b"b3", b"x-b3-sampled"))
            request.finish(RequestResult(200))
            outcomes.add(said.endswith(b"-1") or said == b"1")
        assert len(outcomes) == 1, (trace, outcomes)
        decided[trace] = outcomes.pop()
        expected = sdk.should_sample(None, int(trace, 16), "x").decision is Decision.RECORD_AND_SAMPLE
        assert decided[trace] == expected, trace
    assert 5 < sum(decided.values()) < 35  # (both decisions seen)


@pytest.mark.parametrize(
    ("app_headers", "wanted"),
    [
        ([(b"b3", f"{TRACE}-{APP_SPAN}-d".encode())], {b"b3": b"-d"}),
        (
            [(b"x-b3-traceid", TRACE.encode()), (b"x-b3-spanid", APP_SPAN.encode()), (b"x-b3-flags", b"1")],
            {b"x-b3-flags": b"1"},
        ),
    ],
    ids=["single", "multi"],
)
async def test_b3_debug_goes_on(
    receiver: Receiver, observers: Make, app_headers: list[tuple[bytes, bytes]], wanted: dict[bytes, bytes]
) -> None:
    """The debug flag (record this whatever the rates) went on as a plain "sampled"."""
    observer, _ = observers(A)
    request = observer.start(outbound(app_headers))
    hop = dict(request.trace_headers())
    request.finish(RequestResult(200))
    for name, ending in wanted.items():
        assert hop[name].endswith(ending), hop
    assert b"x-b3-sampled" not in hop


async def test_upper_case_b3_ids_continue_the_trace(receiver: Receiver, observers: Make) -> None:
    """B3 says lower-case hex; OpenTelemetry's and Zipkin's propagators read upper case too (the
    trace was lost: a new one went on, in W3C only)."""
    observer, _ = observers(A)
    headers = [(b"b3", f"{TRACE.upper()}-{APP_SPAN.upper()}-1".encode())]
    request = observer.start(outbound(headers))
    hop = dict(request.trace_headers())
    request.finish(RequestResult(200))
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
    assert span.trace_id == TRACE and span.parent_id == APP_SPAN and list(hop) == [b"b3"]


async def test_b3_debug_goes_on_next_to_w3c(receiver: Receiver, observers: Make) -> None:
    observer, _ = observers(A)
    headers = [
        (b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode()),
        (b"b3", f"{TRACE}-{APP_SPAN}-d".encode()),
    ]
    request = observer.start(outbound(headers))
    hop = dict(request.trace_headers())
    request.finish(RequestResult(200))
    assert hop[b"b3"].endswith(b"-d") and hop[b"traceparent"].endswith(b"-01"), hop


async def test_a_sampler_that_says_no_to_b3_sample_this_passes_the_callers_header_on(
    receiver: Receiver, observers: Make
) -> None:
    """Samplers that are not parent-based decide for themselves: when one says no, the caller's
    "sample this" goes on as it came, not turned into "do not sample"."""
    observer, _ = observers(A, OTEL_TRACES_SAMPLER="always_off")
    info = outbound([(b"b3", b"1")])
    request = observer.start(info)
    out = sent(request, info)
    request.finish(RequestResult(200))
    assert out == [(b"b3", b"1")]


async def test_a_b3_decision_sent_alone_starts_a_trace_in_b3(receiver: Receiver, observers: Make) -> None:
    """``b3: 1`` without ids asks for a sampled trace: it went on as a W3C traceparent and the
    caller's B3 header was dropped."""
    observer, _ = observers(A)
    request = observer.start(outbound([(b"b3", b"1")]))
    hop = dict(request.trace_headers())
    request.finish(RequestResult(200))
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
    assert list(hop) == [b"b3"] and hop[b"b3"] == f"{span.trace_id}-{span.span_id}-1".encode()


async def test_grpc_span_names_come_from_the_path_only_for_calls_the_server_knew(
    receiver: Receiver, observers: Make
) -> None:
    """Span names must stay few (Jaeger indexes each as an operation), and any caller chooses the
    path: a made-up method (UNIMPLEMENTED) or a denied call is named "grpc"."""
    observer, _ = observers(B)
    calls = {
        "/shop.Cart/Get": RequestResult(200, grpc_status=0),
        "/shop.Cart/NotFound": RequestResult(200, grpc_status=5),
        "/random.Svc/Xyz123": RequestResult(200, grpc_status=12),
        "/shop.Cart/Secret": RequestResult(200, grpc_status=7, decision="deny", reason="no rule"),
    }
    for path, result in calls.items():
        observer.start(RequestInfo("inbound", "grpc", "POST", path, "cart", [], source=A)).finish(result)
    spans = await receiver.wait_for(lambda s: len(s) >= len(calls))
    names = {s.attributes["url.path"]: s.name for s in spans}
    assert names == {
        "/shop.Cart/Get": "shop.Cart/Get",
        "/shop.Cart/NotFound": "shop.Cart/NotFound",
        "/random.Svc/Xyz123": "grpc",
        "/shop.Cart/Secret": "grpc",
    }


async def test_what_callers_choose_is_cut_and_errors_have_a_type(receiver: Receiver, observers: Make) -> None:
    """A 60 KB path went whole into the span: 512 such spans made a 30 MB export batch that
    collectors refuse (4 MiB), losing every span in it. error.type (conditionally required) is set
    on failed requests; a CLIENT span has a server.port (required) even when Host has none."""
    observer, _ = observers(A)
    long_path = "/" + "a" * 60_000
    observer.start(outbound([], path=long_path)).finish(RequestResult(503))
    reset = outbound([], path="/reset")
    reset.authority = "cart.shop"
    observer.start(reset).finish(RequestResult(None, error="upstream reset"))
    observer.start(inbound([], path="/ok")).finish(RequestResult(200))
    spans = await receiver.wait_for(lambda s: len(s) >= 3)
    by_path = {s.attributes["url.path"][:10]: s for s in spans}
    cut = by_path["/" + "a" * 9]
    assert len(cut.attributes["url.path"]) == 256 and len(cut.attributes["url.full"]) == 256
    assert cut.attributes["error.type"] == "503" and cut.status == "ERROR"
    failed = by_path["/reset"]
    assert failed.attributes["error.type"] == "upstream_reset" and failed.status == "ERROR"
    assert failed.attributes["server.port"] == 80
    assert "error.type" not in by_path["/ok"].attributes


async def test_an_invalid_tracestate_is_not_logged_per_request(
    receiver: Receiver, observers: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK warned once per request with the caller's text: a log line per request for anyone."""
    observer, _ = observers(A)
    headers = [(b"traceparent", f"00-{TRACE}-{APP_SPAN}-01".encode()), (b"tracestate", b"A0=1")]
    for _ in range(3):
        observer.start(outbound(headers)).finish(RequestResult(200))
    await receiver.wait_for(lambda s: len(s) >= 3)
    assert not [r for r in caplog.records if "A0=1" in r.getMessage()]


async def test_b3_debug_flag_alone_is_sampled_at_any_ratio(
    receiver: Receiver, observers: Make, request: pytest.FixtureRequest
) -> None:
    """`X-B3-Flags: 1` with no ids is a debug decision (B3: it implies accept): with the injected
    parent-based ratio sampler it was read only when ids or a sampled flag came too, so the call was
    recorded at the ratio and the flag dropped before the next hop. (The sidecar's own sampling,
    "fast"; the SDK's B3 propagator reads no decision without ids.)"""
    if request.node.callspec.params["observers"] == "sdk":
        pytest.skip("the SDK's B3 propagator reads no decision without ids")
    observer, _ = observers(
        A, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.0001"
    )
    info = outbound([(b"x-b3-flags", b"1")])
    request = observer.start(info)
    hop = dict(sent(request, info))
    request.finish(RequestResult(200))
    span = one(await receiver.wait_for(lambda s: len(s) >= 1), "CLIENT")
    assert hop.get(b"x-b3-flags") == b"1" and span.span_id.encode() in hop.get(b"x-b3-spanid", b""), hop
