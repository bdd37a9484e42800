"""HTTP/1.1 proxying, the same for both directions: :mod:`proxy.h1` (httptools) parses the downstream
connection one request at a time (pipelined requests wait, as they would at the server), a :class:`Router`
says where each request goes (or answers it itself: denied, no endpoint), and the request and the
response are streamed through, body chunk by body chunk, with backpressure both ways.

After a ``101 Switching Protocols`` the two connections are spliced as opaque bytes (WebSocket).
Malformed requests get a 400 (431 for oversized headers) and the connection is closed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from proxy import h1
from proxy.headers import (
    DENIED_REASON,
    UNPROCESSED,
    XFCC,
    BadPath,
    field_value,
    forwarded,
    header,
    is_upgrade,
    normalize_target,
    request_path,
    trailer_fields,
    with_identity,
)
from proxy.observe import TRACE_HEADERS, Observer, RequestInfo, RequestResult, RequestSpan
from proxy.pipe import LINGER_S, Pipe, PipeClosed, linger_close
from proxy.retry import IDEMPOTENT, RETRY_STATUSES, backoff

log = logging.getLogger("sidemesh.proxy.http")
MAX_HEAD = h1.MAX_HEAD  # request line and headers; more gets 431
REPLAY_MAX = 64 * 1024  # request bodies up to this size are kept for a retry
DRAIN_CHECK = 1.0  # how often an idle keep-alive connection looks whether the sidecar is draining
HEAD_TIMEOUT = 10.0  # from a request's first byte to the end of its head; then 408 (slow clients)
# A retried 5xx's body is skipped if it comes at once (the connection is then reused); one that
# does not come within this, or is bigger, is not waited for: the connection is dropped, as Envoy
# resets the upstream stream of a response it retries.
SKIP_BODY_WAIT = 0.05
SKIP_BODY_MAX = 64 * 1024
# A request body that sends nothing for this long is given up with 408 (Envoy's stream idle
# timeout, 5 minutes): the Service timeout starts only at the body's end, so without it a client
# stalled mid-body held its request, and the app's connection, for good.
BODY_IDLE_S = 300.0
# An answer that ends the connection while the client still sends (a denial or an error before
# the end of its body) is followed by `linger_close` (proxy/pipe.py), not a plain close.


@dataclass(slots=True)
class Local:
    """An answer the sidecar gives itself: denied (403), no endpoint (503), unreachable (502)."""

    status: int
    reason: str
    decision: Literal["allow", "deny", "audit_deny"] = "deny"
    policy: str | None = None
    error: str | None = None
    told: str | None = None  # what the caller is told, when not the reason (logs and spans keep it)
    unprocessed: bool = False  # the app never saw the request: the caller's sidecar may send it elsewhere


@dataclass(slots=True)
class Upstream:
    """A connection, taken from a pool, that carries one request (and then goes back)."""

    pipe: Pipe
    conn: h1.Connection
    reused: bool
    key: object = None
    endpoint: str | None = None
    destination: str | None = None
    reason: str = ""  # why the request was allowed (inbound: the policy decision)
    policy: str | None = None
    audit: bool = False  # allowed, but an audit-mode policy would refuse it
    at_head: Callable[[], None] | None = None  # the response head came (the balancer's latency)
    on_switch: Callable[[], None] | None = None  # a 101: the connection is spliced from here


class Router(Protocol):
    def begin(self, info: RequestInfo) -> float | None:
        """Once per request, before ``route``: the seconds it may wait for its response head
        (retries included), or None."""
        ...

    async def route(
        self, request: h1.Request, info: RequestInfo, avoid: Sequence[str] = ()
    ) -> Local | Upstream:
        """An upstream for the request; ``avoid``: endpoints (ADDRESS:PORT) that failed it, not
        chosen again if another can be."""
        ...

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        """Whether attempt number ``attempt`` (0: the first) may be retried after it got a
        ``status``, or was ``reset`` before its response head (and takes it from the budget)."""
        ...

    def may_reroute(self, attempt: int) -> bool:
        """Whether a request no endpoint has processed may go to another one after ``attempt``
        such tries (0: the first), as after a failed connect (and takes it from the budget)."""
        ...

    async def fresh(self, up: Upstream) -> Local | Upstream:
        """A new connection to the same place (a reused one was closed under the request)."""
        ...

    def release(self, up: Upstream, reusable: bool, ok: bool | None, observe: bool = False) -> None:
        """``ok`` None: the caller gave up (``Lease.abandon``; ``observe``: the endpoint had the whole
        request and had not answered)."""
        ...


@dataclass(slots=True)
class Context:
    direction: Literal["inbound", "outbound"]
    observer: Observer
    idle_timeout: float
    draining: Callable[[], bool]
    head_timeout: float = HEAD_TIMEOUT
    on_refused: Callable[[str], None] = lambda reason: None  # a connection ended for ``reason``
    source: str | None = None
    service: str | None = None
    peer_address: str | None = None
    log_extra: dict[str, object] = field(default_factory=dict)
    # Inbound: the XFCC value for the app (the caller authenticated), None for a plaintext caller.
    xfcc: bytes | None = None


class _BadRequest(Exception):
    def __init__(self, exc: h1.ProtocolError) -> None:
        super().__init__(str(exc))
        self.status = exc.status


class _DownstreamGone(Exception):
    pass


class _CutMidResponse(_DownstreamGone):
    """The upstream failed (closed, reset, sent what cannot be parsed) after the response head
    went downstream."""


class _Retry(Exception):
    """The response head asked for a retry (502/503/504); its body was dropped."""


class _Unprocessed(Exception):
    """The endpoint's sidecar answered that its app never saw the request (``UNPROCESSED``); its
    body was dropped."""


@dataclass(slots=True)
class _Clock:
    """A request's Service timeout, counted as Envoy's route timeout: finding an endpoint counts
    from the request head, the wait for the response head from the end of the request (a slow
    upload is not cut). ``at`` is None while the request body is still coming. A request that
    waits for ``100 Continue`` keeps its clock from the head until the 100 comes (an app that never
    answers is still cut)."""

    timeout: float
    at: float | None
    ended: bool = False  # started by the end of the request body

    def start(self) -> None:
        self.at = time.monotonic() + self.timeout
        self.ended = True

    def body_coming(self) -> None:
        if not self.ended:
            self.at = None


class _BadSwitch(h1.ProtocolError):
    """A 101 that answers no WebSocket handshake (``_bad_switch``): the app answered, so the
    request is not sent again (it is no connection failure), it gets 502."""


class _Timeout(Exception):
    """No response head before the request's deadline."""


class _HeadTimeout(Exception):
    """The request head did not arrive whole in time (a slow or stuck client)."""


async def next_event(conn: h1.Connection, pipe: Pipe) -> object:
    while True:
        event = conn.next_event()
        if event is h1.NEED_DATA:
            conn.receive_data(await pipe.read())
            continue
        return event


