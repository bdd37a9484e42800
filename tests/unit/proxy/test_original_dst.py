"""original_dst() without iptables: what a connection that was not redirected gets.

The redirected case needs root and a network namespace: e2e/test_iptables_netns.py.
"""

from __future__ import annotations

import socket

import pytest

from proxy.original_dst import NoOriginalDestination, original_dst


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_not_redirected_says_so(family: socket.AddressFamily, host: str) -> None:
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"no {family.name} sockets on this machine: {exc}")
    with listener:
        try:
            listener.bind((host, 0))
        except OSError as exc:
            pytest.skip(f"cannot bind {host}: {exc}")
        listener.listen()
        with (
            socket.create_connection(listener.getsockname()[:2], timeout=5),
            listener.accept()[0] as accepted,
            pytest.raises(NoOriginalDestination, match="not redirected by iptables"),
        ):
            original_dst(accepted)


def test_unix_socket_is_refused() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right, pytest.raises(ValueError, match="IPv4 or IPv6 TCP socket"):
        original_dst(left)
