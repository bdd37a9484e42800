"""The HTTP/2 proxy's hpack encoder table (searched by dictionaries) encodes exactly as hpack's
own, and hpack's per-field debug logging is off in the sidecar."""

from __future__ import annotations

import logging
import random

import h2.config
import h2.connection
import hpack
import pytest

from proxy import http2

NAMES = [b":path", b"content-type", b"grpc-status", b"x-a", b"x-b", b"te", b"user-agent", b"x-long" * 20]
VALUES = [b"", b"1", b"application/grpc", b"trailers", b"/a", b"v" * 50, b"v" * 300]
HUGE = b"v" * 4100  # more than the default table holds: hpack empties the table
SIZES = [0, 32, 100, 256, 4096, 65536]


def _headers(rnd: random.Random) -> list[tuple[bytes, bytes]]:
    def value() -> bytes:
        r = rnd.random()
        if r < 0.01:
            return HUGE
        if r < 0.9:
            return rnd.choice(VALUES)
        return bytes([rnd.randrange(97, 123)]) * rnd.randrange(1, 40)

    return [(rnd.choice(NAMES), value()) for _ in range(rnd.randrange(1, 12))]


@pytest.mark.parametrize("seed", range(12))
def test_encodes_byte_for_byte_as_hpack(seed: int) -> None:
    """Random header lists and table size changes (evictions, a table emptied by a field larger
    than it, size 0): the same blocks, the same dynamic table, and the dictionaries name only
    entries still in it, at their place."""
    rnd = random.Random(seed)
    theirs, ours = hpack.Encoder(), hpack.Encoder()
    table = http2._IndexedTable()
    ours.header_table = table
    for _ in range(200):
        if rnd.random() < 0.05:
            size = rnd.choice(SIZES)
            theirs.header_table_size = ours.header_table_size = size
            continue
        headers = _headers(rnd)
        assert ours.encode(headers) == theirs.encode(headers), headers
        assert list(table.dynamic_entries) == list(theirs.header_table.dynamic_entries)
        for (name, value), number in table._exact.items():
            assert table.dynamic_entries[table._added - number] == (name, value)
        for name, number in table._names.items():
            assert table.dynamic_entries[table._added - number][0] == name
        assert len(table._exact) <= len(table.dynamic_entries)


def test_search_answers_as_hpack() -> None:
    """Each kind of answer, against hpack's search on the same table."""
    ours, theirs = http2._IndexedTable(), hpack.table.HeaderTable()
    for table in (ours, theirs):
        table.add(b"x-a", b"1")
        table.add(b"content-type", b"application/grpc")
        table.add(b"x-a", b"2")
    for name, value in [
        (b":method", b"GET"),  # static, exact
        (b":method", b"PATCH"),  # static name only
        (b"content-type", b"application/grpc"),  # dynamic exact over the static name
        (b"x-a", b"1"),  # dynamic exact, not the newest of its name
        (b"x-a", b"3"),  # the newest dynamic entry of the name
        (b"x-b", b"1"),  # nothing
    ]:
        assert ours.search(name, value) == theirs.search(name, value), (name, value)


def test_the_proxy_connections_use_it() -> None:
    conn = http2._Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    assert isinstance(conn.encoder.header_table, http2._IndexedTable)
    conn.initiate_connection()
    conn.send_headers(
        1, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a"), (b":authority", b"b")]
    )
    assert conn.data_to_send()


def test_hpack_writes_no_debug_lines(caplog: pytest.LogCaptureFixture) -> None:
    """hpack logs every field and integer it codes at debug level (header values, credentials
    among them): not from the sidecar, even with debug logging on (sidemesh/hpack_log.py;
    test_sidecar_footprint checks a sidecar has it from its start)."""
    caplog.set_level(logging.DEBUG)
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    block = encoder.encode([(b"authorization", b"Bearer secret"), (b"x-a", b"1")])
    assert decoder.decode(block, raw=True) == [(b"authorization", b"Bearer secret"), (b"x-a", b"1")]
    assert [r for r in caplog.records if r.name.startswith("hpack")] == []