async def _next_head(conn: h1.Connection, pipe: Pipe, timeout: float) -> object:
    """The next event, once the request head is whole, within ``timeout`` of its first byte
    (a timer per wait, not a task: this is the request path). ``conn`` has just said NEED_DATA."""
    deadline: float | None = None
    while True:
        if not pipe.has_input:
            if deadline is None:
                deadline = time.monotonic() + timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await pipe.wait_input(remaining):
                raise _HeadTimeout
        conn.receive_data(await pipe.read())
        event = conn.next_event()
        if event is not h1.NEED_DATA:
            return event


async def _wait_request(pipe: Pipe, ctx: Context, first: bool, lane: _Lane | None = None) -> bool:
    """Wait for the next request's first bytes (or what the ``lane`` hands back); False when the
    connection should end (idle, or draining between two requests). The pipe's ticks (``serve``)
    wake the wait to look at both. A connection's first request is waited for while draining too,
    for the head timeout: the client connected to be served (one accepted as the drain began, or
    taken from the accept queue, was closed before its request was read). The requests the lane
    serves meanwhile count as the connection's activity; while it has one in flight the
    connection is neither idle nor closed for a drain."""
    if pipe.has_input or pipe.handed is not None:
        return True
    deadline = time.monotonic() + ctx.idle_timeout
    held = False  # (a first request, the drain seen: waited for until ``deadline``)
    served = 0 if lane is None else lane.served
    while True:
        now = time.monotonic()
        if lane is not None and (lane.busy or lane.served != served):
            served, first = lane.served, False
            deadline = now + ctx.idle_timeout
            if lane.busy:  # (what comes meanwhile waits for the exchange's end: pipelined, a FIN)
                if await pipe.wait_tick_or_handed(lambda: lane.busy):
                    return True
                continue
        if ctx.draining() and not held:
            if not first:
                return False
            deadline, held = min(deadline, now + ctx.head_timeout), True
        if now >= deadline:
            return False
        if await pipe.wait_tick_or_input() and (lane is None or not lane.busy or pipe.handed is not None):
            return True


def _local_response(local: Local, close: bool) -> list[h1.Event]:
    told = local.reason if local.told is None else local.told
    body = f"{told}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (DENIED_REASON, field_value(told)),
    ]
    if close:
        headers.append((b"connection", b"close"))
    if local.unprocessed:
        headers.append((UNPROCESSED, b"1"))
    return [h1.Response(local.status, headers), h1.Data(body), h1.EndOfMessage()]


async def serve(down: Pipe, router: Router, ctx: Context) -> None:
    """Serve one downstream connection until it ends."""
    conn = h1.Connection(h1.SERVER, max_head=MAX_HEAD)
    lane = _Lane(conn, down, router, ctx) if getattr(router, "route_now", None) is not None else None
    down.start_ticks(min(DRAIN_CHECK, ctx.idle_timeout / 2))  # idle closes within 1.5x the timeout
    first = True
    refused = False  # a head refused (unparsable, too large, not in time): the short linger
    try:
        while True:
            event: object
            handed: object = None
            try:
                event = conn.next_event()  # a pipelined request may be buffered already
                if event is h1.NEED_DATA:
                    if lane is not None and not down.has_input and conn.at_rest:
                        down.on_data = lane.on_request  # plain exchanges in callbacks meanwhile
                    waited = await _wait_request(down, ctx, first, lane)
                    down.on_data = None
                    if lane is not None and lane.served:
                        first = False
                    handed = down.take_handed()
                    if handed is None:
                        if not waited:
                            if down.framed:  # a client sidecar's pooled connection: tell it what
                                await linger_close(down, idle=True)  # it sends meanwhile goes unread
                                return
                            break
                        event = await _next_head(conn, down, ctx.head_timeout)
                    elif handed is _PARSE:  # (what the lane fed the parser: a head not whole yet)
                        event = conn.next_event()
                        if event is h1.NEED_DATA:
                            event = await _next_head(conn, down, ctx.head_timeout)
            except h1.ProtocolError as exc:
                _refuse_head(conn, down, exc.status, str(exc), ctx)
                refused = True
                break
            except _HeadTimeout:
                ctx.on_refused("head")
                _refuse_head(conn, down, 408, "request head not received in time", ctx)
                refused = True
                break
            if handed is _END:  # (the lane ended the connection)
                return
            if isinstance(handed, _Handed):
                event = handed.req
            elif handed is _DRAIN:  # (the lane's last response waits in the write buffer)
                await down.drain()
            if handed is not _DONE and handed is not _DRAIN:
                if isinstance(event, h1.ConnectionClosed) or event is h1.PAUSED:
                    break
                assert isinstance(event, h1.Request), event
                if not await _exchange(
                    conn, down, event, router, ctx, handed if isinstance(handed, _Handed) else None
                ):
                    return  # the connection was spliced or reset: nothing more to do here
            first = False
            reusable = conn.reusable
            if reusable and not ctx.draining():
                conn.start_next_cycle(checked=True)
                continue
            if reusable and down.framed:  # a drain began during a response the caller may
                await linger_close(down, idle=True)  # pool (its head went out without close)
                return
            break
        if conn.receiving:  # answered before the request's end (a refused head, a denial that
            # closes on an expected 100): not reset away (RFC 9112 9.6); an upload the long linger
            await linger_close(down, upload=not first and not refused)
            return
        down.write_eof()
        down.close()
    except (PipeClosed, OSError):  # the client is gone (ENOTCONN from a write_eof too)
        down.abort()
    finally:
        down.on_data = None
        if lane is not None:
            lane.abandon()  # (cancelled with an exchange in the lane: given up, as _forward's)
        down.stop_ticks()
        conn.release()


def _send_error(conn: h1.Connection, down: Pipe, status: int, why: str, ctx: Context) -> bool:
    """Answer ``status`` and say why in the log; False when no answer could go out."""
    log.info("bad request", extra={**ctx.log_extra, "status": status, "reason": why})
    if conn.sent_head:
        return False
    try:
        for ev in _local_response(Local(status, f"bad request: {why}"), close=True):
            down.write(conn.send(ev))
    except (h1.LocalProtocolError, PipeClosed):
        return False
    return True


def _refuse_head(conn: h1.Connection, down: Pipe, status: int, why: str, ctx: Context) -> None:
    """A request head refused before its method and target were known (unparsable, too large, not
    in time): answered, and counted as the request it was (as Envoy counts a downstream protocol
    error), with no method or path and ``decision="refused"``."""
    sent = _send_error(conn, down, status, why, ctx)
    info = RequestInfo(
        direction=ctx.direction,
        protocol="http/1.1",
        method="",
        path="",
        authority="",
        headers=(),
        source=ctx.source,
        service=ctx.service,
        peer_address=ctx.peer_address,
        traced=False,
    )
    ctx.observer.start(info).finish(RequestResult(status if sent else None, decision="refused", error=why))


