"""HTTP/1.1 messages on one connection for the proxy's data path: httptools (llhttp, in C) parses
what arrives, this module frames what goes out. Events in, bytes out, as h11 shapes it, so the
proxy logic in :mod:`proxy.http1` reads the same; h11 made the data path slow (about 40% of a
sidecar's CPU per request went to it), llhttp is Node.js's parser.

A :class:`Connection` is one side of one connection: ``SERVER`` reads requests and writes
responses (the downstream connection), ``CLIENT`` writes requests and reads responses (a pooled
upstream connection). What it decides, as a server would (RFC 9112):

- the framing of what it writes: a body with Content-Length keeps it; a chunked body stays chunked
  (re-chunked as it streams); a response without framing is chunked for an HTTP/1.1 client and
  delimited by closing the connection for an HTTP/1.0 one (so is a chunked one: 1.0 has no
  chunks); responses to HEAD, 1xx, 204 and 304 have no body;
- keep-alive: the connection is reusable once both messages are complete and neither side asked
  to close (llhttp's reading of Connection and the HTTP version);
- pipelined requests wait: after a request's end, :meth:`Connection.next_event` says ``PAUSED``
  until :meth:`Connection.start_next_cycle`;
- upgrades: after a request with ``Upgrade``, the bytes that follow are kept (``trailing_data``)
  until the response says whether the protocol switched (101) or not (they are parsed as HTTP).

Malformed input raises :class:`ProtocolError` with the status to answer (400; 431 for a head over
``max_head`` bytes). Request smuggling shapes (Content-Length with Transfer-Encoding, bad chunk
sizes, obsolete line folding) are llhttp's errors.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal, cast

import httptools

from proxy.headers import HOP_BY_HOP, IDENTITY_HEADERS, absolute_authority
from proxy.observe import TRACE_HEADERS

Header = tuple[bytes, bytes]
Role = Literal["server", "client"]
SERVER: Final = "server"
CLIENT: Final = "client"
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100  # header fields in a request head (Envoy's default max_headers_count): else 431
# RFC 3986 host (reg-name, IPv4, or [IP-literal]) and optional port; empty is allowed for HTTP/1.1.
_HOST_RE = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.vV\-._~!$&'()*+,;=]+\])(?::[0-9]*)?")


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
PAUSED: Final = _Sentinel("PAUSED")


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; ``status`` is what a server answers (400, 431, 405)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class LocalProtocolError(Exception):
    """We were asked to send something the connection's state does not allow."""


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    headers: list[Header]
    http_version: bytes = b"1.1"
    keep_alive: bool = True
    chunked: bool = False
    length: int | None = None
    expect_continue: bool = False
    upgrade: bool = False
    # What the parser learnt in its one pass over the headers (a Request made by hand: unknown).
    known: bool = False  # ``chunked`` and ``length`` describe ``headers`` (else they are read from them)
    host: bytes | None = None  # the Host header (when known)
    hop: bool = True  # a hop-by-hop header may be among the headers
    traced: bool = True  # a trace header may be among the headers
    identity: bool = True  # an identity header (XFCC, l5d-client-id) may be among the headers


@dataclass(slots=True)
class Response:
    status_code: int
    headers: list[Header]
    reason: bytes = b""
    http_version: bytes = b"1.1"
    keep_alive: bool = True
    known: bool = False  # as Request's: ``chunked`` and ``length`` describe ``headers``
    chunked: bool = False
    length: int | None = None
    hop: bool = True  # a hop-by-hop header (Connection among them) may be among the headers


@dataclass(slots=True)
class InformationalResponse:
    status_code: int
    headers: list[Header]
    reason: bytes = b""


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    headers: list[Header] = field(default_factory=list)


@dataclass(slots=True)
class ConnectionClosed:
    pass


Event = Request | Response | InformationalResponse | Data | EndOfMessage | ConnectionClosed
# The end of a message without trailers, as the parser gives it: one object for all (events are
# read, never changed, by the proxy).
_END: Final = EndOfMessage()

_NO_BODY_STATUS = frozenset({204, 304})
_REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def _framing(headers: list[Header]) -> tuple[bool, int | None]:
    """(chunked, content length) as the headers say (llhttp has already refused both at once)."""
    chunked, length = False, None
    for name, value in headers:
        low = name.lower()
        if low == b"transfer-encoding":
            chunked = _is_chunked(value)
        elif low == b"content-length":
            length = int(value)
    return chunked, length


