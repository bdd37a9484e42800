from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from sidemesh.identity.rotation import BACKOFF_MAX, EXPIRED_BACKOFF_MAX, backoff, renewal_time

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(("rand", "minutes"), [(0.0, 30), (0.5, 27), (0.999999, 24)])
def test_renewal_at_half_life_with_jitter(rand: float, minutes: float) -> None:
    at = renewal_time(T0, T0 + dt.timedelta(hours=1), rand)
    assert abs((at - T0).total_seconds() - minutes * 60) < 1


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 1), (2, 2), (3, 4), (7, 60), (50, 60), (1025, 60), (10**6, 60)]
)
def test_backoff_grows_and_is_capped(attempt: int, ceiling: float) -> None:
    """(An attempt past 1,024 raised OverflowError: the renewal loop and the controller stream,
    which compute it while handling a failure, ended for good after about an hour of outage.)"""
    assert backoff(attempt, 1.0) == ceiling
    assert 0.5 <= backoff(attempt, 0.0) <= ceiling


def test_backoff_never_sleeps_past_half_the_remaining_life() -> None:
    assert backoff(20, 1.0, until_expiry=30) == 15
    assert backoff(20, 1.0, until_expiry=None) == BACKOFF_MAX
    # Expired (or no certificate yet): the workload is down until it renews, so retry often.
    assert backoff(20, 1.0, until_expiry=-5) == EXPIRED_BACKOFF_MAX
    assert backoff(20, 1.0, until_expiry=0.0) == EXPIRED_BACKOFF_MAX
    assert 0.5 <= backoff(20, 0.0, until_expiry=-5) <= EXPIRED_BACKOFF_MAX


def test_backoff_ceiling_is_configurable() -> None:
    assert backoff(20, 1.0, ceiling=5.0) == 5.0
    assert backoff(1, 1.0, ceiling=5.0) == 1.0


@pytest.mark.parametrize("ttl_seconds", [20, 60, 100, 300, 3600])
@pytest.mark.parametrize("rand", [0.0, 0.999])
def test_backdated_not_before_does_not_count_as_lifetime(ttl_seconds: int, rand: float) -> None:
    # The CA backdates notBefore by a minute; a certificate received now for ttl_seconds must be
    # renewed at 40-50% of the time it is actually usable, not at once.
    received = T0
    not_before, not_after = received - dt.timedelta(minutes=1), received + dt.timedelta(seconds=ttl_seconds)
    at = renewal_time(not_before, not_after, rand, received=received)
    fraction = (at - received).total_seconds() / ttl_seconds
    assert 0.4 - 1e-6 <= fraction <= 0.5 + 1e-6
    # Without knowing when it arrived, the old computation renews a 20 s certificate in the past.
    if ttl_seconds == 20:
        assert renewal_time(not_before, not_after, rand) < received


def test_received_before_not_before_uses_not_before() -> None:
    at = renewal_time(T0, T0 + dt.timedelta(hours=1), 0.0, received=T0 - dt.timedelta(seconds=5))
    assert at == T0 + dt.timedelta(minutes=30)


def test_the_trust_generation_counts_bundles_not_their_order(tmp_path: Path) -> None:
    """Pooled connections are not reused across a generation: a renewal whose bundle holds the
    same roots in another order must not count (each would replace every pooled connection)."""
    from sidemesh.identity.workload import WorkloadIdentity
    from sidemesh.spiffe import WorkloadId
    from tests.support import pki

    one, two = pki.make_authority(tmp_path / "one"), pki.make_authority(tmp_path / "two")
    sid = WorkloadId("shop", "cart").spiffe_id("cluster.local")
    identity = WorkloadIdentity(sid, None, lambda: "token")  # type: ignore[arg-type]
    svid = pki.make_svid(one, sid)
    identity._install(svid.with_bundle(pki.lite((*one.roots, *two.roots))))
    first = identity.generation
    identity._install(pki.make_svid(one, sid).with_bundle(pki.lite((*two.roots, *one.roots))))  # a renewal
    assert identity.generation == first
    identity._install(pki.make_svid(one, sid).with_bundle(pki.lite(one.roots)))  # a root removed
    assert identity.generation == first + 1