async def _exchange(
    conn: h1.Connection,
    down: Pipe,
    req: h1.Request,
    router: Router,
    ctx: Context,
    handed: _Handed | None = None,
) -> bool:
    """One request and its response. False when the downstream connection is no longer HTTP.
    ``handed``: from the lane, the request's body taken whole, or the exchange it began (its
    request sent), to go on with."""
    sent = None if handed is None else handed.sent
    if sent is not None:
        return await _conclude(conn, down, req, router, ctx, sent.span, sent.result, sent.info, handed)
    bad_path = None
    if ctx.direction == "inbound":  # the enforcing side: the app gets the path the policy saw
        try:
            req.target = normalize_target(req.target)
        except BadPath as exc:
            bad_path = f"bad request target: {exc}"
    info = _request_info(req, req.method.decode("latin-1"), request_path(req.target), ctx)
    span = ctx.observer.start(info)
    if bad_path is not None:  # answered here, and counted as the 400 it is (the app never sees it)
        _send_error(conn, down, 400, bad_path, ctx)
        span.finish(RequestResult(400, decision="refused", error=bad_path))
        if conn.their_done:
            down.close()
        else:  # its body still coming: closing now would reset the 400 away (RFC 9112 9.6)
            await linger_close(down)
        return False
    return await _conclude(conn, down, req, router, ctx, span, RequestResult(None), info, handed)


def _request_info(req: h1.Request, method: str, path: str, ctx: Context) -> RequestInfo:
    raw = req.headers
    authority = (req.host if req.known else header(raw, b"host")) or b""
    return RequestInfo(  # (fields by position: a call by keyword costs about three times as much)
        ctx.direction,
        "http/1.1",
        method,
        path,
        authority.decode("latin-1"),
        raw if req.known else [(n.lower(), v) for n, v in raw],  # headers (the parser's are lower-case)
        ctx.source,
        None,  # destination
        ctx.service,
        ctx.peer_address,
        req.traced,
    )


async def _conclude(
    conn: h1.Connection,
    down: Pipe,
    req: h1.Request,
    router: Router,
    ctx: Context,
    span: RequestSpan,
    result: RequestResult,
    info: RequestInfo,
    handed: _Handed | None,
) -> bool:
    """The exchange from its routing (or, handed from the lane, from its request sent) to its end."""
    raw = req.headers
    try:
        if handed is not None and handed.sent is not None:
            sent = handed.sent
            return await _forward(
                conn, down, req, raw, span, sent.up, router, result, info, sent.clock, ctx, sent=sent
            )
        timeout = router.begin(info)
        clock = None if timeout is None else _Clock(timeout, time.monotonic() + timeout)
        chosen = None if handed is None else handed.chosen
        route = await _route(router, req, info, None if clock is None else clock.at, chosen=chosen)
        whole = None if handed is None else handed.whole
        if isinstance(route, Local):
            if ctx.draining():  # as for a forwarded response: Connection: close, then close
                conn.must_close = True
            if whole:  # (taken by the lane: counted as _answer_locally counts what it reads)
                result.request_bytes += len(whole)
            await _answer_locally(conn, down, route, result)
            return True
        return await _forward(conn, down, req, raw, span, route, router, result, info, clock, ctx, whole)
    except _BadRequest as exc:
        result.error = f"bad request: {exc}"
        _send_error(conn, down, exc.status, str(exc), ctx)
        if conn.our_done and result.status is None:
            result.status = exc.status
        await linger_close(down)
        return False
    except _CutMidResponse as exc:
        result.error = f"downstream: {exc}"
        # What was relayed goes out, then the close: a body framed by its length or its chunks
        # reads as cut short, and the next hop has the app's answer (thrown away with a reset, the
        # caller's sidecar took the connection for one closed under the request: the request went
        # to the app again, answered 502; RFC 9112 9.3.1). A body that ends at the close gets a
        # reset, or its end would look whole.
        if conn.body_ends_at_close:
            down.abort()
        else:
            down.close()
        return False
    except _DownstreamGone as exc:
        result.error = f"downstream: {exc}"
        down.abort()
        return False
    finally:
        span.finish(result)


async def _answer_locally(conn: h1.Connection, down: Pipe, local: Local, result: RequestResult) -> None:
    # A client waiting for "100 Continue" may or may not send its body now: close after answering.
    close = conn.waiting_for_100_continue
    _write_down(down, conn, _local_response(local, close))
    # An upgrade asked for and answered here is declined: what follows is HTTP (the next request
    # on a pooled connection waited for the head timeout, then 408).
    conn.decline_upgrade()
    if local.decision != "allow" or result.decision != "audit_deny":  # (an audit denial stays one)
        result.decision = local.decision
    result.status, result.reason = local.status, local.reason
    result.policy, result.error = local.policy, local.error
    if close or conn.their_done:  # closing, or the request had no body (or it was read)
        return
    try:
        while not isinstance(event := await next_event(conn, down), h1.EndOfMessage):  # discard the body
            if isinstance(event, h1.ConnectionClosed):
                return
            if isinstance(event, h1.Data):
                result.request_bytes += len(event.data)
    except h1.ProtocolError as exc:
        raise _BadRequest(exc) from exc
    except PipeClosed as exc:
        raise _DownstreamGone(str(exc)) from exc


def _request_head(
    req: h1.Request, raw: list[tuple[bytes, bytes]], span: RequestSpan, ctx: Context
) -> h1.Request:
    upgrade = req.upgrade and is_upgrade(raw)
    trace = span.trace_headers()
    simple = req.known and not req.hop and not upgrade  # most requests: nothing to take out but trace headers
    if trace is None:  # the request's own trace headers go on as they came
        headers = raw.copy() if simple else forwarded(raw, upgrade=upgrade)
    elif simple:
        headers = [h for h in raw if h[0] not in TRACE_HEADERS] if req.traced else raw.copy()
        headers += trace
    else:
        headers = forwarded(raw, trace, upgrade=upgrade, replace_trace=True)
    if ctx.direction == "inbound":  # only the sidecar says who called (headers.IDENTITY_HEADERS)
        if req.identity or not req.known:
            headers = with_identity(headers, ctx.xfcc, lower=not req.known)
        elif ctx.xfcc is not None:
            headers.append((XFCC, ctx.xfcc))
    host = req.host if req.known else header(headers, b"host")
    if host is None:  # an HTTP/1.0 request may have none; HTTP/1.1 needs one
        host = b"localhost"
        headers.insert(0, (b"host", host))
    target = req.target
    if ctx.direction == "inbound" and target[:1] != b"/" and target != b"*":
        # Absolute form (its authority is the Host already): the app gets origin form, as from a
        # client without a proxy (RFC 9112 3.2.1, 3.2.2; Envoy sends it so too). Servers that
        # route on the raw target did not know ``http://cart/x``.
        target = request_path(target).encode("latin-1")
    return h1.Request(  # (fields by position: a call by keyword costs about three times as much)
        req.method,
        target,
        headers,
        b"1.1",  # http_version
        True,  # keep_alive
        req.chunked,
        req.length,
        False,  # expect_continue
        upgrade,
        req.known,
        host,
        upgrade,  # hop
        req.traced if trace is None else bool(trace),  # traced
    )


