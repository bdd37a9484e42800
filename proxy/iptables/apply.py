"""The I/O shell around `rules`: read the nat table, pipe the rendered rules into iptables-restore.

Each family is one `iptables-restore --noflush` transaction, so a family's capture is installed
completely or not at all. The rules are the same for the nf_tables and the legacy
backend, but the two do not see each other's rules: a pod whose network namespace already holds
legacy rules (a CNI plugin's, a node on iptables-legacy) must get ours in legacy too, or the legacy
ones run first and ours are bypassed. ``--iptables-mode auto`` (the default) picks the backend as
Istio does, by the rules each already holds; ``legacy``/``nft`` force one (Linkerd's
``--iptables-mode``); with neither ``iptables-legacy`` nor ``iptables-nft`` installed, the plain
`iptables` of the PATH is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from proxy.iptables import rules
from proxy.iptables.rules import CaptureConfig, Family

SAVE_COMMAND: Mapping[Family, str] = {"ipv4": "iptables-save", "ipv6": "ip6tables-save"}
RESTORE_COMMAND = rules.RESTORE_COMMAND
BACKENDS = ("legacy", "nft")
_backend = ""  # "" (the PATH's iptables), "legacy" or "nft": see use_backend
IF_INET6 = Path("/proc/net/if_inet6")
log = logging.getLogger("sidemesh.proxy.init")
TIMEOUT_SECONDS = 30.0
_DENIED = ("permission denied", "operation not permitted", "you must be root")
_NEED_NET_ADMIN = (
    "the init container must run as root with the NET_ADMIN and NET_RAW capabilities "
    "(securityContext: runAsUser: 0, capabilities: {add: [NET_ADMIN, NET_RAW]})"
)


class CaptureError(Exception):
    """Installing or removing the capture failed; the message says what to do about it."""


class NotPermitted(CaptureError):
    """iptables was refused for want of privileges (NET_ADMIN, NET_RAW): no backend can work."""


def has_global_ipv6(path: Path = IF_INET6) -> bool:
    """Whether any interface but `lo` has an IPv6 address of global scope (scope 00; unique local
    addresses such as fd00::/8 count, link-local fe80::/10 does not)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False
    return any(
        len(fields) >= 6 and int(fields[3], 16) == 0 and fields[5] != "lo"
        for fields in map(str.split, text.splitlines())
    )


