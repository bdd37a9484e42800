"""Pods made of Linux network namespaces on one machine (needs root): `sidemesh demo --netns` and
the e2e suites use the same plumbing.

A `Cluster` is a "node" namespace holding a bridge, and one namespace per pod wired to it by a
veth pair, with its own address and a default route through the bridge. Nothing is created in
the host's network namespace, so the addresses (10.77.0.0/24 and the like) exist only here, and
deleting the namespaces removes the veths, the bridge and every iptables rule made in them.
Processes started in a namespace write stdout and stderr to a log file, run in their own process
group, and are stopped by it; `Cluster.close` stops them all and deletes every namespace.

`as_user` runs a command under another UID/GID (the sidecar's 1337). When a directory on the way
to the interpreter is closed to other users (a pyenv Python under a 0700 /root), it hides that
directory behind a tmpfs in a private mount namespace of the command alone and mounts back only
the entries on the way; the host's files and permissions are not touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidemesh.localnet import without_proxies

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) holding sidemesh/
CLEAN_ENV = {k: v for k, v in without_proxies(os.environ).items() if not k.startswith("SIDEMESH_")}
COMMAND_TIMEOUT = 30.0
PACKAGE_OF = {
    "ip": "iproute2",
    "iptables": "iptables",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "curl": "curl",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "mount": "mount",
}


class NetnsError(Exception):
    """A namespace, a command in it or a process started in it did not do what was asked."""


class NetnsUnavailable(NetnsError):
    """This machine or user cannot create network namespaces at all."""


def why_unavailable(*tools: str) -> str | None:
    """Why pods cannot be built here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "needs root: creates network namespaces and iptables rules (run as root or in a privileged container)"
    for tool in tools:
        if shutil.which(tool) is None:
            package = PACKAGE_OF.get(tool, tool)
            return f"{tool} not found: install {package} (apt-get install {package})"
    return None


