"""The iptables capture as text: a pure function from a `CaptureConfig` to `iptables-restore` input.

Nothing here runs a command or reads a file; `proxy.iptables.apply` does that. The output is fed
to `iptables-restore --noflush` (or ip6tables-restore) and touches only the nat table (but for
`guard`, below):

- Our chains are declared with `:NAME - [0:0]`, which under `--noflush` creates or flushes them,
  so a second run rebuilds them instead of appending duplicates.
- The jumps from PREROUTING and OUTPUT into our chains are added only when the existing nat table
  (the output of `iptables-save -t nat`) lacks them, so running twice leaves the same ruleset.
- Rules are written in the form `iptables-save` prints them, in a fixed order, so the golden files
  and a real `iptables-save` can be compared line by line.

Loopback: when the *proxy* (UID 1337) connects to its own pod's IP (it may pick its own pod as
an endpoint), the connection leaves through `lo` and goes through the inbound chain, so the inbound
listener terminates the mTLS it carries (with the same port exclusions as traffic from other pods).
The one exception is the inbound sidecar delivering a connection to the app: it connects to the
pod's address the client asked for (as Istio and Linkerd deliver), from 127.0.0.6 (IPv6: ::6,
which `proxy init` adds to `lo`), and that source is let through, as Istio's rules do. When the
*app* connects to its own pod IP it talks to itself, crossing no trust boundary: that, like all
other `lo` traffic (127.0.0.0/8, ::1), is not captured, as in Istio.

IPv6 not captured (``--ipv6 off``, or ip6tables' nat table unusable) in a pod that has IPv6 (a
link-local address at least): `guard` writes ip6tables' filter table instead, refusing new inbound
IPv6 TCP connections (with a reset) except on loopback and the ports the capture lets through, so an
app listening on `[::]` cannot be reached past the sidecar (Istio's init rejects inbound IPv6 in
that case too). Outbound IPv6 and its replies pass: only a SYN without ACK is refused.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from sidemesh.config import parse_cidr

Family = Literal["ipv4", "ipv6"]
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
RESTORE_COMMAND: Mapping[Family, str] = {"ipv4": "iptables-restore", "ipv6": "ip6tables-restore"}

INBOUND = "SIDEMESH_INBOUND"
IN_REDIRECT = "SIDEMESH_IN_REDIRECT"
OUTPUT = "SIDEMESH_OUTPUT"
OUT_REDIRECT = "SIDEMESH_OUT_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, OUT_REDIRECT)
CHAIN_PREFIX = "SIDEMESH_"
JUMPS = (("PREROUTING", f"-p tcp -j {INBOUND}"), ("OUTPUT", f"-p tcp -j {OUTPUT}"))
GUARD = "SIDEMESH_IN_GUARD"  # (ip6tables' filter table)
GUARD_JUMP = ("INPUT", f"-p tcp -j {GUARD}")
LOOPBACK: Mapping[Family, str] = {"ipv4": "127.0.0.0/8", "ipv6": "::1/128"}
LINK_LOCAL_V6 = "fe80::/10"
# The source of the inbound sidecar's connections to the app (proxy/sidecar.py INBOUND_SOURCE).
INBOUND_SOURCE: Mapping[Family, str] = {"ipv4": "127.0.0.6/32", "ipv6": "::6/128"}
DEFAULT_PROXY_PORTS = (15000, 15001, 15006, 15020)
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel

_PORT_RE = re.compile(r"[0-9]{1,5}")
_COUNTERS_RE = re.compile(r"^\[\d+:\d+\]\s+")


def _check_port(name: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"{name}: {value} is not a port number (1-65535)")


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return parse_cidr(text)


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """What to capture. Ports are TCP ports; `capture_inbound=False` is the `*` of exclude-inbound-ports."""

    proxy_uid: int = 1337
    proxy_gid: int = 1337
    inbound_port: int = 15006
    outbound_port: int = 15001
    proxy_ports: tuple[int, ...] = DEFAULT_PROXY_PORTS
    capture_inbound: bool = True
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    ipv6: bool = False

    def __post_init__(self) -> None:
        for name, ident in (("proxy-uid", self.proxy_uid), ("proxy-gid", self.proxy_gid)):
            if not 0 <= ident <= MAX_ID:
                raise ValueError(f"{name}: {ident} is not a user or group id (0-{MAX_ID})")
        _check_port("inbound-port", self.inbound_port)
        _check_port("outbound-port", self.outbound_port)
        if self.inbound_port == self.outbound_port:
            raise ValueError(
                f"--inbound-port and --outbound-port are both {self.inbound_port}; they must differ "
                "(defaults: inbound 15006, outbound 15001)"
            )
        for name, ports in (
            ("proxy-ports", self.proxy_ports),
            ("exclude-inbound-ports", self.exclude_inbound_ports),
            ("exclude-outbound-ports", self.exclude_outbound_ports),
        ):
            for port in ports:
                _check_port(name, port)
        for cidr in self.exclude_outbound_cidrs:
            try:
                _network(cidr)
            except ValueError as exc:
                raise ValueError(f"exclude-outbound-cidrs: {exc}") from None

    @property
    def families(self) -> tuple[Family, ...]:
        return FAMILIES if self.ipv6 else ("ipv4",)


def parse_ports(text: str) -> tuple[int, ...]:
    """`"8080, 9090,8080"` -> `(8080, 9090)`: comma separated, sorted, duplicates dropped; `""` -> `()`."""
    ports: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "*":
            raise ValueError("'*' (every port) is only accepted for exclude-inbound-ports")
        if not _PORT_RE.fullmatch(item) or not 1 <= int(item) <= 65535:
            raise ValueError(
                f"{item!r} is not a port number (1-65535); write ports comma separated: 8080,9090"
            )
        ports.add(int(item))
    return tuple(sorted(ports))


def parse_inbound_ports(text: str) -> tuple[bool, tuple[int, ...]]:
    """exclude-inbound-ports: `(capture_inbound, ports)`; `*` means capture no inbound traffic."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if "*" in items:
        if len(items) > 1:
            raise ValueError(f"{text!r}: '*' (every port) cannot be combined with port numbers")
        return False, ()
    return True, parse_ports(text)


