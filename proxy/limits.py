"""Bounds on work in progress, and a log line a flood cannot multiply.

:class:`Pacer` spaces out the mTLS dials of outbound connections whose protocol detection timed
out (nothing sent, or bytes that decided nothing): a flood of idle or trickling connections then
costs a few handshakes a second instead of thousands in the same second, while connections that
showed what they speak dial at once. :class:`Throttle` says when a repeated event is worth a log
line again. Both take the time as an argument (tests pass their own).
"""

from __future__ import annotations

import time


class Pacer:
    """At most ``rate`` starts a second after a burst of ``burst``, first come first served.

    A rate, not a number in progress: a handshake costs CPU in both sidecars whether or not others
    run beside it, so only a rate bounds the share of the CPU a flood can take. A caller whose turn
    would come after its deadline gets no turn and takes none from those behind it.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate {rate} and burst {burst} must be positive")
        self.interval = 1.0 / rate
        self.burst = burst
        self._next = -float("inf")  # the earliest free turn

    def reserve(self, deadline: float, now: float | None = None) -> float | None:
        """Seconds to wait for a turn no later than ``deadline`` (0: go now); None: there is none."""
        now = time.monotonic() if now is None else now
        turn = max(self._next, now - (self.burst - 1) * self.interval)
        if turn > deadline:
            return None
        self._next = turn + self.interval
        return max(0.0, turn - now)


class Throttle:
    """At most one log line per ``every`` seconds for a repeated event; counts what it held back."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last = -float("inf")
        self.suppressed = 0

    def due(self, now: float | None = None) -> int | None:
        """None: stay quiet. Otherwise log now, mentioning the returned number of events held back."""
        now = time.monotonic() if now is None else now
        if now - self._last < self.every:
            self.suppressed += 1
            return None
        self._last = now
        held_back, self.suppressed = self.suppressed, 0
        return held_back
