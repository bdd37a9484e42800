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


def test_without_net_admin_the_backend_choice_says_so_and_blames_no_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without NET_ADMIN iptables-nft-save is refused while the legacy one may read: "nf_tables not
    usable" was logged and the legacy backend chosen, before the NET_ADMIN error came."""
    from proxy.iptables import apply

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "iptables-legacy-save", "exit 0\n")
    denied = "iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"
    _fake(bin_dir, "iptables-nft-save", f"echo '{denied}' >&2; exit 4\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(apply.NotPermitted, match="NET_ADMIN"):
        apply.detect_backend()


def test_a_legacy_lock_goes_to_dev_shm_when_run_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """iptables-legacy-restore takes /run/xtables.lock even without -w: in the injected init
    container (read-only root filesystem) it failed, "can't open lock file /run/xtables.lock"."""
    from proxy.iptables import apply

    bin_dir, run, shm = tmp_path / "bin", tmp_path / "run", tmp_path / "shm"
    for d in (bin_dir, run, shm):
        d.mkdir()
    _fake(bin_dir, "iptables-legacy-save", 'echo "lock=${XTABLES_LOCKFILE:-/run/xtables.lock}"\n')
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("XTABLES_LOCKFILE", raising=False)
    monkeypatch.setattr(apply, "LOCK_DIRS", (str(run), str(shm)))
    assert apply._run(["iptables-legacy-save"]) == "lock=/run/xtables.lock\n"  # /run writable: as is
    run.chmod(0o555)
    monkeypatch.setattr(apply.os, "access", lambda p, mode: p != str(run))  # (root may write anyway)
    assert apply._run(["iptables-legacy-save"]) == f"lock={shm}/xtables.lock\n"
    monkeypatch.setenv("XTABLES_LOCKFILE", "/elsewhere.lock")  # the operator's choice stands
    assert apply._run(["iptables-legacy-save"]) == "lock=/elsewhere.lock\n"


def test_an_nft_error_is_not_blamed_on_a_missing_nf_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every iptables-nft message starts "(nf_tables):": a bad rule was told to use the legacy backend."""
    from proxy.iptables import apply

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    bad = "ip6tables-restore v1.8.9 (nf_tables): host/network `fe80::1%eth0' not found"
    (tmp_path / "bad.txt").write_text(bad + "\n")
    _fake(bin_dir, "bad-restore", f"/bin/cat {tmp_path / 'bad.txt'} >&2; exit 2\n")
    _fake(
        bin_dir, "old-kernel", 'echo "Could not fetch rule set generation id: Invalid argument" >&2; exit 1\n'
    )
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(apply.CaptureError) as bad_rule:
        apply._run(["bad-restore"])
    assert "fe80::1%eth0' not found" in str(bad_rule.value) and "legacy" not in str(bad_rule.value)
    with pytest.raises(apply.CaptureError, match="kernel has no nf_tables"):
        apply._run(["old-kernel"])
