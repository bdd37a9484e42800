"""Request metrics and server spans for the control plane's own servers.

``GrpcTelemetry`` is a grpc.aio server interceptor (CA, controller); ``AsgiTelemetry`` wraps an
ASGI app (the injector's FastAPI app). Both count requests by method and outcome, time them, and,
when tracing is on (``sidemesh.telemetry``), open a SERVER span parented on the caller's W3C or B3
trace context. Label values are bounded: gRPC method names are the server's own, HTTP paths are
the app's routes or "other".
"""

from __future__ import annotations

import asyncio
import inspect
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, MutableMapping, Sequence
from typing import Any

import grpc
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, use_span

from sidemesh import propagation, semconv
from sidemesh.prometheus import CollectorRegistry, Counter, Histogram
from sidemesh.telemetry import Tracing

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TRACE_KEYS = frozenset(
    {"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"}
)
_TRACE_NAMES = frozenset(k.encode() for k in _TRACE_KEYS)


def _span_status(span: Span, error: str | None, error_type: str | None = None) -> None:
    """End ``span``; failed (``error``): status ERROR and error.type (the conventions' conditionally
    required attribute: the gRPC code's name, the HTTP status, or the exception's class). An empty
    ``error``: no description (the HTTP conventions: none where the status code says it)."""
    if error is not None:
        span.set_attribute("error.type", error_type or error)
        span.set_status(Status(StatusCode.ERROR, error or None))
    span.end()


# -- gRPC ------------------------------------------------------------------------------------------


class GrpcTelemetry(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts, times and traces every RPC (streams: from open to close).

    Two ways in: as a grpc.aio interceptor (``interceptors=[telemetry]``), or, cheaper per call, by
    registering the service through :meth:`add_servicer`, which wraps each method's handler once at
    registration. grpc.aio runs its interceptor chain on every call (a coroutine per interceptor
    and a continuation object), which is measurable on a server whose calls are short (the CA).
    """

    def __init__(self, registry: CollectorRegistry, tracing: Tracing | None = None) -> None:
        self.tracing = tracing
        self.handled = Counter(
            "sidemesh_grpc_server_handled",
            "RPCs completed, by method and gRPC status code.",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "sidemesh_grpc_server_handling_seconds",
            "RPC duration (streams: how long they stayed open), by method.",
            ["method"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: Any) -> None:
        """Register ``servicer`` with a generated ``add_*Servicer_to_server`` function, every handler
        it registers wrapped once: use this instead of ``interceptors=[self]``."""
        add_to_server(servicer, _InstrumentedServer(self, server))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        return self.wrapped(str(details.method), handler)

    def wrapped(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` of ``method`` (``/package.Service/Method``) counted, timed and traced.

        The server hands back the same handler object for a method every time: it is wrapped once
        (the trace context is read from each call's metadata inside the wrapper)."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, method: str, handler: Any) -> grpc.RpcMethodHandler[Any, Any]:
        h = handler
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(method, h.unary_unary), h.request_deserializer, h.response_serializer
            )
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(method, h.unary_stream), h.request_deserializer, h.response_serializer
            )
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(method, h.stream_unary), h.request_deserializer, h.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap(method, h.stream_stream), h.request_deserializer, h.response_serializer
        )

    def _start(self, method: str, context: Any) -> Span | None:
        if self.tracing is None:
            return None
        metadata = context.invocation_metadata() or ()
        carrier = propagation.combined((str(k), str(v)) for k, v in metadata if k in _TRACE_KEYS)
        parent, _ = propagation.extract(carrier, self.tracing.sample_root)
        if parent is None and propagation.denied(carrier):
            return None  # B3 "deny": the caller asks that nobody record it
        service, _, name = method.lstrip("/").rpartition("/")
        if parent is not None:  # (a caller's tracestate, cut as the span records it: semconv's 4 MiB)
            parent = propagation.recorded_parent(parent)
        span = self.tracing.tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER)
        if span.is_recording():
            attrs: dict[str, str | int] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
            address, port = semconv.grpc_peer(str(context.peer()))
            attrs["network.peer.address"] = address
            if port is not None:
                attrs["network.peer.port"] = port
            span.set_attributes(attrs)
        return span

    def _wrap(self, method: str, behavior: Any) -> Any:
        metrics = _MethodMetrics(self, method)
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                started, span = time.perf_counter(), self._start(method, context)
                error: BaseException | None = None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    metrics.done(started, context, span, error)

            return stream

        async def call(request: Any, context: Any) -> Any:
            started, span = time.perf_counter(), self._start(method, context)
            error: BaseException | None = None
            try:
                if span is None:
                    return await behavior(request, context)
                with use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                    return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                metrics.done(started, context, span, error)

        return call


class _MethodMetrics:
    """One method's series, looked up once (``labels()`` takes a lock and builds a key per call)."""

    __slots__ = ("_handled", "_method", "_seconds", "_telemetry")

    def __init__(self, telemetry: GrpcTelemetry, method: str) -> None:
        self._telemetry = telemetry
        self._method = method
        self._seconds = telemetry.seconds.labels(method)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def done(self, started: float, context: Any, span: Span | None, exc: BaseException | None) -> None:
        code = _code_of(context, exc)
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = self._telemetry.handled.labels(self._method, code.name)
        handled.inc()
        self._seconds.observe(time.perf_counter() - started)
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            failed = code.value[0] in semconv.GRPC_SERVER_ERRORS  # (rpc.grpc.status_code says which)
            _span_status(span, "" if failed else None, code.name)


class _InstrumentedServer:
    """What generated ``add_*Servicer_to_server`` functions call, with telemetry around each handler."""

    def __init__(self, telemetry: GrpcTelemetry, server: Any) -> None:
        self._telemetry = telemetry
        self._server = server

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {
                name: self._telemetry.wrapped(f"/{service_name}/{name}", handler)
                for name, handler in method_handlers.items()
            },
        )

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]) -> None:
        self._server.add_generic_rpc_handlers([_InstrumentedGeneric(self._telemetry, h) for h in handlers])


