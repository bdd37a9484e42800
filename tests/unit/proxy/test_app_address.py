"""Where the inbound sidecar delivers a connection, and where the sidecar listens (no sockets
but a bind check): as Istio (1.10) and Linkerd (2.11) deliver, to the address the caller asked for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.outbound import Refused
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
        # IPv4 link-local as it came (loopback made the app's 127.0.0.1-only ports reachable from
        # the pod's neighbours; IPv6 link-local is refused: test below).
        ("169.254.7.7", True, ("169.254.7.7", ("127.0.0.6", 0))),
        ("127.0.0.1", True, ("127.0.0.1", None)),
    ],
)
def test_app_address(original: str | None, v6_source: bool, expected: tuple[str, object]) -> None:
    assert Sidecar.app_address(_sidecar(v6_source), original) == expected


@pytest.mark.parametrize("original", ["fe80::1%2", "fe80::1", "fe80::1%eth0"])
def test_an_ipv6_link_local_destination_is_refused(original: str) -> None:
    """Linux does not connect from ::6 to the pod's own link-local address, and from any other
    source the connection would be captured again (a loop); delivered to ::1 it reached ports
    the app binds to loopback only (from the pod's neighbours)."""
    with pytest.raises(Refused, match=r"link-local address .*: not delivered"):
        Sidecar.app_address(_sidecar(True), original)


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
