"""The HTTP/2 proxy's hpack encoder (its table searched by dictionaries, its blocks kept) encodes
exactly as hpack's own, its decoder (blocks kept) decodes as hpack's, and hpack's per-field debug
logging is off in the sidecar."""

from __future__ import annotations

import gc
import logging
import random
import tracemalloc
from collections.abc import Iterator

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


def _header_lists(rnd: random.Random) -> Iterator[list[tuple[bytes, bytes]] | int]:
    """Random header lists, half of them one of the last few again (as a client's calls repeat
    their heads), some fields never indexed, and now and then a table size (an int)."""
    seen: list[list[tuple[bytes, bytes]]] = []
    for _ in range(300):
        if rnd.random() < 0.05:
            yield rnd.choice(SIZES)
        elif seen and rnd.random() < 0.5:
            yield list(rnd.choice(seen[-4:]))
        else:
            headers = [hpack.NeverIndexedHeaderTuple(*h) if rnd.random() < 0.1 else h for h in _headers(rnd)]
            seen.append(headers)
            yield headers


@pytest.mark.parametrize("seed", range(12))
def test_encodes_byte_for_byte_as_hpack(seed: int) -> None:
    """Random header lists, repeated ones among them, and table size changes (evictions, a table
    emptied by a field larger than it, size 0): the same blocks, the same dynamic table, and the
    dictionaries name only entries still in it, at their place; repeated lists came from the
    encoder's block cache."""
    rnd = random.Random(seed)
    theirs, ours = hpack.Encoder(), http2._Encoder()
    table = ours.header_table
    hits = 0
    for headers in _header_lists(rnd):
        if isinstance(headers, int):
            theirs.header_table_size = ours.header_table_size = headers
            continue
        kept = dict(ours._blocks)
        assert ours.encode(headers) == theirs.encode(headers), headers
        hits += any(k[1:] == (*headers, *map(type, headers)) for k in kept) and ours._blocks == kept
        assert list(table.dynamic_entries) == list(theirs.header_table.dynamic_entries)
        for (name, value), number in table._exact.items():
            assert table.dynamic_entries[table._added - number] == (name, value)
        for name, number in table._names.items():
            assert table.dynamic_entries[table._added - number][0] == name
        assert len(table._exact) <= len(table.dynamic_entries)
    assert hits > 0, "no block came from the cache"


@pytest.mark.parametrize("seed", range(12))
def test_decodes_as_hpack(seed: int) -> None:
    """The blocks of random lists (repeated ones among them, table size changes, fields never
    indexed) decode to what hpack's decoder makes of them, the same dynamic table after each,
    repeated blocks from the decoder's block cache; a kept block is refused as hpack would once
    the list size limit is below it."""
    rnd = random.Random(seed)
    encoder, theirs, ours = hpack.Encoder(), hpack.Decoder(), http2._Decoder()
    theirs.max_allowed_table_size = ours.max_allowed_table_size = max(SIZES)
    hits = 0
    for headers in _header_lists(rnd):
        if isinstance(headers, int):
            encoder.header_table_size = headers  # (its next block says so to the decoders)
            continue
        block = encoder.encode(headers)
        kept = (block, True) in ours._blocks and ours.header_table.generation == ours._generation
        decoded, expected = ours.decode(block, raw=True), theirs.decode(block, raw=True)
        assert decoded == expected
        assert [type(h) for h in decoded] == [type(h) for h in expected]  # (never indexed stays so)
        assert list(ours.header_table.dynamic_entries) == list(theirs.header_table.dynamic_entries)
        hits += kept
    assert hits > 0, "no block came from the cache"


def test_a_kept_block() -> None:
    """What a kept block decodes to is a new list each time (h2 and the proxy may change it), and
    it is marked over the limit once the advertised limit is below it."""
    encoder, decoder = hpack.Encoder(), http2._Decoder()
    block = encoder.encode([(b"x-a", b"1")])
    decoder.decode(block, raw=True)
    block = encoder.encode([(b"x-a", b"1")])  # (indexed now: the table stays as it is)
    first = decoder.decode(block, raw=True)
    assert (block, True) in decoder._blocks
    first.append((b"x-b", b"2"))
    assert decoder.decode(block, raw=True) == [(b"x-a", b"1")]
    decoder.max_header_list_size = 8
    assert decoder.decode(block, raw=True) == [(b"x-a", b"1"), http2.OVERSIZED]


