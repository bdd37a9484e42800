"""Where the inbound sidecar delivers a connection, and where the sidecar listens (no sockets
but a bind check): as Istio (1.10) and Linkerd (2.11) deliver, to the address the caller asked for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.sidecar import Sidecar, _can_bind, _listen_addresses


def _sidecar(v6_source: bool) -> Sidecar:
    return SimpleNamespace(config=SimpleNamespace(app_host="127.0.0.1"), _v6_source=v6_source)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("original", "v6_source", "expected"),
    [
        (None, True, ("127.0.0.1", None)),  # not redirected (local mode): --app-host
        ("10.1.2.3", True, ("10.1.2.3", ("127.0.0.6", 0))),
        ("::ffff:10.1.2.3", True, ("10.1.2.3", ("127.0.0.6", 0))),  # IPv4 on the dual-stack listener
        ("fd00::7", True, ("fd00::7", ("::6", 0))),
        ("fd00::7", False, ("::1", None)),  # ::6 not on lo: the old way, never a loop
        ("fe80::1", True, ("::1", None)),  # link-local: no zone to connect with
        ("127.0.0.1", True, ("127.0.0.1", None)),
    ],
)
def test_app_address(original: str | None, v6_source: bool, expected: tuple[str, object]) -> None:
    assert Sidecar.app_address(_sidecar(v6_source), original) == expected


@pytest.mark.skipif(not _can_bind("::1"), reason="no IPv6 loopback on this machine")
def test_default_listeners_take_ipv6_under_the_capture() -> None:
    assert _listen_addresses("inbound_listen", "0.0.0.0:15006", "iptables") == ["[::]:15006"]
    assert _listen_addresses("outbound_listen", "127.0.0.1:15001", "iptables") == [
        "127.0.0.1:15001",
        "[::1]:15001",
    ]
    # Set explicitly, or in local mode: taken as it is.
    assert _listen_addresses("inbound_listen", "10.0.0.5:15006", "iptables") == ["10.0.0.5:15006"]
    assert _listen_addresses("inbound_listen", "0.0.0.0:15006", "none") == ["0.0.0.0:15006"]