def parse_cidrs(text: str) -> tuple[str, ...]:
    """`"10.0.0.0/8, 192.168.1.7"` -> `("10.0.0.0/8", "192.168.1.7/32")`; IPv4 first, sorted, no duplicates.

    Host bits are cleared (`10.1.2.3/8` -> `10.0.0.0/8`), as iptables itself does.
    """
    nets = {_network(part.strip()) for part in text.split(",") if part.strip()}
    ordered = sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    return tuple(n.with_prefixlen for n in ordered)


def _passed_inbound(config: CaptureConfig) -> list[int]:
    """The inbound ports the capture lets through: the proxy's own, then those excluded."""
    own = sorted({*config.proxy_ports, config.inbound_port, config.outbound_port})
    return [*own, *sorted(set(config.exclude_inbound_ports) - set(own))]


def _inbound(config: CaptureConfig) -> list[str]:
    if not config.capture_inbound:
        return []
    rules = [f"-A {INBOUND} -p tcp -m tcp --dport {port} -j RETURN" for port in _passed_inbound(config)]
    return [*rules, f"-A {INBOUND} -p tcp -j {IN_REDIRECT}"]


def _outbound(config: CaptureConfig, family: Family) -> list[str]:
    version = 4 if family == "ipv4" else 6
    rules = []
    if config.capture_inbound:
        rules += [
            f"-A {OUTPUT} -s {INBOUND_SOURCE[family]} -o lo -j RETURN",
            f"-A {OUTPUT} ! -d {LOOPBACK[family]} -o lo -m owner --uid-owner {config.proxy_uid} -j {INBOUND}",
        ]
    rules += [
        f"-A {OUTPUT} -m owner --uid-owner {config.proxy_uid} -j RETURN",
        f"-A {OUTPUT} -m owner --gid-owner {config.proxy_gid} -j RETURN",
        f"-A {OUTPUT} -o lo -j RETURN",
    ]
    if family == "ipv6":
        # On-link IPv6 (fe80::/10) is never a mesh endpoint, and cannot be captured: REDIRECT
        # sends the app's connection to ::1 while its socket is tied to the interface (it hung).
        rules.append(f"-A {OUTPUT} -d {LINK_LOCAL_V6} -j RETURN")
    rules += [
        f"-A {OUTPUT} -p tcp -m tcp --dport {port} -j RETURN"
        for port in sorted(set(config.exclude_outbound_ports))
    ]
    nets = parse_cidrs(",".join(config.exclude_outbound_cidrs))
    rules += [
        f"-A {OUTPUT} -d {net} -j RETURN" for net in nets if ipaddress.ip_network(net).version == version
    ]
    return [*rules, f"-A {OUTPUT} -j {OUT_REDIRECT}"]