def _is_chunked(transfer_encoding: bytes) -> bool:
    return transfer_encoding.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


_FRAMING_NAMES = frozenset({b"transfer-encoding", b"content-length", b"host", b"expect"})
_NOTABLE = _FRAMING_NAMES | HOP_BY_HOP | TRACE_HEADERS | IDENTITY_HEADERS


# What one pass over parsed (lower-case) header names finds, the few that matter to the proxy:
# chunked, content length, the first Host, how many Hosts, 100-continue expected, a hop-by-hop,
# trace or identity header among them (a plain tuple: no object to build per message).
_Scan = tuple[bool, int | None, bytes | None, int, bool, bool, bool, bool]


def _scan(headers: list[Header]) -> _Scan:
    chunked = expect = hop = traced = identity = False
    length: int | None = None
    host: bytes | None = None
    hosts = 0
    for name, value in headers:
        if name not in _NOTABLE:  # most headers: one set lookup
            continue
        if name == b"transfer-encoding":
            chunked = _is_chunked(value)
        elif name == b"content-length":
            length = int(value)
        elif name == b"host":
            hosts += 1
            if host is None:
                host = value
        elif name == b"expect":
            expect = expect or value.strip().lower() == b"100-continue"
        elif name in HOP_BY_HOP:
            hop = True
        elif name in IDENTITY_HEADERS:
            identity = True
        else:
            traced = True
    return chunked, length, host, hosts, expect, hop, traced, identity


def _request_host(target: bytes, host: bytes | None, hosts: int, version: bytes) -> bytes | None:
    """The request's Host, as RFC 9112 section 3.2 has a server check it: an HTTP/1.1 request
    without one, with two, or with an invalid one is a 400. A request in absolute form (to a
    proxy) has its target's authority as its Host, whatever the header said (section 3.2.2)."""
    if hosts > 1:
        raise ProtocolError("more than one Host header", 400)
    authority = absolute_authority(target) if not target.startswith(b"/") else None
    if authority is not None:
        if not authority or not _HOST_RE.fullmatch(authority):
            raise ProtocolError("request target has no valid authority", 400)
        return authority
    if host is None:
        if version == b"1.1":
            raise ProtocolError("HTTP/1.1 request without a Host header", 400)
        return None
    if not _HOST_RE.fullmatch(host.strip(b" \t")):
        raise ProtocolError("invalid Host header", 400)
    return host


class _ReleasedParser:
    """Stands in for llhttp's parser after :meth:`Connection.release`."""

    def feed_data(self, data: bytes) -> None:
        raise httptools.HttpParserError("the connection was released")


_RELEASED = cast(httptools.HttpRequestParser, _ReleasedParser())


class _Head(Exception):
    """Raised from the response parser's callback: a response without a body (to HEAD) is complete
    at its head, which llhttp cannot be told."""


