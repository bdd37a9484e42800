"""The HTTP/2 proxy's h2 connection and streams (``_Connection``, ``_H2Stream``) skip work h2 did
for nothing with the proxy's configuration (a repr of every frame received, header blocks copied,
validation flags for validation that is off): for the same bytes in, they give the same events
and the same bytes out as h2's own connection, in each case below; and they format no frame."""

from __future__ import annotations

import random
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.stream
import hyperframe.frame
import pytest
from hpack import NeverIndexedHeaderTuple

from proxy import http2

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"), (b":authority", b"cart")]
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


def _config(client: bool) -> h2.config.H2Configuration:
    # (as the proxy's _Side has it)
    return h2.config.H2Configuration(
        client_side=client,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )


def _pair(client: bool) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection, bytes]:
    """h2's own connection and the proxy's, set up alike, and the preface they send (the same)."""
    theirs = h2.connection.H2Connection(config=_config(client))
    ours = http2._Connection(config=_config(client))
    prefaces = []
    for conn in (theirs, ours):
        conn.initiate_connection()
        prefaces.append(conn.data_to_send())
    assert prefaces[0] == prefaces[1]
    return theirs, ours, prefaces[0]


def _peer(client: bool) -> h2.connection.H2Connection:
    """A peer with h2's defaults (validating what it receives), its preface queued."""
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
    peer.initiate_connection()
    return peer


def _seen(events: list[h2.events.Event]) -> list[str]:
    """The events as compared: each one's repr, and the kind of each header tuple (a field
    never indexed stays so)."""
    out = []
    for event in events:
        out.append(repr(event))
        headers = getattr(event, "headers", None) or []
        out.append(" ".join(type(h).__name__ for h in headers))
    return out


def _both(
    theirs: h2.connection.H2Connection,
    ours: h2.connection.H2Connection,
    step: Callable[[h2.connection.H2Connection], object],
) -> tuple[object, bytes]:
    """One step on both connections: the same events (or the same exception), the same bytes
    out; returned: the events as compared (or the exception, as text), and the bytes."""
    results: list[object] = []
    for conn in (theirs, ours):
        try:
            got = step(conn)
            results.append(_seen(got) if isinstance(got, list) else got)
        except h2.exceptions.ProtocolError as e:
            results.append(f"{type(e).__name__}: {e}")
        results.append(conn.data_to_send())
    assert results[2:] == results[:2]
    out = results[1]
    assert isinstance(out, bytes)
    return results[0], out


def _frames_in(out: bytes, frame_size: int = 16384) -> list[tuple[int, int]]:
    """The type and flags of each frame in what a connection sent, each at most ``frame_size``."""
    frames = []
    at = 0
    while at < len(out):
        length = int.from_bytes(out[at : at + 3], "big")
        assert length <= frame_size and at + 9 + length <= len(out)
        frames.append((out[at + 3], out[at + 4]))
        at += 9 + length
    return frames


def _kinds(events: object) -> list[str]:
    assert isinstance(events, list)
    return [e.split(" ")[0].strip("<>") for e in events[::2]]


