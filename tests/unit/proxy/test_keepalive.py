"""TCP keepalive between sidecars (Linkerd's default, 10 s): a peer that vanished without a FIN is
noticed in about 40 s, and an idle pooled connection to it is not handed out as usable."""

from __future__ import annotations

import socket

from proxy.dial import KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES, set_keepalive


def test_keepalive_is_set_with_linkerds_timings() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)  # (options of TCP are not there: no exception either)
    set_keepalive(a)
    a.close()
    b.close()
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        try:
            set_keepalive(client)
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S == 10
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL_S
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
        finally:
            client.close()
    set_keepalive(None)
