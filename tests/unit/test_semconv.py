"""Addresses split as the semantic conventions want them, whatever a client put in Host."""

from __future__ import annotations

import pytest

from sidemesh.semconv import grpc_peer, host_port, method_of, peer_port


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("cart.shop:80", ("cart.shop", 80)),
        ("cart.shop", ("cart.shop", None)),
        ("[fd00::1]:8080", ("fd00::1", 8080)),
        ("[fd00::1]", ("fd00::1", None)),
        ("fd00::1", ("fd00::1", None)),  # no brackets: not valid in Host, all of it is the host
        ("::1", ("::1", None)),
        ("cart:\u00b2", ("cart:\u00b2", None)),  # a superscript two is a digit to str.isdigit
        ("cart:99999", ("cart:99999", None)),
        ("cart:x", ("cart:x", None)),
        ("", ("", None)),
    ],
)
def test_host_port(authority: str, expected: tuple[str, int | None]) -> None:
    assert host_port(authority) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:5000", ("10.0.0.1", 5000)),
        ("fd00::1:8080", ("fd00::1", 8080)),  # as the sidecar writes an IPv6 peer
        ("[fd00::1]:8080", ("fd00::1", 8080)),
        ("10.0.0.1", ("10.0.0.1", None)),
        ("10.0.0.1:\u00b2", ("10.0.0.1:\u00b2", None)),
    ],
)
def test_peer_port(address: str, expected: tuple[str, int | None]) -> None:
    assert peer_port(address) == expected


def test_grpc_peer_and_methods() -> None:
    assert grpc_peer("ipv4:127.0.0.1:60784") == ("127.0.0.1", 60784)
    assert grpc_peer("ipv6:%5B::1%5D:5000") == ("::1", 5000)
    assert grpc_peer("unix:/tmp/s") == ("/tmp/s", None)
    assert (method_of("GET"), method_of("FOO123"), method_of("get")) == ("GET", "_OTHER", "_OTHER")
