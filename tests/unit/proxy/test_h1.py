"""proxy.h1: what httptools parses becomes the right events, and what the proxy writes is what an
independent parser (h11) reads back as the same message."""

from __future__ import annotations

import h11
import pytest

from proxy import h1


def events(conn: h1.Connection) -> list[object]:
    out: list[object] = []
    while True:
        event = conn.next_event()
        out.append(event)
        if event is h1.NEED_DATA or event is h1.PAUSED or isinstance(event, h1.ConnectionClosed):
            return out


def h11_read(role: type[h11.CLIENT] | type[h11.SERVER], data: bytes, method: bytes = b"GET") -> list[object]:
    """What h11 makes of bytes we wrote (a response as a client reads it, or a request as a server does)."""
    conn = h11.Connection(role)
    if role is h11.CLIENT:
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    out: list[object] = []
    while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        out.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return out


def test_pipelined_requests_wait_for_the_next_cycle() -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
    )
    first = events(server)
    assert isinstance(first[0], h1.Request) and first[0].target == b"/a"
    assert isinstance(first[1], h1.EndOfMessage) and first[2] is h1.PAUSED
    with pytest.raises(h1.LocalProtocolError):
        server.start_next_cycle()  # the response has not been sent
    server.send(h1.Response(200, [(b"content-length", b"2")]))
    server.send(h1.Data(b"ok"))
    server.send(h1.EndOfMessage())
    assert server.reusable
    server.start_next_cycle()
    second = events(server)
    assert isinstance(second[0], h1.Request) and second[0].method == b"POST" and second[0].chunked
    assert second[1] == h1.Data(b"hello")
    assert second[2] == h1.EndOfMessage([(b"x-t", b"1")])  # names lower-case, as HTTP/2's


def test_response_framing_is_kept_or_chosen_and_h11_reads_it_back() -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    events(server)
    # No framing from upstream (it would have closed): chunked for an HTTP/1.1 client, trailers kept.
    wire = server.send(h1.Response(200, [(b"x-a", b"1")]))
    wire += server.send(h1.Data(b"abc")) + server.send(h1.Data(b"")) + server.send(h1.Data(b"de"))
    wire += server.send(h1.EndOfMessage([(b"grpc-status", b"0")]))
    read = h11_read(h11.CLIENT, wire)
    assert isinstance(read[0], h11.Response) and read[0].status_code == 200
    assert b"".join(bytes(e.data) for e in read if isinstance(e, h11.Data)) == b"abcde"
    end = read[-1]
    assert isinstance(end, h11.EndOfMessage) and end.headers.raw_items() == [(b"grpc-status", b"0")]
    assert server.reusable


def test_http10_client_gets_a_close_delimited_body_instead_of_chunks() -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    request = events(server)[0]
    assert isinstance(request, h1.Request) and not request.keep_alive
    head = server.send(h1.Response(200, [(b"Transfer-Encoding", b"chunked")]))
    assert b"transfer-encoding" not in head.lower() and b"Connection: close" in head
    assert server.send(h1.Data(b"raw")) == b"raw"
    assert server.send(h1.EndOfMessage()) == b""
    assert not server.reusable


def test_http10_keep_alive_is_acknowledged() -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    events(server)
    head = server.send(h1.Response(200, [(b"content-length", b"0")]))
    assert b"Connection: keep-alive" in head
    server.send(h1.EndOfMessage())
    assert server.reusable


