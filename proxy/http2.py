"""HTTP/2 (prior knowledge, as gRPC speaks it), terminated on both sides of the mesh: every stream
is routed on its own by a :class:`StreamRouter`.

- Inbound (``proxy.routers.serve_h2``): each stream is authorized; allowed streams are forwarded
  to the app over HTTP/2, denied ones answered by the sidecar (gRPC: a trailers-only response with
  ``grpc-status: 7``; otherwise 403), with the reason in ``sidemesh-denied-reason``.
- Outbound (``proxy.h2route``): each stream gets an endpoint from the balancer, and rides an
  HTTP/2 connection to that endpoint's sidecar (inside `sidemesh/1` mTLS) shared by the streams of
  the app's connection that go there; the Service's timeout bounds the wait for the response head
  (then: ``grpc-status: 4`` or 504). A stream the endpoint did not process (refused, or its
  connection failed) may be sent again elsewhere, and so may one whose connection broke or whose
  response head is 502-504 or a trailers-only ``grpc-status: 14`` (UNAVAILABLE), as
  ``proxy.retry`` says, when its request went up whole and its body (at most ``MAX_REPLAY_BODY``)
  was kept: that head is dropped, and the app gets the last attempt's response.

Every connection is an h2 state machine (no I/O); this module moves events between them. Upstream
connections are keyed by where they go (the app; an endpoint); a key gets another connection when
the peer's ``MAX_CONCURRENT_STREAMS`` is reached, and the loss of one fails only its streams.
Flow control is end to end: DATA received on one side is acknowledged (its window reopened) only
once it has been handed to the other side's connection, so a slow reader slows its sender instead
of filling the proxy's memory (a stream waiting for its upstream connection holds at most its own
window). Each connection's own window is ``CONNECTION_WINDOW``, larger than a stream's, so that
streams whose readers are slow do not hold up the others on their connection (RFC 9113 5.2). Request
and response trailers, resets and informational responses are passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import h2.utilities
import hpack
import hpack.table
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame

from proxy.headers import DENIED_REASON, BadPath, field_value, normalize_target, trailer_fields, with_identity
from proxy.observe import TRACE_HEADERS, RequestInfo, RequestResult, RequestSpan
from proxy.pipe import Pipe, PipeClosed, linger_close
from proxy.pool import Pool
from proxy.retry import GRPC_RETRY_STATUSES, IDEMPOTENT, MAX_REPLAY_BODY, RETRY_STATUSES, Failure, backoff
from sidemesh.hpack_log import quiet_hpack

log = logging.getLogger("sidemesh.proxy.http2")
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
DRAIN_CHECK = 1.0  # how often an idle connection looks whether the sidecar is draining
# A draining sidecar's graceful GOAWAY (RFC 9113 6.8): a first GOAWAY naming the highest stream id,
# then, once the client answered a PING (or after DRAIN_PING_WAIT), the real one.
DRAIN_PING = b"sm-drain"
DRAIN_PING_WAIT = 1.0
MAX_STREAM_ID = 2**31 - 1
# A client whose socket takes nothing for this long, with frames waiting for it, is reset (as a
# closing connection's flush is cut, ``relay.FLUSH_STALL_S``).
CLIENT_STALL_S = 60.0
# Streams sent on a new connection before the peer's SETTINGS say how many it takes: one, as gRPC
# clients send none (an app server limited below what was sent reset the rest, ENHANCE_YOUR_CALM,
# and the callers saw RESOURCE_EXHAUSTED); the others wait for the SETTINGS (``_Up.settled_or_gone``).
UNSETTLED_MAX_STREAMS = 1
APP_MAX_STREAMS = 2**31 - 1  # what the app's connections may open at once (Envoy's default)
CONNECT_ROUNDS = 3  # connections without room a stream waits for before it counts as not connected
# A connection's receive window (a stream's stays h2's 65,535): data waiting for a slow reader holds
# at most its stream's window of it, so it takes 16 such streams to stop the others on the
# connection (with the connection's window at a stream's, one did); and at most this much is
# buffered per connection.
CONNECTION_WINDOW = 1 << 20
# What may be written to an upstream connection whose socket is backed up (its DATA waits in the
# streams' queues, but HEADERS, RST_STREAM and WINDOW_UPDATE go on): past this the peer is taken
# for stuck and the connection is reset (its streams fail, or go elsewhere when they may), so the
# buffer stays bounded without the reader of the app's connection waiting for it (streams opened
# and cancelled toward an endpoint that stopped reading grew the buffer without bound; a reader
# waiting for such a socket stopped reading, saw no close from the app, and waited for good).
MAX_WRITTEN_BACKED_UP = 1 << 20
Header = tuple[bytes, bytes]
Item = tuple[bytes | list[Header] | None, int]  # (data | trailers | end, flow-controlled length)
_REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM
PREMATURE_RESET_MIN_STREAMS = 500  # streams before the rapid-reset rule applies (Envoy's default)
# Frame floods (the CVE-2019-95xx family): DATA frames with nothing in them and no end of stream
# in a row (Envoy allows 1; a few here), and PRIORITY or SETTINGS frames beyond 100 per stream the
# client opened (Envoy's max_inbound_priority_frames_per_stream). Either: GOAWAY ENHANCE_YOUR_CALM,
# as Envoy and nghttp2 answer. PINGs are not counted (grpc-go's bandwidth estimator sends one per
# DATA frame it receives: a rate rule cut off normal streaming clients); their acks, like every
# frame h2 answers by itself, wait for the client to read (Envoy bounds its queued acks).
# WINDOW_UPDATE frames beyond 5 + 2 x (streams opened + 10 x DATA frames sent to the client)
# (Envoy's max_inbound_window_update_frames_per_data_frame_sent): each one walks the streams.
MAX_EMPTY_DATA_FRAMES = 10
CONTROL_FRAMES_BASE = 100
CONTROL_FRAMES_PER_STREAM = 100
WINDOW_UPDATES_BASE = 5
WINDOW_UPDATES_PER_DATA_FRAME = 10
CLIENT_RESET = "reset by the client"
CLIENT_CLOSED = "connection closed"  # the caller's connection ended with the stream open
PREMATURE_RESET_S = 1.0  # a reset this soon after the stream opened is premature (Envoy's default)


@dataclass(slots=True)
class Denial:
    """An answer the sidecar gives itself instead of forwarding a stream."""

    status: int  # HTTP status for a non-gRPC request
    reason: str
    policy: str | None = None
    grpc_status: int = GRPC_PERMISSION_DENIED
    decision: Literal["allow", "deny", "refused"] = "deny"
    error: str | None = None  # for the span and the access log (e.g. "no endpoints")
    told: str | None = None  # what the caller is told, when not the reason (logs and spans keep it)


ConnectApp = Callable[[], Awaitable[Pipe]]


@dataclass(slots=True)
class Target:
    """Where one attempt of a stream goes: a connection of the ones keyed ``key`` (``connect``
    makes one when none has room), and what the span and the access log say about it."""

    key: object
    connect: ConnectApp
    reason: str = ""  # why the stream was allowed
    policy: str | None = None
    audit: bool = False  # allowed, but an audit-mode policy would refuse it (inbound)
    endpoint: str | None = None  # "ip:port" (outbound)
    destination: str | None = None  # the endpoint's SPIFFE ID (outbound)
    unreachable: str = "app not reachable"  # the answer when no connection can be made
    ticket: object = None  # the router's own (the outbound side's balancer lease)
    refused: bool = False  # no connection could be made (set when the attempt failed so)


class StreamRouter(Protocol):
    direction: Literal["inbound", "outbound"]
    source: str | None  # the caller's SPIFFE ID, for RequestInfo
    service: str | None  # outbound: the destination service
    retries: bool  # whether request bodies are kept (up to MAX_REPLAY_BODY) for a retry

    def begin(self, info: RequestInfo) -> float | None:
        """Once per stream: the seconds it may wait for its response head (retries included)."""
        ...

    def route(self, info: RequestInfo, tried: list[Target]) -> Denial | Target:
        """Where the stream goes (``tried``: the targets of its earlier attempts), or its answer."""
        ...

    def report(self, target: Target, ok: bool, latency: float | None = None) -> None:
        """The attempt's outcome (``ok``: no 5xx, no failing gRPC status), once; ``latency``: the
        time to its response head (default: until now)."""
        ...

    def release(self, target: Target, ok: bool) -> None:
        """The attempt is over (reports too, if that was not done)."""
        ...

    def abandon(self, target: Target, observe: bool) -> None:
        """The caller gave up on the attempt, unanswered: neither a failure nor a success."""
        ...

    def may_retry(
        self,
        method: str,
        failure: Failure | None,
        attempt: int,
        status: int | None = None,
        grpc_status: int | None = None,
    ) -> bool:
        """Whether attempt ``attempt`` (0: the first) may be sent again (and takes the retry from
        the budget): it ended with ``failure`` before its response head, or (``failure`` None) with
        a response head of ``status`` (``grpc_status``: a trailers-only gRPC response's)."""
        ...


# (reason, policy, audit) when allowed: audit, an audit-mode policy would have refused it
Authorize = Callable[[str, str], Denial | tuple[str, str | None, bool]]


class _AppRouter:
    """The inbound side: each stream authorized; allowed ones share the connection(s) to the app."""

    direction: Literal["inbound", "outbound"] = "inbound"
    service: str | None = None
    retries: bool = False

    def __init__(self, authorize: Authorize, connect_app: ConnectApp, source: str | None) -> None:
        self.authorize = authorize
        self.connect_app = connect_app
        self.source = source

    def begin(self, info: RequestInfo) -> float | None:
        return None  # timeouts and retries are the caller's side's (outbound)

    def route(self, info: RequestInfo, tried: list[Target]) -> Denial | Target:
        verdict = self.authorize(info.method, info.path)
        if isinstance(verdict, Denial):
            return verdict
        return Target("app", self.connect_app, verdict[0], verdict[1], verdict[2])  # (by position: cheaper)

    def report(self, target: Target, ok: bool, latency: float | None = None) -> None:
        pass

    def release(self, target: Target, ok: bool) -> None:
        pass

    def abandon(self, target: Target, observe: bool) -> None:
        pass

    def may_retry(
        self,
        method: str,
        failure: Failure | None,
        attempt: int,
        status: int | None = None,
        grpc_status: int | None = None,
    ) -> bool:
        return False


@dataclass(slots=True)
class _Stream:
    down_id: int
    info: RequestInfo
    span: RequestSpan
    result: RequestResult
    grpc: bool
    head: list[Header]  # the request head as forwarded (trace headers replaced)
    up: _Up | None = None
    up_id: int | None = None
    target: Target | None = None
    request_ended: bool = False  # the request's end (END_STREAM or trailers) came from downstream
    responded: bool = False  # a final response head came from upstream
    no_content: bool = False  # that head may have no content (204, 304, or to a HEAD)
    # content-length, per direction, held to the body (``result``'s byte counts) as it comes (h2
    # checked it per connection)
    request_expected: int | None = None
    response_expected: int | None = None
    ended_up: bool = False  # the request's end went upstream
    end_queued_down: bool = False  # the response's end is queued or sent
    # per direction: queued (data | trailers | end) not yet sent for lack of window
    to_up: deque[Item] = field(default_factory=deque)
    to_down: deque[Item] = field(default_factory=deque)
    replay: list[bytes] | None = None  # the request body kept for a retry; None: not replayable
    replay_size: int = 0
    trailers: list[Header] | None = None
    attempt: int = 0
    tried: list[Target] = field(default_factory=list)
    deadline: float | None = None
    timeout: float | None = None  # the Service's, armed (``timer``) once the request has ended
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None  # connecting, or waiting to retry
    opened: float = field(default_factory=time.monotonic)
    target_since: float = 0.0  # when the current attempt began
    head_s: float | None = None  # its time to the response head (the balancer's latency)


def _content_length(headers: list[Header]) -> int | None:
    """The content-length of a head (checked before: digits, one value), None without one."""
    if b"content-length" not in map(_NAME, headers):  # (most heads, gRPC's all: looked through in C)
        return None
    return next(int(v) for n, v in headers if n == b"content-length")


def _against_length(expected: int | None, received: int, ended: bool) -> str | None:
    """Why a body of ``received`` bytes so far (all of it when ``ended``) disagrees with its
    content-length (RFC 9113 8.1.1: malformed), or None."""
    if expected is None or received == expected or (received < expected and not ended):
        return None
    return f"{received} bytes of content, content-length {expected}"


# A header list over the limit the sidecar advertises (SETTINGS_MAX_HEADER_LIST_SIZE, 64 KiB) fails
# its own stream; hpack decodes up to this much more so that its table stays in step with the
# peer's (past it, the connection: an HPACK bomb). Such a list is marked by this field at its end.
HEADER_LIST_HARD = 256 * 1024
OVERSIZED = (b":sidemesh-oversized", b"")
# The largest entry of hpack's static table (accept-encoding: gzip, deflate), as a table entry:
# a one-byte index of it makes 60 bytes of list whatever the dynamic table's size (even 0).
_STATIC_MOST = 32 + max(len(n) + len(v) for n, v in hpack.table.HeaderTable.STATIC_TABLE)
# Header blocks remembered per connection and direction (then forgotten, all): blocks of at most
# BLOCK_FIELDS fields, BLOCK_BYTES long, and of fields of BLOCK_CACHE_BYTES in all (RFC 7541 4.1:
# 32 a field more): about 20 KB of Python objects a connection at most (a peer's blocks of 124
# small literals each held about 150 KB: a review). The encoder keeps only blocks of one-byte
# table indexes (it indexes what it sends: a repeated list encodes to those).
BLOCK_CACHE = 8
BLOCK_FIELDS = 24
BLOCK_BYTES = 512
BLOCK_CACHE_BYTES = 4096


class _CountingTable(hpack.table.HeaderTable):
    """hpack's table, counting its changes (``generation``): an entry added, or its size set. A
    header block that left the count as it was decodes (or encodes) the same way again as long as
    the count has not moved since, which the block caches of :class:`_Decoder` and
    :class:`_Encoder` rely on."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        hpack.table.HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class _Decoder(hpack.Decoder):
    """hpack's decoder, refusing a header block longer than the decoded list it may make: only
    padding makes one (any number of dynamic table size updates first, which count for nothing
    in the decoded size; RFC 7541 4.2 allows two). A 1 MiB block of them cost a second of the
    sidecar's event loop per request (hpack decodes them a byte at a time), before any policy.

    A block that only reads the table (indexed fields, literals without indexing) decodes to
    the same fields while the table is unchanged: the fields of the last ``BLOCK_CACHE`` such
    (small) blocks are kept, by their bytes, until the table changes. A client's calls repeat
    theirs (a gRPC method's call heads, its responses and trailers: once in the table, each is a
    few bytes of indexes); hpack decoded each again a byte at a time, about a sixth of the
    Python a gRPC call costs a sidecar.

    Past the limit h2 advertises, a list is marked ``OVERSIZED`` (its stream fails) up to
    ``HEADER_LIST_HARD``, where hpack refuses it (the connection fails)."""

    def __init__(self) -> None:
        self.advertised = hpack.hpack.DEFAULT_MAX_HEADER_LIST_SIZE
        super().__init__()
        self.header_table: _CountingTable = _CountingTable()
        self._blocks: dict[tuple[bytes, bool], tuple[list[Any], int]] = {}
        self._generation = 0  # the table's, when the blocks kept were decoded

    # hpack decodes up to this; h2 sets it to the limit it advertises (``advertised``), over which a
    # list is marked OVERSIZED instead of failing the connection (RFC 9113 8.1.1: a stream error).
    @property
    def max_header_list_size(self) -> int:
        return max(HEADER_LIST_HARD, self.advertised)

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        self.advertised = value

    def decode(self, data: bytes, raw: bool = False) -> Any:
        table = self.header_table
        if table.generation != self._generation:
            self._blocks.clear()
            self._generation = table.generation
        kept = self._blocks.get((data, raw))
        if kept is not None:
            headers, inflated = kept
            self._assert_valid_table_size()
            return [*headers, OVERSIZED] if inflated > self.advertised else headers.copy()
        headers = self._decode(data, raw)
        # (at most each field an entry of the table, or its bytes here, Huffman-coded: 8/5)
        if len(headers) * (max(table.maxsize, _STATIC_MOST) + 32) + 2 * len(data) <= self.advertised:
            inflated = -1  # (not over, surely: not summed)
        else:
            inflated = sum(hpack.table.table_entry_size(n, v) for n, v in headers)
            if inflated > self.advertised:
                headers.append(OVERSIZED)
                return headers
        if table.generation == self._generation and len(data) <= BLOCK_BYTES and len(headers) <= BLOCK_FIELDS:
            if inflated < 0:
                inflated = sum(hpack.table.table_entry_size(n, v) for n, v in headers)
            if inflated <= BLOCK_CACHE_BYTES:
                if len(self._blocks) >= BLOCK_CACHE:
                    self._blocks.clear()
                self._blocks[(data, raw)] = (headers, inflated)
                return headers.copy()
        return headers

    def _decode(self, data: bytes, raw: bool) -> Any:
        if len(data) > self.max_header_list_size:
            raise hpack.OversizedHeaderListError(
                f"a header block of {len(data)} bytes (at most {self.max_header_list_size})"
            )
        at, updates = 0, 0
        while at < len(data) and data[at] & 0xE0 == 0x20:  # 001xxxxx: a dynamic table size update
            updates += 1
            if updates > 2:
                raise hpack.HPACKDecodingError("more than two dynamic table size updates (RFC 7541 4.2)")
            if data[at] & 0x1F == 0x1F:  # (its integer goes on in the next bytes)
                at += 1
                while at < len(data) and data[at] & 0x80:
                    at += 1
            at += 1
        return super().decode(data, raw)


class _IndexedTable(_CountingTable):
    """hpack's encoder table, found by dictionaries instead of a walk through the dynamic table:
    hpack looks every field it sends up by comparing it with each dynamic entry in turn (a
    gRPC call's dozen fields against a table of dozens of entries, in both sidecars and on both of
    their connections: about 4% of a call's Python). The same answers (tested against hpack's
    own search): a static exact match first, then the newest dynamic exact match, then the
    static name, then the newest dynamic entry of that name. Each entry keeps the number it was
    added as; its index is how many were added after it. An entry no longer in the table (evicted
    from the old end, or cleared) is seen to be beyond its end."""

    _OFFSET = hpack.table.HeaderTable.STATIC_TABLE_LENGTH + 1

    def __init__(self) -> None:
        super().__init__()
        self._added = 0  # entries ever added: the newest is number ``_added``
        self._exact: dict[tuple[bytes, bytes], int] = {}
        self._names: dict[bytes, int] = {}

    def add(self, name: bytes, value: bytes) -> None:
        if hpack.table.table_entry_size(name, value) > self._maxsize:  # (hpack empties the table)
            self._forget()
        else:  # (numbered first: what ``_shrink`` then evicts are older ones, never this one)
            self._added += 1
            self._exact[(name, value)] = self._names[name] = self._added
        super().add(name, value)

    def _shrink(self) -> None:
        entries = self.dynamic_entries
        size = self._current_size
        while size > self._maxsize:
            number = self._added + 1 - len(entries)  # the oldest's
            name, value = entries.pop()
            size -= hpack.table.table_entry_size(name, value)
            if self._exact.get((name, value)) == number:
                del self._exact[(name, value)]
            if self._names.get(name) == number:
                del self._names[name]
        self._current_size = size

    def _forget(self) -> None:
        self._exact.clear()
        self._names.clear()

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        _CountingTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]
        if not self.dynamic_entries:
            self._forget()

    def search(self, name: bytes, value: bytes) -> tuple[int, bytes, bytes | None] | None:
        static = self.STATIC_TABLE_MAPPING.get(name)
        if static is not None:
            index = static[1].get(value)
            if index is not None:
                return index, name, value
        held = len(self.dynamic_entries)
        number = self._exact.get((name, value))
        if number is not None and (at := self._added - number) < held:
            return at + self._OFFSET, name, value
        if static is not None:
            return static[0], name, None
        number = self._names.get(name)
        if number is not None and (at := self._added - number) < held:
            return at + self._OFFSET, name, None
        return None


class _Encoder(hpack.Encoder):
    """hpack's encoder on an :class:`_IndexedTable`, remembering the blocks of the last
    ``BLOCK_CACHE`` field lists that encoded to table indexes only (every field already in the
    table), until the table changes: the same list encodes to the same block again (a gRPC
    method's call heads, responses and trailers)."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table: _IndexedTable = _IndexedTable()
        self._blocks: dict[tuple[object, ...], bytes] = {}
        self._generation = 0

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        table = self.header_table
        if table.generation != self._generation:
            self._blocks.clear()
            self._generation = table.generation
        if table.resized or not isinstance(headers, list):  # (a size update goes first)
            return super().encode(headers, huffman)
        # The fields and whether each may be indexed (a never-indexed field encodes otherwise).
        key = (huffman, *headers, *map(type, headers))
        block = self._blocks.get(key)
        if block is not None:
            return block
        block = super().encode(headers, huffman)
        if (
            table.generation == self._generation
            and len(block) <= BLOCK_FIELDS
            and min(block, default=0) >= 0x80  # (one-byte indexes only)
            and sum(32 + len(h[0]) + len(h[1]) for h in headers) <= BLOCK_CACHE_BYTES
        ):
            if len(self._blocks) >= BLOCK_CACHE:
                self._blocks.clear()
            self._blocks[key] = block
        return block


# A frame's head (RFC 9113 4.1): length (24 bits: 16 + 8), type, flags, stream identifier.
_FRAME_HEAD = struct.Struct(">HBBBL")
_END_STREAM, _END_HEADERS = 0x1, 0x4


def _out(kind: int, flags: int, stream_id: int, body: bytes | memoryview) -> bytes:
    """A frame to send, made here as its bytes (``_Connection._prepare_for_sending`` takes them
    as they are): hyperframe's frame objects cost about as much to make and serialize as the
    rest of sending a head or a message."""
    length = len(body)
    return _FRAME_HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + body


def _informational(headers: list[Header]) -> bool:
    """Whether a response head is a 1xx: h2's test, for a head that is well-formed (its one
    pseudo-header first) as the proxy's own and the ones it passes on are (checked, ``_malformed``),
    in one look at the first field (h2 looked through every pseudo-header for it)."""
    return bool(headers) and headers[0][0] == b":status" and headers[0][1][:1] == b"1"


_IN_FLAGS = {  # (received DATA and HEADERS frames' flags: never changed after parsing)
    flags: frozenset(
        name for bit, name in ((_END_STREAM, "END_STREAM"), (_END_HEADERS, "END_HEADERS")) if flags & bit
    )
    for flags in (0, _END_STREAM, _END_HEADERS, _END_STREAM | _END_HEADERS)
}


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, except that a DATA or a HEADERS frame with no padding, no priority and
    (HEADERS) its whole head, the frames a call is made of, is parsed here: hyperframe's parsing
    of one (a frame object, its flags object, each of its parts' constructors) cost more than
    the rest of h2's handling of it. The frame is hyperframe's class, its fields set as
    hyperframe sets them (its flags a frozen set: nothing changes them after parsing). Any
    other frame, one still incomplete, one too long, on stream 0 or in the middle of a head
    split in CONTINUATION frames, goes to h2's parsing (and its errors)."""

    def __next__(self) -> Any:
        data = self._data
        if not data:
            raise StopIteration  # (h2's, once per receive: all was parsed)
        if len(data) >= 9 and not self._headers_buffer:
            high, low, kind, flags, sid = _FRAME_HEAD.unpack_from(data)
            length = (high << 8) | low
            end = 9 + length
            sid &= 0x7FFFFFFF
            if (
                kind <= 0x1
                and not flags & 0x28  # (PADDED, PRIORITY)
                and sid
                and len(data) >= end
                and length <= self.max_frame_size
                and (kind == 0x0 or flags & _END_HEADERS)
            ):
                frame: Any = _new(DataFrame if kind == 0x0 else HeadersFrame)
                frame.stream_id = sid
                frame.flags = _IN_FLAGS[flags & (_END_STREAM if kind == 0x0 else _END_STREAM | _END_HEADERS)]
                frame.body_len = length
                frame.pad_length = 0
                if kind == 0x1:
                    frame.depends_on = frame.stream_weight = 0
                    frame.exclusive = False
                frame.data = bytes(data[9:end])
                del data[:end]
                return frame
        return super().__next__()


_new = object.__new__


# h2's state machines' transitions, keyed by their values: h2 keys them by its enums, whose
# hash is a Python function for every input (and the connection's state), two calls per frame
# or head sent or received (about 3% of the Python of a gRPC call in each sidecar).
_STREAM_MOVES = {(int(state), put._value_): move for (state, put), move in h2.stream._transitions.items()}
_CONNECTION_MOVES = {
    (state._value_, put._value_): target
    for (state, put), (call, target) in h2.connection.H2ConnectionStateMachine._transitions.items()
    if call is None  # (h2 has none; one would go through h2's own)
}


class _StreamMachine(h2.stream.H2StreamStateMachine):
    """h2's stream state machine, its transitions looked up by values (``_STREAM_MOVES``); an
    input with none (h2's error) is h2's."""

    def process_input(self, input_: Any) -> Any:
        move = _STREAM_MOVES.get((self.state, input_._value_))
        if move is None:
            return super().process_input(input_)
        call, target = move
        previous = self.state
        self.state = target
        if call is None:
            return []
        try:
            return call(self, previous)
        except h2.exceptions.ProtocolError:
            self.state = h2.stream.StreamState.CLOSED
            raise
        except AssertionError as err:
            self.state = h2.stream.StreamState.CLOSED
            raise h2.exceptions.ProtocolError(err) from err


class _ConnectionMachine(h2.connection.H2ConnectionStateMachine):
    """h2's connection state machine, as ``_StreamMachine``."""

    def process_input(self, input_: Any) -> Any:
        target = _CONNECTION_MOVES.get((self.state._value_, input_._value_))
        if target is None:
            return super().process_input(input_)
        self.state = target
        return []


class _H2Stream(h2.stream.H2Stream):
    """h2's stream, less work that this configuration of h2 left idle on every header block
    (about a tenth of the Python a gRPC call cost each sidecar):

    - Content-length is not checked against the body: h2 did so per connection (one request or
      response whose body disagreed with its content-length ended every stream on the
      connection; RFC 9113 8.1.1 makes it a stream error). ``H2Proxy`` checks it per stream
      (``_Stream.expected``/``received``). So the request's method, which h2 kept for that
      check (HEAD), is not looked for either.
    - A head sent is not copied to make its names and values bytes (they are: ``Header``), and
      no validation flags are made for the validation and normalization that are off
      (``_Side``).
    - A head received gets validation flags only for joining its cookie fields (RFC 9113
      8.2.3), and only when it has one; fields are kept as hpack decoded them otherwise
      (h2 copied the list).
    - Whether a head is a 1xx response is asked only of a response (h2 asked of every head:
      a request whose first pseudo-header was :status 1xx failed the whole connection; as any
      malformed request it now fails its stream, ``_malformed_request``), by its first field.
    - Frames sent are made as bytes (``_out``), not as hyperframe's objects: h2's connection
      only serializes them (``_Connection`` sends no priority, which h2 would add to the frame).
    - Heads are lists (``Header``), as everywhere in the proxy (h2 took any iterable)."""

    def _initialize_content_length(self, headers: Any) -> None:
        pass

    def send_headers(self, headers: Any, encoder: Any, end_stream: bool = False) -> list[Any]:
        machine = self.state_machine
        input_ = h2.stream.StreamInputs.SEND_HEADERS
        if not machine.client and _informational(headers):
            if end_stream:
                raise h2.exceptions.ProtocolError("Cannot set END_STREAM on informational responses.")
            input_ = h2.stream.StreamInputs.SEND_INFORMATIONAL_HEADERS
        machine.process_input(input_)  # (before encoding: that changes the compression context)
        block = encoder.encode(headers)
        if end_stream:
            machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
        elif machine.trailers_sent:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        if machine.client and self._authority is None:
            self._authority = h2.utilities.authority_from_headers(headers)
        sid = self.stream_id
        ends = _END_STREAM if end_stream else 0
        size = self.max_outbound_frame_size or len(block) or 1
        if len(block) <= size:
            return [_out(0x1, ends | _END_HEADERS, sid, block)]  # HEADERS
        frames = [_out(0x1, ends, sid, block[:size])]
        for at in range(size, len(block), size):  # CONTINUATION frames, the last ending the head
            frames.append(
                _out(0x9, 0 if at + size < len(block) else _END_HEADERS, sid, block[at : at + size])
            )
        return frames

    def send_data(self, data: Any, end_stream: bool = False, pad_length: Any = None) -> list[Any]:
        if pad_length is not None:
            return super().send_data(data, end_stream, pad_length)
        machine = self.state_machine
        machine.process_input(h2.stream.StreamInputs.SEND_DATA)
        if end_stream:
            machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
        self.outbound_flow_control_window -= len(data)
        return [_out(0x0, _END_STREAM if end_stream else 0, self.stream_id, data)]  # DATA

    def receive_headers(
        self, headers: Any, end_stream: bool, header_encoding: Any
    ) -> tuple[list[Any], list[Any]]:
        machine = self.state_machine
        if machine.client and _informational(headers):  # (a response: the stream is ours)
            if end_stream:
                raise h2.exceptions.ProtocolError("Cannot set END_STREAM on informational responses")
            events = machine.process_input(h2.stream.StreamInputs.RECV_INFORMATIONAL_HEADERS)
        else:
            events = machine.process_input(h2.stream.StreamInputs.RECV_HEADERS)
        event: Any = events[0]
        if end_stream:
            ended = machine.process_input(h2.stream.StreamInputs.RECV_END_STREAM)
            event.stream_ended = ended[0]
            events += ended
        elif isinstance(event, h2.events.TrailersReceived):
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set")
        if b"cookie" in map(_NAME, headers):
            headers = self._process_received_headers(headers, self._build_hdr_validation_flags(events), None)
        event.headers = headers
        return [], events


quiet_hpack()  # (sidemesh/hpack_log.py: hpack logs every field it codes, values included)


_COUNTED_OPEN = h2.stream.STREAM_OPEN  # (by state: OPEN and the half-closed ones, RFC 9113 5.1.2)
_CLOSED = h2.stream.StreamState.CLOSED


class _Connection(h2.connection.H2Connection):
    """h2's connection, except that a graceful GOAWAY (NO_ERROR) leaves the streams already open
    to finish, as RFC 9113 section 6.8 has it ("activity on streams numbered lower than or equal to
    the last stream identifier might still complete successfully"): h2 closes the whole connection
    on any GOAWAY, refusing even the DATA still coming for those streams and dropping what was
    queued to send. The peer's GOAWAY is still reported (ConnectionTerminated); opening no new
    stream afterwards is the caller's part (``_Up.closing``). A GOAWAY with an error closes all,
    as h2 does.

    Its streams are :class:`_H2Stream` when it is configured as ``_Side`` configures it (no
    validation or normalization of its own, fields as bytes), for which that class is made;
    otherwise h2's. Heads are sent without priority (deprecated, RFC 9113 5.3.2): asked for,
    it is refused before anything changes."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.lean = not (
            config.validate_outbound_headers
            or config.normalize_outbound_headers
            or config.validate_inbound_headers
            or config.header_encoding
        )
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        self.state_machine.__class__ = _ConnectionMachine
        decoder = _Decoder()
        decoder.max_header_list_size = self.decoder.max_header_list_size
        self.decoder = decoder
        self.encoder = _Encoder()

    def _open_streams(self, remainder: int) -> int:
        """h2's count of the open streams (OPEN or half-closed) whose ID % 2 is ``remainder``,
        forgetting the closed ones as it goes, with each stream's state read once: h2 asked two
        properties of every stream (``open``, ``closed``), and asks on every new stream, sent or
        received (about 4% of a gRPC call's time in the client sidecar at 4 x 8, py-spy)."""
        count = 0
        closed = []
        for stream_id, stream in self.streams.items():
            state = stream.state_machine.state
            if _COUNTED_OPEN[state]:
                if stream_id % 2 == remainder:
                    count += 1
            elif state == _CLOSED:
                closed.append(stream_id)
        for stream_id in closed:
            self._closed_streams[stream_id] = self.streams.pop(stream_id).closed_by
        return count

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        """h2's stream, as an :class:`_H2Stream` with a :class:`_StreamMachine`."""
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        if self.lean:
            stream.__class__ = _H2Stream
        stream.state_machine.__class__ = _StreamMachine
        return stream

    def send_headers(
        self,
        stream_id: int,
        headers: Any,
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        if priority_weight is not None or priority_depends_on is not None or priority_exclusive is not None:
            raise ValueError("the sidecar's HTTP/2 connections send no priority (RFC 9113 5.3.2)")
        stream = self.streams.get(stream_id)
        if stream is None:  # (a new stream: h2's checks of the streams open, and its creation)
            return super().send_headers(stream_id, headers, end_stream)
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        self._prepare_for_sending(stream.send_headers(headers, self.encoder, end_stream))
        return None

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        """h2's, for a stream already open (a response, trailers) in fewer steps; a new stream, or
        a head with priority, is h2's."""
        stream = self.streams.get(frame.stream_id)
        if stream is None or "PRIORITY" in frame.flags:
            return super()._receive_headers_frame(frame)
        headers = h2.connection._decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
        frames, received = stream.receive_headers(
            headers, "END_STREAM" in frame.flags, self.config.header_encoding
        )
        return frames, events + received

    def send_data(self, stream_id: int, data: Any, end_stream: bool = False, pad_length: Any = None) -> None:
        """h2's, its checks made on the stream it looks up once (h2 looked it up for each)."""
        stream = self.streams.get(stream_id)
        if pad_length is not None or stream is None or not self.lean:  # (h2's errors for a stream gone)
            return super().send_data(stream_id, data, end_stream, pad_length)
        size = len(data)
        if size and (size > self.outbound_flow_control_window or size > stream.outbound_flow_control_window):
            window = min(self.outbound_flow_control_window, stream.outbound_flow_control_window)
            raise h2.exceptions.FlowControlError(f"Cannot send {size} bytes, flow control window is {window}")
        if size > self.max_outbound_frame_size:
            raise h2.exceptions.FrameTooLargeError(
                f"Cannot send frame size {size}, max frame size is {self.max_outbound_frame_size}"
            )
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
        frame: Any = stream.send_data(data, end_stream)[0]  # (``_H2Stream``'s: bytes)
        self._data_to_send += frame
        self.outbound_flow_control_window -= size

    def _prepare_for_sending(self, frames: list[Any]) -> None:
        """h2's, less a generator per call (most calls have one frame), taking the frames
        ``_H2Stream`` makes as bytes."""
        for frame in frames:
            self._data_to_send += frame if frame.__class__ is bytes else frame.serialize()

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        """h2's, less its trace line: it formatted every frame received (its repr, payload
        included) for a logger that drops it, about 2% of the Python a gRPC call costs."""
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:  # (as h2: a stream it reset gets a reset)
            if not self._stream_is_closed_by_reset(e.stream_id):
                raise
            reset = RstStreamFrame(e.stream_id)
            reset.error_code = e.error_code
            self._prepare_for_sending([reset])
            return e._events
        except h2.exceptions.StreamIDTooLowError as e:  # (a stream closed and forgotten)
            if self._stream_is_closed_by_reset(e.stream_id):
                reset = RstStreamFrame(e.stream_id)
                reset.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                return []
            if self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            raise
        self._prepare_for_sending(frames)
        return events  # type: ignore[no-any-return]

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[h2.events.Event]]:
        if frame.error_code != h2.errors.ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class _Side:
    def __init__(self, pipe: Pipe, client: bool, max_streams: int | None = None) -> None:
        # What is sent was validated (and so is already normal: lower-case names, no surrounding
        # whitespace, no connection-specific fields) when it was received on the other side, or is
        # the sidecar's own: validating or normalizing it again costs time on every stream for
        # nothing. What h2's normalizing also did, marking credentials never-indexed, `_headers`
        # does.
        # What comes in is checked per stream (`_malformed` for responses, `_malformed_request`
        # and `_malformed_trailers` for requests): h2 checks it per connection, and one malformed
        # head reset every stream on it (RFC 9113 8.1.1 makes it a stream error).
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.pipe = pipe
        self.conn = _Connection(config=config)
        # (h2 fixes 100 streams and leaves push on in its constructor; sent in the preface.) As a
        # client, push off, as gRPC clients and Envoy say it (RFC 9113 6.5.2): a server that
        # pushes sent the sidecar bodies it threw away.
        codes = h2.settings.SettingCodes
        initial = {
            codes.MAX_CONCURRENT_STREAMS: 100 if max_streams is None else max_streams,
            codes.MAX_HEADER_LIST_SIZE: self.conn.DEFAULT_MAX_HEADER_LIST_SIZE,
        }
        if client:
            initial[codes.ENABLE_PUSH] = 0
        self.conn.local_settings = h2.settings.Settings(client=client, initial_values=initial)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - self.conn.inbound_flow_control_window)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.pipe.write(data)


class _Up(_Side):
    """An upstream connection: the streams on it, by their upstream id."""

    def __init__(self, pipe: Pipe, key: object) -> None:
        super().__init__(pipe, client=True)
        self.key = key
        self.streams: dict[int, _Stream] = {}
        self.task: asyncio.Task[None] | None = None
        self.closing = False  # GOAWAY received, or the connection failed: no new streams
        self.last_stream_id: int | None = None  # from the GOAWAY: streams above were not processed
        self.limit: int | None = None  # streams open when h2 refused one more (our count drifted)
        self.settled = False  # the peer's SETTINGS (its MAX_CONCURRENT_STREAMS) arrived
        self.settled_or_gone = asyncio.Event()  # ... or the connection ended
        self.pooling = False  # its app connection is over: its reader stops, the pipe stays open
        self.reused = False  # taken from the pool
        self.heard = True  # something came from the peer since (False: nothing since it was taken)
        self.written_backed_up = 0  # bytes written while its socket was backed up (since it drained)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            if self.pipe.backpressured:
                self.written_backed_up += len(data)
            else:
                self.written_backed_up = 0
            self.pipe.write(data)

    def let_go(self) -> None:
        """Close; abort if anything waits to be sent: it is for streams that are over, and a close
        waits to send it first, for good toward a peer that stopped reading (the socket and its
        buffer were never freed)."""
        self.pipe.flush()
        transport = self.pipe.transport
        if self.pipe.backpressured or (transport is not None and transport.get_write_buffer_size()):
            self.pipe.abort()
        else:
            self.pipe.close()

    def reusable(self) -> bool:
        """Fit for the next app connection: nothing in flight or odd, nothing unread, and its
        socket not backed up (the next connection's calls would wait behind it)."""
        return (
            not self.pipe.backpressured
            and not self.streams
            and not self.closing
            and self.settled
            and self.limit is None
            and self.task is not None
            and self.pipe.usable
        )

    def release(self) -> None:
        """Dropped from the pool (``proxy.pool.Reusable``): nothing to let go of."""

    def _open(self) -> bool:
        transport = self.pipe.transport
        return not (self.closing or transport is None or transport.is_closing() or self.pipe.ended)

    def _max_streams(self) -> int:
        # (Our count, not h2's open_outbound_streams, which walks every stream: a stream leaves
        # ``streams`` when it closes or is reset. send_headers still refuses one too many.)
        limit = self.conn.remote_settings.max_concurrent_streams
        if not self.settled:
            limit = min(limit, UNSETTLED_MAX_STREAMS)
        return limit if self.limit is None else min(limit, self.limit)

    def has_room(self) -> bool:
        return self._open() and len(self.streams) < self._max_streams()

    def unusable(self) -> bool:
        """Closed, closing, or refusing streams (the peer's limit drifted): not worth waiting for."""
        return not self._open() or self.limit is not None

    def full(self) -> bool:
        """Open, but carrying all the streams it may: other streams took the room (not a failure)."""
        return self._open() and 0 < self._max_streams() <= len(self.streams)

    def try_flush(self) -> None:
        with contextlib.suppress(PipeClosed):  # its reader notices and fails its streams
            self.flush()


_CREDENTIALS = frozenset({b"authorization", b"proxy-authorization"})
_MAY_HIDE = _CREDENTIALS | {b"cookie"}  # names whose fields ``_headers`` may make never-indexed
_NAME = operator.itemgetter(0)


_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110 5.6.2 token, lower-case (RFC 9113 8.2.1)
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")  # RFC 9110 9.1 token (64: longer is no method)
# RFC 9113 8.2.1: no NUL, CR or LF in a value; in a request, no whitespace at either end either
_BAD_VALUE = re.compile(rb"[\0\r\n]")
_BAD_REQUEST_VALUE = re.compile(rb"[\0\r\n]|\A[ \t]|[ \t]\Z")
_NOT_IN_VALUES = {_BAD_VALUE: "NUL, CR or LF", _BAD_REQUEST_VALUE: "NUL, CR or LF, or whitespace at an end,"}
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# RFC 9113 8.3.1: :path is a URI's path and query (RFC 3986: no control character or space: nghttp2,
# and so Envoy, refuses them; llhttp refuses them in HTTP/1.1), and :authority has no userinfo.
_BAD_PATH = re.compile(rb"[\x00-\x20\x7f]")


VALID_KEPT = 64  # header lists remembered as well-formed (then forgotten, all)
VALID_KEPT_FIELDS = 32  # ... of at most this many fields
VALID_KEPT_BYTES = 2048  # ... and names and values of at most this many bytes in all


def _remember_valid(check: Callable[..., str | None]) -> Callable[..., str | None]:
    """``check`` (why a header list is malformed, or None: a function of the list alone), with
    the small lists it found well-formed remembered: a client's calls repeat their heads, and a
    gRPC call's checks (its request, response and trailers) were a twentieth of the Python it costs
    a sidecar."""
    valid: dict[tuple[object, ...], None] = {}

    @functools.wraps(check)
    def checked(headers: list[Header], *args: object) -> str | None:
        key = (*headers, *args)
        if key in valid:
            return None
        why = check(headers, *args)
        if (
            why is None
            and len(headers) <= VALID_KEPT_FIELDS
            and sum(len(n) + len(v) for n, v in headers) <= VALID_KEPT_BYTES
        ):
            if len(valid) >= VALID_KEPT:
                valid.clear()
            valid[key] = None
        return why

    return checked


def _bad_field(name: bytes, value: bytes, values: re.Pattern[bytes]) -> str | None:
    """Why a regular field is not valid in HTTP/2 (RFC 9113 8.2.1, 8.2.2), or None."""
    if _FIELD_NAME.fullmatch(name) is None:
        return f"field name {name.decode('latin-1')!r} is not a lower-case token"
    if name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
        return f"connection-specific field {name.decode('latin-1')}"
    if values.search(value) is not None:
        return f"field {name.decode('latin-1')} has {_NOT_IN_VALUES[values]} in its value"
    return None


def _bad_content_length(value: bytes, before: bytes | None) -> str | None:
    """Why a content-length value is malformed (RFC 9110 8.6: 1*DIGIT; several must agree)."""
    if not value.isdigit() or len(value.lstrip(b"0")) > 18:
        return f"content-length {value.decode('latin-1')!r} is not a number"
    if before is not None and int(before) != int(value):
        return "content-length values that disagree"
    return None


@_remember_valid
def _malformed_request(headers: list[Header]) -> str | None:
    """Why a request head from the client is malformed (RFC 9113 8.1.1, 8.2, 8.3.1), or None.
    h2 checked this per connection: one malformed request (a value with a space at its end, an
    upper-case name) reset every call on the client's connection; it is a stream error, answered
    400 on that stream. The checks are h2's: valid values, no connection-specific field, request
    pseudo-headers only, each once and first, :method, :scheme and a non-empty :path (not for
    CONNECT, which is refused anyway), :authority or one Host and the two alike; names must be
    lower-case tokens (RFC 9110 5.1; h2 took any visible ASCII but upper case); content-length
    digits only, several values alike (the body is held to it per stream as it comes)."""
    seen: set[bytes] = set()
    regular = False
    host: bytes | None = None
    length: bytes | None = None
    for name, value in headers:
        if name[:1] == b":":
            shown = name.decode("latin-1")
            if regular:
                return f"pseudo-header {shown} after a regular field"
            if name not in _REQUEST_PSEUDO:
                return f"pseudo-header {shown} is not a request's"
            if name in seen:
                return f"pseudo-header {shown} twice"
            seen.add(name)
            if _BAD_REQUEST_VALUE.search(value) is not None:
                return f"{shown} has {_NOT_IN_VALUES[_BAD_REQUEST_VALUE]} in its value"
            continue
        regular = True
        if (why := _bad_field(name, value, _BAD_REQUEST_VALUE)) is not None:
            return why
        if name == b"host":
            if host is not None:
                return "more than one host field"
            host = value
        elif name == b"content-length" and (why := _bad_content_length(value, length)) is not None:
            return why
        elif name == b"content-length":
            length = value
    pseudo = {n: v for n, v in headers if n in seen}
    method = pseudo.get(b":method")
    if method is None:
        return "no :method"
    if _METHOD.fullmatch(method) is None:
        return f":method {method[:64].decode('latin-1')!r} is not a method (a token of at most 64 characters)"
    if method == b"CONNECT":
        return None
    if b":protocol" in pseudo:
        return ":protocol in a request other than CONNECT"
    path = pseudo.get(b":path")
    if b":scheme" not in pseudo or not path:
        return "no :scheme or no :path"
    if _BAD_PATH.search(path) is not None:
        return ":path has a control character or a space"
    authority = pseudo.get(b":authority")
    if authority is None and host is None:
        return "no :authority and no host"
    if b"@" in (authority if authority is not None else host or b""):
        return ":authority (or host) has userinfo (user@)"
    if authority is not None and host is not None and authority != host:
        return "host differs from :authority"
    return None


@_remember_valid
def _malformed_trailers(headers: list[Header]) -> str | None:
    """Why a request's trailers are malformed (RFC 9113 8.1, 8.2.1), or None. Fields a proxy
    does not pass on in trailers (connection-specific, framing, routing) are dropped
    (`trailer_fields`), not refused."""
    for name, value in headers:
        if name == OVERSIZED[0]:
            return "a header list over the 64 KiB the sidecar takes"
        if name[:1] == b":":
            return f"pseudo-header {name.decode('latin-1')} in trailers"
        if _FIELD_NAME.fullmatch(name) is None:
            return f"field name {name.decode('latin-1')!r} is not a lower-case token"
        if _BAD_REQUEST_VALUE.search(value) is not None:
            return f"field {name.decode('latin-1')} has {_NOT_IN_VALUES[_BAD_REQUEST_VALUE]} in its value"
    return None


@_remember_valid
def _malformed(headers: list[Header], trailers: bool) -> str | None:
    """Why a response head (or trailers) from upstream is malformed (RFC 9113 8.1.1, 8.2, 8.3.2),
    or None: pseudo-headers (only one :status, 100-599) first, lower-case token names, no
    connection-specific field, no CR, LF or NUL in a value. Whitespace around a value passes, as
    with Envoy and as the direct connection would: gRPC servers send it (a grpc-message ending in
    a space, "failed: " with an empty cause)."""
    status = False
    regular = False
    length: bytes | None = None
    for name, value in headers:
        if name == b"content-length" and not trailers:
            if (why := _bad_content_length(value, length)) is not None:
                return why
            length = value
        if name == OVERSIZED[0]:
            return "a header list over the 64 KiB the sidecar takes"
        if name[:1] == b":":
            if trailers or regular or status or name != b":status":
                return f"pseudo-header {name.decode('latin-1')} out of place"
            if len(value) != 3 or not value.isdigit() or not b"100" <= value <= b"599":
                return f":status {value.decode('latin-1')!r} is not 100-599"
            status = True
            continue
        regular = True
        if (why := _bad_field(name, value, _BAD_VALUE)) is not None:
            return why
    if not trailers and not status:
        return "no :status"
    return None


def _headers(raw: list[Any]) -> list[Header]:  # hpack's tuples (h2 types them loosely)
    """A received header block, to be sent on. hpack's tuples are kept, so a field the sender
    marked never-indexed is forwarded never-indexed (RFC 7541 section 7.1.3); fields that carry
    credentials are made never-indexed too, as h2 and nghttp2 do (authorization,
    proxy-authorization, a cookie shorter than 20 bytes): they stay out of the compression
    contexts, where a guessing attacker could find them (section 7.1)."""
    out: list[Header] = list(raw)
    if _MAY_HIDE.isdisjoint(map(_NAME, out)):  # (most blocks: looked through by C calls)
        return out
    for i, (n, v) in enumerate(out):
        if (n in _CREDENTIALS or (n == b"cookie" and len(v) < 20)) and not isinstance(
            out[i], NeverIndexedHeaderTuple
        ):
            out[i] = NeverIndexedHeaderTuple(n, v)
    return out


# gRPC statuses that count as the endpoint failing, for the balancer: UNKNOWN, DEADLINE_EXCEEDED,
# INTERNAL, UNAVAILABLE, DATA_LOSS: the server failed (as for the span status).
GRPC_FAILURES = frozenset({2, 4, 13, 14, 15})


def _succeeded(status: int, grpc_status: int | None) -> bool:
    # (a code gRPC does not define, above 16, reads as UNKNOWN to clients: a failure)
    return status < 500 and grpc_status not in GRPC_FAILURES and (grpc_status is None or grpc_status <= 16)


_GRPC_STATUS = re.compile(rb"[ \t]*([+-]?[0-9]{1,10})[ \t]*")


def _grpc_status_of(headers: list[Header]) -> int | None:
    """The grpc-status of a response's trailers (or trailers-only head), or None without one. A
    value that is no int32, or negative, or 2^31-1, reads as INTERNAL, as grpcio reads it (grpc-go:
    "malformed grpc-status" for no int32); an unbounded number also failed every sampled span's
    export (OTLP's int64)."""
    if b"grpc-status" not in map(_NAME, headers):  # (a response's head: looked through in C)
        return None
    status = None
    for n, v in headers:
        if n == b"grpc-status":
            m = _GRPC_STATUS.fullmatch(v)
            status = int(m.group(1)) if m and 0 <= int(m.group(1)) < 2**31 - 1 else GRPC_INTERNAL
    return status


class H2Proxy:
    """One downstream HTTP/2 connection. Inbound callers pass ``authorize`` and ``connect_app``;
    other sides pass their ``router`` (and None for both)."""

    def __init__(
        self,
        down: Pipe,
        authorize: Authorize | None,
        connect_app: ConnectApp | None,
        start_span: Callable[[RequestInfo], RequestSpan],
        info: dict[str, object],
        router: StreamRouter | None = None,
        pool: Pool[_Up] | None = None,
        reset_guard: bool = True,
        xfcc: bytes | None = None,
        drain_started: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """``reset_guard``: close the connection of a client that resets most streams early (off
        for another sidecar: its resets are its app's cancellations, already guarded there).
        ``xfcc``: inbound, what the app is told of an authenticated caller (None: a plaintext one).
        ``drain_started``: returns when the sidecar starts draining; the connection then gets a
        graceful GOAWAY even with streams open (they finish; new ones go elsewhere)."""
        self.reset_guard = reset_guard
        self.xfcc = xfcc
        self.drain_started = drain_started
        self._refuse_above: int | None = None  # the final GOAWAY's last stream id, once sent
        self._drain_acked = asyncio.Event()  # the client answered the drain's PING
        self._no_streams = asyncio.Event()  # after the final GOAWAY: the last stream ended
        self.pool = pool  # where upstream connections go when this connection ends, and come from
        if router is None:
            if authorize is None or connect_app is None:
                raise TypeError("H2Proxy needs a router, or authorize and connect_app")
            router = _AppRouter(authorize, connect_app, str(info.get("source")))
        self.router: StreamRouter = router
        # The app's own connections (outbound) may open as many streams as Envoy allows: with h2's
        # 100, a channel's long-lived streams (watches) left its other calls queued for good.
        # Other callers (inbound: sidecars, which open more connections as needed) keep 100.
        outbound = router.direction == "outbound"
        self.down = _Side(down, client=False, max_streams=APP_MAX_STREAMS if outbound else None)
        self.start_span = start_span
        self.info = info
        self.streams: dict[int, _Stream] = {}  # by downstream id
        self.ups: dict[object, list[_Up]] = {}  # by target key
        self._connecting: dict[object, asyncio.Task[_Up]] = {}
        self._written: set[_Up] = set()  # upstream connections written to in this batch
        # Upstream connections whose socket is backed up: their streams' data waits, unacknowledged
        # to the client, until the socket drains (a task each), instead of the client's whole
        # connection waiting.
        self._backed_up: dict[_Up, asyncio.Task[None]] = {}
        self.closed = False
        # Rapid reset (CVE-2023-44487): streams the client opened, and those it reset within a
        # second of opening, before their response began. Envoy's rule: after 500 streams, half
        # of them reset so: the connection is closed.
        self._opened = 0
        self._premature = 0
        self._empty_data = 0  # DATA frames in a row with no payload and no end of stream
        self._control = 0  # PRIORITY and SETTINGS frames so far
        self._window_updates = 0  # WINDOW_UPDATE frames so far
        self._data_down = 0  # DATA frames sent to the client so far
        self._flood: str | None = None  # why the client is cut off
        self._linger = False  # close after a GOAWAY of ours: without resetting it away

    async def run(self, idle_timeout: float, draining: Callable[[], bool] = lambda: False) -> None:
        self.down.flush()
        drain = asyncio.create_task(self._drain()) if self.drain_started is not None else None
        try:
            while True:
                if not self.streams and not await self._wait_idle(idle_timeout, draining):
                    # idle or draining: GOAWAY, then close (never a higher id than a GOAWAY before)
                    self.down.conn.close_connection(last_stream_id=self._refuse_above)
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
                    self._linger = True  # which an immediate close would reset away
                    break
                for event in events:
                    try:  # noqa: SIM105 (contextlib.suppress: two calls per event)
                        self._on_down(event)
                    except h2.exceptions.StreamClosedError:  # reset meanwhile
                        pass
                # Not held over the wait below: a read of PINGs is thousands of h2 events (~6 MB
                # for 256 KiB) that a client which reads nothing would keep alive.
                del data, events
                if self._flood is not None:
                    log.warning(
                        "HTTP/2 client flooded the connection: closed",
                        extra={**self.info, "flood": self._flood},
                    )
                    self.down.conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                    self.down.flush()
                    self._linger = True
                    break
                if (
                    self.reset_guard
                    and self._opened >= PREMATURE_RESET_MIN_STREAMS
                    and 2 * self._premature >= self._opened
                ):
                    log.warning(
                        "HTTP/2 client reset most of its streams before their response: connection closed",
                        extra={**self.info, "streams": self._opened, "premature_resets": self._premature},
                    )
                    self.down.conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                    self.down.flush()
                    self._linger = True
                    break
                # What h2 answers by itself (PING and SETTINGS acks, local answers) waits for the
                # client to read, as the responses do: no reading while it does not. An upstream
                # whose socket is backed up holds only its own streams (``_pump``): the reader
                # goes on for the others (RFC 9113 5.2; the reader waited for every upstream
                # written to, and one endpoint that stopped reading froze every call on the
                # app's connection, to healthy endpoints too).
                self.down.flush()
                if not await self._drained():
                    log.warning(
                        "HTTP/2 client took nothing of what was written to it: reset",
                        extra={**self.info, "seconds": CLIENT_STALL_S},
                    )
                    self.down.pipe.abort()
                    break
                for up in self._flush_written():
                    log.warning(
                        "HTTP/2 upstream connection takes nothing: reset",
                        extra={**self.info, "unsent_frames": up.written_backed_up},
                    )
                    up.pipe.abort()  # (its reader fails its streams)
        except (PipeClosed, ConnectionError):
            pass
        finally:
            if drain is not None:
                drain.cancel()
            await self._close()

    async def _drained(self) -> bool:
        """Until the client's socket takes what was written (False: it took nothing at all for
        ``CLIENT_STALL_S``; a slow reader goes on waiting). A client that stopped reading (PINGs
        sent and never their acks read) held the reader here for good, and with it what it had
        sent meanwhile."""
        pipe = self.down.pipe
        pipe.flush()  # (what is queued in the pipe reaches the transport: over its mark or not)
        if not pipe.backpressured:
            await pipe.drain()  # (raises if the connection is gone)
            return True
        taken = pipe.taken()
        while not await pipe.wait_writable(CLIENT_STALL_S):
            if (now := pipe.taken()) == taken:
                return False
            taken = now
        return True

    def _goaway(self, last_stream_id: int) -> None:
        """A GOAWAY (NO_ERROR) written by hand: h2's close_connection would also stop the streams
        still open from sending anything more."""
        self.down.flush()  # what h2 queued goes first: frames stay whole
        self.down.pipe.write(GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0).serialize())

    async def _drain(self) -> None:
        """The sidecar drains: a graceful GOAWAY with streams open (RFC 9113 6.8, as Envoy and
        Linkerd do): the client sends new requests elsewhere at once, the open streams finish (up
        to the drain timeout), then the connection closes. Without it, a connection with one
        long-lived stream (a gRPC watch) went on taking new calls until the drain timeout cut
        them all."""
        assert self.drain_started is not None
        await self.drain_started()
        # Every connection, streams open or not: between two calls the reader waits for the next
        # request, and the idle check would only run once one came (it never does, from a sidecar).
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, PipeClosed):  # (the client may be gone)
            self._goaway(MAX_STREAM_ID)  # "stop opening streams": ones on their way still count
            self.down.conn.ping(DRAIN_PING)
            self.down.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_acked.wait(), DRAIN_PING_WAIT)
            if self.closed:
                return
            self._refuse_above = self.down.conn.highest_inbound_stream_id
            self._goaway(self._refuse_above)  # streams above it are refused: the client retries them
            if self.streams:
                await self._no_streams.wait()
            if self.closed:
                return
            self.down.conn.close_connection(last_stream_id=self._refuse_above)
            self.down.flush()
        if not self.closed:
            self.down.pipe.close()  # the reader sees the end and cleans up

    def _flush_written(self) -> list[_Up]:
        """Send what the batch queued upstream; the connections written to past
        ``MAX_WRITTEN_BACKED_UP`` while backed up (the reader resets them)."""
        written, self._written = self._written, set()
        for up in written:
            up.try_flush()
        return [up for up in written if up.written_backed_up > MAX_WRITTEN_BACKED_UP]

    def _hold_for(self, up: _Up) -> None:
        """``up``'s socket is backed up: its streams' data waits (unacknowledged, so the client's
        windows bound it) until the socket drains, then goes on."""
        if up not in self._backed_up and not self.closed:
            self._backed_up[up] = asyncio.create_task(self._resume_when_drained(up))

    async def _resume_when_drained(self, up: _Up) -> None:
        try:
            await up.pipe.drain()
        except (PipeClosed, ConnectionError):
            return  # its reader fails its streams
        finally:
            self._backed_up.pop(up, None)
        up.written_backed_up = 0
        for stream in list(up.streams.values()):
            if stream.up is up and self.streams.get(stream.down_id) is stream:
                self._pump(stream, up=True)
        self._written.add(up)
        self._flush_now()

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
        self.closed = True
        for stream in list(self.streams.values()):
            # The caller is gone: its streams still open upstream are cancelled (the connection,
            # which may go on in the pool, does not end them). (_finish resets those whose request
            # was still being sent.)
            if stream.up is not None and stream.up_id is not None and stream.ended_up:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    stream.up.conn.reset_stream(stream.up_id, h2.errors.ErrorCodes.CANCEL)
            self._finish(stream, error=CLIENT_CLOSED)
        ups = [up for ups in self.ups.values() for up in ups]
        if self.pool is not None and not self.pool.closed:
            for up in ups:  # (its streams were reset just now: the resets go out first)
                up.pooling = up.reusable()
                if up.pooling:
                    up.try_flush()
                    up.written_backed_up = 0  # (the next app connection counts afresh)
        tasks: list[asyncio.Task[None] | asyncio.Task[_Up]] = list(self._connecting.values())
        tasks += [up.task for up in ups if up.task is not None]
        tasks += self._backed_up.values()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for up in ups:
            if up.pooling and self.pool is not None:
                up.task = None
                self.pool.put(up.key, up.pipe, up)  # (closed there if unfit by now)
            else:
                up.let_go()
        if self._linger:
            await linger_close(self.down.pipe)
        else:
            self.down.pipe.close()

    # -- downstream (the caller) -------------------------------------------------------------

    def _on_down(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            # A frame with a payload ends a run of empty DATA frames (as Envoy and Netty count
            # them): an empty body streamed as one empty frame per request cut off a client at
            # its 11th request on the connection.
            self._empty_data = 0
            if self._refuse_above is not None and event.stream_id > self._refuse_above:
                # After the final GOAWAY: not processed, so the client may send it elsewhere.
                self.down.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            self._opened += 1
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if not event.data:  # nothing to forward (END_STREAM comes as its own event)
                if event.flow_controlled_length:  # padding only
                    self.down.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_ended is None:
                    self._empty_data += 1
                    if self._empty_data > MAX_EMPTY_DATA_FRAMES:
                        self._flood = "empty DATA frames"
                return
            self._empty_data = 0
            if stream is None or stream.ended_up:  # denied or over: its body is dropped
                self.down.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream.result.request_bytes += len(event.data)
            if why := _against_length(
                stream.request_expected, stream.result.request_bytes, event.stream_ended is not None
            ):
                self.down.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_ended is not None:
                    stream.request_ended = True
                self._malformed_later(stream, f"malformed request: {why}")
                return
            if stream.replay is not None:
                stream.replay_size += len(event.data)
                if stream.replay_size > MAX_REPLAY_BODY:
                    stream.replay = None
                elif event.data:
                    stream.replay.append(event.data)
            stream.to_up.append((event.data, event.flow_controlled_length))
            if event.stream_ended is None:  # else its StreamEnded, next, pumps both: one frame
                self._pump(stream, up=True)  # (so every way out of that handler pumps or fails the stream)
        elif isinstance(event, (h2.events.TrailersReceived, h2.events.StreamEnded)):
            if isinstance(event, h2.events.TrailersReceived):
                self._empty_data = 0
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.request_ended:
                stream.request_ended = True
                if isinstance(event, h2.events.TrailersReceived) and (
                    why := _malformed_trailers(_headers(event.headers))
                ):
                    self._malformed_later(stream, f"malformed request trailers: {why}")
                    return
                why = _against_length(stream.request_expected, stream.result.request_bytes, ended=True)
                if why and not stream.ended_up:
                    self._malformed_later(stream, f"malformed request: {why}")
                    return
                if stream.timeout is not None and not stream.responded and not stream.end_queued_down:
                    stream.deadline = time.monotonic() + stream.timeout
                    self._arm(stream)
                if isinstance(event, h2.events.TrailersReceived):
                    stream.trailers = trailer_fields(_headers(event.headers)) or None  # (none left: an end)
                stream.to_up.append((stream.trailers, 0))
                self._pump(stream, up=True)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if not stream.responded and time.monotonic() - stream.opened < PREMATURE_RESET_S:
                    self._premature += 1
                if stream.up is not None and stream.up_id is not None:
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        stream.up.conn.reset_stream(stream.up_id, event.error_code or 0)
                    self._written.add(stream.up)
                self._finish(stream, error=CLIENT_RESET)
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_updates += 1
            if self._window_updates > WINDOW_UPDATES_BASE + 2 * (
                self._opened + WINDOW_UPDATES_PER_DATA_FRAME * self._data_down
            ):
                self._flood = "WINDOW_UPDATE frames"
                return
            self._pump_all(self.streams, event.stream_id, up=False)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._count_control()
            self._pump_all(self.streams, 0, up=False)  # the initial window may have grown
        elif isinstance(event, h2.events.PriorityUpdated):
            self._count_control()
        elif isinstance(event, h2.events.PingAckReceived) and event.ping_data == DRAIN_PING:
            self._drain_acked.set()

    def _count_control(self) -> None:
        self._control += 1
        if self._control > CONTROL_FRAMES_BASE + CONTROL_FRAMES_PER_STREAM * self._opened:
            self._flood = "PRIORITY or SETTINGS frames"

    def _request(self, event: h2.events.RequestReceived) -> None:
        headers = _headers(event.headers)
        oversized = OVERSIZED in headers
        if oversized:
            headers.remove(OVERSIZED)
        pseudo: dict[bytes, bytes] = {}
        regular: list[Header] = []  # (the fields as RequestInfo has them: plain tuples)
        content_type: bytes | None = None
        for name, value in headers:  # (one pass)
            if name[:1] == b":":
                pseudo[name] = value
            else:
                regular.append((name, value))
                if content_type is None and name == b"content-type":
                    content_type = value
        grpc = content_type is not None and content_type.startswith(b"application/grpc")
        router = self.router
        path = pseudo.get(b":path", b"/")
        method = pseudo.get(b":method", b"")
        refusal: str | None
        if oversized:  # (Envoy: 431; a gRPC server without the mesh: RESOURCE_EXHAUSTED)
            refusal, bad_status = "header list over the 64 KiB the sidecar takes", 431
        else:
            refusal, bad_status = _malformed_request(headers), 400
        expected = _content_length(headers) if refusal is None else None
        if refusal is None and expected and event.stream_ended is not None:
            refusal = f"content-length {expected} but no content"
        if refusal is not None:
            refusal = f"malformed request: {refusal}"
        elif method == b"CONNECT":  # extended CONNECT (RFC 8441) too: not offered, not proxied
            refusal, bad_status = "CONNECT is not proxied by the sidecar", 405
        elif not path.startswith(b"/") and not (path == b"*" and method == b"OPTIONS"):
            # (normalizing invented one)
            refusal = "bad request target: the path must start with / (RFC 9113 8.3.1)"
        elif router.direction == "inbound":  # the enforcing side: the app gets the path the policy saw
            try:
                normal = normalize_target(path)
            except BadPath as exc:
                normal, refusal = path, f"bad request target: {exc}"
            if normal != path:
                headers = [(b":path", normal) if h[0] == b":path" else h for h in headers]
                path = normal
        info = RequestInfo(  # (fields by position: a call by keyword costs about three times as much)
            router.direction,
            "grpc" if grpc else "h2",
            method.decode("latin-1"),
            path.decode("latin-1"),
            pseudo.get(b":authority", b"").decode("latin-1"),
            regular,  # headers
            router.source,
            None,  # destination
            router.service,
            str(self.info.get("client")),  # peer_address
        )
        span = self.start_span(info)
        trace = span.trace_headers()
        head = headers if trace is None else [h for h in headers if h[0] not in TRACE_HEADERS] + trace
        if router.direction == "inbound":  # only the sidecar says who called (headers.IDENTITY_HEADERS)
            head = with_identity(head, self.xfcc)
        stream = _Stream(event.stream_id, info, span, RequestResult(None), grpc, head)
        stream.request_ended = event.stream_ended is not None
        stream.request_expected = expected
        self.streams[event.stream_id] = stream
        if refusal is not None:
            code = GRPC_RESOURCE_EXHAUSTED if oversized else GRPC_INVALID_ARGUMENT
            denial = Denial(bad_status, refusal, grpc_status=code, decision="refused", error=refusal)
            self._deny(stream, denial)
            return
        timeout = router.begin(info)
        if timeout is not None:
            # As Envoy's route timeout: from the end of the request (a client stream or a slow
            # upload is not cut); reaching an endpoint counts from the head.
            stream.timeout, stream.deadline = timeout, time.monotonic() + timeout
            if stream.request_ended:
                self._arm(stream)
        if router.retries:
            stream.replay = []
        self._route(stream)

    def _deny(self, stream: _Stream, denial: Denial) -> None:
        """Answer the stream here (before any response head went down) and end it."""
        if stream.timer is not None:  # answered here: no timeout answers it again
            stream.timer.cancel()
            stream.timer = None
        reason = field_value(denial.reason if denial.told is None else denial.told)
        r = stream.result
        if denial.decision != "allow" or r.decision != "audit_deny":  # (an audit denial stays one)
            r.decision = denial.decision
        r.reason, r.policy = denial.reason, denial.policy
        if denial.error is not None:
            r.error = denial.error
        if stream.grpc:  # trailers-only: the status is in the (only) HEADERS frame
            r.status, r.grpc_status = 200, denial.grpc_status
            headers = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(denial.grpc_status).encode()),
                (b"grpc-message", reason.replace(b"%", b"%25")),  # percent-encoded (gRPC's spec)
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
            if stream.info.method == "HEAD":  # RFC 9110 9.3.2: the head alone (a peer refuses content)
                self.down.conn.send_headers(stream.down_id, headers, end_stream=True)
                stream.end_queued_down = True
            else:
                self.down.conn.send_headers(stream.down_id, headers)
                # The body goes as the client's window allows (it may be spent: sending at once
                # raised FlowControlError and took the whole connection down); the stream ends after.
                stream.ended_up = True  # nothing goes upstream
                stream.end_queued_down = True
                stream.to_down.extend(((body, 0), (None, 0)))
                self._pump(stream, up=False)
                return
        stream.ended_up = True  # nothing more goes anywhere
        self._finish(stream)

    # -- routing each attempt ----------------------------------------------------------------

    def _route(self, stream: _Stream) -> None:
        """Pick the attempt's target; send the head now if a connection there has room, else
        connect (in a task: the other streams go on meanwhile)."""
        target = self.router.route(stream.info, stream.tried)
        if isinstance(target, Denial):
            self._deny(stream, target)
            return
        stream.target = target
        stream.target_since = time.monotonic()
        r = stream.result
        r.reason, r.policy, r.endpoint, r.destination = (
            target.reason,
            target.policy,
            target.endpoint,
            target.destination,
        )
        r.decision = "audit_deny" if target.audit else "allow"
        up = next((u for u in self.ups.get(target.key, ()) if u.has_room()), None)
        if up is not None and self._send_head(stream, up):
            return
        stream.task = asyncio.create_task(self._connect_and_send(stream, target))

    def _send_head(self, stream: _Stream, up: _Up) -> bool:
        """The request head on ``up`` (False: no room there after all), then what is queued."""
        end = stream.request_ended and not stream.to_up
        try:
            sid = up.conn.get_next_available_stream_id()
            up.conn.send_headers(sid, stream.head, end_stream=end)
        except h2.exceptions.TooManyStreamsError:
            up.limit = len(up.streams)  # no more here: the stream waits for another connection
            return False
        except h2.exceptions.NoAvailableStreamIDError:  # (not expected: closing after the last one)
            up.closing = True
            return False
        if sid >= MAX_STREAM_ID - 1:
            # Its last stream id (2^30 streams: days of traffic on a pooled connection): no new
            # streams on it, nor into the pool; new ones take a new connection (RFC 9113 5.1.1).
            # h2 raised for the next one, out of the app connection's reader: every call on it
            # failed, and the pool handed the spent connection to the next app connection.
            up.closing = True
        stream.up, stream.up_id, stream.ended_up = up, sid, end
        up.streams[sid] = stream
        self._pump(stream, up=True)
        self._written.add(up)
        return True

    async def _connect_and_send(self, stream: _Stream, target: Target) -> None:
        me = asyncio.current_task()
        try:
            useless = 0  # connections that had no room for another reason than other streams
            while True:
                up = await self._connection(target)
                if self.streams.get(stream.down_id) is not stream or stream.target is not target:
                    return  # over (reset, timed out) meanwhile
                if not up.settled and not up.has_room():
                    await up.settled_or_gone.wait()  # how many streams it takes
                    if self.streams.get(stream.down_id) is not stream or stream.target is not target:
                        return
                if up.has_room() and self._send_head(stream, up):
                    break
                # Filled by the streams that waited with this one (the peer's MAX_CONCURRENT_STREAMS):
                # wait for the next connection, as a gRPC client queues its calls. Closed meanwhile,
                # or refusing streams below its limit: a few more tries, then a failure.
                if not up.full():
                    useless += 1
                    if useless >= CONNECT_ROUNDS:
                        raise PipeClosed("no connection took the stream")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no connection (the connector's error says why)
            if stream.task is me:
                stream.task = None
            log.info("upstream connection failed", extra={**self.info, "reason": str(exc)})
            self._failed(stream, Failure.CONNECT, str(exc), sent=False)
        else:
            if stream.task is me:
                stream.task = None
        self._flush_now()

    async def _connection(self, target: Target) -> _Up:
        """A connection for ``target`` with room for a stream: an open one, or a new one (made once
        for all the streams waiting for it)."""
        ups = self.ups.get(target.key, ())
        up = next((u for u in ups if u.has_room()), None)
        if up is not None:
            return up
        # One whose SETTINGS have not come yet: the caller waits for them (its one stream before
        # them is taken), rather than opening a connection per call meanwhile (RFC 9113 9.1).
        up = next((u for u in ups if not u.settled and not u.unusable()), None)
        if up is not None:
            return up
        task = self._connecting.get(target.key)
        if task is None:
            task = self._connecting[target.key] = asyncio.create_task(self._open(target))
            task.add_done_callback(functools.partial(self._connected, target.key))
        return await asyncio.shield(task)

    def _connected(self, key: object, task: asyncio.Task[_Up]) -> None:
        if self._connecting.get(key) is task:
            del self._connecting[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter has it (or none is left to care)

    async def _open(self, target: Target) -> _Up:
        idle = self.pool.take(target.key) if self.pool is not None else None
        if idle is not None:  # an earlier app connection's: no connect, no handshake
            up = idle[1]
            up.pooling = False
            up.reused, up.heard = True, False
        else:
            pipe = await target.connect()
            if self.closed:
                pipe.close()
                raise PipeClosed("the downstream connection is closed")
            if self.pool is not None:
                self.pool.opened += 1
            up = _Up(pipe, target.key)
            up.flush()
        self.ups.setdefault(target.key, []).append(up)
        up.task = asyncio.create_task(self._up_loop(up))
        return up

    def _flush_now(self) -> None:
        """Outside the downstream loop (a task, a timer): send what is queued."""
        with contextlib.suppress(PipeClosed):
            self.down.flush()
        written, self._written = self._written, set()
        for up in written:
            up.try_flush()

    # -- failures, retries, the timeout -------------------------------------------------------

    def _detach(self, stream: _Stream, ok: bool) -> None:
        """End the stream's current attempt: its upstream stream is reset, its target released."""
        up, sid = stream.up, stream.up_id
        if up is not None and sid is not None:
            up.streams.pop(sid, None)
            self._ack(up, sid, stream.to_down)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                up.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            self._written.add(up)
        stream.up = stream.up_id = None
        stream.ended_up = False
        if stream.target is not None:
            self.router.release(stream.target, ok)
            stream.target = None

    def _failed(self, stream: _Stream, failure: Failure, why: str, sent: bool) -> None:
        """The attempt ended before its response head: ``failure``; ``sent``: its request went
        (at least in part) to the upstream. Retried if allowed, else answered or reset."""
        if self.streams.get(stream.down_id) is not stream:
            return
        target = stream.target
        if target is not None:
            # Unreachable: not connected. A stream it refused (REFUSED_STREAM, above a GOAWAY's
            # last id) reached it: it may take the stream again, on a new stream (RFC 9113 8.7;
            # a Service with one endpoint answered 502 "upstream connection failed").
            target.refused = failure is Failure.CONNECT and not sent
            stream.tried.append(target)
        self._detach(stream, ok=False)
        pause = 0.0 if failure is Failure.CONNECT else backoff(stream.attempt)
        if self._may_retry(stream, failure, sent, pause):
            self._retry(stream, why, sent, pause)
            return
        stream.result.error = "upstream reset" if sent else why
        if not sent and target is not None and self.router.direction == "inbound" and not self.reset_guard:
            # The app is not there (its container restarting, its server stopped) and the caller is
            # another sidecar: REFUSED_STREAM says no app saw the call (RFC 9113 8.7), so that one
            # sends it to another endpoint whatever the method. A trailers-only UNAVAILABLE read as
            # the app's own answer, retried only where the Service allows retrying POST: half of
            # the calls failed with one of two apps stopped, where a client without the mesh sees
            # the server go and loses none.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.down.conn.reset_stream(stream.down_id, _REFUSED)
            self._finish(stream, error=why)
            return
        if not sent and target is not None:  # nothing went out: answer (502 / UNAVAILABLE)
            self._deny(stream, Denial(502, target.unreachable, target.policy, GRPC_UNAVAILABLE, "allow"))
            return
        if failure is not Failure.CONNECT:
            # Lost before any of the response: what a client sees of a lost transport without the
            # mesh, UNAVAILABLE (a reset reads as INTERNAL to gRPC, a server bug its retry policies
            # do not retry); 502 otherwise, as Envoy answers an upstream lost before its headers.
            policy = target.policy if target is not None else None
            self._deny(
                stream, Denial(502, f"upstream {why}", policy, GRPC_UNAVAILABLE, "allow", "upstream reset")
            )
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):  # not processed: the client may retry it
            self.down.conn.reset_stream(stream.down_id, _REFUSED)
        self._finish(stream, error="upstream reset")

    def _retry_response(self, stream: _Stream, status: int, headers: list[Header], ended: bool) -> bool:
        """A final response head 502-504, or a gRPC trailers-only UNAVAILABLE, to a request that
        went up whole and was kept: dropped (its upstream stream reset, the endpoint's failure
        counted) and the request sent again elsewhere when the policy and the budget allow.
        False: the head goes to the caller (a request still streaming is not retried)."""
        grpc_status = _grpc_status_of(headers) if ended and stream.grpc and status == 200 else None
        if status not in RETRY_STATUSES and grpc_status not in GRPC_RETRY_STATUSES:
            return False  # (checked first: the router's check takes the retry from the budget)
        target = stream.target
        if target is None or not stream.ended_up:
            return False
        pause = backoff(stream.attempt)
        if not self._may_retry(stream, None, True, pause, status, grpc_status):
            return False
        stream.tried.append(target)
        self._detach(stream, ok=False)
        why = f"grpc-status {grpc_status}" if grpc_status is not None else f"status {status}"
        self._retry(stream, why, True, pause)
        return True

    def _retry(self, stream: _Stream, why: str, sent: bool, pause: float) -> None:
        """Send the stream again (after ``pause``) to the router's next target; ``sent``: the
        request went up, so its kept copy is queued again."""
        stream.attempt += 1
        stream.result.retries += 1
        log.info("retrying", extra={**self.info, "reason": why, "attempt": stream.attempt})
        if sent:  # what went up is acknowledged downstream: send the kept copy again
            self._ack(self.down, stream.down_id, stream.to_up)
            stream.to_up.clear()
            stream.to_up.extend((chunk, 0) for chunk in stream.replay or ())
            if stream.request_ended and (stream.replay or stream.trailers is not None):
                stream.to_up.append((stream.trailers, 0))
        if pause > 0:
            stream.task = asyncio.create_task(self._route_later(stream, pause))
        else:
            self._route(stream)

    def _may_retry(
        self,
        stream: _Stream,
        failure: Failure | None,
        sent: bool,
        pause: float,
        status: int | None = None,
        grpc_status: int | None = None,
    ) -> bool:
        if self.closed or not self.router.retries:
            return False
        if sent and not (stream.request_ended and stream.replay is not None):
            return False  # the request went up in part or is big: it cannot be sent again
        if stream.deadline is not None and time.monotonic() + pause >= stream.deadline:
            return False
        return self.router.may_retry(stream.info.method, failure, stream.attempt, status, grpc_status)

    async def _route_later(self, stream: _Stream, pause: float) -> None:
        await asyncio.sleep(pause)
        if self.streams.get(stream.down_id) is stream:
            stream.task = None
            self._route(stream)
            self._flush_now()

    def _arm(self, stream: _Stream) -> None:
        assert stream.timeout is not None
        stream.timer = asyncio.get_running_loop().call_later(stream.timeout, self._timed_out, stream)

    def _timed_out(self, stream: _Stream) -> None:
        """No response head within the Service's timeout: the upstream stream is reset and the
        caller answered (gRPC: DEADLINE_EXCEEDED; otherwise 504)."""
        stream.timer = None
        if self.streams.get(stream.down_id) is not stream or stream.responded or stream.end_queued_down:
            return  # (answered already: a local answer whose body waits for the client's window)
        if stream.task is not None:
            stream.task.cancel()
            stream.task = None
        policy = stream.result.policy
        self._detach(stream, ok=False)
        denial = Denial(504, "upstream timeout", policy, GRPC_DEADLINE_EXCEEDED, "allow", "timeout")
        try:
            self._deny(stream, denial)  # it ends the stream, now or once the client's window allows
        except h2.exceptions.ProtocolError:
            self._finish(stream)
        self._flush_now()

    # -- upstream (the app, an endpoint) ------------------------------------------------------

    async def _up_loop(self, up: _Up) -> None:
        app_gone = False
        try:
            while data := await up.pipe.read():
                up.heard = True
                for event in up.conn.receive_data(data):
                    try:  # noqa: SIM105 (contextlib.suppress: two calls per event)
                        self._on_up(up, event)
                    except h2.exceptions.StreamClosedError:  # reset meanwhile
                        pass
                up.flush()
                self._flush_now()
                try:
                    await self.down.pipe.drain()
                except (PipeClosed, ConnectionError):
                    # The app's connection is gone, not this one: ``run`` ends and ``_close``
                    # decides what becomes of it (the pool, or closed).
                    app_gone = True
                    return
        except (PipeClosed, ConnectionError, h2.exceptions.ProtocolError) as exc:
            log.info("HTTP/2 connection upstream failed", extra={**self.info, "reason": str(exc)})
        finally:
            up.settled_or_gone.set()  # (streams waiting for its SETTINGS: another connection)
            ups = self.ups.get(up.key, [])
            if up in ups and not app_gone:
                ups.remove(up)
            if not (up.pooling or app_gone):  # (pooling: stopped by ``_close``, it stays open)
                up.closing = True
                for sid, stream in list(up.streams.items()):  # in flight on the lost connection
                    self._lost(up, sid, stream)
                with contextlib.suppress(PipeClosed):
                    self._flush_now()
                up.let_go()

    def _lost(self, up: _Up, sid: int, stream: _Stream) -> None:
        """``up`` failed or went away under the stream: an attempt without a response head may be
        retried (not processed at all, by the GOAWAY: whatever its method). A connection taken from
        the pool that failed before the peer sent anything counts as never reached, as HTTP/1.1's
        pool does: the peer most likely closed it while it was idle (a crash, no GOAWAY), its
        close crossing the streams."""
        if stream.end_queued_down and not self.closed:
            # The whole response came before the connection went (a server closing after its
            # last stream, RFC 9113 6.8): what the caller has not read yet still goes to it.
            self._upstream_done(stream)
            return
        if stream.responded and stream.grpc and not self.closed and not stream.end_queued_down:
            # A gRPC call whose response had begun: its transport was lost, which a gRPC client
            # sees as UNAVAILABLE without the mesh (a reset would read as INTERNAL, a server bug,
            # which retry policies and watch reconnect logic do not retry).
            stream.to_down.clear()  # (its connection is gone: nothing to acknowledge to it)
            stream.end_queued_down = True
            stream.result.error = "connection lost"
            stream.result.grpc_status = GRPC_UNAVAILABLE
            trailers = [
                (b"grpc-status", b"%d" % GRPC_UNAVAILABLE),
                (b"grpc-message", b"upstream connection lost"),
            ]
            stream.to_down.append((trailers, 0))
            self._pump(stream, up=False)
            return
        if stream.responded or self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.down.conn.reset_stream(stream.down_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self._finish(stream, error="upstream reset")
            return
        unprocessed = (
            (up.last_stream_id is not None and sid > up.last_stream_id)
            or not up.settled  # the peer never spoke HTTP/2 (its SETTINGS come first)
            or up.pipe.denied is not None  # the sidecar refused
            # (a guess, not a proof: never for a method that must not run twice, RFC 9113 8.7)
            or (up.reused and not up.heard and stream.info.method in IDEMPOTENT)
        )
        self._failed(stream, Failure.CONNECT if unprocessed else Failure.RESET, "connection lost", sent=True)

    def _on_up(self, up: _Up, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = up.streams.get(sid) if sid is not None else None
        if isinstance(event, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
            if stream is not None:
                head = _headers(event.headers)
                why = _malformed(head, False)  # (not trailers)
                if why is None and isinstance(event, h2.events.ResponseReceived) and event.stream_ended:
                    status = next((v for n, v in head if n == b":status"), b"")
                    if (
                        _content_length(head)
                        and status not in (b"204", b"304")
                        and stream.info.method != "HEAD"
                    ):
                        why = f"content-length {_content_length(head)} but no content"
                if why is not None:
                    self._malformed_response(up, stream, why)
                    return
                self._response_head(stream, event, head)
        elif isinstance(event, h2.events.DataReceived):
            if not event.data:  # nothing to forward (END_STREAM comes as its own event)
                if event.flow_controlled_length:
                    up.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            if stream is None:
                up.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            if stream.no_content:  # RFC 9110 6.4.1: content where none may be
                up.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._malformed_response(up, stream, f"content in a {stream.result.status} response")
                return
            stream.result.response_bytes += len(event.data)
            if why := _against_length(
                stream.response_expected, stream.result.response_bytes, event.stream_ended is not None
            ):
                up.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._malformed_response(up, stream, why)
                return
            stream.to_down.append((event.data, event.flow_controlled_length))
            if event.stream_ended is None:  # (as toward the app: the end comes next, in one frame;
                self._pump(stream, up=False)  # every way out of its handler pumps or fails the stream)
        elif isinstance(event, (h2.events.TrailersReceived, h2.events.StreamEnded)):
            if stream is not None and not stream.end_queued_down:
                why = _against_length(stream.response_expected, stream.result.response_bytes, ended=True)
                if why and stream.responded:
                    self._malformed_response(up, stream, why)
                    return
                stream.end_queued_down = True
                trailers = _headers(event.headers) if isinstance(event, h2.events.TrailersReceived) else None
                if trailers is not None:
                    if (why := _malformed(trailers, True)) is not None:
                        stream.end_queued_down = False
                        self._malformed_response(up, stream, why)
                        return
                    self._grpc_status(stream, trailers)
                if stream.target is not None and stream.result.status is not None:
                    ok = _succeeded(stream.result.status, stream.result.grpc_status)
                    self.router.report(stream.target, ok, stream.head_s)
                stream.to_down.append((trailers, 0))
                self._pump(stream, up=False)
        elif isinstance(event, h2.events.StreamReset):
            if stream is not None:
                self._reset_by_upstream(stream, event.error_code or 0)
        elif isinstance(event, h2.events.WindowUpdated):
            self._pump_all(up.streams, event.stream_id, up=True)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            up.settled = True
            up.settled_or_gone.set()
            self._pump_all(up.streams, 0, up=True)
        elif isinstance(event, h2.events.ConnectionTerminated):
            up.closing = True  # GOAWAY: streams above its last id were not processed
            up.last_stream_id = event.last_stream_id or 0
            for other, s in list(up.streams.items()):
                if other > up.last_stream_id:
                    self._failed(s, Failure.CONNECT, "GOAWAY", sent=True)

    def _malformed_later(self, stream: _Stream, reason: str) -> None:
        """The request turned out malformed after its head (its trailers, or a body that disagrees
        with its content-length): a stream error (RFC 9113 8.1.1). Its upstream stream is reset
        (the app never sees a request ending as it should not); the caller gets 400
        (INVALID_ARGUMENT) if nothing of the response went down yet, else a reset."""
        log.info("malformed HTTP/2 request from the client", extra={**self.info, "reason": reason})
        if stream.end_queued_down and not stream.responded:
            return  # the sidecar's own answer (a 400, 403, 502...) is on its way: it stands
        if stream.task is not None:  # connecting, or waiting to retry: not any more
            stream.task.cancel()
            stream.task = None
        policy = stream.result.policy
        self._detach(stream, ok=True)  # (the client's doing, not the endpoint's)
        if stream.responded:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.down.conn.reset_stream(stream.down_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._finish(stream, error=reason)
            return
        self._deny(stream, Denial(400, reason, policy, GRPC_INVALID_ARGUMENT, "allow", reason))

    def _malformed_response(self, up: _Up, stream: _Stream, why: str) -> None:
        """That stream only is reset upstream (PROTOCOL_ERROR); the caller gets 502 if nothing of
        the response went down yet, else a reset, as Envoy answers."""
        log.warning("malformed HTTP/2 response from upstream", extra={**self.info, "reason": why})
        sid = stream.up_id
        if sid is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                up.conn.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._written.add(up)
        if stream.responded:
            self._detach(stream, ok=False)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.down.conn.reset_stream(stream.down_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._finish(stream, error=f"malformed response: {why}")
            return
        policy = stream.result.policy
        self._detach(stream, ok=False)
        reason, error = f"malformed response from upstream: {why}", f"malformed response: {why}"
        self._deny(stream, Denial(502, reason, policy, GRPC_INTERNAL, "allow", error))

    def _response_head(
        self,
        stream: _Stream,
        event: h2.events.ResponseReceived | h2.events.InformationalResponseReceived,
        headers: list[Header],
    ) -> None:
        final = isinstance(event, h2.events.ResponseReceived)
        ended = final and event.stream_ended is not None  # type: ignore[union-attr]
        if final:
            status = int(next((v for n, v in headers if n == b":status"), b"0"))
            if stream.replay is not None and self._retry_response(stream, status, headers, ended):
                return  # not passed on: the request goes elsewhere
            stream.result.status = status
            stream.responded = True
            stream.no_content = status in (204, 304) or stream.info.method == "HEAD"
            stream.response_expected = None if stream.no_content else _content_length(headers)
            stream.replay = None  # no retry after a response head
            if stream.timer is not None:
                stream.timer.cancel()
                stream.timer = None
            self._grpc_status(stream, headers)
            # For the balancer a 5xx is a failure, and so is a gRPC status that says the server
            # failed: an endpoint that fails fast must not look fast (Linkerd counts them too).
            # A gRPC call's status comes in its trailers: reported then (or at its end), with the
            # time to this head as its latency (not the life of a long stream).
            stream.head_s = time.monotonic() - stream.target_since
            if stream.target is not None and (status >= 500 or not stream.grpc or ended):
                self.router.report(
                    stream.target, _succeeded(status, stream.result.grpc_status), stream.head_s
                )
        else:  # a 1xx goes to the caller: not sent again (Envoy stops retrying on an upstream 1xx)
            stream.replay = None
        self.down.conn.send_headers(stream.down_id, headers, end_stream=ended)
        if ended:
            stream.end_queued_down = True
            self._finish(stream)

    def _reset_by_upstream(self, stream: _Stream, code: int) -> None:
        if code == _REFUSED and not stream.responded:  # not processed: may go elsewhere
            self._failed(stream, Failure.CONNECT, "refused stream", sent=True)
            return
        if code == h2.errors.ErrorCodes.NO_ERROR and stream.end_queued_down:
            # A complete response, then "send no more of the request" (RFC 9113 8.1: a client
            # must not discard the response for it): what is queued of the response still goes
            # down; the rest of the request is dropped, and the caller's stream reset NO_ERROR
            # once the response is out (``_finish``), as the upstream did.
            self._upstream_done(stream)
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.down.conn.reset_stream(stream.down_id, code)
        where = "the app" if self.router.direction == "inbound" else "the upstream"
        self._finish(stream, error=f"reset by {where}")

    def _upstream_done(self, stream: _Stream) -> None:
        """The upstream stream is over with the whole response received: the queued rest of the
        response still goes down; the rest of the request is dropped (and the caller's stream
        reset NO_ERROR once the response is out, if its request has not ended: ``_finish``)."""
        self._ack(self.down, stream.down_id, stream.to_up)
        stream.to_up.clear()
        stream.ended_up = True
        if stream.up is not None and stream.up_id is not None:
            stream.up.streams.pop(stream.up_id, None)

    @staticmethod
    def _grpc_status(stream: _Stream, headers: list[Header]) -> None:
        grpc_status = _grpc_status_of(headers)
        if grpc_status is not None:
            stream.result.grpc_status = grpc_status

    # -- moving data under flow control -------------------------------------------------------

    def _pump_all(self, table: dict[int, _Stream], stream_id: int, up: bool) -> None:
        targets = list(table.values()) if stream_id == 0 else [s for s in [table.get(stream_id)] if s]
        for stream in targets:
            self._pump(stream, up=up)

    def _pump(self, stream: _Stream, up: bool) -> None:
        """Send what is queued toward one side as far as its windows allow; each piece sent is
        acknowledged to the side it came from."""
        dst: _Side | None = stream.up if up else self.down
        src: _Side | None = self.down if up else stream.up
        queue = stream.to_up if up else stream.to_down
        sid = stream.up_id if up else stream.down_id
        other = stream.down_id if up else stream.up_id
        if dst is None or sid is None:
            return  # no upstream yet: kept (and not acknowledged) until there is one
        while queue:
            if up and dst.pipe.backpressured:  # kept (and not acknowledged) until it drains
                assert isinstance(dst, _Up)
                self._written.add(dst)  # (what is queued in its pipe goes out meanwhile)
                self._hold_for(dst)
                return
            item, flow = queue[0]
            # The end right behind the last data goes in its frame (END_STREAM on the DATA, as a
            # client sends a unary call's): one frame less to make, send and parse on each hop.
            ends = False
            try:
                if item is None:
                    dst.conn.end_stream(sid)
                elif isinstance(item, list):
                    dst.conn.send_headers(sid, item, end_stream=True)
                else:
                    window = min(dst.conn.local_flow_control_window(sid), dst.conn.max_outbound_frame_size)
                    if window <= 0:
                        return
                    if not up:
                        self._data_down += 1  # one frame: at most max_outbound_frame_size
                    if len(item) > window:
                        dst.conn.send_data(sid, item[:window])
                        queue[0] = (item[window:], flow)
                        continue
                    ends = len(queue) > 1 and queue[1][0] is None
                    dst.conn.send_data(sid, item, end_stream=ends)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                if src is not None and other is not None:
                    self._ack(src, other, queue)
                queue.clear()
                return
            queue.popleft()
            if flow and src is not None and other is not None:
                try:  # noqa: SIM105 (contextlib.suppress: two calls per frame)
                    src.conn.acknowledge_received_data(flow, other)
                except h2.exceptions.ProtocolError:
                    pass
            if ends:
                queue.popleft()  # (the end: no flow of its own)
                item = None
            written = dst if up else src
            if isinstance(written, _Up):
                self._written.add(written)
            if item is None or isinstance(item, list):
                if up:
                    stream.ended_up = True
                else:
                    self._finish(stream)
                return

    @staticmethod
    def _ack(side: _Side, stream_id: int, queue: deque[Item]) -> None:
        """Reopen the windows of data that will not be sent on (the connection's, at least)."""
        for _, flow in queue:
            if flow:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    side.conn.acknowledge_received_data(flow, stream_id)

    def _finish(self, stream: _Stream, error: str | None = None) -> None:
        if self.streams.pop(stream.down_id, None) is None:
            return
        if not self.streams and self._refuse_above is not None:
            self._no_streams.set()
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.task is not None and stream.task is not asyncio.current_task():
            stream.task.cancel()
        self._ack(self.down, stream.down_id, stream.to_up)
        stream.to_up.clear()
        up, sid = stream.up, stream.up_id
        if up is not None and sid is not None:
            up.streams.pop(sid, None)
            self._ack(up, sid, stream.to_down)
            if not stream.ended_up:  # the response ended first: the rest of the request is not sent
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    up.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            self._written.add(up)
        stream.to_down.clear()
        if not stream.request_ended and error is None:  # answered: its body will not be read (RFC 9113 8.1)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.down.conn.reset_stream(stream.down_id, h2.errors.ErrorCodes.NO_ERROR)
        if error is not None and stream.result.error is None:
            stream.result.error = error
        if stream.target is not None:
            if error in (CLIENT_RESET, CLIENT_CLOSED):  # the caller's doing, not the endpoint's
                status = stream.result.status  # failure: what it answered counts; unanswered,
                if status is None:  # neither a failure nor a success (Lease.abandon)
                    self.router.abandon(stream.target, observe=stream.request_ended)
                else:
                    self.router.report(
                        stream.target, _succeeded(status, stream.result.grpc_status), stream.head_s
                    )
            self.router.release(stream.target, stream.result.error is None)
            stream.target = None
        stream.span.finish(stream.result)