def test_a_list_over_the_advertised_limit_is_marked_and_the_table_kept_in_step() -> None:
    """Between the advertised limit (64 KiB) and HEADER_LIST_HARD a list decodes, marked OVERSIZED
    (its stream fails, not the connection), and the table stays as hpack's with no limit; past the
    hard limit hpack refuses it (a connection error, as for any HPACK bomb)."""
    encoder, theirs, ours = hpack.Encoder(), hpack.Decoder(max_header_list_size=1 << 30), http2._Decoder()
    ours.max_header_list_size = 1 << 16  # (what h2 sets: the advertised limit)
    big = [(b"x-big", b"v" * 70_000), (b"x-a", b"1")]
    for headers in (big, [(b"x-a", b"1"), (b"x-b", b"2")], big):
        block = encoder.encode(headers, huffman=headers is not big)  # (70 kB Huffman-coded: seconds)
        expected = theirs.decode(block, raw=True)
        got = ours.decode(block, raw=True)
        assert got == ([*expected, http2.OVERSIZED] if headers is big else expected)
        assert list(ours.header_table.dynamic_entries) == list(theirs.header_table.dynamic_entries)
    # Many fields, each small, over the advertised limit in all: summed, marked.
    many = [(b"x-%d" % i, b"v" * 100) for i in range(700)]
    assert ours.decode(encoder.encode(many), raw=True)[-1] == http2.OVERSIZED
    with pytest.raises(hpack.OversizedHeaderListError):
        ours.decode(encoder.encode([(b"x-huge", b"v" * http2.HEADER_LIST_HARD)], huffman=False), raw=True)


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


def _literal_block(i: int) -> bytes:
    """Many literal fields without indexing (a one-letter name, an empty value): the table stays
    as it was."""
    return b"".join(b"\x00\x01" + bytes([97 + (n * 7 + i) % 26]) + b"\x00" for n in range(124))


def test_what_a_peer_can_make_a_decoder_keep_is_small() -> None:
    """Blocks of many literals are not kept (124 of them held about 150 KB a connection); the
    blocks that are kept cost a few tens of KB per connection at most, Python objects included
    (the worst: as many small literal fields as a kept block may have)."""
    decoder = http2._Decoder()
    for i in range(http2.BLOCK_CACHE):
        decoder.decode(_literal_block(i), raw=True)
    assert decoder._blocks == {}
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        decoders = []
        for _ in range(20):
            decoder = http2._Decoder()
            for i in range(http2.BLOCK_CACHE):
                block = b"".join(
                    b"\x00\x01" + bytes([97 + (n * 7 + i) % 26]) + b"\x01" + bytes([97 + n % 26])
                    for n in range(http2.BLOCK_FIELDS)
                )
                decoder.decode(block, raw=True)
            assert len(decoder._blocks) == http2.BLOCK_CACHE
            decoders.append(decoder)
        gc.collect()
        per = (tracemalloc.get_traced_memory()[0] - base) / len(decoders)
    finally:
        tracemalloc.stop()
    assert per < 40 * 1024, f"{per / 1024:.0f} KiB per decoder"


@pytest.mark.parametrize(
    "block",
    [
        b"\x20" + b"\x90" * 1927,  # table size 0, then the static entry accept-encoding: gzip, deflate
        b"\x20" + b"\x0f\x05\x00" * 1720,  # table size 0, static name access-control-allow-origin, no value
        b"\x2a" + b"\x54\x00" * 1420,  # table size 10, the same name with incremental indexing
    ],
    ids=["static-entries", "static-names", "tiny-table"],
)
def test_a_list_over_the_limit_made_of_static_entries_is_marked(block: bytes) -> None:
    """One byte of block can make up to 60 bytes of list from the static table whatever the
    dynamic table's size: a peer that sets its table small cannot pass 100 KB unmarked (the quick
    bound that spares summing small lists counted only the dynamic table's size)."""
    decoder = http2._Decoder()
    decoder.max_header_list_size = 1 << 16  # (what h2 sets: the advertised limit)
    got = decoder.decode(block, raw=True)
    assert got[-1] == http2.OVERSIZED
    assert sum(hpack.table.table_entry_size(n, v) for n, v in got[:-1]) > 1 << 16