def test_http10_with_transfer_encoding_is_not_kept_alive() -> None:
    """RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing; the
    server closes the connection after it (what follows could be smuggled)."""
    server = h1.Connection(h1.SERVER)
    server.receive_data(
        b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    request = events(server)[0]
    assert isinstance(request, h1.Request) and request.keep_alive is False
    server.send(h1.Response(200, [(b"content-length", b"0")]))
    server.send(h1.EndOfMessage())
    assert not server.reusable


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(status: int) -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    events(server)
    head = server.send(h1.Response(status, []))
    assert b"chunked" not in head.lower()
    assert server.send(h1.Data(b"ignored")) == b""
    assert server.send(h1.EndOfMessage()) == b""


def _client(method: bytes = b"GET", headers: list[h1.Header] | None = None) -> tuple[h1.Connection, bytes]:
    client = h1.Connection(h1.CLIENT)
    wire = client.send(h1.Request(method, b"/", headers or [(b"Host", b"x")]))
    wire += client.send(h1.EndOfMessage())
    return client, wire


def test_head_response_ends_at_its_head_and_the_connection_is_reused() -> None:
    client, wire = _client(b"HEAD")
    assert wire == b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    got = events(client)
    assert isinstance(got[0], h1.Response) and isinstance(got[1], h1.EndOfMessage)
    assert client.reusable
    client.start_next_cycle()
    client.send(h1.Request(b"GET", b"/", [(b"Host", b"x")]))
    client.send(h1.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert events(client)[1] == h1.Data(b"abc")


def test_informational_then_final_response() -> None:
    client, _ = _client()
    client.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    got = events(client)
    assert isinstance(got[0], h1.InformationalResponse) and got[0].status_code == 100
    assert isinstance(got[1], h1.Response) and got[1].status_code == 200
    assert got[2:4] == [h1.Data(b"abc"), h1.EndOfMessage()]
    assert client.reusable


def test_close_delimited_response_ends_at_eof_and_is_not_reused() -> None:
    client, _ = _client()
    client.receive_data(b"HTTP/1.1 200 OK\r\n\r\nabc")
    assert events(client)[1:] == [h1.Data(b"abc"), h1.NEED_DATA]
    client.receive_data(b"")
    assert events(client) == [h1.EndOfMessage(), h1.ConnectionClosed()]
    assert not client.reusable


@pytest.mark.parametrize(
    "surplus",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSECRET",  # a body longer than its framing
        b"HTTP/1.1 200 OK\r\nContent-Le",  # the start of a second response
        b"EVIL",
    ],
)
def test_bytes_after_the_response_make_the_connection_not_reusable(surplus: bytes) -> None:
    """They answer no request: pooled, they would be the next request's answer (another client)."""
    client, _ = _client()
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + surplus)
    seen = []
    while not isinstance(seen[-1] if seen else None, h1.EndOfMessage):
        try:
            seen.append(client.next_event())
        except h1.ProtocolError:
            break
    assert not client.reusable
    clean, _ = _client()
    clean.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    events(clean)
    assert clean.reusable


@pytest.mark.parametrize("status", [b"099", b"600", b"999"])
def test_a_status_outside_100_599_is_an_error(status: bytes) -> None:
    """RFC 9110 15: 100-599. A 099 was read as a 1xx (its body dropped, the client left waiting)."""
    client, _ = _client()
    client.receive_data(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\nok")
    with pytest.raises(h1.ProtocolError, match="is not 100-599"):
        events(client)


def test_truncated_response_is_an_error() -> None:
    client, _ = _client()
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    events(client)
    client.receive_data(b"")
    with pytest.raises(h1.ProtocolError):
        events(client)


def test_upgrade_keeps_the_bytes_after_it_both_ways() -> None:
    upgrade = [(b"Host", b"x"), (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
    server = h1.Connection(h1.SERVER)
    server.receive_data(b"GET /ws HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in upgrade))
    server.receive_data(b"\r\nCLIENT-FRAME")
    got = events(server)
    assert isinstance(got[0], h1.Request) and got[0].upgrade
    assert server.trailing == b"CLIENT-FRAME"
    client, _ = _client(headers=upgrade)
    client.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nSRV"
    )
    reply = events(client)[0]
    assert isinstance(reply, h1.InformationalResponse) and reply.status_code == 101
    assert client.switched and client.trailing == b"SRV"


def test_declined_upgrade_parses_what_followed_as_http() -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    events(server)
    server.send(h1.Response(200, [(b"content-length", b"0")]))
    server.send(h1.EndOfMessage())
    server.decline_upgrade()
    server.start_next_cycle()
    nxt = events(server)[0]
    assert isinstance(nxt, h1.Request) and nxt.target == b"/next"


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost cart\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"CONNECT cart:443 HTTP/1.1\r\nHost: cart:443\r\n\r\n", 405),
    ],
    ids=["header-line", "content-length", "cl-and-te", "bad-chunk", "huge-header", "connect"],
)
def test_malformed_requests(wire: bytes, status: int) -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(wire)
    with pytest.raises(h1.ProtocolError) as caught:
        events(server)
    assert caught.value.status == status


