"""When to renew and how long to back off (no I/O)."""

from __future__ import annotations

import datetime as dt

RENEW_FRACTION = 0.5
JITTER_FRACTION = 0.1
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0


def renewal_time(not_before: dt.datetime, not_after: dt.datetime, rand: float) -> dt.datetime:
    """At half the lifetime, moved earlier by up to 10% of the lifetime (``rand`` in [0, 1)).

    The jitter spreads the renewals of many workloads started together.
    """
    lifetime = not_after - not_before
    return not_before + lifetime * (RENEW_FRACTION - JITTER_FRACTION * rand)


def backoff(attempt: int, rand: float, until_expiry: float | None = None) -> float:
    """Exponential backoff with full jitter, capped at a minute and never past the expiry."""
    ceiling = min(BACKOFF_MAX, BACKOFF_INITIAL * 2.0 ** max(0, attempt - 1))
    delay = max(BACKOFF_INITIAL / 2, ceiling * rand)
    if until_expiry is not None and until_expiry > 0:
        delay = min(delay, max(until_expiry / 2, 0.5))
    return delay