class Connection:
    """One side of an HTTP/1.1 connection (see the module's docstring)."""

    __slots__ = (
        "_body_seen",
        "_continue_done",
        "_eof",
        "_error",
        "_events",
        "_framing_fed",
        "_fresh",
        "_head_done",
        "_head_fed",
        "_head_size",
        "_headers",
        "_in_message",
        "_in_trailers",
        "_informational",
        "_last_response",
        "_messages",
        "_out_body",
        "_out_chunked",
        "_out_to_close",
        "_parser",
        "_paused",
        "_reason",
        "_switched",
        "_upgrading",
        "_url",
        "_valid_host",
        "max_head",
        "must_close",
        "our_done",
        "request",
        "role",
        "sent_head",
        "their_done",
        "trailing",
    )

    def __init__(self, role: Role, max_head: int = MAX_HEAD) -> None:
        self.role = role
        self.max_head = max_head
        self._events: deque[Event | bytes] = deque()  # (body data as the bytes themselves: Data when taken)
        self.trailing = b""  # bytes after an upgrade request (or a switching response)
        self._eof = False
        self._error: ProtocolError | None = None
        self._paused = False
        self._upgrading = False
        self._switched = False
        self.must_close = False
        self.request: Request | None = None  # server: the request being answered; client: the one sent
        self._last_response: Response | None = None
        self._url = self._reason = b""
        self._valid_host: bytes | None = None  # the last request's Host, found valid
        self._fresh: bytes | None = None  # a read whose first byte begins a message (being fed)
        self._headers: list[Header] = []
        self._head_done = False
        self._head_size = 0
        self._informational = False
        self._new_parser()
        self._start()

    def _new_parser(self) -> None:
        if self.role == SERVER:
            self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser = (
                httptools.HttpRequestParser(self)
            )
        else:
            self._parser = httptools.HttpResponseParser(self)
        self._in_message = False
        self._head_fed = 0
        self._in_trailers = False
        self._framing_fed = 0
        self._body_seen = False
        self._messages = 0

    def release(self) -> None:
        """The connection is over: let go of llhttp's parser. The parser holds this object's
        callbacks, so together they form a reference cycle that would wait for a full GC."""
        self._parser = _RELEASED

    def _start(self) -> None:
        self._out_chunked = False
        self._out_to_close = False
        self._out_body = True
        self.our_done = False
        self.their_done = False
        self.sent_head = False
        self._continue_done = False  # body data arrived or an answer went out (100-continue)

    # -- llhttp's callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._messages += 1
        self._in_message = True
        self._url = b""
        self._reason = b""
        self._headers = []
        self._head_done = False
        self._informational = False
        self._head_fed = 0
        self._head_size = 0
        self._in_trailers = False  # after a chunk header, until its data (the last chunk's: trailers)
        self._framing_fed = 0  # bytes of reads after the head that carried no body, in a row

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.max_head:
            raise ProtocolError("request target too long", 414)

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))  # names are case-insensitive: lower-case, as HTTP/2
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.max_head:
            raise ProtocolError(
                "trailer fields too large" if self._head_done else "header fields too large", 431
            )

    def on_headers_complete(self) -> None:
        self._head_done = True
        self._head_size = 0  # (a trailer section has 64 KiB of its own, as in Node's and Envoy's)
        headers, self._headers = self._headers, []
        parser = self._parser
        # The version: read off the first line of a read that began with this head (HTTP/1.1, the
        # usual), else asked of the parser (which formats a string per call). A head the parser
        # took whole has its first line as llhttp read it: one CRLF ends it (llhttp refuses a bare
        # CR or LF there, and anything between the version and the CRLF).
        fresh, self._fresh = self._fresh, None  # (a second message in one read: the parser is asked)
        if self.role == SERVER:
            if (
                fresh is not None
                and (end := fresh.find(b"\r\n")) > 9
                and fresh[end - 9 : end] == b" HTTP/1.1"
            ):
                version = b"1.1"
            else:
                version = parser.get_http_version().encode()
            assert isinstance(parser, httptools.HttpRequestParser)
            if version not in (b"1.1", b"1.0"):  # llhttp takes 0.9 (no version) and any x.y
                raise ProtocolError(f"HTTP/{version.decode('latin-1')} is not spoken here", 505)
            method = parser.get_method()
            if method == b"CONNECT":
                raise ProtocolError("CONNECT is not proxied by the sidecar", 405)
            if self._url == b"*" and method != b"OPTIONS":
                raise ProtocolError("the asterisk-form target is for OPTIONS only (RFC 9112 3.2.4)", 400)
            if len(headers) > MAX_HEADERS:
                raise ProtocolError(f"more than {MAX_HEADERS} header fields", 431)
            chunked, length, host, hosts, expect, hop, traced, identity = _scan(headers)
            keep_alive = parser.should_keep_alive()
            url = self._url
            if hosts != 1 or host != self._valid_host or url[:1] != b"/":  # (else: checked before)
                checked = _request_host(url, host, hosts, version)
                if checked is not None and checked is not host:  # absolute form: the target's authority
                    headers = [(n, v) for n, v in headers if n != b"host"]
                    headers.insert(0, (b"host", checked))
                    host = checked
                elif checked is not None:
                    self._valid_host = checked  # (a keep-alive client's next requests say the same)
            if version == b"1.0" and chunked:
                keep_alive = False  # RFC 9112 6.1: faulty framing, close after this request
            upgrade = parser.should_upgrade()
            if upgrade and (chunked or length):
                # llhttp stops at the end of an upgrade request's head: its body would be read as
                # the next request (smuggled past the policy) once the upgrade is declined.
                raise ProtocolError("an Upgrade request with a body is not proxied: send it without Upgrade")
            self._events.append(
                Request(
                    method,
                    url,
                    headers,
                    version,
                    keep_alive,
                    chunked,
                    length,
                    expect and version == b"1.1",
                    upgrade,
                    True,
                    host,
                    hop,
                    traced,
                    identity,
                )
            )
            return
        assert isinstance(parser, httptools.HttpResponseParser)
        version = (
            b"1.1"
            if fresh is not None and fresh.startswith(b"HTTP/1.1 ")
            else parser.get_http_version().encode()
        )
        status = parser.get_status_code()
        if not 100 <= status <= 599:  # RFC 9110 15: a three-digit code of a class 1xx-5xx
            raise ProtocolError(f"response status {status} is not 100-599")
        if 100 <= status < 200:
            self._events.append(InformationalResponse(status, headers, self._reason))
            self._informational = True
            self._switched = status == 101
            return
        keep = parser.should_keep_alive()
        scan = _scan(headers)
        self._events.append(
            Response(status, headers, self._reason, version, keep, True, scan[0], scan[1], scan[5])
        )
        request = self.request
        if request is not None and request.method == b"HEAD":
            raise _Head

    def on_body(self, body: bytes) -> None:
        self._in_trailers = False
        self._body_seen = True
        self._events.append(body)

    def on_chunk_header(self) -> None:
        # Its data follows (on_body), or, for the last chunk, the trailer section (for the status
        # a section too large gets: receive_data counts it).
        self._in_trailers = True

    def on_message_complete(self) -> None:
        self._in_message = False
        self._in_trailers = False
        if self._informational:
            self._informational = False
            return  # 1xx: the final response follows (or, after 101, another protocol)
        trailers = self._headers
        if not trailers:
            self._events.append(_END)  # (most messages: one end, shared)
            return
        self._headers = []
        if not self._parser.should_keep_alive():
            self.must_close = True  # a Connection: close in the trailers (llhttp reads it there too)
        self._events.append(EndOfMessage(trailers))

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" at the end of its stream."""
        if self._error is not None:
            return
        if not data:
            self._receive_eof()
            return
        if self._upgrading or self._switched:
            self.trailing += data
            return
        if self._in_message and not self._head_done:
            if self._head_fed > self.max_head:
                self._fail(ProtocolError("request header fields too large", 431))
                return
            self._head_fed += len(data)
        # A read that began after this message's head, ended in it and carried none of its body is
        # all chunk framing (size lines, extensions) or trailer section: held to ``max_head`` in a
        # row, or one that never ends is taken forever (llhttp keeps an unfinished trailer field
        # whole: quadratic; it skips extensions: CVE-2024-22019's endless chunk extension). Reads
        # with body data in them reset the count, whatever their boundaries.
        framing_of = self._messages if self._in_message and self._head_done else -1
        self._body_seen = False
        self._fresh = None if self._in_message else data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.trailing += data[offset:]
            if self.role == SERVER:
                self._upgrading = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Head):
                self._events.append(_END)
                self._in_message = False
                if not data.endswith(b"\r\n\r\n"):
                    self.must_close = True  # bytes after the head: not ours to parse, not reusable
                self._new_parser()
            elif isinstance(cause, ProtocolError):
                self._fail(cause)
            else:
                self._fail(ProtocolError(f"malformed message: {exc}"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed message: {exc}"))
        self._fresh = None  # (not kept past its read)
        if self._in_message and not self._head_done and self._head_fed > self.max_head:
            self._fail(ProtocolError("request header fields too large", 431))
        elif self._body_seen:
            self._framing_fed = 0
        elif framing_of == self._messages and self._in_message:
            self._framing_fed += len(data)
            if self._framing_fed > self.max_head:
                self._fail(
                    ProtocolError("trailer fields too large", 431)
                    if self._in_trailers
                    else ProtocolError("chunk size lines or extensions too large")
                )

    def _receive_eof(self) -> None:
        self._eof = True
        if self._switched or self._upgrading:
            return
        if self._in_message:
            response = self._current_response()
            if self._head_done and response is not None and self._close_delimited(response):
                self._in_message = False
                self._events.append(_END)
            else:
                self._fail(ProtocolError("connection closed in the middle of a message"))
                return
        self._events.append(ConnectionClosed())

    def _current_response(self) -> Response | None:
        for event in reversed(self._events):
            if isinstance(event, Response):
                return event
        return self._last_response if self.role == CLIENT else None

    @staticmethod
    def _close_delimited(response: Response) -> bool:
        chunked, length = _message_framing(response)
        return not chunked and length is None

    def _fail(self, error: ProtocolError) -> None:
        self._error = error

    def next_event(self) -> Event | _Sentinel:
        """The next event, NEED_DATA, or PAUSED (a message ended: ``start_next_cycle`` first)."""
        if self._paused:
            return PAUSED
        if self._events:
            event = self._events.popleft()
            if isinstance(event, EndOfMessage):
                self.their_done = True
                if self.role == SERVER:
                    self._paused = True
            elif isinstance(event, Request):
                self.request = event
                if not event.keep_alive:
                    self.must_close = True
            elif isinstance(event, Response):
                self._last_response = event
                if not event.keep_alive:
                    self.must_close = True
            elif type(event) is bytes:
                if self.role == SERVER:
                    self._continue_done = True
                return Data(event)
            return event  # type: ignore[return-value]
        if self._error is not None:
            raise self._error
        if self._eof:
            return ConnectionClosed()
        return NEED_DATA

    def whole_message(self, unless: frozenset[int] = frozenset()) -> tuple[Request | Response, bytes] | None:
        """The next message, when all of it is parsed: its head, its body joined in one piece
        (b"": none) and its end without trailers, taken at once as ``next_event`` and
        ``rest_of_message`` would take them (what follows it stays); else None and nothing taken
        (nor is a response whose status is in ``unless``)."""
        events = self._events
        n = len(events)
        if n < 2 or self._paused:
            return None
        head, end = events[0], events[1]
        if end is _END:  # (no body)
            body, n = b"", 2
        elif type(end) is bytes and n > 2:
            after = events[2]
            if after is _END:  # (the body in one piece)
                body, n = end, 3
            elif type(after) is bytes:  # (a body in pieces: chunks, as llhttp gives them)
                taken = 3
                while taken < n and type(events[taken]) is bytes:
                    taken += 1
                if taken == n or events[taken] is not _END:
                    return None
                body = b"".join([events[i] for i in range(1, taken)])  # type: ignore[misc]
                n = taken + 1
            else:
                return None
        else:
            return None
        kind = type(head)
        if kind is Request:
            self.request = head  # type: ignore[assignment]
            if self.role == SERVER:
                self._paused = True
                if body:
                    self._continue_done = True
        elif kind is Response and head.status_code not in unless:  # type: ignore[union-attr]
            self._last_response = head  # type: ignore[assignment]
        else:
            return None
        if len(events) == n:
            events.clear()
        else:  # (pipelined: the next request's events stay)
            for _ in range(n):
                events.popleft()
        if not head.keep_alive:  # type: ignore[union-attr]
            self.must_close = True
        self.their_done = True
        return head, body  # type: ignore[return-value]

    @property
    def nothing_yet(self) -> bool:
        """No event parsed and no error: what came so far begins no message, or not a whole head."""
        return not self._events and self._error is None

    @property
    def at_rest(self) -> bool:
        """Nothing parsed and not yet taken, no message begun, no error: the next bytes begin one."""
        return not self._events and not self._in_message and self._error is None

    def rest_of_message(self) -> bytes | None:
        """Right after a head: the rest of its message when it is already parsed, its body data
        and then its end without trailers (most messages arrive whole in one read), taken at once
        as the events one by one would be; else None, and nothing is taken."""
        events = self._events
        n = len(events)
        end = events[-1] if n else None
        if n == 1 and end is _END:  # (the usual shapes first: a message without a body, or with
            body, data = b"", False  # it in one piece)
            events.clear()
        elif n == 2 and end is _END and type(events[0]) is bytes:
            body, data = events[0], True
            events.clear()
        else:
            count = 0
            for event in events:
                if type(event) is bytes:
                    count += 1
                elif event is _END:
                    break
                else:
                    return None
            else:
                return None
            body = b"".join([events.popleft() for _ in range(count)])  # type: ignore[misc]
            events.popleft()
            data = count > 0
        self.their_done = True
        if self.role == SERVER:
            self._paused = True
            if data:
                self._continue_done = True
        return body

    @property
    def receiving(self) -> bool:
        """The peer is in the middle of a message: its head or body is not whole yet."""
        return self._in_message

    @property
    def waiting_for_100_continue(self) -> bool:
        """The client asked for ``100 Continue`` and has sent no body yet (nor had an answer)."""
        request = self.request
        return (
            self.role == SERVER
            and request is not None
            and request.expect_continue
            and not self._continue_done
            and not self.sent_head
            and not self.their_done
        )

    @property
    def reusable(self) -> bool:
        """Both messages complete and nobody asked to close. A client connection also holds
        nothing more from its server: bytes after the response (a body longer than its framing
        said, a second response) answer no request, and on a pooled connection they would be
        taken for the next request's answer, another client's (Envoy closes such a connection)."""
        # (A server's parse error in a pipelined request after this one is that request's: the
        # next cycle raises it, so it is answered 400/431/414 before the close, not dropped.)
        if not (
            self.our_done
            and self.their_done
            and not self.must_close
            and (self._error is None or self.role == SERVER)
        ):
            return False
        return self.role == SERVER or not (self._events or self._in_message)

    def next_cycle(self) -> bool:
        """``reusable``, and if so the next cycle started (``start_next_cycle``)."""
        if not self.reusable:
            return False
        self.start_next_cycle(checked=True)
        return True

    def start_next_cycle(self, checked: bool = False) -> None:
        """Ready for the next message; ``checked``: the caller has just seen ``reusable`` true."""
        if not checked and not self.reusable:
            raise LocalProtocolError("the connection is not between messages")
        self._paused = False
        self.request = None
        self._last_response = None
        self._start()

    def decline_upgrade(self) -> None:
        """The server answered an upgrade request without switching: what followed it is HTTP."""
        if not self._upgrading:
            return
        self._upgrading = False
        rest, self.trailing = self.trailing, b""
        if rest:
            self.receive_data(rest)

    # -- sending -----------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        if isinstance(event, Data):
            return self._send_data(event.data)
        if isinstance(event, EndOfMessage):
            return self._send_end(event.headers)
        if isinstance(event, Request):
            return self._send_request(event)
        if isinstance(event, Response):
            return self._send_response(event)
        if isinstance(event, InformationalResponse):
            if self.role != SERVER or self.sent_head:
                raise LocalProtocolError("an informational response after the response head")
            self._continue_done = True
            return _head_line(b"HTTP/1.1 %d %s\r\n" % (event.status_code, _reason(event)), event.headers)
        raise LocalProtocolError(f"cannot send {event!r}")

    def send_whole(self, head: Request | Response, body: bytes = b"") -> bytes:
        """A whole message at once, its head, ``body`` and its end (no trailers): the bytes that
        ``send`` gives for the three events."""
        data = self._send_request(head) if isinstance(head, Request) else self._send_response(head)
        if body:
            data += self._send_data(body)
        return data + self._send_end([])

    def _send_request(self, request: Request) -> bytes:
        if self.role != CLIENT or self.sent_head:
            raise LocalProtocolError("a request on a connection busy with another")
        self.sent_head = True
        self.request = request
        self._out_chunked, length = _message_framing(request)
        self._out_body = self._out_chunked or bool(length)
        self._switched = False
        self.trailing = b""
        return _head_line(b"%s %s HTTP/1.1\r\n" % (request.method, request.target), request.headers)

    def _send_response(self, response: Response) -> bytes:
        if self.role != SERVER or self.sent_head:
            raise LocalProtocolError("a second response head")
        request = self.request
        self.sent_head = True
        if (  # most responses: framed by their length or chunks, to a keep-alive HTTP/1.1 request
            response.known
            and not response.hop
            and (response.chunked or response.length is not None)
            and not self.must_close
            and request is not None
            and request.keep_alive
            and request.http_version == b"1.1"
        ):  # (what the general case below comes to for them: the fields as they are)
            status = response.status_code
            if request.method != b"HEAD" and status not in _NO_BODY_STATUS and status >= 200:
                self._out_chunked = response.chunked
            else:
                self._out_body = False
            return _head_line(b"HTTP/1.1 %d %s\r\n" % (status, _reason(response)), response.headers)
        headers = response.headers
        chunked, length = _message_framing(response)
        if response.hop and b"close" in _connection_tokens(headers):
            self.must_close = True
        http10 = request is not None and request.http_version == b"1.0"
        bodiless = (
            (request is not None and request.method == b"HEAD")
            or response.status_code in _NO_BODY_STATUS
            or response.status_code < 200
        )
        self._out_body = not bodiless
        if not bodiless:
            if chunked and http10:  # HTTP/1.0 has no chunks: the end of the body is the close
                headers = [(n, v) for n, v in headers if n.lower() != b"transfer-encoding"]
                self.must_close = self._out_to_close = True
            elif chunked:
                self._out_chunked = True
            elif length is None and http10:
                self.must_close = self._out_to_close = True
            elif length is None:
                headers = [*headers, (b"Transfer-Encoding", b"chunked")]
                self._out_chunked = True
        if self.must_close or (request is not None and not request.keep_alive):
            self.must_close = True
            if not any(n.lower() == b"connection" for n, _ in headers):
                headers = [*headers, (b"Connection", b"close")]
        elif http10:  # a 1.0 client that asked to keep the connection must hear that it is kept
            headers = [*headers, (b"Connection", b"keep-alive")]
        return _head_line(b"HTTP/1.1 %d %s\r\n" % (response.status_code, _reason(response)), headers)

    def _send_data(self, data: bytes) -> bytes:
        if not self.sent_head or self.our_done:
            raise LocalProtocolError("body data outside a message")
        if not data or not self._out_body:
            return b""
        if self._out_chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def _send_end(self, trailers: list[Header]) -> bytes:
        if not self.sent_head or self.our_done:
            raise LocalProtocolError("end of a message not started")
        self.our_done = True
        if self._out_chunked and self._out_body:
            return _head_line(b"0\r\n", trailers)
        return b""

    @property
    def body_ends_at_close(self) -> bool:
        """The response being sent (server) has a body whose end is the connection's close: cut
        short, only a reset tells the client it is not whole."""
        return self.sent_head and self._out_body and self._out_to_close

    @property
    def switched(self) -> bool:
        """A 101 was received (client) and the connection is now the upgraded protocol's."""
        return self._switched


def _message_framing(message: Request | Response) -> tuple[bool, int | None]:
    if message.known:
        return message.chunked, message.length
    return _framing(message.headers)


def codings_beyond_chunked(headers: list[Header]) -> list[bytes]:
    """The transfer codings of a message other than chunked (gzip, ...): an HTTP/1.0 recipient
    cannot be sent them (RFC 9112 6.1), and dropping the header would leave the body coded with
    nothing to say so."""
    return [
        t
        for n, v in headers
        if n.lower() == b"transfer-encoding"
        for t in (p.strip().lower() for p in v.split(b","))
        if t and t != b"chunked"
    ]


def _connection_tokens(headers: list[Header]) -> set[bytes]:
    return {
        t.strip().lower()
        for n, v in headers
        if n.lower() == b"connection"
        for t in v.split(b",")
        if t.strip()
    }


def _reason(response: Response | InformationalResponse) -> bytes:
    return response.reason or _REASONS.get(response.status_code, b"")


_JOIN_FIELD = b": ".join


def _head_line(first: bytes, headers: list[Header]) -> bytes:
    """``first`` (one line, with its CRLF) and the header lines. A CR or LF inside a name or value
    (header injection) shows as more line ends than lines, and is refused; names are tokens (the
    parser's, or the proxy's own), so a colon cannot be inside one."""
    # (C calls: no bytecode per line; joined, not formatted: formatting a line costs more)
    block = first + b"\r\n".join(map(_JOIN_FIELD, headers)) + b"\r\n\r\n" if headers else first + b"\r\n"
    lines = len(headers) + 2
    if block.count(b"\n") != lines or block.count(b"\r") != lines:
        bad = next((n for n, v in headers if b"\r" in n + v or b"\n" in n + v), b"")
        raise LocalProtocolError(f"header {bad!r} cannot be sent (CR or LF inside)")
    return block