def test_a_grpc_call_in_and_out_as_h2() -> None:
    """As the server side: a call's head, message and end received; a head, a message and
    trailers sent. As the client side: the call sent, and its answer received."""
    peer = _peer(client=True)
    theirs, ours, _ = _pair(client=False)
    preface = peer.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(preface))
    peer.send_headers(1, REQUEST + GRPC)
    peer.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    call = peer.data_to_send()
    events, _ = _both(theirs, ours, lambda c: c.receive_data(call))
    assert _kinds(events) == ["RequestReceived", "DataReceived", "StreamEnded"]
    assert type(ours.state_machine) is http2._ConnectionMachine  # (the proxy's parts in use)
    assert type(ours.streams[1].state_machine) is http2._StreamMachine
    assert type(ours.streams[1]) is http2._H2Stream and type(ours.incoming_buffer) is http2._FrameBuffer
    _, head = _both(theirs, ours, lambda c: c.send_headers(1, RESPONSE))
    _, message = _both(theirs, ours, lambda c: c.send_data(1, b"\x00\x00\x00\x00\x02ok"))
    _, trailers = _both(theirs, ours, lambda c: c.send_headers(1, TRAILERS, end_stream=True))
    answer = peer.receive_data(head + message + trailers)
    assert [type(e).__name__ for e in answer][-4:] == [
        "ResponseReceived",
        "DataReceived",
        "TrailersReceived",
        "StreamEnded",
    ]

    server = _peer(client=False)
    theirs, ours, mine = _pair(client=True)
    preface = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(preface))
    _, head = _both(theirs, ours, lambda c: c.send_headers(1, REQUEST + GRPC))
    _, message = _both(theirs, ours, lambda c: c.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True))
    received = server.receive_data(mine + head + message)
    assert [type(e).__name__ for e in received][-3:] == ["RequestReceived", "DataReceived", "StreamEnded"]
    server.advertise_alternative_service(b'h2=":8443"', stream_id=1)  # (its origin: the request's)
    server.send_headers(1, RESPONSE)
    server.send_data(1, b"\x00\x00\x00\x00\x02ok")
    server.send_headers(1, TRAILERS, end_stream=True)
    answer = server.data_to_send()
    events, _ = _both(theirs, ours, lambda c: c.receive_data(answer))
    assert "AlternativeServiceAvailable origin:cart," in str(events)
    assert _kinds(events) == [
        "SettingsAcknowledged",
        "AlternativeServiceAvailable",
        "ResponseReceived",
        "DataReceived",
        "TrailersReceived",
        "StreamEnded",
    ]


def test_messages_sent_as_h2_sends_them() -> None:
    """DATA frames (made by the proxy, not by hyperframe): bytes or a memoryview, padded (h2's
    own), empty, the last ending the stream; the windows spent alike."""
    server = _peer(client=False)
    theirs, ours, _ = _pair(client=True)
    preface = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(preface))
    _both(theirs, ours, lambda c: c.send_headers(1, REQUEST + GRPC))
    sent = []
    for data, padding in [
        (b"a" * 1000, None),
        (memoryview(b"0123456789")[2:7], None),
        (b"pad", 4),
        (b"", None),
    ]:
        _, out = _both(theirs, ours, lambda c: c.send_data(1, data, pad_length=padding))  # noqa: B023
        sent.append(out)
        assert ours.local_flow_control_window(1) == theirs.local_flow_control_window(1)
        assert ours.streams[1].outbound_flow_control_window == theirs.streams[1].outbound_flow_control_window
    _, out = _both(theirs, ours, lambda c: c.send_data(1, b"end", end_stream=True))
    sent.append(out)
    assert [(f[3], f[4], f[9:]) for f in sent] == [
        (0, 0, b"a" * 1000),
        (0, 0, b"23456"),
        (0, 8, b"\x04pad\x00\x00\x00\x00"),  # (PADDED: its length, the data, the padding)
        (0, 0, b""),
        (0, 1, b"end"),  # (END_STREAM)
    ]
    refused, _ = _both(theirs, ours, lambda c: c.send_data(1, b"more"))
    assert "Invalid input StreamInputs.SEND_DATA" in str(refused)


def test_messages_refused_as_h2_refuses_them() -> None:
    """Past a window (the stream's, the connection's, a window made negative by a smaller
    SETTINGS_INITIAL_WINDOW_SIZE, where an empty frame may still go), past the frame size, on a
    stream never opened or closed: the same error, nothing sent."""
    import h2.settings

    server = _peer(client=False)
    server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    theirs, ours, _ = _pair(client=True)
    preface = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(preface))
    _both(theirs, ours, lambda c: c.send_headers(1, REQUEST + GRPC))
    _both(theirs, ours, lambda c: c.send_headers(3, REQUEST + GRPC))
    refusals = [_both(theirs, ours, lambda c: c.send_data(1, b"x" * 11))]
    _both(theirs, ours, lambda c: c.send_data(1, b"x" * 10))
    server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 5})  # (stream 1: -5)
    smaller = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(smaller))
    assert ours.local_flow_control_window(1) == -5
    _both(theirs, ours, lambda c: c.send_data(1, b""))
    refusals.append(_both(theirs, ours, lambda c: c.send_data(1, b"x")))
    server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    larger = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(larger))
    refusals.append(_both(theirs, ours, lambda c: c.send_data(3, b"x" * 16385)))
    for _ in range(3):
        _both(theirs, ours, lambda c: c.send_data(3, b"x" * 16384))
    assert ours.outbound_flow_control_window == 65535 - 10 - 3 * 16384  # (the connection's: 16,373)
    refusals.append(_both(theirs, ours, lambda c: c.send_data(3, b"x" * 16374)))
    refusals.append(_both(theirs, ours, lambda c: c.send_data(7, b"x")))
    _both(theirs, ours, lambda c: c.reset_stream(3))
    refusals.append(_both(theirs, ours, lambda c: c.send_data(3, b"x")))
    _both(theirs, ours, lambda c: c.send_headers(5, REQUEST + GRPC))
    _both(theirs, ours, lambda c: c.close_connection())  # (GOAWAY sent: nothing more goes)
    refusals.append(_both(theirs, ours, lambda c: c.send_data(5, b"x")))
    assert [(str(error).split(":")[0], out) for error, out in refusals] == [
        ("FlowControlError", b""),
        ("FlowControlError", b""),
        ("FrameTooLargeError", b""),
        ("FlowControlError", b""),
        ("NoSuchStreamError", b""),
        ("StreamClosedError", b""),
        ("ProtocolError", b""),
    ]


