"""Opaque TCP's endpoint choice when a connect fails (proxy/outbound.py _connect_balanced)."""

from __future__ import annotations

import types

import pytest

from proxy import outbound
from proxy.balance import Balancer
from proxy.relay import Relay
from sidemesh.mesh.compile import Destination, Endpoint

A = Endpoint("10.0.0.1", 80, None, "shop/a")
B = Endpoint("10.0.0.2", 80, None, "shop/b")


async def test_an_unreachable_endpoint_is_not_dialled_again_when_the_others_are_ejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With A ejected, the balancer handed B (black-holed) to every retry: three connect timeouts
    for one connection. Now B is tried once, and its lease for the retry is given back unreported."""
    balancer = Balancer()
    for _ in range(10):  # A refused enough connections to be ejected
        balancer.acquire(Destination("a", (A,))).release(False)
    dials: list[tuple[str, int]] = []

    async def plain(sc: object, relay: object, dial: tuple[str, int]) -> None:
        dials.append(dial)
        raise outbound.Refused(f"cannot connect to {dial[0]}:{dial[1]}: timed out")

    monkeypatch.setattr(outbound, "_connect_plain", plain)
    sidecar = types.SimpleNamespace(balancer=balancer)
    with pytest.raises(outbound.Refused, match="timed out"):
        await outbound._connect_balanced(sidecar, Relay(on_close=None), Destination("x.shop:80", (A, B)))  # type: ignore[arg-type]
    assert dials == [("10.0.0.2", 80)]
    state = balancer._state_of(B, Destination("x.shop:80", (A, B)), balancer.clock())
    assert state.outstanding == 0
