"""Batched signings: each request gets its own certificate or its own refusal; a full batch runs
without waiting for the window; a cancelled request is skipped."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import pytest

from ca import keys
from ca.batch import IssueBatch
from ca.errors import IdentityMismatch, InvalidRequest
from sidemesh.clock import SYSTEM_CLOCK
from sidemesh.identity.svid import make_csr, new_key
from sidemesh.spiffe import SpiffeId

CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
FRONTEND = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")
HOUR = dt.timedelta(hours=1)


@pytest.fixture
def authority(tmp_path: Path) -> keys.SigningAuthority:
    return keys.bootstrap(tmp_path / "ca", "cluster.local", dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))


async def test_each_request_of_a_batch_gets_its_own_answer(authority: keys.SigningAuthority) -> None:
    batch = IssueBatch(SYSTEM_CLOCK, window=0.02, size=100)
    good = [batch.issue(authority, CART, make_csr(new_key(), CART), HOUR) for _ in range(3)]
    garbage = batch.issue(authority, CART, "not a csr", HOUR)
    someone_else = batch.issue(authority, CART, make_csr(new_key(), FRONTEND), HOUR)
    last = batch.issue(authority, FRONTEND, make_csr(new_key(), FRONTEND), HOUR)
    assert not any(f.done() for f in (*good, garbage, someone_else, last))  # waiting for the window
    issued = [await f for f in (*good, last)]
    assert len({i.serial for i in issued}) == 4
    assert [i.spiffe_id for i in issued] == [CART, CART, CART, FRONTEND]
    assert all(i.certificate.public_key() is not None for i in issued)
    with pytest.raises(InvalidRequest):
        await garbage
    with pytest.raises(IdentityMismatch):
        await someone_else


async def test_a_full_batch_does_not_wait_for_the_window(authority: keys.SigningAuthority) -> None:
    batch = IssueBatch(SYSTEM_CLOCK, window=30.0, size=2)
    started = time.monotonic()
    first = batch.issue(authority, CART, make_csr(new_key(), CART), HOUR)
    second = batch.issue(authority, CART, make_csr(new_key(), CART), HOUR)
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert time.monotonic() - started < 5
    third = batch.issue(authority, CART, make_csr(new_key(), CART), HOUR)  # a new batch, alone
    await asyncio.sleep(0.1)
    assert not third.done()
    batch.run()
    assert (await third).spiffe_id == CART


async def test_a_cancelled_request_is_skipped(authority: keys.SigningAuthority) -> None:
    batch = IssueBatch(SYSTEM_CLOCK, window=0.02)
    cancelled = batch.issue(authority, CART, make_csr(new_key(), CART), HOUR)
    kept = batch.issue(authority, CART, make_csr(new_key(), CART), HOUR)
    cancelled.cancel()
    assert (await kept).spiffe_id == CART
    assert cancelled.cancelled()


async def test_the_audit_line_is_written_before_the_caller_has_its_certificate(
    authority: keys.SigningAuthority,
) -> None:
    events: list[str] = []
    batch = IssueBatch(
        SYSTEM_CLOCK, window=0.02, on_issued=lambda issued, peer: events.append(f"audit {peer}")
    )

    async def call(peer: str) -> None:
        await batch.issue(authority, CART, make_csr(new_key(), CART), HOUR, peer=peer)
        events.append(f"answer {peer}")

    refused = batch.issue(authority, CART, "not a csr", HOUR, peer="p0")
    await asyncio.gather(call("p1"), call("p2"))
    with pytest.raises(InvalidRequest):
        await refused
    assert events[:2] == ["audit p1", "audit p2"]  # both lines written by the batch, then the answers
    assert sorted(events[2:]) == ["answer p1", "answer p2"]  # no line for the refused one


async def test_an_idle_ca_signs_at_once_a_busy_one_waits_for_the_window(
    authority: keys.SigningAuthority,
) -> None:
    batch = IssueBatch(SYSTEM_CLOCK, window=0.5, size=100)
    started = time.monotonic()
    await batch.issue(authority, CART, make_csr(new_key(), CART), HOUR)
    assert time.monotonic() - started < 0.25  # idle: the next turn of the loop, not the window
    started = time.monotonic()
    await batch.issue(authority, CART, make_csr(new_key(), CART), HOUR)  # right after a batch: waits
    assert time.monotonic() - started >= 0.4