def test_informational_responses_sent_and_received_as_h2() -> None:
    peer = _peer(client=True)
    theirs, ours, _ = _pair(client=False)
    peer.send_headers(1, [*REQUEST, (b"expect", b"100-continue")])
    request = peer.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(request))
    _both(theirs, ours, lambda c: c.send_headers(1, [(b":status", b"100")]))
    refused, _ = _both(theirs, ours, lambda c: c.send_headers(1, [(b":status", b"103")], end_stream=True))
    assert "END_STREAM on informational" in str(refused)
    _both(theirs, ours, lambda c: c.send_headers(1, RESPONSE, end_stream=True))

    server = _peer(client=False)
    theirs, ours, mine = _pair(client=True)
    _, head = _both(theirs, ours, lambda c: c.send_headers(1, REQUEST, end_stream=True))
    server.receive_data(mine + head)
    server.send_headers(1, [(b":status", b"100")])
    server.send_headers(1, [(b":status", b"103"), (b"link", b"</a>")])
    server.send_headers(1, RESPONSE, end_stream=True)
    answer = server.data_to_send()
    events, _ = _both(theirs, ours, lambda c: c.receive_data(answer))
    assert _kinds(events) == [
        "RemoteSettingsChanged",
        "SettingsAcknowledged",
        "InformationalResponseReceived",
        "InformationalResponseReceived",
        "ResponseReceived",
        "StreamEnded",
    ]
    # An informational head with END_STREAM (h2 will not send one: made from its encoder).
    theirs, ours, _ = _pair(client=True)
    _both(theirs, ours, lambda c: c.send_headers(1, REQUEST, end_stream=True))
    block = h2.connection.H2Connection().encoder.encode([(b":status", b"100")])
    bad = len(block).to_bytes(3, "big") + bytes([1, 5]) + (1).to_bytes(4, "big") + block
    refused, _ = _both(theirs, ours, lambda c: c.receive_data(bad))
    assert "END_STREAM on informational" in str(refused)


def test_a_request_that_looks_informational_fails_its_stream_not_the_connection() -> None:
    """A request whose first pseudo-header is :status 1xx: h2 took it for an informational
    response, which a server cannot receive, and failed the whole connection; it is a malformed
    request (RFC 9113 8.1.1: a stream error), which the proxy answers on its stream."""
    block = h2.connection.H2Connection().encoder.encode([(b":status", b"100"), *REQUEST])
    preface = _peer(client=True).data_to_send()
    data = preface + _frame(1, 0x5, 1, block)
    theirs, ours, _ = _pair(client=False)
    with pytest.raises(h2.exceptions.ProtocolError):
        theirs.receive_data(data)
    events = ours.receive_data(data)
    head = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert http2._malformed_request(list(head.headers)) == "pseudo-header :status is not a request's"
    assert 7 not in [kind for kind, _ in _frames_in(ours.data_to_send())]  # (no GOAWAY)
    later = _frame(1, 0x5, 3, h2.connection.H2Connection().encoder.encode(REQUEST))
    assert [type(e).__name__ for e in ours.receive_data(later)] == ["RequestReceived", "StreamEnded"]