def _cut_at_the_limit(conn: h1.Connection) -> None:
    """10,000 more bytes of a field that never ends (the limit is 4,096): a 431."""

    def trickle() -> None:
        for _ in range(100):
            conn.receive_data(b"a" * 100)
            events(conn)

    with pytest.raises(h1.ProtocolError) as caught:
        trickle()
    assert caught.value.status == 431


def test_a_head_that_never_ends_is_cut_at_the_limit() -> None:
    server = h1.Connection(h1.SERVER, max_head=4096)
    server.receive_data(b"GET / HTTP/1.1\r\nX: ")
    _cut_at_the_limit(server)


@pytest.mark.parametrize("role", ["request", "response"])
@pytest.mark.parametrize("part", [b"X-T: ", b"X-T"], ids=["value", "name"])
def test_a_trailer_section_that_never_ends_is_cut_at_the_limit(role: str, part: bytes) -> None:
    """After the last chunk nothing was counted: llhttp kept a trailer field that never ended whole
    (a copy per piece: quadratic), 60 MiB of one value in 4 s and as much memory, for a request
    the policy denied as well (its body is read to keep the connection)."""
    if role == "request":
        conn = h1.Connection(h1.SERVER, max_head=4096)
        conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    else:
        conn = h1.Connection(h1.CLIENT, max_head=4096)
        conn.send(h1.Request(b"GET", b"/", [(b"Host", b"x")]))
        conn.send(h1.EndOfMessage())
        conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.receive_data(b"2\r\nab\r\n0\r\n" + part)
    events(conn)
    _cut_at_the_limit(conn)


def test_trailers_and_bodies_of_any_size_within_the_limit_still_pass() -> None:
    """Body data is not counted as trailers, whatever its chunks' sizes and reads' boundaries."""
    conn = h1.Connection(h1.SERVER, max_head=4096)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(50):
        for piece in (b"1000\r\n", b"a" * 4096, b"\r\n"):  # a chunk header alone in a read, then its data
            conn.receive_data(piece)
    trailer = b"X-T: " + b"b" * 3000 + b"\r\n"
    for piece in (b"0\r\n", trailer[:1000], trailer[1000:], b"\r\n"):
        conn.receive_data(piece)
    got = events(conn)
    assert sum(len(e.data) for e in got if isinstance(e, h1.Data)) == 50 * 4096
    assert got[-2] == h1.EndOfMessage([(b"x-t", b"b" * 3000)])


@pytest.mark.parametrize("role", ["request", "response"])
def test_reads_that_end_after_a_chunk_size_line_are_body_not_trailers(role: str) -> None:
    """Each read ending with the next chunk's size line (a sender writing "data CRLF next-size"; or
    segmentation): every read began and ended just after a chunk header, was counted as trailer
    section, and a valid 160 KiB body (or a streamed response) got 431 after 64 KiB."""
    if role == "request":
        conn = h1.Connection(h1.SERVER)
        conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n")
    else:
        conn = h1.Connection(h1.CLIENT)
        conn.send(h1.Request(b"GET", b"/", [(b"Host", b"x")]))
        conn.send(h1.EndOfMessage())
        conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n")
    received = 0
    for _ in range(40):
        conn.receive_data(b"a" * 4096 + b"\r\n1000\r\n")
        received += sum(len(e.data) for e in events(conn) if isinstance(e, h1.Data))
    conn.receive_data(b"a" * 4096 + b"\r\n0\r\n\r\n")
    got = events(conn)
    assert received + sum(len(e.data) for e in got if isinstance(e, h1.Data)) == 41 * 4096
    assert h1.EndOfMessage() in got