def has_ipv6(path: Path = IF_INET6) -> bool:
    """Whether any interface but `lo` has an IPv6 address (what `--ipv6 auto` asks).

    Each line of /proc/net/if_inet6 is `address ifindex prefixlen scope flags name`. A link-local
    address (fe80::/10, which every IPv6-enabled interface has) counts: a pod without a global
    address is still reachable over IPv6 from its neighbours, and left uncaptured an app listening
    on `[::]` would take plaintext past the sidecar. A kernel without IPv6 has no such file.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False
    return any(len(fields) >= 6 and fields[5] != "lo" for fields in map(str.split, text.splitlines()))


def add_inbound_source() -> str | None:
    """Put ::6 on `lo` (the IPv6 source of the sidecar's connections to the app, which the capture
    lets through: `rules.INBOUND_SOURCE`); 127.0.0.6 needs nothing (all of 127/8 is local).
    Returns why it could not, or None. Without it the sidecar delivers IPv6 to ::1 instead."""
    try:
        _run(["ip", "-6", "addr", "replace", "::6/128", "dev", "lo"])
    except CaptureError as exc:
        return str(exc)
    return None


# What iptables-nft prints when the kernel has no usable nf_tables (every iptables-nft message
# starts "(nf_tables):", so the word alone says nothing).
_NO_NF_TABLES = ("rule set generation id", "could not fetch rule set", "protocol not supported")
LOCK_DIRS = ("/run", "/dev/shm")


def _env() -> dict[str, str] | None:
    """iptables-legacy takes /run/xtables.lock even without -w: in the injected init container
    (read-only root filesystem) it could not, and proxy init failed on every legacy node. When
    /run cannot be written, the lock goes to /dev/shm (a tmpfs in every pod), as XTABLES_LOCKFILE
    says (Linkerd mounts an emptyDir over /run for the same lock)."""
    if "XTABLES_LOCKFILE" in os.environ or os.access(LOCK_DIRS[0], os.W_OK):
        return None
    for directory in LOCK_DIRS[1:]:
        if os.access(directory, os.W_OK):
            return {**os.environ, "XTABLES_LOCKFILE": f"{directory}/xtables.lock"}
    return None


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    command = " ".join(argv)
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
            env=_env(),
        )
    except FileNotFoundError:
        raise CaptureError(
            f"{argv[0]} not found on PATH: install iptables; the sidecar image must contain it "
            "(Debian/Ubuntu: apt-get install iptables)"
        ) from None
    except PermissionError as exc:
        raise CaptureError(f"cannot run {argv[0]}: {exc}; {_NEED_NET_ADMIN}") from None
    except subprocess.TimeoutExpired:
        raise CaptureError(f"`{command}` did not finish within {TIMEOUT_SECONDS:.0f}s") from None
    if proc.returncode != 0:
        err = proc.stderr.strip() or proc.stdout.strip() or "no output"
        if any(marker in err.lower() for marker in _DENIED):
            raise NotPermitted(f"`{command}` was not permitted ({err}): {_NEED_NET_ADMIN}")
        if any(marker in err.lower() for marker in _NO_NF_TABLES):
            err += (
                " (the node's kernel has no nf_tables: use the legacy backend, --iptables-mode legacy "
                "or SIDEMESH_IPTABLES_MODE=legacy)"
            )
        raise CaptureError(f"`{command}` failed with exit status {proc.returncode}: {err}")
    return proc.stdout


def binary(base: str, backend: str | None = None) -> str:
    """``iptables-save`` etc. for the chosen backend: ``iptables-legacy-save``, ``iptables-nft-save``."""
    backend = _backend if backend is None else backend
    if not backend:
        return base
    name, _, verb = base.partition("-")
    return f"{name}-{backend}-{verb}" if verb else f"{name}-{backend}"


def use_backend(backend: str) -> None:
    global _backend
    _backend = backend


def detect_backend() -> tuple[str, str]:
    """The backend whose tables already hold rules (the legacy one when it holds more), as Istio
    decides; ("", why) when no backend-specific binary is installed or neither holds any rule."""
    counts: dict[str, int] = {}
    failed: dict[str, str] = {}
    for backend in BACKENDS:
        save = binary("iptables-save", backend)
        if shutil.which(save) is None:
            continue
        try:
            text = _run([save])
        except NotPermitted:
            raise  # (not a backend that does not work: the container lacks NET_ADMIN)
        except CaptureError as exc:
            failed[backend] = str(exc)
            continue
        counts[backend] = sum(line.startswith("-A ") for line in text.splitlines())
    if not counts:
        return "", "no iptables-legacy or iptables-nft binaries: the iptables of the PATH"
    if "nft" in failed and "legacy" in counts:  # a kernel without nf_tables: what legacy is for
        return "legacy", f"nf_tables not usable ({failed['nft']})"
    found = ", ".join(f"{n} rules in {b}" for b, n in counts.items())
    if counts.get("legacy", 0) > counts.get("nft", 0):
        return "legacy", found
    if counts.get("nft", 0) > 0:
        return "nft", found
    return "", f"{found}: the iptables of the PATH"


def read_nat(family: Family) -> str:
    """The current nat table, as `iptables-save -t nat` prints it."""
    return read_table(family, "nat")


def read_table(family: Family, table: str) -> str:
    return _run([binary(SAVE_COMMAND[family]), "-t", table])


def restore(family: Family, text: str) -> None:
    """Apply `text` atomically, leaving the rules and chains it does not name alone."""
    _run([binary(RESTORE_COMMAND[family]), "--noflush"], stdin=text)


def install(config: CaptureConfig, ipv6_optional: bool = False) -> dict[Family, str]:
    """Install the capture for every family the config enables; returns what was applied.

    IPv6 failing (no ip6tables, a kernel without IPv6 NAT) is an error that also takes the IPv4
    capture back out, unless ``ipv6_optional`` (``--ipv6 auto`` in a pod without a global IPv6
    address): then IPv4 stays, ``"ipv6"`` is missing from what is returned, and a warning says why."""
    applied: dict[Family, str] = {}
    for family in config.families:
        try:
            text = rules.render(config, family, read_nat(family))
            restore(family, text)
        except CaptureError as exc:
            if family == "ipv6" and ipv6_optional:
                log.warning(
                    "IPv6 not captured: ip6tables failed in a pod without a global IPv6 address",
                    extra={"reason": str(exc)},
                )
                break
            if family == "ipv6":  # all or nothing: the IPv4 capture, and an earlier run's IPv6 one
                for installed in ("ipv4", "ipv6"):
                    with contextlib.suppress(CaptureError):
                        uninstall([installed])
            raise
        applied[family] = text
    return applied


def install_guard(config: CaptureConfig) -> str:
    """Refuse new inbound IPv6 TCP connections (`rules.guard`) where IPv6 is not captured; returns
    what was applied ("" when inbound is not captured at all)."""
    text = rules.guard(config, read_table("ipv6", "filter"))
    if text:
        restore("ipv6", text)
    return text


def remove_guard() -> str:
    """Take `install_guard`'s chain out again if it is there (IPv6 captured now, or --cleanup);
    returns what was applied, "" when there was nothing (or no ip6tables at all)."""
    try:
        existing = read_table("ipv6", "filter")
    except CaptureError:  # no ip6tables, or a kernel without IPv6: nothing of ours can be there
        return ""
    if rules.GUARD not in existing:
        return ""
    text = rules.cleanup(existing, "filter")
    restore("ipv6", text)
    return text


def installed_families() -> tuple[Family, ...]:
    """IPv4, and IPv6 when ip6tables' nat table holds our chains (what `--cleanup` removes,
    whatever `--ipv6` says now: an earlier run may have captured IPv6)."""
    try:
        ipv6 = rules.CHAIN_PREFIX in read_nat("ipv6")
    except CaptureError:  # no ip6tables, or a kernel without IPv6
        ipv6 = False
    return ("ipv4", "ipv6") if ipv6 else ("ipv4",)


def uninstall(families: Sequence[Family]) -> dict[Family, str]:
    """Remove every rule and chain the capture added; returns what was applied."""
    applied: dict[Family, str] = {}
    for family in families:
        text = rules.cleanup(read_nat(family))
        restore(family, text)
        applied[family] = text
    return applied