class _InstrumentedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose answers are wrapped (used for methods not registered by name)."""

    def __init__(self, telemetry: GrpcTelemetry, inner: grpc.GenericRpcHandler[Any, Any]) -> None:
        self._telemetry = telemetry
        self._inner = inner

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._telemetry.wrapped(str(handler_call_details.method), handler)


def _code_of(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with: what the handler set (abort sets it too), else from the
    exception (a cancelled call: CANCELLED; any other: UNKNOWN, as grpc answers), else OK."""
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    if exc is None:
        return grpc.StatusCode.OK
    return grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN


# -- ASGI (the injector) ---------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AsgiTelemetry:
    """ASGI middleware: counts and times each HTTP request by route and status code, and traces it."""

    def __init__(
        self,
        app: ASGIApp,
        registry: CollectorRegistry,
        routes: Collection[str],
        tracing: Tracing | None = None,
    ) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.tracing = tracing
        self.requests = Counter(
            "sidemesh_http_server_requests",
            "HTTP requests answered, by path (the app's routes, else 'other'), method and status code.",
            ["path", "method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "sidemesh_http_server_request_duration_seconds",
            "HTTP request duration, by path.",
            ["path"],
            buckets=BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = str(scope.get("path", ""))
        route = path if path in self.routes else "other"
        method = semconv.method_of(str(scope.get("method", "GET")))  # a bounded label and span name
        status = {"code": 500}
        span = self._start(scope, method, route)

        async def send_status(message: Message) -> None:
            if message.get("type") == "http.response.start":
                status["code"] = int(message.get("status", 500))
            await send(message)

        error: str | None = None
        try:
            if span is None:
                await self.app(scope, receive, send_status)
            else:
                with use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                    await self.app(scope, receive, send_status)
        except BaseException as exc:
            error = exc.__class__.__name__
            raise
        finally:
            code = status["code"]
            self.requests.labels(route, method, str(code)).inc()
            self.seconds.labels(route).observe(time.perf_counter() - started)
            if span is not None:
                span.set_attribute("http.response.status_code", code)
                _span_status(span, error or ("" if code >= 500 else None), error or str(code))

    def _start(self, scope: Scope, method: str, route: str) -> Span | None:
        if self.tracing is None:
            return None
        headers = typing.cast(list[tuple[bytes, bytes]], scope.get("headers") or [])
        carrier = propagation.carrier_of(headers, _TRACE_NAMES)
        parent, _ = propagation.extract(carrier, self.tracing.sample_root)
        if parent is None and propagation.denied(carrier):
            return None  # B3 "deny": the caller asks that nobody record it
        # semconv: "{method} {http.route}", the method alone when no route matched (never the raw path).
        matched = route in self.routes
        name = "HTTP" if method == semconv.OTHER_METHOD else method
        if parent is not None:  # (a caller's tracestate, cut as the span records it)
            parent = propagation.recorded_parent(parent)
        span = self.tracing.tracer.start_span(
            f"{name} {route}" if matched else name, context=parent, kind=SpanKind.SERVER
        )
        if span.is_recording():
            attrs: dict[str, str | int] = {
                "http.request.method": method,
                "url.path": str(scope.get("path", "")),
                "url.scheme": str(scope.get("scheme", "http")),
            }
            if matched:
                attrs["http.route"] = route
            if method == semconv.OTHER_METHOD:
                attrs["http.request.method_original"] = str(scope.get("method", ""))
            client = scope.get("client")
            if client:
                attrs["network.peer.address"], attrs["network.peer.port"] = str(client[0]), int(client[1])
            span.set_attributes(attrs)
        return span