@pytest.mark.parametrize("line", [b"5;ext=", b"0000", b'5;ext="'], ids=["extension", "zeros", "quoted"])
def test_a_chunk_size_line_that_never_ends_is_cut(line: bytes) -> None:
    """llhttp skips a chunk extension's bytes (and leading zeros), so nothing was ever refused: an
    endless one held the request and the app's connection for good (CVE-2024-22019)."""
    conn = h1.Connection(h1.SERVER, max_head=4096)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + line)
    events(conn)

    def trickle() -> None:
        for _ in range(100):
            conn.receive_data((b"0" if line == b"0000" else b"a") * 100)
            events(conn)

    with pytest.raises(h1.ProtocolError) as caught:
        trickle()
    assert caught.value.status == 400


def test_pipelined_requests_after_a_trailer_section_are_not_counted_as_trailers() -> None:
    """A read that began in one message's trailer section and ended in another's was counted whole
    as trailer bytes (the pipelined requests in between with it): 431 for valid requests."""
    conn = h1.Connection(h1.SERVER, max_head=4096)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n")
    pipelined = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    conn.receive_data(
        b"\r\n" + pipelined + b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    )
    served = 0
    while (got := events(conn))[-1] is h1.PAUSED or h1.EndOfMessage() in got:  # answer each in turn
        served += 1
        conn.send(h1.Response(200, [(b"content-length", b"0")]))
        conn.send(h1.EndOfMessage())
        if not conn.reusable:
            break
        conn.start_next_cycle()
    assert served == 201  # the first POST and the 200 GETs, none refused; the last POST has begun
    assert isinstance(got[0], h1.Request) and got[0].method == b"POST"


@pytest.mark.parametrize("role", ["request", "response"])
def test_a_head_and_a_trailer_section_have_a_limit_each(role: str) -> None:
    """The trailer fields were counted on top of the head's: a 40 KiB head and a 30 KiB trailer
    section, each within 64 KiB, got 431 (Node and Envoy hold each to its own limit)."""
    big = b"X-Big: " + b"a" * 40_000 + b"\r\n"
    if role == "request":
        conn = h1.Connection(h1.SERVER)
        conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\n" + big + b"Transfer-Encoding: chunked\r\n\r\n")
    else:
        conn = h1.Connection(h1.CLIENT)
        conn.send(h1.Request(b"GET", b"/", [(b"Host", b"x")]))
        conn.send(h1.EndOfMessage())
        conn.receive_data(b"HTTP/1.1 200 OK\r\n" + big + b"Transfer-Encoding: chunked\r\n\r\n")
    conn.receive_data(b"2\r\nab\r\n0\r\nX-T: " + b"b" * 30_000 + b"\r\n\r\n")
    got = events(conn)
    assert got[-2] == h1.EndOfMessage([(b"x-t", b"b" * 30_000)]), got[-2:]