@pytest.mark.parametrize("frame_size", [16384, 20000])
def test_a_head_larger_than_a_frame_goes_on_in_continuation_frames(frame_size: int) -> None:
    import h2.settings

    peer = _peer(client=False)
    peer.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: frame_size})
    theirs, ours, mine = _pair(client=True)
    preface = peer.data_to_send()
    _, ack = _both(theirs, ours, lambda c: c.receive_data(preface))
    peer.receive_data(mine + ack)  # (the larger frames it takes once its settings are acknowledged)
    # (values that Huffman coding does not shorten much: ~40 KB, three frames)
    big = REQUEST + [(b"x-big-%d" % i, bytes(33 + (j * 7 + i) % 90 for j in range(3000))) for i in range(12)]
    received = []
    for sid in (1, 3):  # (the second: from the changed table)
        _, out = _both(theirs, ours, lambda c: c.send_headers(sid, big, end_stream=True))  # noqa: B023
        kinds = _frames_in(out, frame_size)
        assert kinds[0] == (1, 1) and kinds[-1] == (9, 4)  # HEADERS (END_STREAM) ... END_HEADERS
        total = sum(int.from_bytes(out[at : at + 3], "big") for at in _starts(out))
        assert set(kinds[1:-1]) <= {(9, 0)} and len(kinds) == -(-total // frame_size) >= 2
        received += [e for e in peer.receive_data(out) if isinstance(e, h2.events.RequestReceived)]
    assert [[(bytes(n), bytes(v)) for n, v in e.headers] for e in received] == [big, big]


def test_heads_at_the_frame_size_and_empty_trailers() -> None:
    """A block of exactly the frame size goes in one HEADERS frame, one byte more in two; an
    empty list (trailers with no field: an upstream may send them) in a HEADERS frame with an
    empty block, which h2 could not make (IndexError, out of the proxy's handler)."""
    import hpack

    peer = _peer(client=False)
    theirs, ours, mine = _pair(client=True)
    preface = peer.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(preface))
    peer.receive_data(mine)
    _, first = _both(theirs, ours, lambda c: c.send_headers(1, REQUEST))  # (its fields in the tables)
    peer.receive_data(first)
    for sid, size, frames in ((3, 16384, 1), (5, 16385, 2)):
        # ("X" Huffman-codes to 8 bits: a value of n of them, n bytes; never indexed, so the
        # head codes alike whatever the table holds)
        def head(n: int) -> list[tuple[bytes, bytes]]:
            return [*REQUEST, hpack.NeverIndexedHeaderTuple(b"x-v", b"X" * n)]

        fresh = http2._Encoder()
        fresh.encode(head(0))  # (REQUEST's fields in the table, as in the connections')
        n = next(n for n in range(size - 30, size) if len(fresh.encode(head(n))) == size)
        _, out = _both(theirs, ours, lambda c: c.send_headers(sid, head(n)))  # noqa: B023
        assert len(_frames_in(out)) == frames
        assert sum(int.from_bytes(out[at : at + 3], "big") for at in _starts(out)) == size
        peer.receive_data(out)
    ours.send_headers(1, [], end_stream=True)
    out = ours.data_to_send()
    assert _frames_in(out) == [(1, 5)] and out[:3] == b"\x00\x00\x00"
    ended = peer.receive_data(out)
    assert [type(e).__name__ for e in ended] == ["TrailersReceived", "StreamEnded"]


def _starts(out: bytes) -> list[int]:
    starts, at = [], 0
    while at < len(out):
        starts.append(at)
        at += 9 + int.from_bytes(out[at : at + 3], "big")
    return starts


def test_priority_is_refused_before_anything_changes() -> None:
    peer = _peer(client=False)
    ours = http2._Connection(config=_config(True))
    ours.initiate_connection()
    peer.receive_data(ours.data_to_send())
    with pytest.raises(ValueError, match="no priority"):
        ours.send_headers(1, [*REQUEST, (b"x-new", b"1")], end_stream=True, priority_weight=32)
    assert not ours.streams and not ours.data_to_send()
    ours.send_headers(1, [*REQUEST, (b"x-new", b"1")], end_stream=True)
    ours.send_headers(3, [*REQUEST, (b"x-new", b"1")], end_stream=True)  # (from the table)
    heads = [e for e in peer.receive_data(ours.data_to_send()) if isinstance(e, h2.events.RequestReceived)]
    assert [[(bytes(n), bytes(v)) for n, v in e.headers] for e in heads] == [[*REQUEST, (b"x-new", b"1")]] * 2


