"""`sidemesh proxy init` on real iptables, in network namespaces this test creates (needs root).

Each golden case (tests/golden/iptables/<case>.rules, written by tests/unit/proxy/test_rules.py) is
replayed in steps: 1. a fresh namespace, loaded with the case's existing nat table if it has one;
2. `sidemesh proxy init` with the case's flags; 3. iptables-save shows exactly what the golden file
adds; 4. a second run changes nothing; 5. `--cleanup` removes every SIDEMESH_ chain and jump.

Then real connections: a pod namespace wired to a peer namespace by a veth pair (10.99.0.0/24,
10.99.1.0/24 and fd99::/64 exist only in these namespaces). Redirected connections land on stub
listeners that answer with `original_dst()`; connections that must not be captured reach the peer.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.config import ProxyConfig
from proxy.iptables.rules import FAMILIES, Family
from proxy.sidecar import _listen_addresses
from sidemesh.config import parse_hostport

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "tests" / "golden" / "iptables"
SAVE: dict[Family, str] = {"ipv4": "iptables-save", "ipv6": "ip6tables-save"}
RESTORE: dict[Family, str] = {"ipv4": "iptables-restore", "ipv6": "ip6tables-restore"}
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SIDEMESH_")}
NatState = dict[str, list[str]]


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates network namespaces and iptables rules (run as root or in a privileged container)"
    for tool in ("ip", *SAVE.values(), *RESTORE.values()):
        if shutil.which(tool) is None:
            return f"{tool} not found: install iproute2 and iptables (apt-get install iproute2 iptables)"
    return None


SKIP = _why_skip()
pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


@dataclass
class Netns:
    name: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, *cmd: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*cmd), input=stdin, capture_output=True, text=True, timeout=30, cwd=REPO, env=CLEAN_ENV
        )
        if check and proc.returncode != 0:
            pytest.fail(f"`{shlex.join(cmd)}` in {self.name} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def sidemesh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "sidemesh", *args)

    def start(self, *cmd: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.argv(*cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=CLEAN_ENV
        )
        self.procs.append(proc)
        return proc

    def nat(self, family: Family) -> NatState:
        return nat_state(self.run(SAVE[family], "-t", "nat").stdout)

    def snapshot(self) -> list[str]:
        return [
            line
            for f in FAMILIES
            for line in self.run(SAVE[f], "-t", "nat").stdout.splitlines()
            if not line.startswith("#")
        ]


@pytest.fixture
def make_netns() -> Iterator[Callable[[], Netns]]:
    created: list[Netns] = []

    def make() -> Netns:
        name = f"sm-e2e-{os.getpid()}-{secrets.token_hex(3)}"
        proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            pytest.skip(f"cannot create a network namespace ({proc.stderr.strip()}): needs CAP_SYS_ADMIN")
        created.append(Netns(name))
        return created[-1]

    try:
        yield make
    finally:
        for ns in created:
            for proc in ns.procs:
                proc.kill()
                proc.communicate(timeout=5)
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=10, check=False)


def restored(state: NatState, text: str) -> NatState:
    """What `iptables-restore --noflush` of `text` does to `state`: a declared chain is created or
    flushed, `-A` appends. Parsed here rather than with the code under test. Comments, counters and
    chain policies are dropped."""
    result = {chain: list(specs) for chain, specs in state.items()}
    for line in text.splitlines():
        words = re.sub(r"^\[\d+:\d+\]\s*", "", line).split()
        if words and words[0].startswith(":"):
            result[words[0][1:]] = []
        elif words[:1] == ["-A"]:
            result.setdefault(words[1], []).append(" ".join(words[2:]))
    return result


def nat_state(text: str) -> NatState:
    """iptables-save text -> {chain: [rule spec, ...]}."""
    return restored({}, text)


def without_ours(state: NatState) -> NatState:
    return {
        chain: [spec for spec in specs if "SIDEMESH_" not in spec]
        for chain, specs in state.items()
        if not chain.startswith("SIDEMESH_")
    }


@dataclass(frozen=True)
class GoldenCase:
    args: list[str]
    existing: str
    sections: dict[Family, str]

    @classmethod
    def load(cls, path: Path) -> GoldenCase:
        args: list[str] = []
        existing = ""
        sections: dict[Family, str] = {}
        current: Family | None = None
        for line in path.read_text().splitlines(keepends=True):
            header = [f for f in FAMILIES if line.startswith(f"# {f}: ")]
            if line.startswith("# args:"):
                args = shlex.split(line.removeprefix("# args:"))
            elif line.startswith("# existing:"):
                existing = (path.parent / line.split(":", 1)[1].strip()).read_text()
            elif header:
                current = header[0]
                sections[current] = ""
            elif current is not None:
                sections[current] += line
        return cls(args, existing, sections)


CASES = sorted(p.stem for p in GOLDEN_DIR.glob("*.rules"))


@pytest.mark.parametrize("case", CASES)
def test_golden_case_on_real_iptables(case: str, make_netns: Callable[[], Netns]) -> None:
    golden = GoldenCase.load(GOLDEN_DIR / f"{case}.rules")
    ns = make_netns()  # 1
    if golden.existing:
        ns.run(RESTORE["ipv4"], stdin=golden.existing)
    before = {f: ns.nat(f) for f in FAMILIES}

    ns.sidemesh("proxy", "init", *golden.args)  # 2

    for family in FAMILIES:  # 3
        text = golden.sections.get(family)
        expected = before[family] if text is None else restored(before[family], text)
        assert ns.nat(family) == expected, f"{family} nat table differs from {case}.rules"

    first = ns.snapshot()  # 4
    ns.sidemesh("proxy", "init", *golden.args)
    assert ns.snapshot() == first, "a second `proxy init` changed the ruleset"

    ns.sidemesh("proxy", "init", "--cleanup", *golden.args)  # 5
    for family in FAMILIES:
        assert ns.nat(family) == without_ours(before[family]), f"--cleanup left {family} rules behind"
    ns.sidemesh("proxy", "init", "--cleanup", *golden.args)  # cleaning a clean table is fine


def test_recorded_existing_table_is_what_iptables_prints(make_netns: Callable[[], Netns]) -> None:
    ns = make_netns()
    ns.sidemesh("proxy", "init")
    assert ns.nat("ipv4") == nat_state((GOLDEN_DIR / "after-default-init.nat").read_text())


def _chains(ns: Netns, save: str) -> bool:
    return "SIDEMESH_" in ns.run(save, "-t", "nat").stdout


@pytest.mark.parametrize(("existing", "expected"), [("legacy", "legacy"), ("nft", "nft")])
def test_the_capture_goes_to_the_backend_that_already_holds_rules(
    make_netns: Callable[[], Netns], existing: str, expected: str
) -> None:
    """nf_tables and legacy iptables do not see each other's rules: a legacy REDIRECT already in
    the pod (a CNI plugin's, a node on legacy iptables) ran before our nft chains, and connections
    it matched bypassed the sidecar. As Istio, auto picks the backend that holds rules."""
    for tool in ("iptables-legacy-save", "iptables-nft-save", "iptables-legacy", "iptables-nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: both iptables backends are needed (Debian's iptables package)")
    ns = make_netns()
    ns.run(f"iptables-{existing}", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.98.0.3", "--dport", "8080",
           "-j", "REDIRECT", "--to-ports", "9090")  # fmt: skip
    ns.sidemesh("proxy", "init", "--ipv6", "off")
    other = "nft" if expected == "legacy" else "legacy"
    assert _chains(ns, f"iptables-{expected}-save") and not _chains(ns, f"iptables-{other}-save")
    ns.sidemesh("proxy", "init", "--ipv6", "off", "--cleanup")
    assert not _chains(ns, f"iptables-{expected}-save")


def test_a_forced_backend_is_used(make_netns: Callable[[], Netns]) -> None:
    if shutil.which("iptables-legacy-save") is None:
        pytest.skip("iptables-legacy-save not found")
    ns = make_netns()
    ns.sidemesh("proxy", "init", "--ipv6", "off", "--iptables-mode", "legacy")
    assert _chains(ns, "iptables-legacy-save")
    bad = ns.run(sys.executable, "-m", "sidemesh", "proxy", "init", "--iptables-mode", "xtables", check=False)
    assert bad.returncode == 2 and "--iptables-mode: 'xtables' is not one of auto, legacy, nft" in bad.stderr


def test_the_legacy_backend_works_with_run_read_only(make_netns: Callable[[], Netns]) -> None:
    """As in the injected init container (readOnlyRootFilesystem): iptables-legacy-restore takes
    /run/xtables.lock even without -w, and proxy init failed on every legacy node."""
    if shutil.which("iptables-legacy-save") is None or shutil.which("unshare") is None:
        pytest.skip("iptables-legacy-save or unshare (util-linux) not found")
    ns = make_netns()
    init = shlex.join(
        [sys.executable, "-m", "sidemesh", "proxy", "init", "--ipv6", "off", "--iptables-mode", "legacy"]
    )
    ro_run = f"mount --make-rprivate / && mount -t tmpfs -o ro tmpfs /run && {init}"
    proc = ns.run("unshare", "-m", "sh", "-c", ro_run, check=False)
    assert proc.returncode == 0, proc.stderr
    assert _chains(ns, "iptables-legacy-save")


def test_without_net_admin_says_what_is_needed(make_netns: Callable[[], Netns]) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not found: needed to drop NET_ADMIN")
    ns = make_netns()
    drop = "-net_admin,-net_raw"
    proc = ns.run(
        "setpriv",
        "--bounding-set",
        drop,
        "--inh-caps",
        drop,
        "--",
        sys.executable,
        "-m",
        "sidemesh",
        "proxy",
        "init",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "NET_ADMIN" in proc.stderr
    assert "SIDEMESH_" not in ns.run("iptables-save", "-t", "nat").stdout


STUB = """
import socket, sys, threading
from proxy.original_dst import NoOriginalDestination, original_dst

def serve(label, listener):
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                ip, port = original_dst(conn) if label in ("outbound", "inbound") else ("", "")
                text = f"{label} {ip} {port}" if ip else f"{label} {listener.getsockname()[1]}"
            except NoOriginalDestination:
                text = f"{label} not-redirected"
            conn.sendall(text.encode() + b"\\n")

for spec in sys.argv[1:]:
    label, host, port = spec.split(",")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:  # the inbound listener is dual-stack: IPv4 arrives as ::ffff:a.b.c.d
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if label == "inbound" else 1)
    s.bind((host, int(port)))
    s.listen(16)
    threading.Thread(target=serve, args=(label, s), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = """
import os, socket, sys
host, port, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
source = sys.argv[5] if len(sys.argv) > 5 else ""
family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
os.setgroups([]); os.setgid(gid); os.setuid(uid)
s = socket.socket(family, kind, proto)  # after dropping privileges: iptables' owner match sees uid/gid
if source:
    s.bind((source, 0))
s.settimeout(3)
try:
    s.connect(addr)
    print(s.makefile().readline().strip())
except OSError as exc:
    print(f"error {exc}")
finally:
    s.close()
"""


def _wire(pod: Netns, peer: Netns) -> None:
    pod.run("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", peer.name)
    for ns, host in ((pod, 1), (peer, 2)):
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("ip", "addr", "add", f"10.99.0.{host}/24", "dev", "veth0")
        ns.run("ip", "addr", "add", f"10.99.1.{host}/24", "dev", "veth0")
        ns.run("ip", "-6", "addr", "add", f"fd99::{host}/64", "dev", "veth0", "nodad")
        ns.run("ip", "link", "set", "veth0", "up")


def _link_local(ns: Netns, timeout: float = 10.0) -> str:
    """veth0's fe80:: address, once duplicate address detection is over (no longer tentative)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = ns.run("ip", "-6", "addr", "show", "dev", "veth0", "scope", "link").stdout
        found = re.search(r"inet6 (fe80::[0-9a-f:]+)/64 scope link(?! tentative)", shown)
        if found:
            return found[1]
        assert time.monotonic() < deadline, f"no usable link-local address in {ns.name}:\n{shown}"
        time.sleep(0.1)


def _serve(ns: Netns, *specs: str) -> None:
    proc = ns.start(sys.executable, "-c", STUB, *specs)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", f"stub listeners in {ns.name} did not start"


def test_connections_are_captured_or_not(make_netns: Callable[[], Netns]) -> None:
    pod, peer = make_netns(), make_netns()
    _wire(pod, peer)
    pod.sidemesh(
        "proxy",
        "init",
        "--ipv6",
        "on",
        "--exclude-inbound-ports",
        "9090",
        "--exclude-outbound-ports",
        "5432",
        "--exclude-outbound-cidrs",
        "10.99.1.0/24",
    )
    # Listeners where the sidecar binds them by default in a pod with IPv6 (its real choice).
    defaults = {f.name: f for f in dataclasses.fields(ProxyConfig)}
    listeners = [
        f"{kind},{parse_hostport(name, address)[0]},{parse_hostport(name, address)[1]}"
        for kind, name in (("outbound", "outbound_listen"), ("inbound", "inbound_listen"))
        for address in _listen_addresses(name, defaults[name].default, "iptables")
    ]
    assert listeners == ["outbound,127.0.0.1,15001", "outbound,::1,15001", "inbound,::,15006"]
    _serve(pod, *listeners, "app,0.0.0.0,8080", "app,::,8080", "app,0.0.0.0,9090")
    _serve(peer, "peer,0.0.0.0,8080", "peer,0.0.0.0,5432", "peer,::,8080")

    probes: dict[str, tuple[Netns, str, int, int, int, str] | tuple[Netns, str, int, int, int, str, str]] = {
        "app -> peer is captured": (pod, "10.99.0.2", 8080, 0, 0, "outbound 10.99.0.2 8080"),
        "proxy uid -> peer is not": (pod, "10.99.0.2", 8080, 1337, 1337, "peer 8080"),
        "proxy gid -> peer is not": (pod, "10.99.0.2", 8080, 0, 1337, "peer 8080"),
        "excluded outbound port": (pod, "10.99.0.2", 5432, 0, 0, "peer 5432"),
        "excluded outbound cidr": (pod, "10.99.1.2", 8080, 0, 0, "peer 8080"),
        "loopback is not captured": (pod, "127.0.0.1", 9090, 0, 0, "app 9090"),
        "app -> own pod ip is not captured": (pod, "10.99.0.1", 8080, 0, 0, "app 8080"),
        "proxy uid -> own pod ip goes inbound": (
            pod,
            "10.99.0.1",
            8080,
            1337,
            1337,
            "inbound 10.99.0.1 8080",
        ),
        "own pod ip, excluded inbound port": (pod, "10.99.0.1", 9090, 0, 0, "app 9090"),
        # The sidecar delivering inbound connections to the app's own pod address, from 127.0.0.6/::6.
        "proxy from 127.0.0.6 -> own pod ip is not": (
            pod,
            "10.99.0.1",
            8080,
            1337,
            1337,
            "app 8080",
            "127.0.0.6",
        ),
        "ipv6 proxy uid -> own pod ip goes inbound": (
            pod,
            "fd99::1",
            8080,
            1337,
            1337,
            "inbound fd99::1 8080",
        ),
        "ipv6 proxy from ::6 -> own pod ip is not": (pod, "fd99::1", 8080, 1337, 1337, "app 8080", "::6"),
        "ipv6 app -> peer is captured": (pod, "fd99::2", 8080, 0, 0, "outbound fd99::2 8080"),
        "ipv6 proxy uid -> peer is not": (pod, "fd99::2", 8080, 1337, 1337, "peer 8080"),
        "peer -> pod is captured inbound": (peer, "10.99.0.1", 8080, 0, 0, "inbound 10.99.0.1 8080"),
        "peer -> excluded inbound port": (peer, "10.99.0.1", 9090, 0, 0, "app 9090"),
        "ipv6 peer -> pod is captured": (peer, "fd99::1", 8080, 0, 0, "inbound fd99::1 8080"),
        # On-link IPv6 is not captured: REDIRECT lost the interface and the connection hung.
        "ipv6 app -> peer link-local is not": (pod, f"{_link_local(peer)}%veth0", 8080, 0, 0, "peer 8080"),
    }
    results = {
        name: ns.run(
            sys.executable, "-c", CLIENT, host, str(port), str(uid), str(gid), *source
        ).stdout.strip()
        for name, (ns, host, port, uid, gid, _, *source) in probes.items()
    }
    assert results == {name: probe[5] for name, probe in probes.items()}


def test_ipv6_auto_without_ip6tables_keeps_ipv4_in_a_pod_with_link_local_only(
    make_netns: Callable[[], Netns], tmp_path: Path
) -> None:
    """`--ipv6 auto` captures IPv6 whenever the pod has an IPv6 address, link-local included.
    Without ip6tables (or IPv6 NAT), a pod with no global IPv6 address still starts: IPv4 is
    captured and the gap is logged. Asked for explicitly (`--ipv6 on`), it is an error that takes
    the IPv4 rules back out (all or nothing)."""
    pod, peer = make_netns(), make_netns()
    pod.run("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", peer.name)
    for ns in (pod, peer):
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("ip", "link", "set", "veth0", "up")  # IPv6 link-local only (fe80::, from the kernel)
    bin_dir = tmp_path / "bin"  # a PATH with iptables but no ip6tables
    bin_dir.mkdir()
    for tool in ("iptables", "iptables-save", "iptables-restore", "ip"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = ["env", f"PATH={bin_dir}"]
    auto = pod.run(*env, sys.executable, "-m", "sidemesh", "proxy", "init", check=False)
    assert auto.returncode == 0, auto.stderr
    assert "IPv6 not captured" in auto.stderr
    assert any(
        "SIDEMESH_INBOUND" in rule for rule in pod.run("iptables-save", "-t", "nat").stdout.splitlines()
    )
    pod.sidemesh("proxy", "init", "--cleanup")
    on = pod.run(*env, sys.executable, "-m", "sidemesh", "proxy", "init", "--ipv6", "on", check=False)
    assert on.returncode == 2 and "ip6tables" in on.stderr, on.stderr
    assert "SIDEMESH" not in pod.run("iptables-save", "-t", "nat").stdout


def test_a_failed_ipv6_rerun_leaves_neither_family_half_installed(
    make_netns: Callable[[], Netns], tmp_path: Path
) -> None:
    """All or nothing across runs: when a second run's ip6tables-restore failed, the IPv4 rules were
    taken out but the first run's IPv6 chains stayed (22 lines), half a capture."""
    pod = make_netns()
    pod.sidemesh("proxy", "init", "--ipv6", "on")
    assert _chains(pod, "ip6tables-save")
    bin_dir = tmp_path / "bin"  # the same tools, but ip6tables-restore fails
    bin_dir.mkdir()
    for tool in ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    real = shutil.which("ip6tables-restore")
    failing = bin_dir / "ip6tables-restore"
    grep, cat = shutil.which("grep"), shutil.which("cat")
    script = (  # an install (rules to add) fails; a cleanup goes through
        f"#!/bin/sh\nrules=$({cat})\n"
        f'if printf "%s" "$rules" | {grep} -q -- "-A SIDEMESH"; then echo "no IPv6 NAT" >&2; exit 1; fi\n'
        f'printf "%s\\n" "$rules" | {real} "$@"\n'
    )
    failing.write_text(script)
    failing.chmod(0o755)
    again = pod.run(
        "env",
        f"PATH={bin_dir}",
        sys.executable,
        "-m",
        "sidemesh",
        "proxy",
        "init",
        "--ipv6",
        "on",
        check=False,
    )
    assert again.returncode == 2 and "no IPv6 NAT" in again.stderr, again.stderr
    assert not _chains(pod, "iptables-save") and not _chains(pod, "ip6tables-save")


def _link_local_pair(make_netns: Callable[[], Netns]) -> tuple[Netns, Netns]:
    """A pod and a peer on a veth pair with nothing but IPv6 link-local addresses (from the kernel)."""
    pod, peer = make_netns(), make_netns()
    pod.run("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", peer.name)
    for ns in (pod, peer):
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("ip", "link", "set", "veth0", "up")
    return pod, peer


def _filter_rules(ns: Netns) -> list[str]:
    return [
        line for line in ns.run("ip6tables-save", "-t", "filter").stdout.splitlines() if "SIDEMESH" in line
    ]


def test_uncaptured_ipv6_refuses_new_inbound_connections(make_netns: Callable[[], Netns]) -> None:
    """IPv6 not captured (`--ipv6 off`) in a pod with a link-local address: an app listening on
    `[::]` took plaintext from the pod's neighbours past the sidecar. Now new inbound IPv6 TCP is
    reset (ip6tables' filter table), except on the ports the capture lets through; the pod's own
    outbound IPv6 still works. A re-run leaves the same rules; --cleanup opens it again."""
    pod, peer = _link_local_pair(make_netns)
    _serve(pod, "app,::,8080", "excluded,::,9090")
    _serve(peer, "peer,::,8080")
    pod_ll, peer_ll = _link_local(pod), _link_local(peer)

    def probe(ns: Netns, host: str, port: int) -> str:
        return ns.run(sys.executable, "-c", CLIENT, f"{host}%veth0", str(port), "0", "0").stdout.strip()

    assert probe(peer, pod_ll, 8080) == "app 8080"  # before: open
    pod.sidemesh("proxy", "init", "--ipv6", "off", "--exclude-inbound-ports", "9090")
    rules = _filter_rules(pod)
    assert "-A INPUT -p tcp -j SIDEMESH_IN_GUARD" in rules
    assert probe(peer, pod_ll, 8080).startswith("error [Errno 111]")  # reset: refused at once
    assert probe(peer, pod_ll, 9090) == "excluded 9090"
    assert probe(pod, peer_ll, 8080) == "peer 8080"  # outbound IPv6 and its replies pass

    pod.sidemesh("proxy", "init", "--ipv6", "off", "--exclude-inbound-ports", "9090")
    assert _filter_rules(pod) == rules
    pod.sidemesh("proxy", "init", "--ipv6", "off", "--exclude-inbound-ports", "*")  # no inbound capture
    assert _filter_rules(pod) == []
    pod.sidemesh("proxy", "init", "--ipv6", "off", "--exclude-inbound-ports", "9090")

    pod.sidemesh("proxy", "init", "--cleanup")
    assert _filter_rules(pod) == []
    assert probe(peer, pod_ll, 8080) == "app 8080"


def test_ipv6_nat_failing_in_auto_mode_refuses_inbound_ipv6_instead(
    make_netns: Callable[[], Netns], tmp_path: Path
) -> None:
    """`--ipv6 auto` in a link-local-only pod whose ip6tables has no nat table (a kernel without
    IPv6 NAT): IPv4 is captured, and new inbound IPv6 TCP is refused instead of left open. A later
    run that can capture IPv6 takes the refusal out."""
    pod, peer = _link_local_pair(make_netns)
    _serve(pod, "app,::,8080")
    pod_ll, _ = _link_local(pod), _link_local(peer)  # (the peer's own, to connect from)
    bin_dir = tmp_path / "bin"  # the same tools, but ip6tables-restore fails for the nat table
    bin_dir.mkdir()
    for tool in ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    real, grep, cat = shutil.which("ip6tables-restore"), shutil.which("grep"), shutil.which("cat")
    failing = bin_dir / "ip6tables-restore"
    failing.write_text(
        f"#!/bin/sh\nrules=$({cat})\n"
        f'if printf "%s" "$rules" | {grep} -q "^\\*nat"; then echo "no IPv6 NAT" >&2; exit 1; fi\n'
        f'printf "%s\\n" "$rules" | {real} "$@"\n'
    )
    failing.chmod(0o755)
    auto = pod.run("env", f"PATH={bin_dir}", sys.executable, "-m", "sidemesh", "proxy", "init", check=False)
    assert auto.returncode == 0, auto.stderr
    assert "IPv6 not captured" in auto.stderr and "refused" in auto.stderr
    assert _chains(pod, "iptables-save") and not _chains(pod, "ip6tables-save")
    assert "-A INPUT -p tcp -j SIDEMESH_IN_GUARD" in _filter_rules(pod)
    client = peer.run(sys.executable, "-c", CLIENT, f"{pod_ll}%veth0", "8080", "0", "0").stdout.strip()
    assert client.startswith("error [Errno 111]"), client

    pod.sidemesh("proxy", "init")  # ip6tables' nat works now: IPv6 captured, the refusal goes
    assert _chains(pod, "ip6tables-save") and _filter_rules(pod) == []
