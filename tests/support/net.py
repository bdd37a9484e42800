"""What the machine's network stack offers, for tests that skip without it."""

from __future__ import annotations

import socket


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound (the kernel has IPv6 and loopback has the address)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True