def test_configured_otherwise_the_connection_is_h2s() -> None:
    """With h2's own validation and normalization on (not as the proxy sets it up), its streams
    are h2's: a connection-specific field is normalized away when sent, an upper-case name is
    refused when received, as h2 does."""
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    theirs = h2.connection.H2Connection(config=config)
    ours = http2._Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    assert not ours.lean
    for conn in (theirs, ours):
        conn.initiate_connection()
    _both(theirs, ours, lambda c: c.send_headers(1, [*REQUEST, (b"Connection", b"close"), (b"X-A", b"1")]))
    _both(theirs, ours, lambda c: c.send_data(1, b"x", pad_length=2))
    _both(theirs, ours, lambda c: c.send_data(1, b"y", end_stream=True))
    server = _peer(client=False)
    preface = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(preface))
    block = server.encoder.encode([(b":status", b"200"), (b"X-Upper", b"1")])
    refused, _ = _both(theirs, ours, lambda c: c.receive_data(_frame(1, 0x5, 1, block)))
    assert "uppercase" in str(refused)


def test_a_response_with_a_pseudo_header_before_status_is_malformed_not_1xx() -> None:
    """h2 looked for :status through the pseudo-headers; the proxy takes it first (the only
    pseudo-header a response has): such a response is a final one, malformed (a stream error,
    502), where h2 took it for a 1xx, and failed the connection if it also ended the stream."""
    server = _peer(client=False)
    ours = http2._Connection(config=_config(True))
    ours.initiate_connection()
    ours.receive_data(server.data_to_send())
    ours.send_headers(1, REQUEST, end_stream=True)
    block = server.encoder.encode([(b":x", b"1"), (b":status", b"103")])
    events = ours.receive_data(_frame(1, 0x5, 1, block))
    head = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    assert http2._malformed(list(head.headers), False) is not None


@pytest.mark.parametrize("closed", ["sent GOAWAY", "received GOAWAY"])
def test_heads_on_open_streams_after_a_goaway_as_h2(closed: str) -> None:
    """A head sent or received on a stream already open, once the connection is closed by a
    GOAWAY: as h2 (the connection's state machine refuses it, or lets it through)."""
    server = _peer(client=False)
    theirs, ours, mine = _pair(client=True)
    preface = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(preface))
    _, head = _both(theirs, ours, lambda c: c.send_headers(1, REQUEST + GRPC))
    server.receive_data(mine + head)
    ack = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(ack))
    server.send_headers(1, RESPONSE)
    response = server.data_to_send()
    if closed == "sent GOAWAY":
        _both(theirs, ours, lambda c: c.close_connection())
    else:
        server.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
        goaway = server.data_to_send()
        _both(theirs, ours, lambda c: c.receive_data(goaway))
    refused, _ = _both(theirs, ours, lambda c: c.receive_data(response))
    assert "Invalid input ConnectionInputs.RECV_HEADERS" in str(refused)
    refused, _ = _both(theirs, ours, lambda c: c.send_headers(1, TRAILERS, end_stream=True))
    assert "Invalid input ConnectionInputs.SEND_HEADERS" in str(refused)


def test_a_response_with_priority_as_h2() -> None:
    server = _peer(client=False)
    theirs, ours, _ = _pair(client=True)
    preface = server.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(preface))
    _both(theirs, ours, lambda c: c.send_headers(1, REQUEST, end_stream=True))
    block = server.encoder.encode(RESPONSE)
    priority = (3).to_bytes(4, "big") + bytes([15])  # (depends on stream 3, weight 16)
    framed = _frame(1, 0x4 | 0x1 | 0x20, 1, priority + block)
    events, _ = _both(theirs, ours, lambda c: c.receive_data(framed))
    assert _kinds(events) == ["ResponseReceived", "StreamEnded", "PriorityUpdated"]