async def _forward(
    conn: h1.Connection,
    down: Pipe,
    req: h1.Request,
    raw: list[tuple[bytes, bytes]],
    span: RequestSpan,
    up: Upstream,
    router: Router,
    result: RequestResult,
    info: RequestInfo,
    clock: _Clock | None,
    ctx: Context,
    taken: bytes | None = None,
    sent: _Sent | None = None,
) -> bool:
    """``taken``: the request's body, taken whole from the parser already; ``sent``: the request
    went out (from the lane), with its head and body kept."""
    result.reason, result.policy = up.reason, up.policy
    if up.audit:
        result.decision = "audit_deny"
    first: object = h1.NEED_DATA
    whole: bytes | None
    skip = False  # (the lane's request went out: _forward goes on after its send)
    if sent is not None:  # (whole: its body kept, its clock started)
        head, whole, body = sent.head, sent.unsent, sent.body()
        skip = whole is None
    else:
        head = _request_head(req, raw, span, ctx)
        # Most requests: no body, or all of it in the read with the head.
        whole = conn.rest_of_message() if taken is None else taken
        if whole is None:
            try:
                first = conn.next_event()  # (without I/O)
            except h1.ProtocolError as exc:
                router.release(up, False, None)  # (nothing was sent: not the endpoint's outcome)
                raise _BadRequest(exc) from exc
        bodiless = whole is not None or isinstance(first, h1.EndOfMessage)
        body = _Body(bodiless)
        if whole:  # (its clock started at the head: from the body's end, that is now)
            body.keep(whole)
            if clock is not None:
                clock.start()
        if isinstance(first, h1.EndOfMessage) and first.headers:  # (a chunked request of no data, trailers)
            body.trailers = trailer_fields(first.headers)
        if clock is not None and not bodiless and not req.expect_continue:
            clock.body_coming()  # started by the end of the body
    tried: list[str] = []  # endpoints that failed this request: a retry goes elsewhere if it can
    started = [False]  # a response head went downstream
    retried = False  # the one free retry of a request on a pooled connection closed under it
    gone = [False]  # the client left while the response was awaited
    attempt = 0  # retries by the route's policy (502/503/504, reset), from the budget
    unprocessed = 0  # endpoints whose sidecar said their app never saw the request
    while True:
        result.endpoint, result.destination = up.endpoint, up.destination
        pump: asyncio.Task[None] | None = None
        try:
            if skip:
                skip = False
            elif whole is not None:  # the request read whole (most): out now, in one write
                up.pipe.write_now(up.conn.send_whole(head, whole))
                whole = None  # (sent again, it is what ``body`` kept: none if it was too large)
            else:
                data = up.conn.send(head)
                if body.complete:  # a retry with the whole body kept, or trailers: sent from here
                    for chunk in body.chunks:
                        data += up.conn.send(h1.Data(chunk))
                    data += up.conn.send(h1.EndOfMessage(body.trailers))
                    up.pipe.write_now(data)  # the request is whole: out now
                else:
                    up.pipe.write(data)
            if not body.complete:
                pump = asyncio.create_task(_pump_body(conn, down, up, first, body, clock))
                pump.add_done_callback(_abort_on_failure(up.pipe))
            # A request can be sent again if its body (if any) was read whole and kept.
            retry_status = _retry_check(router, info.method, attempt, body)
            # A client that leaves (reset, or FIN: no half-close for HTTP, as Envoy) gives up the
            # request: the upstream is dropped, not waited on (a hung app held both for good).
            if down.ended and body.complete:
                gone[0] = True
                up.pipe.abort()
            down.on_end = functools.partial(_client_gone, gone, up.pipe)
            try:
                spliced = await _relay_response(
                    conn,
                    down,
                    up,
                    result,
                    started,
                    clock,
                    retry_status,
                    # A response before the request's end says Connection: close, as Envoy's: the
                    # connection closes if the body is still coming when the response ends
                    # (RFC 9110 10.1.1: the client must know, or its next request is lost).
                    ctx.draining if pump is None else functools.partial(_closing, ctx.draining, pump),
                    body,
                )
            finally:
                down.on_end = None
            if pump is not None and not pump.done():
                # The response is complete before the request body: the server will not read the
                # rest (a denial, an early error). Stop both, as a server would (RFC 9112 9.6).
                await _stop(pump)
                router.release(up, False, result.status is None or result.status < 500)
                await linger_close(down, upload=True)
                return False
            if pump is not None:
                await pump
            result.request_bytes = body.size
        except _Retry as exc:
            _put_back(router, up, False)
            attempt += 1
            log.info("retrying", extra={"status": str(exc), "attempt": attempt, "endpoint": up.endpoint})
            again = await _elsewhere(router, up, req, info, attempt, clock, tried, result)
            if isinstance(again, Local):
                await _answer_locally(conn, down, again, result)
                return True
            up = again
            continue
        except _Unprocessed:
            # Its app is not there (restarting, stopped): another endpoint, whatever the method, as
            # after a failed connect (as many times, from the retry budget; not one that said so).
            _put_back(router, up, False)
            unreachable = Local(
                502, "app not reachable", "allow", up.policy, "the endpoint's app is not reachable"
            )
            again = unreachable
            if up.endpoint is not None:
                tried.append(up.endpoint)
                again = await _route(router, req, info, None if clock is None else clock.at, tried)
                # Only to another endpoint (none other: that answer), and as a retry the budget
                # allows (taken from it only then).
                if isinstance(again, Upstream) and (
                    again.endpoint in tried or not router.may_reroute(unprocessed)
                ):
                    router.release(again, True, None)  # (the connection unused: back to its pool)
                    again = unreachable
            if isinstance(again, Local):
                await _answer_locally(conn, down, again, result)
                return True
            unprocessed += 1
            result.retries += 1
            log.info("app not reachable at the endpoint; another", extra={"endpoint": up.endpoint})
            up = again
            continue
        except _Timeout:
            await _stop(pump)
            up.pipe.abort()
            router.release(up, False, False)
            result.error = "timeout"
            local = Local(504, "upstream timeout", "allow", up.policy, "timeout")
            if body.complete:
                await _answer_locally(conn, down, local, result)
                return True
            _write_down(down, conn, _local_response(local, close=True))
            result.status = 504
            await linger_close(down)
            return False
        except (PipeClosed, ConnectionError, h1.ProtocolError, h1.LocalProtocolError) as exc:
            pump_exc = await _stop(pump)
            if gone[0] and pump_exc is None:  # not the endpoint's failure: answered, its answer
                # counts; unanswered, neither (its time so far when it had the whole request)
                ok = (result.status is None or result.status < 500) if started[0] else None  # (a 5xx is one)
                router.release(up, False, ok, observe=body.complete)
                raise _DownstreamGone("the client closed before the response ended") from exc
            if (
                pump_exc is None
                and not started[0]
                # (a malformed or cut response, a bad 101: the app answered, so it had the request)
                and not isinstance(exc, h1.ProtocolError)
                and not retried
                # A pooled connection closed under the request, or a fresh one that a draining
                # sidecar took from its closing listener's queue and closed before reading it.
                and (up.reused or (up.pipe.framed and up.pipe.idle_closed))
                and body.replayable
                # RFC 9112 9.3.1: never a non-idempotent one, unless the other sidecar said it
                # dropped the request unread (an EOF frame alone is no proof: one relaying the
                # port as opaque sends it when its app closes, after the app may have acted).
                and (info.method in IDEMPOTENT or await _left_unread(up.pipe, clock))
                and not down.ended  # (the client left while it waited)
            ):
                retried = True  # a pooled connection was closed under the request: once more, fresh
                up.pipe.abort()
                fresh = await _fresh(router, up, None if clock is None else clock.at)
                if isinstance(fresh, Local) and fresh.status == 502 and up.endpoint is not None:
                    # Not even a new connection (a draining peer closed its pooled connections
                    # and its listener): nothing was sent, so elsewhere, as any failed connect.
                    tried.append(up.endpoint)
                    fresh = await _route(router, req, info, None if clock is None else clock.at, tried)
                if isinstance(fresh, Local):
                    await _answer_locally(conn, down, fresh, result)
                    return True
                up = fresh
                continue
            if (
                pump_exc is None
                and not started[0]
                and not isinstance(exc, _BadSwitch)
                and body.replayable
                # (after the free retry above, when that does not apply: a POST on a pooled
                # connection when the Service allows retrying it, as Envoy's retry_on: reset)
                and router.may_retry(info.method, None, True, attempt)
            ):
                up.pipe.abort()
                router.release(up, False, False)
                attempt += 1
                again = await _elsewhere(router, up, req, info, attempt, clock, tried, result)
                if isinstance(again, Local):
                    await _answer_locally(conn, down, again, result)
                    return True
                up = again
                continue
            if pump_exc is not None:
                # The client's doing (it left mid-body, or sent one that cannot be read): not the
                # endpoint's failure (healthy endpoints were ejected by impatient clients).
                client = isinstance(pump_exc, (_BadRequest, _DownstreamGone))
                router.release(up, False, None if client else False)
                raise pump_exc from exc
            router.release(up, False, False)
            if started[0]:
                raise _CutMidResponse(f"upstream failed mid-response: {exc}") from exc
            result.error = f"upstream: {exc}"
            local = Local(502, "upstream connection failed", "allow", up.policy, result.error)
            if body.complete:
                await _answer_locally(conn, down, local, result)
                return True
            _write_down(down, conn, _local_response(local, close=True))
            result.status = 502
            await linger_close(down, upload=True)  # (a client still sending its body: see pipe.py)
            return False
        except BaseException:
            await _stop(pump)
            router.release(up, False, None)  # (cancelled: a drain's end, the client's leaving)
            raise
        # A 5xx is a failure for the balancer: an endpoint that fails fast must not look fast.
        _put_back(router, up, result.status is None or result.status < 500)
        return not spliced


