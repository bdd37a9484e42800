from __future__ import annotations

import datetime as dt

import pytest

from sidemesh.identity.rotation import BACKOFF_MAX, backoff, renewal_time

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(("rand", "minutes"), [(0.0, 30), (0.5, 27), (0.999999, 24)])
def test_renewal_at_half_life_with_jitter(rand: float, minutes: float) -> None:
    at = renewal_time(T0, T0 + dt.timedelta(hours=1), rand)
    assert abs((at - T0).total_seconds() - minutes * 60) < 1


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 1), (2, 2), (3, 4), (7, 60), (50, 60)])
def test_backoff_grows_and_is_capped(attempt: int, ceiling: float) -> None:
    assert backoff(attempt, 1.0) == ceiling
    assert 0.5 <= backoff(attempt, 0.0) <= ceiling


def test_backoff_never_sleeps_past_half_the_remaining_life() -> None:
    assert backoff(20, 1.0, until_expiry=30) == 15
    assert backoff(20, 1.0, until_expiry=None) == BACKOFF_MAX
    assert backoff(20, 1.0, until_expiry=-5) == BACKOFF_MAX  # already expired: plain backoff