def test_split_cookie_fields_are_joined_as_h2_does() -> None:
    """RFC 9113 8.2.3: cookie fields split for compression are joined ("; ") when received, the
    result never indexed, at the end of the list, as h2 did."""
    peer = _peer(client=True)
    theirs, ours, _ = _pair(client=False)
    peer.send_headers(
        1, [*REQUEST, (b"cookie", b"a=1"), (b"x-a", b"1"), (b"cookie", b"b=2")], end_stream=True
    )
    request = peer.data_to_send()
    events, _ = _both(theirs, ours, lambda c: c.receive_data(request))
    assert isinstance(events, list)
    head = next(e for e in events if "RequestReceived" in e)
    assert "(b'cookie', b'a=1; b=2')" in head and head.index("x-a") < head.index("cookie")
    assert events[events.index(head) + 1].split()[-1] == NeverIndexedHeaderTuple.__name__


def test_trailers_must_end_the_stream_both_ways() -> None:
    peer = _peer(client=True)
    theirs, ours, _ = _pair(client=False)
    peer.send_headers(1, REQUEST)
    request = peer.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(request))
    _both(theirs, ours, lambda c: c.send_headers(1, RESPONSE))
    refused, _ = _both(theirs, ours, lambda c: c.send_headers(1, TRAILERS))
    assert "Trailers must have END_STREAM" in str(refused)

    theirs, ours, _ = _pair(client=False)
    peer = _peer(client=True)
    peer.send_headers(1, REQUEST)
    frames = peer.data_to_send()
    # Trailers without END_STREAM (h2 will not send them so: made from its encoder).
    block = peer.encoder.encode(TRAILERS)
    frames += len(block).to_bytes(3, "big") + bytes([1, 4]) + (1).to_bytes(4, "big") + block
    refused, _ = _both(theirs, ours, lambda c: c.receive_data(frames))
    assert "Trailers must have END_STREAM" in str(refused)


@pytest.mark.parametrize(
    ("closed_by", "frame", "answer"),
    [
        ("reset", "DATA", "RST_STREAM"),
        ("end", "DATA", "RST_STREAM"),
        ("reset, forgotten", "DATA", "RST_STREAM"),
        ("end, forgotten", "DATA", "RST_STREAM"),
        ("reset, forgotten", "HEADERS", "RST_STREAM"),
        ("end, forgotten", "HEADERS", "StreamClosedError"),
    ],
)
def test_frames_for_a_closed_stream_are_answered_as_h2_answers_them(
    closed_by: str, frame: str, answer: str
) -> None:
    """A frame for a closed stream: RST_STREAM (STREAM_CLOSED), a DATA frame's flow counted
    once; or a connection error (a head for a stream that ended and was forgotten since): as h2
    answers each."""
    peer = _peer(client=True)
    theirs, ours, _ = _pair(client=False)
    peer.send_headers(1, REQUEST, end_stream=closed_by.startswith("end"))
    request = peer.data_to_send()
    _both(theirs, ours, lambda c: c.receive_data(request))
    if closed_by.startswith("end"):
        _both(theirs, ours, lambda c: c.send_headers(1, RESPONSE, end_stream=True))
    else:
        _both(theirs, ours, lambda c: c.reset_stream(1, h2.errors.ErrorCodes.CANCEL))
    if closed_by.endswith("forgotten"):  # (closed streams are dropped when open streams are counted)
        peer.send_headers(3, REQUEST)
        later = peer.data_to_send()
        _both(theirs, ours, lambda c: c.receive_data(later))
        _both(theirs, ours, lambda c: c.open_inbound_streams)
        assert 1 not in ours.streams
    # (a head with a field new to the table: decoded once, or the tables of both ends differ)
    data = b"x" * 1000 if frame == "DATA" else peer.encoder.encode([*REQUEST, (b"x-late", b"1")])
    kind, flags = (0, 0) if frame == "DATA" else (1, 4)
    late = len(data).to_bytes(3, "big") + bytes([kind, flags]) + (1).to_bytes(4, "big") + data
    flow = len(data) if frame == "DATA" else 0
    window = ours.inbound_flow_control_window
    got, out = _both(theirs, ours, lambda c: c.receive_data(late))
    if answer == "RST_STREAM":
        assert got == [] and out[3] == 3 and out[-4:] == b"\x00\x00\x00\x05"  # (STREAM_CLOSED)
        assert ours.inbound_flow_control_window == theirs.inbound_flow_control_window == window - flow
        if frame == "DATA":
            _both(theirs, ours, lambda c: c.receive_data(late))  # (again)
            assert ours.inbound_flow_control_window == theirs.inbound_flow_control_window == window - 2 * flow
        peer.send_headers(5, [*REQUEST, (b"x-late", b"1")], end_stream=True)  # (the table's entry)
        next_request = peer.data_to_send()
        events, _ = _both(theirs, ours, lambda c: c.receive_data(next_request))
        assert "(b'x-late', b'1')" in str(events)
    else:
        assert "StreamClosedError" in str(got)


