"""Pods made of Linux network namespaces, for the e2e suites (needs root).

The plumbing - `Cluster`, `Netns`, `Process`, `as_user` - lives in `sidemesh/netns.py`, which
`sidemesh demo --netns` uses too; this module adds what only the tests need: a skip (not an
error) when namespaces cannot be made, and packet capture on a namespace's interface.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidemesh import netns as _netns
from sidemesh.netns import (
    CLEAN_ENV,
    COMMAND_TIMEOUT,
    PACKAGE_OF,
    Netns,
    NetnsError,
    NetnsUnavailable,
    Process,
    as_user,
    closed_dirs,
    process_ids,
)

__all__ = [
    "CLEAN_ENV",
    "COMMAND_TIMEOUT",
    "PACKAGE_OF",
    "REPO",
    "Cluster",
    "Netns",
    "NetnsError",
    "Process",
    "Segment",
    "as_user",
    "capture",
    "closed_dirs",
    "process_ids",
    "split_frames",
    "tcp_segments",
    "why_skip",
]

REPO = Path(__file__).resolve().parents[1]


def why_skip(*tools: str) -> str | None:
    """Why an e2e suite cannot run here, or None."""
    return _netns.why_unavailable(*tools)


class Cluster(_netns.Cluster):
    """`sidemesh.netns.Cluster`, skipping the test when this machine cannot make namespaces."""

    @classmethod
    def create(cls, workdir: Path, subnet: str, prefix: str = "sm", subnet6: str | None = None) -> Cluster:
        try:
            cluster = super().create(workdir, subnet, prefix, subnet6)
        except NetnsUnavailable as exc:
            pytest.skip(str(exc))
        assert isinstance(cluster, Cluster)
        return cluster


# -- packet capture ----------------------------------------------------------------------------

CAPTURE = """
import select, signal, socket, struct, sys
iface, path = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
sock.bind((iface, 0))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
with open(path, "wb") as out:
    print("capturing", flush=True)
    while not stop:
        if select.select([sock], [], [], 0.05)[0]:
            frame = sock.recv(1 << 18)
            out.write(struct.pack("!I", len(frame)) + frame)
    sock.setblocking(False)
    while True:  # what arrived before SIGTERM
        try:
            frame = sock.recv(1 << 18)
        except BlockingIOError:
            break
        out.write(struct.pack("!I", len(frame)) + frame)
"""


@contextlib.contextmanager
def capture(ns: Netns, iface: str, label: str = "capture") -> Iterator[list[bytes]]:
    """Every frame seen on `iface` of `ns` while the block runs (a raw AF_PACKET socket, so no
    tcpdump); the list is filled when the block ends."""
    path = ns.workdir / f"{label}-{secrets.token_hex(3)}.frames"
    proc = ns.start(label, sys.executable, "-c", CAPTURE, iface, str(path))
    frames: list[bytes] = []
    deadline = time.monotonic() + 10
    while "capturing" not in proc.text():
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the packet capture did not start:\n{proc.tail()}")
        time.sleep(0.02)
    try:
        yield frames
    finally:
        proc.stop(timeout=5)
    frames += split_frames(path.read_bytes())


def split_frames(data: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos + 4 <= len(data):
        (length,) = struct.unpack_from("!I", data, pos)
        frames.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return frames


@dataclass(frozen=True, slots=True)
class Segment:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def tcp_segments(frames: Iterable[bytes]) -> list[Segment]:
    """The TCP segments in Ethernet frames, IPv4 and IPv6 (without extension headers); everything
    else is skipped."""
    out = []
    for frame in frames:
        ip = frame[14:]
        if frame[12:14] == b"\x08\x00" and len(ip) >= 20:
            header = (ip[0] & 0x0F) * 4
            total = int.from_bytes(ip[2:4], "big") or len(ip)  # 0 in GSO frames: take the frame's size
            proto, src, dst = ip[9], ipaddress.IPv4Address(ip[12:16]), ipaddress.IPv4Address(ip[16:20])
        elif frame[12:14] == b"\x86\xdd" and len(ip) >= 40:
            header = 40
            total = (40 + int.from_bytes(ip[4:6], "big")) if ip[4:6] != b"\0\0" else len(ip)
            proto, src, dst = ip[6], ipaddress.IPv6Address(ip[8:24]), ipaddress.IPv6Address(ip[24:40])
        else:
            continue
        if proto != 6 or len(ip) < header + 20:
            continue
        tcp = ip[header:total]
        offset = (tcp[12] >> 4) * 4
        out.append(
            Segment(
                str(src),
                int.from_bytes(tcp[0:2], "big"),
                str(dst),
                int.from_bytes(tcp[2:4], "big"),
                bytes(tcp[offset:]),
            )
        )
    return out
