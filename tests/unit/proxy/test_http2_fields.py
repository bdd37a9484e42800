"""Header fields the HTTP/2 proxy sends with h2's outbound normalizing off: its own (a denial's
reason) must be valid as they are, and received ones keep or gain their never-indexed mark."""

from __future__ import annotations

import asyncio
import contextlib
import typing

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from proxy import http2
from proxy.headers import field_value
from proxy.pipe import Pipe
from tests.support.pipes import denying_h2_proxy, response_head


# A denial as sidemesh/policy/evaluate.py words it, with enough policies that the 512-byte cut
# falls right after a ", ": the value would end in a space, which h2 refuses as a connection error.
def _reason(pad: int) -> str:
    refs = ["shop/policy-" + "a" * pad, *(f"shop/policy-{i:03d}" for i in range(60))]
    return "no rule of " + ", ".join(refs) + " allows it"


REASON = next(r for r in map(_reason, range(40)) if r[511] == " ")


def test_field_value_is_ascii_without_controls_or_surrounding_whitespace() -> None:
    assert field_value(REASON).endswith(b",")
    assert len(field_value(REASON)) == 511
    assert field_value(" a\r\nb\x00c\u00e9 ") == b"a  b c?"
    assert len(field_value("y" * 900)) == 512


async def denied_by_the_proxy(grpc: bool) -> tuple[list[tuple[bytes, bytes]], bool]:
    """One request to an inbound H2Proxy that denies it with REASON, read by a default h2 client:
    the response (or trailers-only) head, and whether the connection is still usable after it."""
    server, reader, writer = await denying_h2_proxy(5, http2.Denial(403, REASON, "shop/x"))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    head = [(":method", "POST"), (":scheme", "http"), (":authority", "cart"), (":path", "/a.B/C")]
    if grpc:
        head += [("content-type", "application/grpc"), ("te", "trailers")]
    try:
        got: list[tuple[bytes, bytes]] = []
        for sid in (1, 3):  # the second request: the connection survived the first answer
            client.send_headers(sid, head, end_stream=True)
            writer.write(client.data_to_send())
            while True:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "the proxy closed the connection"
                events = client.receive_data(data)  # raises ProtocolError on an invalid field
                writer.write(client.data_to_send())
                heads = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
                if heads:
                    got = [(bytes(n), bytes(v)) for n, v in heads[0].headers]
                    break
        return got, True
    finally:
        writer.close()
        server.cancel()
        with contextlib.suppress(BaseException):
            await server


@pytest.mark.parametrize("grpc", [True, False])
async def test_a_long_denial_reason_is_a_valid_field_and_the_connection_lives_on(grpc: bool) -> None:
    head, alive = await denied_by_the_proxy(grpc)
    fields = dict(head)
    assert alive
    assert fields[b"sidemesh-denied-reason"] == REASON.encode()[:511]
    if grpc:
        assert fields[b"grpc-status"] == b"7" and fields[b"grpc-message"] == REASON.encode()[:511]
    else:
        assert fields[b":status"] == b"403"


def test_received_fields_keep_their_mark_and_credentials_gain_one() -> None:
    out = http2._headers(
        [
            HeaderTuple(b":path", b"/"),
            NeverIndexedHeaderTuple(b"x-secret", b"s"),
            HeaderTuple(b"authorization", b"Bearer t"),
            HeaderTuple(b"proxy-authorization", b"Basic x"),
            HeaderTuple(b"cookie", b"short=1"),
            HeaderTuple(b"x-plain", b"p"),
        ]
    )
    never = [h[0] for h in out if isinstance(h, NeverIndexedHeaderTuple)]
    assert never == [b"x-secret", b"authorization", b"proxy-authorization", b"cookie"]
    assert [(bytes(n), bytes(v)) for n, v in out] == [
        (b":path", b"/"),
        (b"x-secret", b"s"),
        (b"authorization", b"Bearer t"),
        (b"proxy-authorization", b"Basic x"),
        (b"cookie", b"short=1"),
        (b"x-plain", b"p"),
    ]


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    ("padding", "refused"),
    [
        (b"", False),
        (b"\x20", False),
        (b"\x3f\xe1\x1f\x20", False),
        (b"\x20" * 3, True),
        (b"\x20" * 60000, True),
    ],
)
def test_a_header_block_padded_with_table_size_updates_is_refused(padding: bytes, refused: bool) -> None:
    """hpack takes any number of dynamic table size updates before the first field, and they
    count for nothing in the decoded size: a 1 MiB block of them cost a second of the sidecar's
    event loop per request. RFC 7541 4.2 allows two; a block longer than the list it may make is
    refused too."""
    import h2.config
    import h2.exceptions
    from hpack import Encoder

    from proxy.http2 import _Connection

    config = h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False
    )
    server = _Connection(config=config)
    server.initiate_connection()
    fields = Encoder().encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    )
    block = padding + fields
    data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")
    chunks = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    data += _frame(1, 4 if len(chunks) == 1 else 0, 1, chunks[0])  # HEADERS
    for i, chunk in enumerate(chunks[1:], 2):
        data += _frame(9, 4 if i == len(chunks) else 0, 1, chunk)  # CONTINUATION
    if refused:
        with pytest.raises(h2.exceptions.ProtocolError):
            server.receive_data(data)
    else:
        events = server.receive_data(data)
        assert any(type(e).__name__ == "RequestReceived" for e in events), events


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (b"0", 0),
        (b"14", 14),
        (b"2147483648", 13),  # no int32: INTERNAL, as grpcio and grpc-go read it
        (b"99999999999999999999", 13),  # (failed every sampled span's OTLP export: int64)
        (b"abc", 13),
        (b"", 13),
        (b"1_0", 13),  # (Python's int() takes it; clients do not)
        (b"-1", 13),  # (grpcio: negative value)
        (b"2147483647", 13),  # (grpcio: out of range)
        (b"2147483646", 2147483646),
        (b"+0", 0),  # as grpcio reads them: OK (grpc-go takes no spaces)
        (b" 0", 0),
        (b"0 ", 0),
        (b"-0", 0),
        (b"+", 13),
    ],
)
def test_grpc_status_values_that_are_no_int32_read_as_internal(value: bytes, status: int) -> None:
    assert http2._grpc_status_of([(b"grpc-status", value)]) == status
    assert http2._succeeded(200, status) is (status == 0)  # (17 and above: UNKNOWN to clients)
    assert http2._grpc_status_of([(b"grpc-message", b"x")]) is None