def _frame(kind: int, flags: int, stream: int, body: bytes) -> bytes:
    return len(body).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + body


def _random_frames(rnd: random.Random) -> bytes:
    """Frames as a peer may send them, mostly plain DATA and HEADERS, and among them padded
    ones, ones with priority, heads in CONTINUATION frames, other kinds, flags no frame defines,
    the reserved bit set, and now and then a bad one: on stream 0, too long, CONTINUATION out of
    place, a head interrupted."""
    out = b""
    for _ in range(rnd.randrange(1, 12)):
        sid = rnd.choice([1, 3, 0x7FFFFFFF, 0x80000001])
        body = rnd.randbytes(rnd.choice([0, 1, 5, 100, 16384]))
        r = rnd.random()
        if r < 0.35:
            out += _frame(0, rnd.choice([0, 1, 0x1 | 0x4 | 0x2 | 0x40]), sid, body)
        elif r < 0.6:
            out += _frame(1, rnd.choice([0x4, 0x5, 0x4 | 0x2 | 0x10 | 0x80]), sid, body)
        elif r < 0.68:
            out += _frame(0, 0x8 | rnd.choice([0, 1]), sid, bytes([2]) + body + b"\x00\x00")  # padded
        elif r < 0.74:
            out += _frame(1, 0x20 | 0x4, sid, b"\x80\x00\x00\x03\x10" + body)  # priority
        elif r < 0.8:
            out += (
                _frame(1, 0x1, sid, body[:3]) + _frame(9, 0, sid, body[3:5]) + _frame(9, 0x4, sid, body[5:])
            )
        elif r < 0.86:
            out += _frame(8, 0, rnd.choice([0, sid]), (1000).to_bytes(4, "big"))  # WINDOW_UPDATE
        elif r < 0.9:
            out += _frame(0xEE, 0xFF, sid, body[:8])  # (an extension)
        elif r < 0.93:
            out += _frame(rnd.choice([0, 1]), 0x5, 0, body[:8])  # (on stream 0)
        elif r < 0.96:
            out += _frame(0, 0, sid, b"x" * 16385)  # (longer than the frame size allows)
        elif r < 0.98:
            out += _frame(9, 0x4, sid, body[:4])  # (CONTINUATION with no head before)
        else:
            out += _frame(1, 0, sid, body[:4]) + _frame(0, 0, sid, b"")  # (a head interrupted)
    return out


def _parse(buffer: h2.frame_buffer.FrameBuffer, data: bytes, cuts: list[int]) -> list[object]:
    """The frames (their fields as hyperframe has them) and the error, if any, from the data fed
    in pieces cut where ``cuts`` says."""
    buffer.max_frame_size = 16384
    got: list[object] = []
    try:
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            buffer.add_data(data[start:end])
            for frame in buffer:
                fields = {k: v for k, v in vars(frame).items() if k != "flags"}
                got.append(
                    (
                        type(frame).__name__,
                        sorted(frame.flags),
                        fields,
                        getattr(frame, "flow_controlled_length", None),
                    )
                )
    except h2.exceptions.ProtocolError as e:
        got.append(f"{type(e).__name__}: {e}")
    return got


@pytest.mark.parametrize("seed", range(60))
def test_frames_parsed_as_h2_parses_them(seed: int) -> None:
    rnd = random.Random(seed)
    data = _random_frames(rnd)
    cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.choice([0, 1, 3, 20]))))
    theirs = _parse(h2.frame_buffer.FrameBuffer(server=False), data, cuts)
    ours = _parse(http2._FrameBuffer(server=False), data, cuts)
    assert ours == theirs
    assert theirs  # (something parsed, or an error)


def test_the_preface_is_checked_before_any_frame() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    frames = _frame(1, 0x5, 1, b"\x82") + _frame(0, 0x1, 1, b"hi")
    for data in (preface + frames, b"GET / HTTP/1.1\r\n\r\n" + frames):
        assert _parse(http2._FrameBuffer(server=True), data, [3, 30]) == _parse(
            h2.frame_buffer.FrameBuffer(server=True), data, [3, 30]
        )
    assert len(_parse(http2._FrameBuffer(server=True), preface + frames, [])) == 2


