"""Where a redirected connection was going: SO_ORIGINAL_DST on a socket accepted on 15001/15006.

iptables REDIRECT rewrites the destination to the sidecar's port; the kernel's conntrack entry
still holds the original address, and this reads it back. Works with a plain `socket.socket` and
with the `TransportSocket` asyncio hands out (`transport.get_extra_info("socket")`).
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, level SOL_IPV6
SOL_IP = socket.IPPROTO_IP  # the same numbers as SOL_IP / SOL_IPV6, which Python does not export
SOL_IPV6 = socket.IPPROTO_IPV6
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # sin_family (host order), sin_port, sin_addr, zero
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # sin6_family, sin6_port, flowinfo, addr, scope_id


class AcceptedSocket(Protocol):
    @property
    def family(self) -> int: ...

    def getsockname(self) -> object: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


class NoOriginalDestination(OSError):
    """The connection was not redirected by iptables, so there is no original destination."""


def original_dst(sock: AcceptedSocket) -> tuple[str, int]:
    """`(address, port)` the client connected to before iptables redirected it to us.

    An IPv4 client accepted on a dual-stack IPv6 socket (`::ffff:a.b.c.d`) is looked up in the
    IPv4 conntrack table and returned as a plain IPv4 address.
    """
    try:
        if sock.family == socket.AF_INET or (sock.family == socket.AF_INET6 and _ipv4_mapped(sock)):
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
            port, packed = _SOCKADDR_IN.unpack_from(raw)
            return socket.inet_ntop(socket.AF_INET, packed), port
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            port, packed = _SOCKADDR_IN6.unpack_from(raw)
            return socket.inet_ntop(socket.AF_INET6, packed), port
    except OSError as exc:
        raise NoOriginalDestination(
            exc.errno,
            f"no original destination ({exc.strerror}): the connection was not redirected by iptables "
            "(was `sidemesh proxy init` run in this pod?)",
        ) from exc
    raise ValueError(f"original_dst needs an IPv4 or IPv6 TCP socket, not address family {sock.family}")


def _ipv4_mapped(sock: AcceptedSocket) -> bool:
    name = sock.getsockname()
    return isinstance(name, tuple) and str(name[0]).lower().startswith("::ffff:") and "." in str(name[0])