def test_well_formed_lists_are_remembered_and_only_they() -> None:
    """The checks remember small well-formed lists (asked again, the check does not run), never a
    malformed one, nor a big one; the answer is the check's either way."""
    runs: list[list[tuple[bytes, bytes]]] = []

    def check(headers: list[tuple[bytes, bytes]], trailers: bool) -> str | None:
        runs.append(headers)
        return "bad" if (b"x-bad", b"1") in headers else None

    checked = http2._remember_valid(check)
    good = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    bad = [*good, (b"x-bad", b"1")]
    big = [(b"x-%d" % i, b"v") for i in range(http2.VALID_KEPT_FIELDS + 1)]
    long = [(b"x-long", b"v" * http2.VALID_KEPT_BYTES)]
    for headers, why in [(good, None), (bad, "bad"), (big, None), (long, None)]:
        assert checked(list(headers), False) == why
        assert checked(list(headers), False) == why
    assert runs == [good, bad, bad, big, big, long, long]
    assert checked([HeaderTuple(*h) for h in good], False) is None  # (the same fields)
    assert checked(good, True) is None and runs[-1] == good  # (trailers: another question)
    assert len(runs) == 8


def test_the_proxy_checks_remember() -> None:
    """The proxy's three checks are the remembering ones, and still refuse what they refused."""
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    assert http2._malformed_request(request) is None
    assert http2._malformed_request(request) is None
    assert http2._malformed_request([*request, (b"Upper", b"1")]) is not None
    assert http2._malformed_request([*request, (b"connection", b"close")]) is not None
    assert http2._malformed([(b":status", b"200")], False) is None
    assert http2._malformed([(b":status", b"200")], True) is not None  # (a pseudo-header in trailers)
    assert http2._malformed_trailers([(b"grpc-status", b"0")]) is None
    assert http2._malformed_trailers([(b":status", b"200")]) is not None
    for check in (http2._malformed_request, http2._malformed, http2._malformed_trailers):
        assert hasattr(check, "__wrapped__")


@pytest.mark.parametrize("max_streams", [None, 7])
def test_as_a_client_the_proxy_says_push_is_off(max_streams: int | None) -> None:
    """The sidecar's connections to an app (or to another sidecar) say SETTINGS_ENABLE_PUSH=0,
    as gRPC clients and Envoy do (RFC 9113 6.5.2); both sides keep their stream limit."""
    codes = h2.settings.SettingCodes
    for client in (True, False):
        side = http2._Side(typing.cast(Pipe, None), client=client, max_streams=max_streams)
        peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=not client))
        peer.initiate_connection()
        if client:
            events = peer.receive_data(side.conn.data_to_send())
        else:  # (a server reads the client's preface first)
            side.conn.receive_data(peer.data_to_send())
            events = peer.receive_data(side.conn.data_to_send())
        changed = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)).changed_settings
        if client:
            assert changed[codes.ENABLE_PUSH].new_value == 0
        streams = changed[codes.MAX_CONCURRENT_STREAMS].new_value
        assert streams == (100 if max_streams is None else max_streams)


def test_a_request_over_the_header_list_limit_gets_431_before_the_policy() -> None:
    """An H2Proxy whose policy denies everything (403) gets a ~114 KB list (over the 64 KiB it
    advertises) made of static entries after a table size of 0: 431, before the policy (with
    the quick bound counting the dynamic table only, it passed as within the limit: 403)."""

    async def run() -> bytes:
        server, reader, writer = await denying_h2_proxy(5)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        writer.write(client.data_to_send())
        client.send_headers(
            1,
            [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"cart")],
            end_stream=True,
        )
        client.data_to_send()  # (replaced by the block below: stream 1 is open for the client)
        block = b"\x20\x83\x86\x84\x01\x04cart" + b"\x90" * 1900
        writer.write(_frame(1, 0x5, 1, block))
        # (the client's own decoder state does not matter: it only reads the answer)
        try:
            return (await response_head(reader, writer, client))[b":status"]
        finally:
            writer.close()
            server.cancel()

    assert asyncio.run(run()) == b"431"