def test_request_written_is_read_back_by_h11() -> None:
    client = h1.Connection(h1.CLIENT)
    headers = [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")]
    wire = client.send(h1.Request(b"POST", b"/p?q=1", headers))
    wire += client.send(h1.Data(b"hello")) + client.send(h1.EndOfMessage([(b"x-t", b"2")]))
    read = h11_read(h11.SERVER, wire)
    assert isinstance(read[0], h11.Request) and read[0].target == b"/p?q=1"
    assert read[1].data == b"hello"  # type: ignore[attr-defined]
    assert read[2].headers.raw_items() == [(b"x-t", b"2")]  # type: ignore[attr-defined]


def test_header_injection_is_refused() -> None:
    client = h1.Connection(h1.CLIENT)
    with pytest.raises(h1.LocalProtocolError):
        client.send(h1.Request(b"GET", b"/", [(b"Host", b"x\r\nEvil: 1")]))


def test_one_pass_over_the_headers_says_what_the_proxy_needs() -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(
        b"POST / HTTP/1.1\r\nHOST: a\r\nX-One: 1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    plain = events(server)[0]
    assert isinstance(plain, h1.Request) and plain.known
    assert plain.headers[0] == (b"host", b"a")  # names lower-case
    assert (plain.host, plain.length, plain.chunked, plain.expect_continue) == (b"a", 2, False, True)
    assert not plain.hop and not plain.traced
    for extra, hop, traced in (
        (b"Connection: x-one\r\n", True, False),
        (b"Keep-Alive: 5\r\n", True, False),
        (b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n", False, True),
        (b"X-B3-TraceId: 0af7651916cd43dd\r\n", False, True),
    ):
        server = h1.Connection(h1.SERVER)
        server.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n")
        request = events(server)[0]
        assert isinstance(request, h1.Request) and (request.hop, request.traced) == (hop, traced), extra
    client = h1.Connection(h1.CLIENT)
    client.send(h1.Request(b"GET", b"/", [(b"host", b"a")]))
    client.send(h1.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    response = events(client)[0]
    assert isinstance(response, h1.Response) and response.known and response.chunked and not response.hop
    client = h1.Connection(h1.CLIENT)
    client.send(h1.Request(b"GET", b"/", [(b"host", b"a")]))
    client.send(h1.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    response = events(client)[0]
    assert isinstance(response, h1.Response) and response.length == 0 and response.hop


def test_framing_the_parser_found_is_what_a_copy_is_sent_with() -> None:
    """A message made from a parsed one keeps its framing without a second look at the headers;
    one made by hand is framed by its headers, whatever their case."""
    known = h1.Request(
        b"POST", b"/", [(b"host", b"a"), (b"transfer-encoding", b"chunked")], chunked=True, known=True
    )
    by_hand = h1.Request(b"POST", b"/", [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")])
    for request in (known, by_hand):
        client = h1.Connection(h1.CLIENT)
        wire = client.send(request) + client.send(h1.Data(b"abc")) + client.send(h1.EndOfMessage())
        read = h11_read(h11.SERVER, wire)
        assert b"".join(bytes(e.data) for e in read if isinstance(e, h11.Data)) == b"abc"


def test_header_injection_in_a_name_or_the_first_line_is_refused() -> None:
    for headers, target in (
        ([(b"X-A\r\nEvil", b"1")], b"/"),
        ([(b"x-a", b"1\n")], b"/"),
        ([], b"/\r\nEvil: 1"),
    ):
        client = h1.Connection(h1.CLIENT)
        with pytest.raises(h1.LocalProtocolError):
            client.send(h1.Request(b"GET", target, headers))


def test_the_rest_of_a_message_already_parsed_is_taken_at_once_as_its_events_would_be() -> None:
    """``rest_of_message``: a message whose body and end came with its head (most do) is taken
    in one call, leaving the connection where the events one by one would have; anything else
    (a body still coming, trailers) is left for the events, nothing taken."""
    server = h1.Connection(h1.SERVER)
    server.receive_data(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    request = server.next_event()
    assert isinstance(request, h1.Request) and request.target == b"/a"
    assert server.rest_of_message() == b"hello"
    assert server.their_done and server.next_event() is h1.PAUSED  # the pipelined one waits
    server.send(h1.Response(200, [(b"content-length", b"0")]))
    server.send(h1.EndOfMessage())
    server.start_next_cycle()
    assert isinstance(server.next_event(), h1.Request)
    assert server.rest_of_message() == b""  # (no body)

    # A chunked body whole in the buffer: one piece; with trailers: left as events.
    chunked = h1.Connection(h1.SERVER)
    chunked.receive_data(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
    )
    assert isinstance(chunked.next_event(), h1.Request) and chunked.rest_of_message() == b"abc"
    trailed = h1.Connection(h1.SERVER)
    trailed.receive_data(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\nX-T: 1\r\n\r\n"
    )
    assert isinstance(trailed.next_event(), h1.Request) and trailed.rest_of_message() is None
    assert events(trailed)[:2] == [h1.Data(b"z"), h1.EndOfMessage([(b"x-t", b"1")])]

    # Part of the body still to come: nothing is taken, and what came is the next event.
    partial = h1.Connection(h1.SERVER)
    partial.receive_data(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
    assert isinstance(partial.next_event(), h1.Request) and partial.rest_of_message() is None
    assert not partial.their_done and partial.next_event() == h1.Data(b"ab")

    # A response read by the client side: whole, and the connection is reusable after it.
    client = h1.Connection(h1.CLIENT)
    client.send_whole(h1.Request(b"GET", b"/", [(b"host", b"x")]))
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(client.next_event(), h1.Response) and client.rest_of_message() == b"ok"
    assert client.reusable


def test_a_whole_message_is_sent_as_its_three_events_are() -> None:
    """``send_whole`` gives the bytes of ``send`` for the head, the body and the end, whatever
    the framing chosen (a length, chunks, none for HEAD), and leaves the same state."""
    for method, headers, status, body in [
        (b"GET", [(b"content-length", b"5")], 200, b"hello"),
        (b"GET", [(b"content-length", b"0")], 200, b""),
        (b"GET", [], 200, b"hello"),  # no framing: chunked for a 1.1 client
        (b"GET", [], 200, b""),  # (chunked, empty: only the last chunk)
        (b"GET", [(b"transfer-encoding", b"chunked")], 200, b"hello"),
        (b"HEAD", [(b"content-length", b"5")], 200, b""),
        (b"HEAD", [(b"content-length", b"5")], 200, b"hello"),  # (a body given for HEAD: not sent)
        (b"GET", [], 204, b""),
    ]:
        one, three = h1.Connection(h1.SERVER), h1.Connection(h1.SERVER)
        for conn in (one, three):
            conn.receive_data(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert isinstance(conn.next_event(), h1.Request) and conn.rest_of_message() == b""
        sent = one.send_whole(h1.Response(status, headers), body)
        expected = (
            three.send(h1.Response(status, headers))
            + three.send(h1.Data(body))
            + three.send(h1.EndOfMessage())
        )
        assert sent == expected and one.reusable and three.reusable
        read = h11_read(h11.CLIENT, sent, method)
        got = b"".join(bytes(e.data) for e in read if isinstance(e, h11.Data))
        assert got == (b"" if method == b"HEAD" or status == 204 else body)
        assert one.next_cycle() and one.request is None and not one.our_done and not one.their_done
        assert not one.next_cycle()  # (a new cycle: nothing sent or received in it yet)
    request = h1.Request(b"POST", b"/u", [(b"host", b"x"), (b"content-length", b"3")])
    client = h1.Connection(h1.CLIENT)
    read = h11_read(h11.SERVER, client.send_whole(request, b"abc"))
    assert (
        isinstance(read[0], h11.Request) and read[1].data == b"abc" and isinstance(read[2], h11.EndOfMessage)
    )
    with pytest.raises(h1.LocalProtocolError):
        client.send_whole(request, b"abc")  # a second request on a busy connection


def test_a_whole_message_is_taken_as_its_events_would_be() -> None:
    """``whole_message`` (the HTTP/1.1 lane's): a head, its body in one piece and its end, taken
    at once with what ``next_event`` and ``rest_of_message`` learn from them; anything else
    (trailers, a body in pieces, a head alone, a status it is told to leave) is left as it was."""
    server = h1.Connection(h1.SERVER)
    server.receive_data(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    message = server.whole_message()
    assert message is not None and message[1] == b"hello"
    req = message[0]
    assert isinstance(req, h1.Request) and req.target == b"/a" and server.request is req
    assert server.their_done and server.next_event() is h1.PAUSED and not server.must_close
    assert server.whole_message() is None  # (paused: the next cycle first)
    server.send(h1.Response(200, [(b"content-length", b"0")]))
    server.send(h1.EndOfMessage())
    server.start_next_cycle()
    message = server.whole_message()
    assert message is not None and message[1] == b"" and server.must_close  # (its Connection: close)
    server = h1.Connection(h1.SERVER)  # a body in chunks, as llhttp gives them: joined
    server.receive_data(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n2\r\nbc\r\n0\r\n\r\n"
        b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    message = server.whole_message()
    assert message is not None and message[1] == b"abc" and server.their_done
    server.send(h1.Response(200, [(b"content-length", b"0")]))
    server.send(h1.EndOfMessage())
    server.start_next_cycle()
    message = server.whole_message()
    assert message is not None and isinstance(message[0], h1.Request) and message[0].target == b"/n"
    for data in (
        b"POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: 1\r\n\r\n",
        b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel",
        b"POST /f HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n2\r\nbc\r\n",
    ):
        server = h1.Connection(h1.SERVER)
        server.receive_data(data)
        assert server.whole_message() is None and not server.their_done
        assert isinstance(server.next_event(), h1.Request)  # (left for the events, as they were)
    client = h1.Connection(h1.CLIENT)
    client.send(h1.Request(b"GET", b"/", [(b"host", b"x")]))
    client.send(h1.EndOfMessage())
    client.receive_data(b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\nno")
    assert client.whole_message(frozenset({503})) is None and not client.their_done
    message = client.whole_message()
    assert message is not None and message[1] == b"no" and client.reusable


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("status", [200, 204, 304, 404])
@pytest.mark.parametrize(
    "framing",
    [[(b"content-length", b"3")], [(b"transfer-encoding", b"chunked")], [(b"content-length", b"0")]],
)
def test_a_plain_response_head_is_written_as_the_general_case_writes_it(
    method: bytes, status: int, framing: list[tuple[bytes, bytes]]
) -> None:
    """The short way for a response framed by its length or chunks to a keep-alive HTTP/1.1
    request (``known``) writes the bytes the general case writes (``known`` False: framing read
    from the fields), and frames the body the same."""
    out = []
    for known in (True, False):
        server = h1.Connection(h1.SERVER)
        server.receive_data(b"%s / HTTP/1.1\r\nHost: x\r\n\r\n" % method)
        assert isinstance(server.next_event(), h1.Request)
        chunked = framing[0][0] == b"transfer-encoding"
        length = None if chunked else int(framing[0][1])
        headers = [(b"server", b"app"), *framing]
        response = h1.Response(status, headers, known=known, chunked=chunked, length=length, hop=not known)
        data = server.send(response) + server.send(h1.Data(b"abc")) + server.send(h1.EndOfMessage())
        out.append((data, server.reusable))
    assert out[0] == out[1]


def _answer(server: h1.Connection) -> None:
    server.send(h1.Response(200, [(b"content-length", b"0")]))
    server.send(h1.EndOfMessage())
    server.start_next_cycle()


@pytest.mark.parametrize(
    "reads",
    [
        # HTTP/1.1 then HTTP/1.0 in one read: the second's version is the parser's, not the read's
        [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.0\r\n\r\n"],
        # a 1.1 head and a 1.0 head that begins in the same read and ends in the next
        [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HT", b"TP/1.0\r\n\r\n"],
        # a read in the middle of a head is not its first line, though it may end as one does
        [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.0\r\nX-A", b": bb HTTP/1.1\r\n\r\n"],
        # empty lines before the request line (llhttp skips them): asked of the parser too
        [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\nGET /b HTTP/1.0\r\n\r\n"],
    ],
)
def test_each_request_has_its_own_version_whatever_the_reads(reads: list[bytes]) -> None:
    server = h1.Connection(h1.SERVER)
    for data in reads:
        server.receive_data(data)
    first = events(server)
    assert isinstance(first[0], h1.Request) and first[0].http_version == b"1.1" and first[0].keep_alive
    _answer(server)
    second = events(server)
    assert isinstance(second[0], h1.Request) and second[0].target == b"/b"
    assert second[0].http_version == b"1.0" and not second[0].keep_alive


def _response_in_two_reads(head: bytes, cut: int) -> h1.Response:
    """The response a client connection reads from ``head`` cut in two reads at ``cut``."""
    client = h1.Connection(h1.CLIENT)
    client.send(h1.Request(b"GET", b"/", [(b"host", b"x")]))
    client.send(h1.EndOfMessage())
    client.receive_data(head[:cut])
    client.receive_data(head[cut:])
    response = client.next_event()
    assert isinstance(response, h1.Response)
    return response


def test_a_response_version_is_read_whatever_the_reads() -> None:
    for head in (
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ):
        for cut in (len(head), 5, 12):
            response = _response_in_two_reads(head, cut)
            assert response.http_version == head[5:8]
            assert response.keep_alive is (head[5:8] == b"1.1")


@pytest.mark.parametrize(
    ("second", "error"),
    [
        (
            b"GET /b HTTP/1.1\r\nHost: cart:80\r\nHost: cart:80\r\n\r\n",
            "more than one Host",
        ),  # the same, twice
        (b"GET /b HTTP/1.1\r\nHost: cart:80/x\r\n\r\n", "invalid Host"),
        (
            b"GET http://[bad/b HTTP/1.1\r\nHost: cart:80\r\n\r\n",
            "no valid authority",
        ),  # absolute: its authority
    ],
)
def test_a_host_found_valid_once_is_still_checked_on_the_next_requests(second: bytes, error: str) -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(b"GET /a HTTP/1.1\r\nHost: cart:80\r\n\r\n")
    assert isinstance(events(server)[0], h1.Request)
    _answer(server)
    server.receive_data(second)
    with pytest.raises(h1.ProtocolError, match=error):
        events(server)


def test_messages_without_trailers_share_one_end_and_body_data_is_given_as_data() -> None:
    server = h1.Connection(h1.SERVER)
    server.receive_data(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    first = events(server)
    assert first[1] == h1.Data(b"hi") and type(first[1]) is h1.Data
    assert first[2] == h1.EndOfMessage() and first[2].headers == []
    _answer(server)
    server.receive_data(
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n"
    )
    second = events(server)
    assert second[2] == h1.EndOfMessage([(b"x-t", b"1")]) and first[2].headers == []  # (not the shared one's)


def test_next_cycle_is_reusable_then_start_next_cycle() -> None:
    """A pooled client connection holding bytes after its response (a second response) or in the
    middle of one, or asked to close, does not start a cycle; nor does one whose request is unsent."""
    for reply, ready in [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
    ]:
        client = h1.Connection(h1.CLIENT)
        assert not client.next_cycle()
        client.send_whole(h1.Request(b"GET", b"/", [(b"host", b"x")]))
        client.receive_data(reply)
        assert client.whole_message() is not None
        assert client.reusable is ready and client.next_cycle() is ready
        assert client.sent_head is not ready  # (a cycle started: nothing sent in it)


def test_versions_of_random_pipelined_heads_in_random_reads() -> None:
    """Each message's version is its own whatever the reads' boundaries (the first line of a read
    is read for HTTP/1.1 only when the read begins the head): requests of 1.0 and 1.1 pipelined,
    with headers whose values end as a request line does, and responses, cut at random."""
    import random

    rng = random.Random(6)
    for _ in range(300):
        versions = [rng.choice([b"1.0", b"1.1"]) for _ in range(rng.randint(1, 3))]
        lead = [rng.choice([b"", b"\r\n"]) if i else b"" for i in range(len(versions))]
        stream = b"".join(
            lead[i]
            + b"GET /"
            + str(i).encode()
            + b" HTTP/"
            + v
            + b"\r\nHost: x\r\nX-A: y HTTP/1.1\r\n"
            + (b"Connection: keep-alive\r\n" if v == b"1.0" else b"")
            + b"\r\n"
            for i, v in enumerate(versions)
        )
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 4))))
        server = h1.Connection(h1.SERVER)
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            server.receive_data(stream[a:b])
        for i, version in enumerate(versions):
            got = events(server)
            assert isinstance(got[0], h1.Request) and got[0].target == b"/" + str(i).encode()
            assert got[0].http_version == version, (stream, cuts)
            _answer(server)
    for _ in range(200):
        version = rng.choice([b"1.0", b"1.1"])
        head = b"HTTP/" + version + b" 200 OK\r\nContent-Length: 0\r\nX-A: HTTP/1.1 \r\n\r\n"
        assert _response_in_two_reads(head, rng.randint(1, len(head))).http_version == version
