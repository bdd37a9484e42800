"""HTTP/2 (prior knowledge, as gRPC speaks it) on the inbound side: every stream is authorized on
its own; allowed streams are forwarded to the app over one HTTP/2 connection per downstream
connection, denied ones answered by the sidecar (gRPC: a trailers-only response with
``grpc-status: 7``; otherwise 403), with the reason in ``sidemesh-denied-reason``.

Both connections are h2 state machines (no I/O); this module moves events between them. Flow
control is end to end: DATA received on one side is acknowledged (its window reopened) only once
it has been handed to the other side's connection and that socket has drained, so a slow reader
slows its sender instead of filling the proxy's memory. Request and response trailers, resets and
informational responses are passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from proxy.headers import DENIED_REASON
from proxy.observe import TRACE_HEADERS, RequestInfo, RequestResult, RequestSpan
from proxy.pipe import Pipe, PipeClosed

log = logging.getLogger("sidemesh.proxy.http2")
GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14
DRAIN_CHECK = 1.0  # how often an idle connection looks whether the sidecar is draining
Header = tuple[bytes, bytes]


@dataclass(slots=True)
class Denial:
    status: int  # HTTP status for a non-gRPC request
    reason: str
    policy: str | None = None
    grpc_status: int = GRPC_PERMISSION_DENIED
    decision: Literal["allow", "deny"] = "deny"


@dataclass(slots=True)
class _Stream:
    down_id: int
    span: RequestSpan
    result: RequestResult
    grpc: bool
    up_id: int | None = None
    ended_down: bool = False  # the response's END_STREAM went downstream
    ended_up: bool = False  # the request's END_STREAM went upstream
    end_queued_up: bool = False  # the request's end (END_STREAM or trailers) is queued or sent
    end_queued_down: bool = False
    # per direction: queued (data | trailers | end) not yet sent for lack of window
    to_up: deque[tuple[bytes | list[Header] | None, int]] = field(default_factory=deque)
    to_down: deque[tuple[bytes | list[Header] | None, int]] = field(default_factory=deque)


class _Side:
    def __init__(self, pipe: Pipe, client: bool) -> None:
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self.pipe = pipe
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.pipe.write(data)


def _headers(raw: object) -> list[Header]:
    return [(bytes(n), bytes(v)) for n, v in raw]  # type: ignore[attr-defined]


Authorize = Callable[[str, str], Denial | tuple[str, str | None]]  # (reason, policy) when allowed
ConnectApp = Callable[[], Awaitable[Pipe]]


class H2Proxy:
    def __init__(
        self,
        down: Pipe,
        authorize: Authorize,
        connect_app: ConnectApp,
        start_span: Callable[[RequestInfo], RequestSpan],
        info: dict[str, object],
    ) -> None:
        self.down = _Side(down, client=False)
        self.up: _Side | None = None
        self.authorize = authorize
        self.connect_app = connect_app
        self.start_span = start_span
        self.info = info
        self.streams: dict[int, _Stream] = {}  # by downstream id
        self.by_up: dict[int, _Stream] = {}
        self._up_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()

    async def run(self, idle_timeout: float, draining: Callable[[], bool] = lambda: False) -> None:
        self.down.flush()
        try:
            while True:
                if not self.streams and not await self._wait_idle(idle_timeout, draining):
                    self.down.conn.close_connection()  # idle or draining: GOAWAY, then close
                    self.down.flush()
                    break
                data = await self.down.pipe.read()
                if not data:
                    break
                try:
                    events = self.down.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.info("HTTP/2 protocol error from the client", extra={**self.info, "reason": str(exc)})
                    self.down.flush()  # h2 queued a GOAWAY
                    break
                for event in events:
                    with contextlib.suppress(h2.exceptions.StreamClosedError):  # reset meanwhile
                        await self._on_down(event)
                self.down.flush()
                if self.up is not None:
                    self.up.flush()
                    await self.up.pipe.drain()
        except (PipeClosed, ConnectionError):
            pass
        finally:
            await self._close()

    async def _wait_idle(self, idle_timeout: float, draining: Callable[[], bool]) -> bool:
        """With no stream open: wait for the client; False when idle too long or draining."""
        deadline = time.monotonic() + idle_timeout
        while not self.down.pipe.has_input:
            remaining = deadline - time.monotonic()
            if draining() or remaining <= 0:
                return False
            await self.down.pipe.wait_input(min(DRAIN_CHECK, remaining))
        return True

    async def _close(self) -> None:
        for stream in list(self.streams.values()):
            self._finish(stream, error="connection closed")
        if self._up_task is not None:
            self._up_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._up_task
        if self.up is not None:
            self.up.pipe.close()
        self.down.pipe.close()

    # -- downstream (the caller) -------------------------------------------------------------

    async def _on_down(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            await self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.up_id is None:  # denied: its body is dropped
                self.down.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream.result.request_bytes += len(event.data)
            stream.to_up.append((event.data, event.flow_controlled_length))
            self._pump(stream, up=True)
        elif isinstance(event, (h2.events.TrailersReceived, h2.events.StreamEnded)):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.up_id is not None and not stream.end_queued_up:
                stream.end_queued_up = True
                trailers = isinstance(event, h2.events.TrailersReceived)
                stream.to_up.append((_headers(event.headers) if trailers else None, 0))  # type: ignore[union-attr]
                self._pump(stream, up=True)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if stream.up_id is not None and self.up is not None:
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        self.up.conn.reset_stream(stream.up_id, event.error_code or 0)
                self._finish(stream, error="reset by the client")
        elif isinstance(event, h2.events.WindowUpdated):
            self._pump_all(up=False, stream_id=event.stream_id, by_up=False)

    async def _request(self, event: h2.events.RequestReceived) -> None:
        headers = _headers(event.headers)
        pseudo = {n: v for n, v in headers if n.startswith(b":")}
        method = pseudo.get(b":method", b"").decode("latin-1")
        path = pseudo.get(b":path", b"/").decode("latin-1")
        content_type = next((v for n, v in headers if n == b"content-type"), b"")
        grpc = content_type.startswith(b"application/grpc")
        info = RequestInfo(
            direction="inbound",
            protocol="grpc" if grpc else "h2",
            method=method,
            path=path,
            authority=pseudo.get(b":authority", b"").decode("latin-1"),
            headers=[(n, v) for n, v in headers if not n.startswith(b":")],
            source=str(self.info.get("source")),
            peer_address=str(self.info.get("client")),
        )
        span = self.start_span(info)
        stream = _Stream(event.stream_id, span, RequestResult(status=None), grpc)
        self.streams[event.stream_id] = stream
        verdict = self.authorize(method, path)
        if isinstance(verdict, Denial):
            self._deny(stream, verdict, ended=event.stream_ended is not None)
            return
        stream.result.reason, stream.result.policy = verdict
        try:
            up = await self._upstream()
        except Exception as exc:  # the app is not reachable (the connector's error says why)
            stream.result.error = str(exc)
            denial = Denial(502, "app not reachable", verdict[1], GRPC_UNAVAILABLE, "allow")
            self._deny(stream, denial, ended=event.stream_ended is not None)
            return
        forwarded = [(n, v) for n, v in headers if n not in TRACE_HEADERS] + span.trace_headers()
        try:
            stream.up_id = up.conn.get_next_available_stream_id()
            up.conn.send_headers(stream.up_id, forwarded, end_stream=event.stream_ended is not None)
        except h2.exceptions.TooManyStreamsError:
            self.down.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self._finish(stream, error="the app's stream limit")
            return
        stream.ended_up = stream.end_queued_up = event.stream_ended is not None
        self.by_up[stream.up_id] = stream
        up.flush()

    def _deny(self, stream: _Stream, denial: Denial, ended: bool) -> None:
        reason = denial.reason.encode("ascii", "replace")[:512]
        r = stream.result
        r.decision, r.reason, r.policy = denial.decision, denial.reason, denial.policy
        if stream.grpc:  # trailers-only: the status is in the (only) HEADERS frame
            r.status, r.grpc_status = 200, denial.grpc_status
            headers = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(denial.grpc_status).encode()),
                (b"grpc-message", reason),
                (DENIED_REASON, reason),
            ]
            self.down.conn.send_headers(stream.down_id, headers, end_stream=True)
        else:
            r.status = denial.status
            body = reason + b"\n"
            headers = [
                (b":status", str(denial.status).encode()),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (DENIED_REASON, reason),
            ]
            self.down.conn.send_headers(stream.down_id, headers)
            self.down.conn.send_data(stream.down_id, body, end_stream=True)
        if not ended:  # the request body will not be read (RFC 9113 section 8.1)
            with contextlib.suppress(h2.exceptions.StreamClosedError):  # it may have ended meanwhile
                self.down.conn.reset_stream(stream.down_id, h2.errors.ErrorCodes.NO_ERROR)
        self._finish(stream)

    # -- upstream (the app) ------------------------------------------------------------------

    async def _upstream(self) -> _Side:
        async with self._connecting:
            if self.up is None or self.up.pipe.at_eof:
                pipe = await self.connect_app()
                self.up = _Side(pipe, client=True)
                self.up.flush()
                self.by_up.clear()
                self._up_task = asyncio.create_task(self._up_loop(self.up))
            return self.up

    async def _up_loop(self, up: _Side) -> None:
        try:
            while data := await up.pipe.read():
                for event in up.conn.receive_data(data):
                    with contextlib.suppress(h2.exceptions.StreamClosedError):  # reset meanwhile
                        self._on_up(event)
                up.flush()
                self.down.flush()
                await self.down.pipe.drain()
        except (PipeClosed, ConnectionError, h2.exceptions.ProtocolError) as exc:
            log.info("HTTP/2 connection to the app failed", extra={**self.info, "reason": str(exc)})
        finally:
            if self.up is up:
                self.up = None
            for stream in list(self.by_up.values()):  # in flight on the lost connection
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.down.conn.reset_stream(stream.down_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                self._finish(stream, error="upstream reset")
            with contextlib.suppress(PipeClosed):
                self.down.flush()
            up.pipe.close()

    def _on_up(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = self.by_up.get(sid) if sid is not None else None
        if isinstance(event, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
            if stream is None:
                return
            headers = _headers(event.headers)
            if isinstance(event, h2.events.ResponseReceived):
                status = next((v for n, v in headers if n == b":status"), b"0")
                stream.result.status = int(status)
                self._grpc_status(stream, headers)
            ended = isinstance(event, h2.events.ResponseReceived) and event.stream_ended is not None
            self.down.conn.send_headers(stream.down_id, headers, end_stream=ended)
            if ended:
                stream.end_queued_down = True
                self._done_down(stream)
        elif isinstance(event, h2.events.DataReceived):
            if stream is None:
                if self.up is not None:
                    self.up.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream.result.response_bytes += len(event.data)
            stream.to_down.append((event.data, event.flow_controlled_length))
            self._pump(stream, up=False)
        elif isinstance(event, (h2.events.TrailersReceived, h2.events.StreamEnded)):
            if stream is not None and not stream.end_queued_down:
                stream.end_queued_down = True
                trailers = _headers(event.headers) if isinstance(event, h2.events.TrailersReceived) else None
                if trailers is not None:
                    self._grpc_status(stream, trailers)
                stream.to_down.append((trailers, 0))
                self._pump(stream, up=False)
        elif isinstance(event, h2.events.StreamReset):
            if stream is not None:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.down.conn.reset_stream(stream.down_id, event.error_code or 0)
                self._finish(stream, error="reset by the app")
        elif isinstance(event, h2.events.WindowUpdated):
            self._pump_all(up=True, stream_id=event.stream_id, by_up=True)

    @staticmethod
    def _grpc_status(stream: _Stream, headers: list[Header]) -> None:
        for n, v in headers:
            if n == b"grpc-status" and v.isdigit():
                stream.result.grpc_status = int(v)

    # -- moving data under flow control -------------------------------------------------------

    def _pump_all(self, up: bool, stream_id: int, by_up: bool) -> None:
        table = self.by_up if by_up else self.streams
        targets = list(table.values()) if stream_id == 0 else [s for s in [table.get(stream_id)] if s]
        for stream in targets:
            self._pump(stream, up=up)

    def _pump(self, stream: _Stream, up: bool) -> None:
        """Send what is queued toward one side as far as its windows allow."""
        dst = self.up if up else self.down
        src = self.down if up else self.up
        queue = stream.to_up if up else stream.to_down
        sid = stream.up_id if up else stream.down_id
        if dst is None or sid is None:
            return
        while queue:
            item, flow = queue[0]
            try:
                if item is None:
                    dst.conn.end_stream(sid)
                elif isinstance(item, list):
                    dst.conn.send_headers(sid, item, end_stream=True)
                else:
                    window = min(dst.conn.local_flow_control_window(sid), dst.conn.max_outbound_frame_size)
                    if window <= 0:
                        return
                    if len(item) > window:
                        dst.conn.send_data(sid, item[:window])
                        queue[0] = (item[window:], flow)
                        continue
                    dst.conn.send_data(sid, item)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                queue.clear()
                return
            queue.popleft()
            if flow and src is not None:
                other = stream.down_id if up else stream.up_id
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    if other is not None:
                        src.conn.acknowledge_received_data(flow, other)
            if item is None or isinstance(item, list):
                if up:
                    stream.ended_up = True
                else:
                    self._done_down(stream)
                return

    def _done_down(self, stream: _Stream) -> None:
        stream.ended_down = True
        self._finish(stream)

    def _finish(self, stream: _Stream, error: str | None = None) -> None:
        if self.streams.pop(stream.down_id, None) is None:
            return
        if stream.up_id is not None:
            self.by_up.pop(stream.up_id, None)
        if error is not None and stream.result.error is None:
            stream.result.error = error
        stream.span.finish(stream.result)
