"""The I/O shell's one pure-ish helper: `--ipv6 auto` reads /proc/net/if_inet6."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.iptables.apply import has_ipv6

LO = "00000000000000000000000000000001 01 80 10 80       lo\n"
LINK_LOCAL = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
GLOBAL = "20010db8000000000000000000000002 04 40 00 80     eth0\n"
ULA = "fd000000000000000000000000000002 04 40 00 82     eth0\n"
GLOBAL_ON_LO = "20010db8000000000000000000000009 01 80 00 80       lo\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", False),
        (LO, False),
        (LO + LINK_LOCAL, True),  # reachable over IPv6 from its neighbours: captured too
        (LO + GLOBAL_ON_LO, False),
        (LO + LINK_LOCAL + GLOBAL, True),
        (LO + ULA, True),
    ],
)
def test_has_ipv6(tmp_path: Path, content: str, expected: bool) -> None:
    path = tmp_path / "if_inet6"
    path.write_text(content)
    assert has_ipv6(path) is expected


def test_kernel_without_ipv6(tmp_path: Path) -> None:
    assert has_ipv6(tmp_path / "missing") is False


def _fake(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.mark.parametrize(
    ("legacy", "nft", "expected"),
    [
        ("-A OUTPUT -j X\n", "", "legacy"),  # rules in legacy only
        ("", "-A OUTPUT -j X\n", "nft"),
        ("", "", ""),  # none: the PATH's iptables
        # a kernel without nf_tables: iptables-nft-save fails; legacy is what works there
        ("", "Could not fetch rule set generation id: Invalid argument\n", "legacy"),
    ],
)
def test_the_backend_is_the_one_holding_rules_or_the_one_that_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy: str, nft: str, expected: str
) -> None:
    from proxy.iptables import apply

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "iptables-legacy-save", f"printf '%s' '{legacy}'\n")
    if nft.startswith("Could not"):
        _fake(bin_dir, "iptables-nft-save", f"echo '{nft.strip()}' >&2; exit 1\n")
    else:
        _fake(bin_dir, "iptables-nft-save", f"printf '%s' '{nft}'\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    backend, why = apply.detect_backend()
    assert backend == expected, why