def render(config: CaptureConfig, family: Family, existing_nat: str) -> str:
    """The `iptables-restore --noflush` input that installs the capture for `family`.

    `existing_nat` is what `iptables-save -t nat` printed before (empty for a fresh pod); it only
    decides whether the PREROUTING and OUTPUT jumps are already in place.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {', '.join(FAMILIES)}")
    present = set(parse_table(existing_nat, "nat")[1])
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in CHAINS)]
    lines += [f"-A {chain} {spec}" for chain, spec in JUMPS if (chain, spec) not in present]
    lines += _inbound(config)
    lines.append(f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {config.inbound_port}")
    lines += _outbound(config, family)
    lines.append(f"-A {OUT_REDIRECT} -p tcp -j REDIRECT --to-ports {config.outbound_port}")
    return "\n".join([*lines, "COMMIT", ""])


def guard(config: CaptureConfig, existing_filter: str) -> str:
    """The `ip6tables-restore --noflush` input (filter table) that refuses new inbound IPv6 TCP
    connections where IPv6 is not captured; "" when inbound is not captured at all (`*`).

    `existing_filter` is what `ip6tables-save -t filter` printed before: as in `render`, it only
    decides whether the INPUT jump is already in place, and the chain is rebuilt on a re-run."""
    if not config.capture_inbound:
        return ""
    present = set(parse_table(existing_filter, "filter")[1])
    lines = ["*filter", f":{GUARD} - [0:0]"]
    lines += [f"-A {chain} {spec}" for chain, spec in (GUARD_JUMP,) if (chain, spec) not in present]
    lines.append(f"-A {GUARD} -i lo -j RETURN")
    lines += [f"-A {GUARD} -p tcp -m tcp --dport {port} -j RETURN" for port in _passed_inbound(config)]
    lines.append(
        f"-A {GUARD} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset"
    )
    return "\n".join([*lines, "COMMIT", ""])


def cleanup(existing: str, table: str = "nat") -> str:
    """The `iptables-restore --noflush` input that removes every rule and chain we added to `table`.

    Deletes each rule of another chain that jumps into a `SIDEMESH_*` chain (as many times as it
    occurs), then flushes and deletes the `SIDEMESH_*` chains that exist. Nothing to remove gives an
    empty transaction, so cleaning up twice is harmless.
    """
    chains, rules = parse_table(existing, table)
    ours = [chain for chain in chains if chain.startswith(CHAIN_PREFIX)]
    lines = [f"*{table}"]
    lines += [
        f"-D {chain} {spec}"
        for chain, spec in rules
        if not chain.startswith(CHAIN_PREFIX) and _target(spec).startswith(CHAIN_PREFIX)
    ]
    lines += [f":{chain} - [0:0]" for chain in ours]
    lines += [f"-X {chain}" for chain in ours]
    return "\n".join([*lines, "COMMIT", ""])


def restore_command(family: Family, backend: str = "") -> str:
    """``iptables-restore``, or the backend's own (``iptables-legacy-restore``, ``ip6tables-nft-restore``)."""
    name, _, verb = RESTORE_COMMAND[family].partition("-")
    return f"{name}-{backend}-{verb}" if backend else RESTORE_COMMAND[family]


def section(family: Family, text: str, backend: str = "") -> str:
    """`text` under a `# ipv4: iptables-restore --noflush` comment line (restore ignores comments),
    naming the backend's command when one was chosen."""
    return f"# {family}: {restore_command(family, backend)} --noflush\n{text}"


def render_families(
    config: CaptureConfig, existing: Mapping[Family, str] | None = None, backend: str = ""
) -> str:
    """`render` for every family the config enables, each as a `section`: what --dry-run prints."""
    existing = existing or {}
    return "".join(section(f, render(config, f, existing.get(f, "")), backend) for f in config.families)


def parse_table(text: str, wanted: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Chain names and `(chain, rule spec)` pairs of table `wanted` in `iptables-save` (or restore)
    text. Comments, counters and other tables are ignored; text with no `*table` line counts as
    `wanted`."""
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    table = wanted
    for raw in text.splitlines():
        line = _COUNTERS_RE.sub("", raw.strip())
        if line.startswith("*"):
            table = line[1:]
        elif table != wanted or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            _, chain, *spec = line.split()
            rules.append((chain, " ".join(spec)))
    return chains, rules


def _target(spec: str) -> str:
    words = spec.split()
    for flag in ("-j", "-g"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return ""