def _put_back(router: Router, up: Upstream, ok: bool) -> None:
    """The exchange on ``up`` is over: released, to its pool if both messages ended cleanly."""
    router.release(up, up.conn.next_cycle(), ok)


async def _left_unread(pipe: Pipe, clock: _Clock | None) -> bool:
    """Whether the other sidecar closed this idle pooled connection and dropped the request unread
    (its EOF said idle, an UNREAD frame followed: ``linger_close(idle=True)``), waiting for it as
    long as that sidecar waits for a request, within the request's deadline. Any other end (an
    opaque relay's, an older sidecar's) is no such proof, and is not waited on."""
    if not (pipe.framed and pipe.ended and pipe.idle_closed):
        return False
    deadline = None if clock is None else clock.at
    wait = LINGER_S + 0.5 if deadline is None else min(LINGER_S + 0.5, deadline - time.monotonic())
    if wait <= 0:  # the request's time is up: no retry (the app could act on it unanswered)
        return False
    told = pipe.left_unread or await pipe.wait_unread(wait)
    return told and (deadline is None or deadline > time.monotonic())


def _retry_check(router: Router, method: str, attempt: int, body: _Body) -> Callable[[int], bool]:
    """Whether a response head with this status is dropped for a retry: only when the request's
    body was read whole and kept (the check runs when the head arrives, which may be before the
    body has all been sent: then the response goes to the client)."""
    return lambda status: body.replayable and router.may_retry(method, status, False, attempt)


class _Body:
    """A request body as it is streamed upstream, kept (up to ``REPLAY_MAX``) so that the request
    can be retried: Linkerd keeps 64 KiB the same way. Bigger bodies are streamed, never kept."""

    __slots__ = ("chunks", "complete", "overflow", "size", "trailers")

    def __init__(self, empty: bool) -> None:
        self.chunks: list[bytes] = []
        self.trailers: list[h1.Header] = []
        self.size = 0
        self.complete = empty  # read to its end (and kept, unless overflow)
        self.overflow = False

    def keep(self, data: bytes) -> None:
        self.size += len(data)
        if self.overflow:
            return
        if self.size > REPLAY_MAX:
            self.overflow = True
            self.chunks.clear()
        else:
            self.chunks.append(data)

    @property
    def replayable(self) -> bool:
        return self.complete and not self.overflow

    def answered(self) -> None:
        """A 1xx went to the client: the request is not sent again (its client would see a second
        100 Continue; Envoy stops retrying once an upstream 1xx was passed on)."""
        self.overflow = True
        self.chunks.clear()


async def _elsewhere(
    router: Router,
    up: Upstream,
    req: h1.Request,
    info: RequestInfo,
    attempt: int,
    clock: _Clock | None,
    tried: list[str],
    result: RequestResult,
) -> Local | Upstream:
    """A retry by the route's policy, counted, away from ``up``'s endpoint if it can."""
    result.retries += 1
    if up.endpoint is not None:
        tried.append(up.endpoint)
    return await _reroute(router, req, info, attempt, clock, tried)


async def _reroute(
    router: Router, req: h1.Request, info: RequestInfo, attempt: int, clock: _Clock | None, tried: list[str]
) -> Local | Upstream:
    """A retry (the request is whole by now, so its clock runs), elsewhere than ``tried`` if it can."""
    deadline = None if clock is None else clock.at
    pause = backoff(attempt - 1)
    if deadline is not None and time.monotonic() + pause >= deadline:
        return Local(504, "upstream timeout", "allow", error="timeout")
    await asyncio.sleep(pause)
    return await _route(router, req, info, deadline, tried)


