"""A small OTLP/gRPC trace receiver: opentelemetry-proto's TraceService on grpc.aio.

`sidemesh demo` starts one when no collector is configured and prints the trace tree of its
requests; the tests use it as a real collector. It keeps every span in memory: not for production.
"""

from __future__ import annotations

import asyncio
import threading
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SPAN_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    status: str  # "UNSET", "OK" or "ERROR"
    resource: dict[str, Any] = field(default_factory=dict)
    start_ns: int = 0  # Unix time, nanoseconds
    end_ns: int = 0
    status_message: str = ""
    trace_state: str = ""  # W3C tracestate

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


class Receiver(pb_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.delay = 0.0  # seconds each Export takes (a slow collector)
        self._changed = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        server = grpc.aio.server()
        # opentelemetry-proto ships no type hints for its generated gRPC code
        pb_grpc.add_TraceServiceServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def Export(
        self, request: pb.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExportTraceServiceResponse:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=s.name,
                            kind=SPAN_KINDS.get(s.kind, str(s.kind)),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status={0: "UNSET", 1: "OK", 2: "ERROR"}.get(s.status.code, "UNSET"),
                            resource=resource,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            status_message=s.status.message,
                            trace_state=s.trace_state,
                        )
                    )
        self._changed.set()
        return pb.ExportTraceServiceResponse()

    async def wait_for(
        self, predicate: typing.Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        async with asyncio.timeout(timeout):
            while not predicate(self.spans):
                self._changed.clear()
                await self._changed.wait()
        return self.spans


class ReceiverThread:
    """A Receiver on its own event loop in a daemon thread, for synchronous callers (the demo)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp-receiver", daemon=True)
        self.receiver = Receiver()

    def start(self, timeout: float = 10.0) -> str:
        """Listen on a free loopback port; the endpoint to give OTEL_EXPORTER_OTLP_ENDPOINT."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), self._loop).result(timeout)
        return self.receiver.endpoint

    def spans(self) -> list[ReceivedSpan]:
        return list(self.receiver.spans)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float
    ) -> list[ReceivedSpan] | None:
        """The spans once ``predicate`` holds for them, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.receiver.stop(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()


def trace_tree(spans: Sequence[ReceivedSpan], trace_id: str, branch: str = "└─ ") -> list[str]:
    """One trace as indented lines, parents before children (by start time): each span's kind,
    name, service, duration and HTTP status, then its source -> destination identities and the
    authorization decision with its reason. A span whose parent was not received (the app's own
    span) is a root."""
    mine = sorted((s for s in spans if s.trace_id == trace_id), key=lambda s: s.start_ns)
    ids = {s.span_id for s in mine}
    children: dict[str, list[ReceivedSpan]] = {}
    for s in mine:
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            pad = "   " * depth
            a = s.attributes
            status = a.get("http.response.status_code")
            head = f'{pad}{branch}{s.kind} "{s.name}" in {s.service or "?"}, {s.duration_ms:.1f} ms'
            lines.append(head + (f", HTTP {status}" if status is not None else ""))
            who = f"{a.get('sidemesh.source.id', '?')} -> {a.get('sidemesh.destination.id', '?')}"
            decision = str(a.get("sidemesh.authz.decision", "?"))
            reason = a.get("sidemesh.authz.reason")
            detail = f"{decision} ({reason})" if reason else decision
            if s.status == "ERROR" and s.status_message and "denied" not in s.status_message:
                detail += f", error: {s.status_message}"
            lines.append(f"{pad}{' ' * len(branch)}   {who}, decision: {detail}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return lines
