"""The caller address the CA's per-address TokenReview limits are kept by."""

from __future__ import annotations

import pytest

from ca.authn import peer_address


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.5:41234", "10.0.0.5"),
        ("ipv6:%5B::1%5D:33778", "::1"),  # as grpcio writes an IPv6 peer (percent-encoded brackets)
        ("ipv6:[fd00::5]:41234", "fd00::5"),
        ("unix:/run/sock", "unix:/run/sock"),
    ],
)
def test_the_address_of_a_grpc_peer(peer: str, address: str) -> None:
    assert peer_address(peer) == address
