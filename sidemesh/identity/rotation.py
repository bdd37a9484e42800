"""When to renew and how long to back off (no I/O)."""

from __future__ import annotations

import datetime as dt

RENEW_FRACTION = 0.5
JITTER_FRACTION = 0.1
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
# Without a valid certificate the workload serves nothing: retry often (but not in a busy loop).
EXPIRED_BACKOFF_MAX = 2.0


def renewal_time(
    not_before: dt.datetime, not_after: dt.datetime, rand: float, received: dt.datetime | None = None
) -> dt.datetime:
    """At half the lifetime, moved earlier by up to 10% of the lifetime (``rand`` in [0, 1)).

    The lifetime counts from when the certificate was ``received`` when that is later than its
    notBefore: the CA backdates notBefore (clock skew), and counting the backdated minute would
    renew a short-lived certificate at once, again and again. The jitter spreads the renewals of
    many workloads started together.
    """
    start = not_before if received is None else max(not_before, received)
    lifetime = not_after - start
    return start + lifetime * (RENEW_FRACTION - JITTER_FRACTION * rand)


def backoff(
    attempt: int, rand: float, until_expiry: float | None = None, ceiling: float = BACKOFF_MAX
) -> float:
    """Exponential backoff with full jitter, capped at ``ceiling`` and never past the expiry.

    ``until_expiry`` <= 0 (the certificate has expired) caps the delay at EXPIRED_BACKOFF_MAX.
    """
    # (the exponent capped: 2.0 ** 1024 overflows, and an outage can last a thousand attempts)
    top = min(ceiling, BACKOFF_INITIAL * 2.0 ** min(max(0, attempt - 1), 32))
    delay = max(min(BACKOFF_INITIAL / 2, top), top * rand)
    if until_expiry is not None:
        if until_expiry > 0:
            delay = min(delay, max(until_expiry / 2, 0.5))
        else:
            delay = min(delay, EXPIRED_BACKOFF_MAX)
    return delay