def _described(events: list[object]) -> list[tuple[str, dict[str, str]]]:
    """Events by class and fields (h2's internal ones have no repr of their own: theirs names the
    object's address, which matched only when the allocator reused it)."""
    return [(type(e).__name__, {k: repr(v) for k, v in vars(e).items()}) for e in events]


def _moved(machine: object, put: object) -> tuple[object, ...]:
    """One input to a state machine: what it returned (or raised) and all its fields after."""
    try:
        got: object = _described(machine.process_input(put))  # type: ignore[attr-defined]
    except h2.exceptions.ProtocolError as e:
        got = f"{type(e).__name__}: {e}"
    return got, {k: v for k, v in vars(machine).items()}


@pytest.mark.parametrize("client", [None, True, False])
def test_every_stream_transition_as_h2s(client: bool | None) -> None:
    """Each input in each state (and on whichever side: the callbacks look at it), from a
    machine of h2's and one of the proxy's: the same events or error, the same state after."""
    seen = set()
    for state in h2.stream.StreamState:
        for put in h2.stream.StreamInputs:
            theirs = h2.stream.H2StreamStateMachine(1)
            ours = h2.stream.H2StreamStateMachine(1)
            ours.__class__ = http2._StreamMachine
            for machine in (theirs, ours):
                machine.state, machine.client = state, client
            assert _moved(ours, put) == _moved(theirs, put), (state, put)
            seen.add(str(ours.state))
    assert len(seen) > 3  # (transitions were made, not only refusals)


def test_every_connection_transition_as_h2s() -> None:
    for state in h2.connection.ConnectionState:
        for put in h2.connection.ConnectionInputs:
            theirs = h2.connection.H2ConnectionStateMachine()
            ours = h2.connection.H2ConnectionStateMachine()
            ours.__class__ = http2._ConnectionMachine
            theirs.state = ours.state = state
            assert _moved(ours, put) == _moved(theirs, put), (state, put)
    assert len(http2._CONNECTION_MOVES) == len(h2.connection.H2ConnectionStateMachine._transitions)


def test_no_frame_received_is_formatted(monkeypatch: pytest.MonkeyPatch) -> None:
    """h2 formatted every frame it received (repr, the payload's start included) for a trace
    line its default logger drops: about 2% of a gRPC call's Python in each sidecar."""
    formatted = []

    def counted(frame: hyperframe.frame.Frame) -> str:
        formatted.append(type(frame).__name__)
        return "frame"

    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", counted)
    peer = _peer(client=True)
    ours = http2._Connection(config=_config(False))
    ours.initiate_connection()
    peer.send_headers(1, REQUEST + GRPC)
    peer.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    peer.ping(b"12345678")
    events = ours.receive_data(peer.data_to_send())
    assert [type(e).__name__ for e in events] == [
        "RemoteSettingsChanged",
        "RequestReceived",
        "DataReceived",
        "StreamEnded",
        "PingReceived",
    ]
    assert formatted == []


@pytest.mark.parametrize("seed", range(20))
def test_open_streams_counted_and_closed_ones_forgotten_as_h2(seed: int) -> None:
    """The count h2 makes on every new stream (its limit, SETTINGS_MAX_CONCURRENT_STREAMS), made
    reading each stream's state once: the same count of each parity, the same streams forgotten
    (with how they closed), over streams in every state."""
    rng = random.Random(seed)
    ours = http2._Connection(_config(True))
    theirs = h2.connection.H2Connection(_config(True))
    for stream_id in rng.sample(range(1, 200), rng.randint(0, 40)):
        stream = h2.stream.H2Stream(stream_id, ours.config, 65535, 65535)
        stream.state_machine.state = rng.choice(list(h2.stream.StreamState))
        stream.state_machine.stream_closed_by = rng.choice([None, *h2.stream.StreamClosedBy])
        ours.streams[stream_id] = theirs.streams[stream_id] = stream
    assert (ours.open_outbound_streams, ours.open_inbound_streams) == (
        theirs.open_outbound_streams,
        theirs.open_inbound_streams,
    )
    assert ours.streams == theirs.streams and ours._closed_streams == theirs._closed_streams
    assert not any(s.closed for s in ours.streams.values())