@dataclass
class Process:
    """A process started in a namespace, logging to `log`."""

    label: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        """The JSON lines of the log (the other lines are skipped)."""
        out = []
        for line in self.text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll `condition`; raise with the log's tail if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.popen.poll() is not None:
                raise NetnsError(f"{self.label} exited {self.popen.returncode} before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise NetnsError(f"no {what} within {timeout:.0f}s; {self.label} logged:\n{self.tail()}")
            time.sleep(0.05)

    def wait_for_record(
        self, event: str, timeout: float, where: Callable[[dict[str, Any]], bool] = lambda _r: True
    ) -> dict[str, Any]:
        """The first log record with this event for which `where` holds."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [r for r in self.records() if r.get("event") == event and where(r)]
            return bool(found)

        self.wait_until(seen, f"a matching {event!r} log record", timeout)
        return found[0]

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the process group, SIGKILL it after `timeout`; the exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode


@dataclass
class Netns:
    name: str
    workdir: Path
    procs: list[Process] = field(default_factory=list)
    cwd: Path = SOURCE_ROOT

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, *cmd: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*cmd), capture_output=True, text=True, timeout=timeout, cwd=self.cwd, env=CLEAN_ENV
        )
        if check and proc.returncode != 0:
            raise NetnsError(f"`{shlex.join(cmd)}` in {self.name} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def start(self, label: str, *cmd: str, env: dict[str, str] | None = None) -> Process:
        log = self.workdir / f"{label}.log"
        for n in range(2, 100):
            if not log.exists():
                break
            log = self.workdir / f"{label}-{n}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                self.argv(*cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=CLEAN_ENV if env is None else env,
                start_new_session=True,  # its own process group, stopped as one
            )
        self.procs.append(Process(label, popen, log))
        return self.procs[-1]


@dataclass
class Cluster:
    """A node namespace with a bridge at `<subnet>.1`, and pod namespaces attached to it. Namespace
    names are `<prefix>-<pid>-<random>-<name>`, so concurrent runs never collide. With `subnet6`
    (an IPv6 /64 prefix such as `fd77::`) it is dual stack: the bridge is also `<subnet6>1` and
    pod `host` also gets `<subnet6><host>`."""

    workdir: Path
    subnet: str
    node: Netns
    pods: dict[str, Netns] = field(default_factory=dict)
    run_id: str = ""
    prefix: str = "sm"
    subnet6: str | None = None

    BRIDGE = "br0"

    @classmethod
    def create(cls, workdir: Path, subnet: str, prefix: str = "sm", subnet6: str | None = None) -> Cluster:
        run_id = f"{os.getpid()}-{secrets.token_hex(2)}"
        node = _add_netns(f"{prefix}-{run_id}-node", workdir)
        cluster = cls(workdir, subnet, node, run_id=run_id, prefix=prefix, subnet6=subnet6)
        try:
            cluster.ip("link", "set", "lo", "up")
            cluster.ip("link", "add", cls.BRIDGE, "type", "bridge")
            cluster.ip("addr", "add", f"{subnet}.1/24", "dev", cls.BRIDGE)
            if subnet6 is not None:  # nodad: usable at once, not "tentative" for a second
                cluster.ip("-6", "addr", "add", f"{subnet6}1/64", "dev", cls.BRIDGE, "nodad")
            # promisc: frames forwarded between pods also reach the bridge's own packet taps.
            cluster.ip("link", "set", cls.BRIDGE, "promisc", "on", "up")
        except BaseException:
            cluster.close()
            raise
        return cluster

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def ip(self, *args: str) -> None:
        _check(["ip", "-n", self.node.name, *args])

    def add_pod(self, name: str, host: int) -> Netns:
        pod = _add_netns(f"{self.prefix}-{self.run_id}-{name}", self.workdir)
        self.pods[name] = pod
        port = f"v{host}-{name}"[:15]
        self.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", pod.name)
        self.ip("link", "set", port, "master", self.BRIDGE, "up")
        for args in (
            ("link", "set", "lo", "up"),
            ("addr", "add", f"{self.subnet}.{host}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("route", "add", "default", "via", self.gateway),
        ):
            _check(["ip", "-n", pod.name, *args])
        if self.subnet6 is not None:
            _check(
                [
                    "ip",
                    "-n",
                    pod.name,
                    "-6",
                    "addr",
                    "add",
                    f"{self.subnet6}{host}/64",
                    "dev",
                    "eth0",
                    "nodad",
                ]
            )
            _check(["ip", "-n", pod.name, "-6", "route", "add", "default", "via", f"{self.subnet6}1"])
        return pod

    def namespaces(self) -> list[Netns]:
        return [*self.pods.values(), self.node]

    def close(self) -> list[str]:
        """Stop every process, delete every namespace; what went wrong, if anything."""
        problems = []
        for ns in self.namespaces():
            for proc in ns.procs:
                try:
                    proc.stop(timeout=5)
                except (OSError, subprocess.SubprocessError) as exc:
                    problems.append(f"{proc.label}: {exc}")
        for ns in self.namespaces():
            done = subprocess.run(
                ["ip", "netns", "del", ns.name], capture_output=True, text=True, timeout=10, check=False
            )
            if done.returncode != 0:
                problems.append(f"ip netns del {ns.name}: {done.stderr.strip()}")
        return problems


def _check(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if done.returncode != 0:
        raise NetnsError(f"`{shlex.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")


def _add_netns(name: str, workdir: Path) -> Netns:
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise NetnsUnavailable(
            f"cannot create a network namespace ({done.stderr.strip()}): needs CAP_SYS_ADMIN"
        )
    return Netns(name, workdir)


def list_netns() -> list[str]:
    """The names `ip netns list` shows."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


# -- running as another user -------------------------------------------------------------------


def closed_dirs(paths: Iterable[Path]) -> dict[Path, set[str]]:
    """For each path, its first ancestor that other users cannot search, and the entry under it
    on the way to the path: {Path("/root"): {".pyenv"}} for a pyenv Python in a 0700 /root."""
    out: dict[Path, set[str]] = {}
    for path in (p.resolve() for p in paths):
        for parent in reversed(path.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                out.setdefault(parent, set()).add(path.relative_to(parent).parts[0])
                break
    return out


def as_user(uid: int, gid: int, cmd: list[str], stage: Path) -> list[str]:
    """`cmd` as uid/gid with no supplementary groups, able to run this Python and this checkout.

    `stage` is an empty directory other users can reach (mount points for the reveal)."""
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *cmd]
    closed = closed_dirs([Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix), SOURCE_ROOT])
    if not closed:
        return setpriv
    script = ["set -e"]
    for i, (directory, entries) in enumerate(sorted(closed.items())):
        moves = []
        for j, entry in enumerate(sorted(entries)):
            source, point = _q(directory / entry), _q(stage / f"{i}-{j}")
            make = "mkdir -p" if (directory / entry).is_dir() else "touch"
            script += [f"{make} {point}", f"mount --bind {source} {point}"]
            moves += [f"{make} {source}", f"mount --move {point} {source}"]
        script.append(f"mount -t tmpfs -o mode=0755,size=1m sidemesh-e2e {_q(directory)}")
        script += moves
    script.append('exec "$@"')
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "\n".join(script),
        "as-user",
        *setpriv,
    ]


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def process_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split()[1:] for line in status.splitlines() if ":" in line}
    return int(fields["Uid"][0]), int(fields["Gid"][0])
