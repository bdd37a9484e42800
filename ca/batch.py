"""Signings run in batches, a few milliseconds' worth at a time (no I/O).

The CA's event loop interleaves each signing with gRPC's own work for the call (tasks, futures,
completion-queue wake-ups, HTTP/2 and TLS in its C core). Run that way, a signing costs far more
CPU than the same signing run in a loop: the CSR checks, OpenSSL's ECDSA and the certificate
template find the processor's caches full of gRPC's code and data. :class:`IssueBatch` collects the
signings that arrive within ``window`` (or until ``size`` of them wait) and runs them one after the
other, each with its own result or error, so that all but the first find their code warm.

Measured with ``bench.ca_sign``'s load (64 calls in flight, CA on one core), interleaved runs on a
shared machine: ~570 -> ~390 µs of CPU per signing; 10 ms alone left the CPU idle while all the calls
in flight waited for the timer (~2,000/s at 78% CPU), hence ``size`` (32: ~2,450/s). The price is
latency: under load, a signing waits up to ``window`` when fewer than ``size`` arrive (calls wait
for the CPU longer than that anyway). An idle CA (no batch in the last ``window``) runs a request at
the next turn of its loop, with whatever arrived in the same turn: a workload asking for its
certificate at a quiet moment waits for nobody.

The audit line of each issuance is written in the batch, right after its certificate is signed
and before its caller resumes: every certificate that leaves the CA has its line already written
(as Vault's audit devices: no response without its audit record), and the logging code too runs
many times in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable

from ca import issuer
from ca.keys import SigningAuthority
from sidemesh.clock import Clock
from sidemesh.spiffe import SpiffeId

ISSUE_BATCH_SECONDS = 0.01  # the longest a signing waits for others
ISSUE_BATCH_SIZE = 32  # a batch this large runs at once (the CPU would idle waiting for more)

_Request = tuple[
    "asyncio.Future[issuer.Issued]", SigningAuthority, SpiffeId, str, dt.timedelta, frozenset[str], str
]
OnIssued = Callable[[issuer.Issued, str], None]  # (the certificate, the caller's peer): the audit line


class IssueBatch:
    """``issuer.issue`` for the calls of the last ``window`` seconds, one after the other."""

    def __init__(
        self,
        clock: Clock,
        window: float = ISSUE_BATCH_SECONDS,
        size: int = ISSUE_BATCH_SIZE,
        on_issued: OnIssued | None = None,
    ) -> None:
        self.clock = clock
        self.window = window
        self.size = size
        self.on_issued = on_issued
        self._pending: list[_Request] = []
        self._timer: asyncio.Handle | None = None
        self._last_run = float("-inf")  # loop time of the last batch

    def issue(
        self,
        authority: SigningAuthority,
        identity: SpiffeId,
        csr_pem: str,
        ttl: dt.timedelta,
        allowed_dns: frozenset[str] = frozenset(),
        peer: str = "",
    ) -> asyncio.Future[issuer.Issued]:
        """The certificate, or the error ``issuer.issue`` raises, once this request's batch has run."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[issuer.Issued] = loop.create_future()
        pending = self._pending
        pending.append((future, authority, identity, csr_pem, ttl, allowed_dns, peer))
        if len(pending) == 1:
            if loop.time() - self._last_run > self.window:  # idle: no reason to wait
                self._timer = loop.call_soon(self.run)
            else:
                self._timer = loop.call_later(self.window, self.run)
        elif len(pending) == self.size:  # enough to gain from: no need to wait (the CPU would idle)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_soon(self.run)
        return future

    def run(self) -> None:
        """Sign what waits, now (the clock is read once per batch)."""
        pending, self._pending = self._pending, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(RuntimeError):
            self._last_run = asyncio.get_running_loop().time()
        now = self.clock.now()
        for future, authority, identity, csr_pem, ttl, allowed_dns, peer in pending:
            if future.done():  # its call was cancelled meanwhile
                continue
            try:
                issued = issuer.issue(authority, identity, csr_pem, ttl, now, allowed_dns)
            except Exception as exc:  # the caller's own error (CAError: refused), raised where it awaits
                future.set_exception(exc)
                continue
            if self.on_issued is not None:
                self.on_issued(issued, peer)  # before the caller can send the certificate anywhere
            future.set_result(issued)