async def _route(
    router: Router,
    req: h1.Request,
    info: RequestInfo,
    deadline: float | None,
    avoid: Sequence[str] = (),
    chosen: Choice | None = None,
) -> Local | Upstream:
    """``router.route`` within the request's deadline: the Service's timeout covers finding and
    connecting to an endpoint too (as Envoy's route timeout), not only waiting for the response.
    ``chosen``: what the router's ``route_now`` chose (the lane's), for ``route`` to go on with."""
    if chosen is None:
        routing = router.route(req, info, avoid)
    else:  # (a router with ``route_now``)
        routing = router.route(req, info, avoid, chosen=chosen)  # type: ignore[call-arg]
    if deadline is None:
        return await routing
    try:
        return await asyncio.wait_for(routing, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return Local(504, "upstream timeout", "allow", error="timeout")


async def _fresh(router: Router, up: Upstream, deadline: float | None) -> Local | Upstream:
    """``router.fresh`` within the request's deadline, as ``_route`` (it dialled for the whole
    connect timeout: 5 s for a Service whose timeout is 300 ms)."""
    if deadline is None:
        return await router.fresh(up)
    left = deadline - time.monotonic()
    if left <= 0:  # (wait_for would cancel it before it ran: its lease never given back)
        router.release(up, False, False)
        return Local(504, "upstream timeout", "allow", error="timeout")
    try:
        return await asyncio.wait_for(router.fresh(up), left)
    except TimeoutError:
        return Local(504, "upstream timeout", "allow", error="timeout")


def _write_down(down: Pipe, conn: h1.Connection, events: list[h1.Event]) -> None:
    try:
        for ev in events:
            down.write(conn.send(ev))
    except (PipeClosed, h1.LocalProtocolError) as exc:
        raise _DownstreamGone(str(exc)) from exc


async def _stop(pump: asyncio.Task[None] | None) -> Exception | None:
    if pump is None:
        return None
    if not pump.done():
        pump.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await pump
    return _pump_error(pump)


def _abort_on_failure(pipe: Pipe) -> Callable[[asyncio.Task[None]], None]:
    """A failed request body (bad chunking, client gone) aborts the upstream, which ends the wait
    for its response."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            pipe.abort()

    return done


def _pump_error(task: asyncio.Task[None]) -> Exception | None:
    if task.cancelled():
        return None
    exc = task.exception()
    if isinstance(exc, (_BadRequest, _DownstreamGone)):
        return exc
    return None


async def _pump_body(
    conn: h1.Connection, down: Pipe, up: Upstream, first: object, body: _Body, clock: _Clock | None
) -> None:
    """Request body, downstream -> upstream, kept in ``body`` while it is small; its end starts
    the ``clock``."""
    event = first
    while True:
        if event is h1.NEED_DATA:
            try:
                if not down.has_input and not await down.wait_input(BODY_IDLE_S):
                    raise _BadRequest(h1.ProtocolError(f"request body idle for {BODY_IDLE_S:.0f} s", 408))
                conn.receive_data(await down.read())
                event = conn.next_event()
            except h1.ProtocolError as exc:
                raise _BadRequest(exc) from exc
            except PipeClosed as exc:
                raise _DownstreamGone(str(exc)) from exc
            continue
        if isinstance(event, h1.Data):
            if clock is not None and clock.at is not None:  # (an Expect request's client that
                clock.body_coming()  # stopped waiting for 100: its clock still ran from the head)
            body.keep(event.data)
            up.pipe.write(up.conn.send(event))
            await up.pipe.drain()
        elif isinstance(event, h1.EndOfMessage):
            if event.headers:
                event = h1.EndOfMessage(trailer_fields(event.headers))
            body.trailers = event.headers
            body.complete = True
            if clock is not None:
                clock.start()
            up.pipe.write(up.conn.send(event))
            return
        elif isinstance(event, h1.ConnectionClosed):
            raise _DownstreamGone("closed in the middle of a request body")
        try:
            event = conn.next_event()
        except h1.ProtocolError as exc:
            raise _BadRequest(exc) from exc


async def _relay_response(
    conn: h1.Connection,
    down: Pipe,
    up: Upstream,
    result: RequestResult,
    started: list[bool],
    clock: _Clock | None = None,
    retry_status: Callable[[int], bool] | None = None,
    draining: Callable[[], bool] = lambda: False,
    body: _Body | None = None,
) -> bool:
    """Response, upstream -> downstream. True when the connections were switched (101) and spliced.
    Until the head: bounded by the ``clock``, and a head that ``retry_status`` accepts is dropped
    (``_Retry``). A response that starts while ``draining`` (or before the request's body ended)
    says ``Connection: close`` and the connection closes after it (RFC 9112 9.6, as Envoy drains):
    the client sends its next request elsewhere rather than on a connection about to close under
    it."""
    while True:
        event: object = up.conn.next_event()  # without I/O when the last read held more than one event
        if event is not h1.NEED_DATA:
            pass
        elif clock is not None and not started[0]:
            while event is h1.NEED_DATA:  # a timer, not wait_for's task per wait
                if clock.at is None:  # the request body is still coming: not started yet
                    remaining = clock.timeout  # (it cannot end later than this after its start)
                else:
                    remaining = clock.at - time.monotonic()
                    if remaining <= 0:
                        raise _Timeout
                if not await up.pipe.wait_input(remaining):
                    continue
                up.conn.receive_data(await up.pipe.read())
                event = up.conn.next_event()
        else:
            while event is h1.NEED_DATA:  # (``next_event``, without asking again first)
                up.conn.receive_data(await up.pipe.read())
                event = up.conn.next_event()
        if (
            isinstance(event, h1.Response)
            and event.status_code == 502
            and up.pipe.framed  # (from another sidecar)
            and body is not None
            and body.replayable
            and header(event.headers, UNPROCESSED) is not None
        ):
            await _skip_body(up)
            raise _Unprocessed
        if (
            retry_status is not None
            and isinstance(event, h1.Response)
            and event.status_code in RETRY_STATUSES
            and retry_status(event.status_code)
        ):
            await _skip_body(up)
            raise _Retry(event.status_code)
        if isinstance(event, h1.InformationalResponse):
            switching = event.status_code == 101
            if switching and (why := _bad_switch(up.conn.request, event.headers)) is not None:
                raise _BadSwitch(why)
            if event.status_code == 100 and clock is not None:
                clock.body_coming()  # the body comes now: the clock starts again at its end
            if not switching and conn.request is not None and conn.request.http_version == b"1.0":
                continue  # RFC 9110 15.2: no 1xx to an HTTP/1.0 client (the app was spoken to in 1.1)
            headers = forwarded(event.headers, upgrade=switching)
            _write_down(down, conn, [h1.InformationalResponse(event.status_code, headers, event.reason)])
            if body is not None:
                body.answered()
            retry_status = None
            if switching:
                started[0] = True
                result.status = 101
                if up.at_head is not None:
                    up.at_head()
                if up.on_switch is not None:
                    up.on_switch()
                down.on_end = None  # spliced: a half-close is the app's to pass on
                await _splice(conn, down, up)
                return True
        elif isinstance(event, h1.Response):
            if (
                conn.request is not None
                and conn.request.http_version == b"1.0"
                and (codings := h1.codings_beyond_chunked(event.headers))
                and conn.request.method != b"HEAD"
                and event.status_code not in (204, 304)
            ):
                raise h1.ProtocolError(
                    f"a response in transfer coding {b', '.join(codings).decode('latin-1')} cannot go to an "
                    "HTTP/1.0 client (RFC 9112 6.1)"
                )
            started[0] = True
            result.status = event.status_code
            if up.at_head is not None:
                up.at_head()
            if draining():
                conn.must_close = True
            response = _without_hop(event) if event.hop else event  # (most: as it came)
            rest = up.conn.rest_of_message()
            if rest is None:
                _write_down(down, conn, [response])
                continue
            try:  # the whole response is here (most are): one write
                down.write_now(conn.send_whole(response, rest))
                result.response_bytes += len(rest)
                if down.backpressured:  # (a client that does not read: its next request waits)
                    await down.drain()
            except (PipeClosed, h1.LocalProtocolError) as exc:
                raise _DownstreamGone(str(exc)) from exc
            conn.decline_upgrade()
            return False
        elif isinstance(event, h1.Data):
            result.response_bytes += len(event.data)
            _write_down(down, conn, [event])
            if down.backpressured:  # else it goes out with what follows (one write, one record)
                try:
                    await down.drain()
                except PipeClosed as exc:
                    raise _DownstreamGone(str(exc)) from exc
        elif isinstance(event, h1.EndOfMessage):
            _write_down(
                down, conn, [h1.EndOfMessage(trailer_fields(event.headers)) if event.headers else event]
            )
            down.flush()  # the response is whole: out now, not a turn of the loop later
            conn.decline_upgrade()  # if the request asked for one: what followed it is HTTP again
            return False
        else:
            raise PipeClosed("upstream closed before responding")


def _without_hop(event: h1.Response) -> h1.Response:
    """The response head to send on, without its hop-by-hop fields."""
    return h1.Response(
        event.status_code,
        forwarded(event.headers),
        event.reason,
        known=event.known,
        chunked=event.chunked,
        length=event.length,
        hop=False,  # none is left
    )


_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3


def _bad_switch(request: h1.Request | None, headers: Sequence[h1.Header]) -> str | None:
    """Why a 101 is not the answer to the WebSocket handshake its request made (the only upgrade
    passed on), or None. After a 101 both connections are spliced and no request on them is
    seen: a 101 that is not a switch (an app endpoint answering a status of the caller's choice)
    let the caller's next requests reach the app past the per-request policy, with identity
    headers of its choosing. RFC 9110 7.8: a 101 names the protocol in Upgrade; RFC 6455 4.1: a
    client fails a handshake without ``Upgrade: websocket`` and the Sec-WebSocket-Accept its key
    calls for."""
    if request is None or not request.upgrade:
        return "101 Switching Protocols to a request that asked for no upgrade"
    upgrade = header(headers, b"upgrade") or b""
    if b"websocket" not in (token.strip().lower() for token in upgrade.split(b",")):
        return "101 Switching Protocols without Upgrade: websocket"
    key = (header(request.headers, b"sec-websocket-key") or b"").strip()
    accept = (header(headers, b"sec-websocket-accept") or b"").strip()
    if not key or accept != base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest()):
        return "101 Switching Protocols whose Sec-WebSocket-Accept does not answer the request's key"
    return None


def _closing(draining: Callable[[], bool], pump: asyncio.Task[None]) -> bool:
    return draining() or not pump.done()


def _client_gone(gone: list[bool], up: Pipe) -> None:
    gone[0] = True
    up.abort()


async def _skip_body(up: Upstream) -> None:
    """The body of a response that is not passed on, read if it is at hand; else the connection is
    left unfinished (not reusable: closed on release)."""
    skipped = 0
    try:
        while skipped <= SKIP_BODY_MAX:
            event = up.conn.next_event()
            if event is h1.NEED_DATA:
                if not await up.pipe.wait_input(SKIP_BODY_WAIT):
                    return
                up.conn.receive_data(await up.pipe.read())
            elif isinstance(event, (h1.EndOfMessage, h1.ConnectionClosed)):
                return
            elif isinstance(event, h1.Data):
                skipped += len(event.data)
    except (PipeClosed, ConnectionError, h1.ProtocolError):
        up.pipe.abort()


async def _splice(conn: h1.Connection, down: Pipe, up: Upstream) -> None:
    """After 101: opaque bytes both ways, with half-close, until both directions end."""
    if up.conn.trailing:
        down.write(up.conn.trailing)
    if conn.trailing:
        up.pipe.write(conn.trailing)
    await asyncio.gather(copy(down, up.pipe), copy(up.pipe, down))
    down.close()
    up.pipe.close()


async def copy(src: Pipe, dst: Pipe) -> None:
    try:
        while data := await src.read():
            dst.write(data)
            await dst.drain()
        dst.write_eof()
    except (PipeClosed, ConnectionError):
        src.abort()
        dst.abort()


# -- plain exchanges in callbacks ----------------------------------------------------------------
#
# Most requests are plain: a head and a body of known length (or none) in one read, answered by a
# response of the same kind. The lane proxies those in the pipes' ``on_data`` callbacks, from one
# connection to the other as they arrive, with no task woken, and the same decisions as above
# (route, span, retry budget, balancer lease, policy). It takes a request only at a message
# boundary and only whole; whatever it does not finish it hands back to ``serve``, at one of two
# points: before anything was sent (the request, and its body if taken, go through ``_exchange``
# as if read there), or once the request went out (``_forward`` goes on after its own send: a
# response not whole or not plain, a status the route may retry, the upstream ending, the
# request's deadline, the client leaving). docs/sidecar.md, "Plain exchanges in callbacks".

_PARSE: Final = h1._Sentinel("PARSE")  # the parser holds what came: serve asks it (a head not whole)
_DONE: Final = h1._Sentinel("DONE")  # an exchange finished: serve goes on as after one of its own
_DRAIN: Final = h1._Sentinel("DRAIN")  # ... and its response waits in the write buffer: drain first
_END: Final = h1._Sentinel("END")  # the lane ended the connection (the client left, a failure)


@dataclass(slots=True)
class _Sent:
    """An exchange the lane began and hands back after its request went out."""

    req: h1.Request  # as parsed (its target normalized inbound)
    info: RequestInfo
    span: RequestSpan
    result: RequestResult
    up: Upstream
    head: h1.Request
    whole: bytes  # the request's body, all of it (b"": none)
    clock: _Clock | None
    unsent: bytes | None = None  # the request's body, when it could not be sent (``_forward`` sends it)

    def body(self) -> _Body:
        """The body as ``_forward`` keeps one for a retry (made only for an exchange handed back)."""
        body = _Body(True)
        if self.whole:
            body.keep(self.whole)
        return body


class Choice(Protocol):
    """What a router chose without a wait for a request it could not route at once (the
    balancer's endpoint, to connect to): given back to its ``route``, or cancelled."""

    def cancel(self) -> None: ...


@dataclass(slots=True)
class _Handed:
    req: h1.Request
    whole: bytes | None = None  # its body, taken whole from the parser (b"": none)
    sent: _Sent | None = None
    chosen: Choice | None = None  # for ``route`` (``route_now``'s choice, not made again)


class _Lane:
    """One downstream connection's plain exchanges in callbacks (above)."""

    __slots__ = (
        "busy",
        "conn",
        "ctx",
        "down",
        "inbound",
        "last",
        "route_now",
        "router",
        "sent",
        "served",
        "timer",
    )

    def __init__(self, conn: h1.Connection, down: Pipe, router: Router, ctx: Context) -> None:
        self.conn = conn
        self.down = down
        self.router = router
        self.route_now: Callable[[h1.Request, str, str], Upstream | Choice | None] = router.route_now  # type: ignore[attr-defined]
        self.ctx = ctx
        self.inbound = ctx.direction == "inbound"
        self.busy = False  # an exchange in flight (``sent``)
        self.sent: _Sent | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.served = 0  # exchanges finished here (serve's idle timeout counts them)
        # The last request target as received, as normalized (inbound) and as the policy's path
        self.last: tuple[bytes, bytes, str] | None = None

    def on_request(self, data: bytes) -> None:
        """The downstream's bytes at a message boundary, while ``serve`` waits for a request."""
        down = self.down
        down.on_data = None  # (what comes during the exchange is buffered: pipelined, a FIN)
        try:
            self._request(data)
        except Exception:  # (a defect: the connection ends, nothing left half done)
            self._failed()

    def _failed(self) -> None:
        log.exception("HTTP/1.1 exchange failed", extra=self.ctx.log_extra)
        self.abandon()
        self.down.abort()
        self.down.hand_back(_END)

    def _request(self, data: bytes) -> None:
        conn, down, ctx = self.conn, self.down, self.ctx
        conn.receive_data(data)
        message = conn.whole_message()
        if message is None:  # (a head not whole, a body still coming, an error: serve asks)
            down.hand_back(_PARSE)
            return
        req, whole = message
        assert type(req) is h1.Request
        if (
            req.http_version != b"1.1"
            or req.expect_continue
            or req.upgrade
            or conn.must_close
            or ctx.draining()
            or down.ended
        ):
            down.hand_back(_Handed(req, whole))
            return
        method = req.method.decode("latin-1")
        target = req.target
        last = self.last
        if last is not None and last[0] == target:  # (a keep-alive client's same target again)
            target, path = last[1], last[2]
        else:
            received = target
            if self.inbound:
                try:
                    target = normalize_target(target)
                except BadPath:
                    down.hand_back(_Handed(req, whole))
                    return
            path = request_path(target)
            self.last = (received, target, path)
        up = self.route_now(req, method, path)
        if type(up) is not Upstream:  # (an answer of the sidecar's own, a connection to make: serve's)
            down.hand_back(_Handed(req, whole, chosen=up))  # type: ignore[arg-type]
            return
        try:
            self._send(req, method, path, target, whole, up)
        except BaseException:
            if self.sent is None:  # (not yet the lane's to give up)
                self.router.release(up, False, None)
            raise

    def _send(
        self, req: h1.Request, method: str, path: str, target: bytes, whole: bytes, up: Upstream
    ) -> None:
        ctx, down = self.ctx, self.down
        req.target = target
        raw = req.headers
        info = _request_info(req, method, path, ctx)
        span = ctx.observer.start(info)
        # (status, grpc_status, decision, reason, policy, retries, endpoint, destination: by position)
        result = RequestResult(None, None, "allow", up.reason, up.policy, 0, up.endpoint, up.destination)
        try:
            timeout = self.router.begin(info)
            clock = (
                None if timeout is None else _Clock(timeout, time.monotonic() + timeout, True)
            )  # (started)
            head = _request_head(req, raw, span, ctx)
        except BaseException:
            span.finish(result)
            raise
        self.sent = sent = _Sent(req, info, span, result, up, head, whole, clock)
        self.busy = True
        down.on_end = self.give_back  # (the client left: as _forward sees it)
        pipe = up.pipe
        pipe.on_end = self.give_back
        try:
            pipe.write_now(up.conn.send_whole(head, whole))
        except PipeClosed:
            self.give_back()  # (the connection closed under it: _forward's retry)
            return
        except h1.LocalProtocolError:
            sent.unsent = whole  # (not sent: _forward sends it, and fails it as its own)
            self.give_back()
            return
        pipe.on_data = self.on_response
        if clock is not None:
            self.timer = down.call_later(clock.timeout, self.give_back)

    def on_response(self, data: bytes) -> None:
        """The upstream's bytes, while the lane's request waits for its response."""
        try:
            self._response(data)
        except Exception:
            self._failed()

    def _response(self, data: bytes) -> None:
        sent = self.sent
        assert sent is not None
        up = sent.up
        uc = up.conn
        uc.receive_data(data)
        # (A status the route may retry is _relay_response's to decide; so are 1xx, a response not
        # whole, a parse error, and any response while draining: it says Connection: close.)
        message = None if self.ctx.draining() else uc.whole_message(RETRY_STATUSES)
        if message is None:
            if uc.nothing_yet:
                return  # (the head is not whole yet)
            self.give_back()
            return
        event, rest = message
        assert type(event) is h1.Response
        conn, down, result = self.conn, self.down, sent.result
        result.status = status = event.status_code
        if up.at_head is not None:
            up.at_head()
        try:
            down.write_now(conn.send_whole(_without_hop(event) if event.hop else event, rest))
        except (PipeClosed, h1.LocalProtocolError) as exc:
            self._settle()
            result.error = f"downstream: {exc}"
            self.router.release(up, False, None)
            sent.span.finish(result)
            down.abort()
            down.hand_back(_END)
            return
        self._settle()
        result.response_bytes = len(rest)
        result.request_bytes = len(sent.whole)
        _put_back(self.router, up, status < 500)
        sent.span.finish(result)
        self.served += 1
        if down.backpressured:  # (a client that does not read: its next request waits)
            down.hand_back(_DRAIN)
        elif conn.at_rest and not down.has_input and not self.ctx.draining() and conn.next_cycle():
            down.on_data = self.on_request  # the next request, here too
        else:  # (closing, pipelined, a head begun: serve's, with its head timeout)
            down.hand_back(_DONE)

    def _settle(self) -> None:
        """The exchange leaves the lane: its callbacks and timer are let go."""
        sent = self.sent
        self.sent = None
        self.busy = False
        self.down.on_end = None
        if sent is not None:
            sent.up.pipe.on_data = None
            sent.up.pipe.on_end = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def give_back(self) -> None:
        """The exchange goes on in ``serve`` (``_forward`` after its send)."""
        sent = self.sent
        if sent is None:
            return
        self._settle()
        self.down.hand_back(_Handed(sent.req, sent=sent))

    def abandon(self) -> None:
        """``serve`` ends (cancelled) with an exchange here, or handed back and not taken yet:
        given up, as ``_forward`` gives one up."""
        sent = self.sent
        if sent is not None:
            self._settle()
        else:
            handed = self.down.take_handed()
            if not isinstance(handed, _Handed):
                return
            if handed.chosen is not None:
                handed.chosen.cancel()
            sent = handed.sent
            if sent is None:
                return
        self.router.release(sent.up, False, None)
        sent.span.finish(sent.result)
