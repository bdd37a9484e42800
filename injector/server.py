"""`sidemesh injector serve`: the FastAPI app and the uvicorn HTTPS server around `review.admit`.

The routes only move bytes and log; every decision is made in `review.py` and `patch.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from opentelemetry import trace
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from injector import review
from injector.settings import InjectionSettings
from injector.tls import ServingCertificate
from sidemesh.httpd import listening_socket
from sidemesh.prometheus import CollectorRegistry, Counter
from sidemesh.server_telemetry import AsgiTelemetry
from sidemesh.telemetry import Tracing

log = logging.getLogger("sidemesh.injector")

# The API server refuses objects over 3 MiB; a review carries the object once (CREATE).
MAX_BODY = 8 * 1024 * 1024


# FastAPI 0.165 and later trace, measure and log every request through OpenTelemetry's global
# providers unless told not to: requests are traced by AsgiTelemetry here (with the component's
# own provider), and the global lookup raised on a bad OTEL_PYTHON_*_PROVIDER, failing every
# admission. Older FastAPI has no such option.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def _json(status: int, body: object) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json"
    )


async def _read_body(request: Request) -> bytes | None:
    """The body, or None when it is larger than MAX_BODY (checked while reading, not trusted)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class _CloseWhile:
    """ASGI middleware: while ``closing()``, every answer says ``Connection: close`` (and uvicorn
    closes the connection after it). The API server keeps its connections to a webhook and sends
    on them again; one that uvicorn closed as it stopped, while a POST crossed the close, lost that
    admission (Go's transport does not send a POST again: a refused pod under failurePolicy Fail),
    where told to close after each answer during the shutdown delay, it opens new connections and
    finds the next endpoint."""

    def __init__(self, app: Any, closing: Callable[[], bool]) -> None:
        self.app = app
        self.closing = closing

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.closing():
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(n, v) for n, v in message.get("headers", []) if n.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)


def create_app(
    settings: Callable[[], InjectionSettings],
    healthy: Callable[[], bool] = lambda: True,
    registry: CollectorRegistry | None = None,
    tracing: Tracing | None = None,
    closing: Callable[[], bool] = lambda: False,
) -> FastAPI:
    """The webhook app; its request metrics go into ``registry`` (served by `sidemesh injector
    serve` on --metrics-listen), its spans to ``tracing``; while ``closing()`` (the shutdown
    delay) every answer says ``Connection: close``."""
    app = FastAPI(
        title="sidemesh injector", docs_url=None, redoc_url=None, openapi_url=None, **_NO_NATIVE_TELEMETRY
    )
    registry = registry or CollectorRegistry()
    admissions = Counter(
        "sidemesh_injector_admissions",
        "AdmissionReviews answered, by outcome (injected, skipped, ignored, denied, error, bad request, too large).",
        ["outcome"],
        registry=registry,
    )
    app.add_middleware(AsgiTelemetry, registry=registry, routes=("/mutate", "/healthz"), tracing=tracing)
    app.add_middleware(_CloseWhile, closing=closing)

    @app.post("/mutate")
    async def mutate(request: Request) -> Response:
        started = time.perf_counter()
        body = await _read_body(request)
        if body is None:
            outcome = review.Outcome(
                413, {"error": f"request body over {MAX_BODY} bytes"}, {"outcome": "too large"}
            )
        else:
            outcome = review.admit(body, settings())
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        what = str(outcome.log.get("outcome", "unknown"))
        admissions.labels(what).inc()
        trace.get_current_span().set_attribute("sidemesh.injector.outcome", what)
        log.log(outcome.log_level, "admission", extra={**outcome.log, "duration_ms": duration_ms})
        return _json(outcome.http_status, outcome.body)

    @app.get("/healthz")
    async def healthz() -> Response:
        ok = healthy()
        return _json(200 if ok else 503, {"ok": ok})

    return app


class _EmbeddedServer(uvicorn.Server):
    """Signals belong to the caller (the CLI or a test), not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# A connection must not go this long without a byte while a request is being read (or after its
# TLS handshake, before any): uvicorn closes an idle keep-alive connection but not one that sends
# part of a request, or nothing at all, and thousands of those held the injector's memory past its
# limit. The API server sends an AdmissionReview at once; a slow but steady body is not cut.
REQUEST_IDLE_S = 10.0


class _ReadGuard(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on silence while reading a request."""

    _read_timer: asyncio.TimerHandle | None = None
    _reading = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_timer is not None:
            self._arm()  # bytes came: the silence starts again
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = True
        if not self._answering():  # a pipelined request waits for the answer to the one before
            self._arm()

    def on_message_complete(self) -> None:
        self._reading = False
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._reading:  # the next request was begun meanwhile: reading it resumes now
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _answering(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(REQUEST_IDLE_S, self._expire)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _expire(self) -> None:
        self._read_timer = None
        # (never while the app answers a request read whole: the timer stops at its end)
        if (self._reading or not self._answering()) and not self.transport.is_closing():
            self.transport.close()


class WebhookServer:
    """uvicorn over HTTPS with a ServingCertificate whose context is updated in place."""

    def __init__(self, app: FastAPI, serving: ServingCertificate, host: str, port: int) -> None:
        self.serving = serving
        self.host, self.requested_port = host, port
        self.port = 0
        config = uvicorn.Config(
            app,
            ssl_context_factory=lambda _config, _default: serving.context,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            # The API server reuses connections, idle up to 90 s (Go's transport), and does not
            # retry a POST: closing first, the webhook could race its next call (an EOF, which
            # failurePolicy Fail makes a refused pod). Longer than that: the client closes first.
            timeout_keep_alive=120,
            http=_ReadGuard,
        )
        self.server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        sock = listening_socket(self.host, self.requested_port)  # (the wildcard: both families)
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name="injector-uvicorn")
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped during start")
            await asyncio.sleep(0.01)
        log.info("injector serving", extra={"address": f"{self.host}:{self.port}"})
        return self.port

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
            self._task = None
