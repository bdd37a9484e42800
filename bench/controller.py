"""The controller at scale: one simulated cluster, compiled, then streamed to 1,000 sidecars.

    .venv/bin/python -m bench.controller [--pods N --services N --policies N --streams N]

Phases, each in a process of its own so that every figure (time, CPU, RSS) is that process's own:

1. Cluster (default 10,000 pods in 50 namespaces, 500 service accounts, 2,000 Services with named
   and numbered target ports, 1,000 ServiceAuthorizations of 2-4 rules, some with HTTP
   conditions), made three ways with the same content: the ``Snapshot`` built directly in Python,
   ``build_snapshot`` from the documents as dicts, and ``load_directory`` of the same documents
   written as YAML (one file per namespace). The three are checked to be equal.
2. Compile, as the controller does it: ``MeshState.update(snapshot)`` (the shared outbound table)
   + ``MeshState.outbound()`` (that table serialized whole, which the controller does when a
   stream first needs it) + ``MeshState.inbound(identity)`` for every identity; median of
   --repeat runs on fresh ``MeshState`` objects, with a breakdown of where the time goes.
3. The controller: ``ConfigServer`` (controller/server.py, unchanged, plain asyncio as
   ``sidemesh controller serve`` runs it, log level info with its stderr going to a file) in its
   own process, pinned to core 0, fed by ``MemorySource`` (below) and serving mTLS on 127.0.0.1.
   Its SVID (with the controller's DNS name) is signed directly with the key of a CA bootstrapped
   into a temporary directory, and installed into its ``WorkloadIdentity`` (no CA server, no
   renewal: the run is far shorter than the SVID's one-hour TTL).
4. The sidecars: --streams config streams from one load process pinned to core 1, over
   --channels grpc.aio channels (each its own TCP + TLS connection, with the client certificate
   of one identity, signed by the same CA). Every stream acknowledges every update as
   ``proxy/config_client.py`` does; it reads only the top-level fields of an update (version, and
   the sizes of the inbound and outbound parts), it does not decode them.
   Measured: the initial sync of all streams; then one ServiceAuthorization modified (the source
   pushes a new Snapshot) and, for every stream, the time from the push until it received the new
   version, and the bytes of that update; then the same for one pod added (which changes the
   shared outbound table). Times are CLOCK_MONOTONIC, which all processes share.

The parent samples the controller's RSS every 100 ms (and stops the run if it passes
--rss-limit-mb). Writes ``bench/results/controller.md`` and ``bench/results/controller.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import Progress
from bench.common import cpu_model as _cpu_model
from bench.common import git_commit as _git_commit

if typing.TYPE_CHECKING:
    import grpc

    from ca.keys import SigningAuthority
    from controller.server import ConfigServer
    from controller.sources import OnChange
    from sidemesh.identity.svid import SVID
    from sidemesh.mesh.resources import Snapshot
    from sidemesh.spiffe import SpiffeId

TRUST_DOMAIN = "cluster.local"
SERVER_NAME = "sidemesh-controller.sidemesh-system.svc"  # CONTROLLER_SERVER_NAME in controller/config.py
CONTROLLER_IDENTITY = "sidemesh-system/sidemesh-controller"
METHOD = "/sidemesh.config.v1.ConfigDiscovery/Stream"  # as proxy/config_client.py
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ANALYSIS = "controller-analysis.md"  # by hand: profiles and proposed changes, next to the results
REPO_DIR = Path(__file__).resolve().parent.parent

TARGET_UPDATE_P99_S = 1.0  # every stream holds a policy change within 1 s (p99)
TARGET_COMPILE_S = 2.0  # outbound + inbound for every identity
TARGET_RSS_MB = 1000.0  # controller peak RSS, MB (10^6 bytes)
MB = 1e6
OTHER_LOAD = 0.25  # other processes using more than this share of a core disturb a phase

TIERS = ("frontend", "backend", "db")
POD_PORTS = (("http", 8080), ("grpc", 9090), ("metrics", 9100))
DEFAULT_POLICY_ANNOTATION = "sidemesh.io/default-policy"  # sidemesh/mesh/resources.py

Result = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Small helpers


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _proc_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, all its threads, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def _rss_mb(pid: int | None = None) -> float:
    return _proc_status(pid or os.getpid()).get("VmRSS", 0) / MB


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all cores, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _thread_cpu(pid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds of a process."""
    main = other = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            text = (task / "stat").read_text()
            fields = text[text.rindex(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            if task.name == str(pid):
                main += seconds
            else:
                other += seconds
    return main, other


@dataclass(frozen=True, slots=True)
class CpuMark:
    """CPU counters at one moment: the machine's, ours (parent and children), the controller's."""

    wall: float
    busy: float
    steal: float
    ours: float
    controller_main: float
    controller_other: float

    @classmethod
    def take(cls, children: Sequence[int], controller: int | None) -> CpuMark:
        busy, steal = _machine_cpu()
        ours = _self_cpu_seconds()
        for pid in children:
            with contextlib.suppress(OSError, ValueError):
                ours += _proc_cpu_seconds(pid)
        main, other = _thread_cpu(controller) if controller else (0.0, 0.0)
        return cls(time.monotonic(), busy, steal, ours, main, other)

    def since(self, before: CpuMark, extra_ours: float = 0.0) -> Result:
        """Shares of a core over the interval: other processes (what none of ours used), steal."""
        wall = max(self.wall - before.wall, 1e-9)
        ours = self.ours - before.ours + extra_ours
        return {
            "wall_s": wall,
            "other_processes": max(0.0, (self.busy - before.busy - ours) / wall),
            "steal": (self.steal - before.steal) / wall,
            "controller_loop_thread_s": self.controller_main - before.controller_main,
            "controller_other_threads_s": self.controller_other - before.controller_other,
        }


def wait_quiet(pids: Sequence[int], limit: float) -> Result:
    """Sample 1 s windows (up to ``limit`` s) until other processes use under OTHER_LOAD of a core."""
    started = time.monotonic()
    n = 0
    while True:
        mark = CpuMark.take(pids, None)
        time.sleep(1.0)
        other = float(CpuMark.take(pids, None).since(mark)["other_processes"])
        waited = time.monotonic() - started
        if other <= OTHER_LOAD or waited >= limit:
            if n:
                _say(f"waited {waited:.0f} s; other processes now use {other:.0%} of a core")
            return {"waited_s": waited, "other_processes": other}
        if n % 15 == 0:
            _say(f"the machine is busy (other processes use {other:.0%} of a core); waiting for quiet")
        n += 1


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _child_setup(core: int | None) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if core is not None:
        os.sched_setaffinity(0, {core})


def _say(text: str) -> None:
    Progress.detail(text)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


def _secs(seconds: float) -> str:
    return f"{seconds:,.2f} s"


# ---------------------------------------------------------------------------------------------
# The simulated cluster: one description, emitted as documents (dicts, YAML) or built directly


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    pods: int = 10_000
    services: int = 2_000  # one Service per app; an app is a group of pods with one `app` label
    policies: int = 1_000
    namespaces: int = 50
    service_accounts: int = 500

    @property
    def sa_per_namespace(self) -> int:
        return max(1, self.service_accounts // self.namespaces)

    def namespace(self, n: int) -> str:
        return f"ns-{n % self.namespaces:02d}"

    def apps_in(self, n: int) -> int:
        return len(range(n, self.services, self.namespaces))


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str
    namespace: str
    service_account: str
    address: str
    labels: tuple[tuple[str, str], ...]  # sorted
    ports: tuple[tuple[str, int], ...]  # (name, port)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]
    ports: tuple[tuple[str, int, int | str], ...]  # (name, port, targetPort)
    cluster_ip: str


@dataclass(frozen=True, slots=True)
class RuleSpec:
    sources: tuple[tuple[str | None, str | None], ...]  # (namespace, serviceAccount)
    ports: tuple[int, ...]
    http: tuple[tuple[str, ...], tuple[str, ...]] | None  # (methods, paths)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]
    rules: tuple[RuleSpec, ...]


def _address(first: int, index: int) -> str:
    return f"10.{first + index // 65536}.{index // 256 % 256}.{index % 256}"


def pod_spec(spec: ClusterSpec, p: int) -> PodSpec:
    a = p % spec.services  # the app, global index
    n, local = a % spec.namespaces, a // spec.namespaces
    app = f"app-{local:03d}"
    replica = p // spec.services
    labels = (("app", app), ("tier", TIERS[local % 3]), ("version", f"v{1 + replica % 2}"))
    return PodSpec(
        f"{app}-{replica}",
        spec.namespace(n),
        f"sa-{local % spec.sa_per_namespace}",
        _address(64, p),
        labels,
        POD_PORTS,
    )


def service_spec(spec: ClusterSpec, a: int) -> ServiceSpec:
    n, local = a % spec.namespaces, a // spec.namespaces
    ports: tuple[tuple[str, int, int | str], ...] = (("http", 80, "http"), ("grpc", 9090, 9090))
    if local % 4 == 0:
        ports += (("metrics", 9100, "metrics"),)
    return ServiceSpec(
        f"svc-{local:03d}", spec.namespace(n), (("app", f"app-{local:03d}"),), ports, _address(96, a)
    )


def policy_spec(spec: ClusterSpec, q: int) -> PolicySpec:
    n, local = q % spec.namespaces, q // spec.namespaces
    spn = spec.sa_per_namespace
    if local % 5 == 4:  # one in five protects a whole tier of the namespace
        selector = (("tier", TIERS[(local // 5) % 3]),)
    else:
        selector = (("app", f"app-{(2 * local) % max(1, spec.apps_in(n)):03d}"),)
    rules = [
        RuleSpec(
            ((None, f"sa-{local % spn}"), (spec.namespace(n + 1), f"sa-{(local + 3) % spn}")),
            (8080,),
            (("GET", "POST"), ("/api/v1/*", "/healthz")),
        ),
        RuleSpec(((spec.namespace(n + 7), None),), (9100,), None),
    ]
    if local % 2 == 0:
        rules.append(RuleSpec(((None, "sa*"),), (9090,), None))
    if local % 3 == 0:
        rules.append(RuleSpec((("ns-1*", None), (None, "sa-1")), (8080,), (("GET",), ("/public/*",))))
    return PolicySpec(f"authz-{local:03d}", spec.namespace(n), selector, tuple(rules))


def namespace_annotations(n: int) -> tuple[tuple[str, str], ...]:
    return ((DEFAULT_POLICY_ANNOTATION, "deny"),) if n % 10 == 9 else ()


def changed_policy_index(spec: ClusterSpec) -> int:
    """The policy the run modifies: one selecting one app, near the middle."""
    q = spec.policies // 2
    while (q // spec.namespaces) % 5 == 4 and q + 1 < spec.policies:
        q += 1
    return q


def identities(spec: ClusterSpec) -> list[str]:
    """Every identity ("ns/sa") some pod runs as."""
    pods = (pod_spec(spec, p) for p in range(spec.pods))
    return sorted({f"{pod.namespace}/{pod.service_account}" for pod in pods})


# -- documents


def _rule_doc(rule: RuleSpec) -> dict[str, Any]:
    sources = []
    for ns, sa in rule.sources:
        source = {}
        if ns is not None:
            source["namespace"] = ns
        if sa is not None:
            source["serviceAccount"] = sa
        sources.append(source)
    to: dict[str, Any] = {"ports": list(rule.ports)}
    if rule.http is not None:
        to["http"] = {"methods": list(rule.http[0]), "paths": list(rule.http[1])}
    return {"from": sources, "to": to}


def cluster_docs(spec: ClusterSpec) -> list[dict[str, Any]]:
    """Kubernetes-style documents, in the kinds the directory source reads."""
    docs: list[dict[str, Any]] = []
    for n in range(spec.namespaces):
        meta: dict[str, Any] = {"name": spec.namespace(n)}
        if namespace_annotations(n):
            meta["annotations"] = dict(namespace_annotations(n))
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    for p in range(spec.pods):
        pod = pod_spec(spec, p)
        docs.append(
            {
                "apiVersion": "sidemesh.io/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels)},
                "spec": {
                    "serviceAccount": pod.service_account,
                    "address": pod.address,
                    "ports": [{"name": name, "port": port} for name, port in pod.ports],
                },
            }
        )
    for a in range(spec.services):
        svc = service_spec(spec, a)
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": svc.name, "namespace": svc.namespace},
                "spec": {
                    "selector": dict(svc.selector),
                    "clusterIP": svc.cluster_ip,
                    "ports": [
                        {"name": name, "port": port, "targetPort": target} for name, port, target in svc.ports
                    ],
                },
            }
        )
    for q in range(spec.policies):
        pol = policy_spec(spec, q)
        docs.append(
            {
                "apiVersion": "sidemesh.io/v1alpha1",
                "kind": "ServiceAuthorization",
                "metadata": {"name": pol.name, "namespace": pol.namespace},
                "spec": {
                    "selector": {"matchLabels": dict(pol.selector)},
                    "rules": [_rule_doc(r) for r in pol.rules],
                },
            }
        )
    return docs


def write_yaml(docs: Sequence[dict[str, Any]], directory: Path) -> tuple[int, int]:
    """One file per namespace (namespace-less documents in cluster.yaml); returns (files, bytes)."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    by_file: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        by_file.setdefault(f"{ns}.yaml" if ns else "cluster.yaml", []).append(doc)
    directory.mkdir(parents=True, exist_ok=True)
    size = 0
    for name, items in by_file.items():
        text = yaml.dump_all(items, Dumper=dumper, sort_keys=False)
        (directory / name).write_text(text)
        size += len(text.encode())
    return len(by_file), size


# -- the Snapshot, directly


def cluster_snapshot(spec: ClusterSpec) -> Snapshot:
    from sidemesh.mesh.resources import (
        Namespace,
        Service,
        ServicePort,
        Snapshot,
        Workload,
        WorkloadPort,
    )
    from sidemesh.policy.model import Authorization, HTTPMatch, Rule, Source

    namespaces = tuple(Namespace(spec.namespace(n), namespace_annotations(n)) for n in range(spec.namespaces))
    ports_cache: dict[tuple[tuple[str, int], ...], tuple[WorkloadPort, ...]] = {}
    workloads = []
    for p in range(spec.pods):
        pod = pod_spec(spec, p)
        ports = ports_cache.get(pod.ports)
        if ports is None:
            ports = ports_cache[pod.ports] = tuple(WorkloadPort(port, name) for name, port in pod.ports)
        workloads.append(
            Workload(pod.name, pod.namespace, pod.service_account, pod.address, pod.labels, (), ports)
        )
    services = []
    for a in range(spec.services):
        svc = service_spec(spec, a)
        services.append(
            Service(
                svc.name,
                svc.namespace,
                svc.selector,
                tuple(ServicePort(port, target, name) for name, port, target in svc.ports),
                svc.cluster_ip,
                cluster_ips=(svc.cluster_ip,),
            )
        )
    policies = []
    for q in range(spec.policies):
        pol = policy_spec(spec, q)
        rules = tuple(
            Rule(
                tuple(Source(ns, sa) for ns, sa in r.sources),
                r.ports,
                HTTPMatch(*r.http) if r.http is not None else None,
            )
            for r in pol.rules
        )
        policies.append(Authorization(pol.name, pol.namespace, pol.selector, rules))
    return Snapshot(tuple(services), tuple(workloads), namespaces, tuple(policies))


def _same_content(a: Snapshot, b: Snapshot) -> bool:
    return all(
        set(getattr(a, kind)) == set(getattr(b, kind))
        for kind in ("services", "workloads", "namespaces", "policies", "endpoints")
    ) and not (a.errors or b.errors)


def policy_changed(spec: ClusterSpec, snapshot: Snapshot) -> tuple[Snapshot, str]:
    """The snapshot after one ServiceAuthorization gained a source in its first rule."""
    from sidemesh.policy.model import Source

    q = changed_policy_index(spec)
    old = snapshot.policies[q]
    first = old.rules[0]
    first = dataclasses.replace(first, sources=(*first.sources, Source(spec.namespace(3), "sa-0")))
    new = dataclasses.replace(old, rules=(first, *old.rules[1:]))
    policies = (*snapshot.policies[:q], new, *snapshot.policies[q + 1 :])
    return dataclasses.replace(snapshot, policies=policies), old.ref


def pod_added(spec: ClusterSpec, snapshot: Snapshot) -> tuple[Snapshot, str]:
    """The snapshot after one more replica of an app (a new pod behind an existing Service)."""
    from sidemesh.mesh.resources import Workload, WorkloadPort

    pod = pod_spec(spec, spec.pods)
    w = Workload(
        pod.name,
        pod.namespace,
        pod.service_account,
        pod.address,
        pod.labels,
        (),
        tuple(WorkloadPort(port, name) for name, port in pod.ports),
    )
    return dataclasses.replace(snapshot, workloads=(*snapshot.workloads, w)), f"{w.ref} ({w.address})"


# ---------------------------------------------------------------------------------------------
# Certificates (what tests/support/pki.py make_svid does, with DNS names for the controller)


def make_svid(authority: SigningAuthority, spiffe_id: SpiffeId, dns_names: tuple[str, ...] = ()) -> SVID:
    """An SVID signed directly by ``authority`` with the CA's own leaf template."""
    from cryptography.hazmat.primitives import hashes

    from ca import templates
    from sidemesh.identity.svid import SVID

    key = templates.new_key()
    params = templates.LeafParams(
        spiffe_id, key.public_key(), dt.timedelta(hours=1), dt.datetime.now(dt.UTC), dns_names
    )
    cert = templates.leaf_builder(params, authority.cert, authority.chain).sign(
        authority.key, hashes.SHA256()
    )
    return SVID.of(spiffe_id, key, (cert, *authority.chain), authority.roots)


# ---------------------------------------------------------------------------------------------
# Child processes: plumbing


def _run_in_child(main: Callable[[Connection], None], conn: Connection) -> None:
    try:
        main(conn)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


class Inbox:
    """Commands from the parent, read on the event loop (the pipe's fd with add_reader)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            self.queue.put_nowait(self.conn.recv())
        except EOFError:  # the parent is gone
            self.loop.remove_reader(self.conn.fileno())
            self.queue.put_nowait(("stop",))

    async def get(self) -> Any:
        return await self.queue.get()

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.conn.fileno())


# ---------------------------------------------------------------------------------------------
# Phase 1 + 2: cluster and compile (a process of its own, on the controller's core)


@dataclass(frozen=True, slots=True)
class ClusterParams:
    spec: ClusterSpec
    tmp: str
    repeat: int
    yaml: bool
    core: int | None


def _cluster_child(p: ClusterParams, conn: Connection) -> None:
    _child_setup(p.core)
    _run_in_child(lambda c: c.send(_cluster_main(p)), conn)


def _load_directory_libyaml(directory: Path) -> Snapshot | None:
    """``sidemesh.mesh.directory.load_directory`` with libyaml's safe loader (None without libyaml)."""
    import yaml

    from sidemesh.mesh.directory import SUFFIXES
    from sidemesh.mesh.resources import build_snapshot

    loader = getattr(yaml, "CSafeLoader", None)
    if loader is None:
        return None
    docs = []
    for path in sorted(p for p in directory.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        for i, doc in enumerate(yaml.load_all(path.read_text(), Loader=loader)):
            docs.append((f"{path.name}#{i}", doc))
    return build_snapshot(docs)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def _cluster_main(p: ClusterParams) -> Result:
    from controller.state import MeshState
    from sidemesh.api import config_pb2 as pb
    from sidemesh.mesh import compile as mc
    from sidemesh.mesh import directory, wire
    from sidemesh.mesh.resources import build_snapshot
    from sidemesh.policy.model import DefaultPolicy

    spec = p.spec
    out: Result = {}
    snapshot, out["direct_s"] = _timed(lambda: cluster_snapshot(spec))
    _say(f"Snapshot built directly in Python: {_secs(out['direct_s'])}")
    docs, out["docs_generate_s"] = _timed(lambda: cluster_docs(spec))
    items = [(f"doc#{i}", d) for i, d in enumerate(docs)]
    from_dicts, out["build_snapshot_s"] = _timed(lambda: build_snapshot(items))
    items.clear()
    out["documents"] = len(docs)
    out["dicts_equal"] = _same_content(snapshot, from_dicts)
    _say(
        f"build_snapshot from {len(docs):,} dicts: {_secs(out['build_snapshot_s'])} "
        f"(same content: {out['dicts_equal']})"
    )
    del from_dicts
    if p.yaml:
        config_dir = Path(p.tmp) / "yaml"
        out["yaml_files"], out["yaml_bytes"] = write_yaml(docs, config_dir)
        from_yaml, out["yaml_load_s"] = _timed(lambda: directory.load_directory(config_dir))
        out["yaml_equal"] = _same_content(snapshot, from_yaml)
        del from_yaml
        # For comparison: the same files parsed with libyaml's loader (what directory.py could use).
        c_loaded, out["yaml_load_libyaml_s"] = _timed(lambda: _load_directory_libyaml(config_dir))
        out["yaml_libyaml_equal"] = c_loaded is not None and _same_content(snapshot, c_loaded)
        del c_loaded
        _say(
            f"load_directory of {out['yaml_files']} YAML files ({out['yaml_bytes'] / MB:.1f} MB): "
            f"{_secs(out['yaml_load_s'])} (same content: {out['yaml_equal']}); the same with "
            f"yaml.CSafeLoader: {_secs(out['yaml_load_libyaml_s'])}"
        )
    del docs

    ids = sorted(mc.identities(snapshot))
    out["identities"] = len(ids)
    runs = []
    for i in range(p.repeat):
        state = MeshState(TRUST_DOMAIN, DefaultPolicy.ALLOW_AUTHENTICATED)
        _, outbound_s = _timed(lambda s=state: (s.update(snapshot), s.outbound()))  # type: ignore[misc]
        _, inbound_s = _timed(lambda s=state: [s.inbound(w) for w in ids])  # type: ignore[misc]
        runs.append({"outbound_s": outbound_s, "inbound_s": inbound_s, "total_s": outbound_s + inbound_s})
        _say(
            f"compile run {i + 1}/{p.repeat}: MeshState.update + outbound() {_secs(outbound_s)} + inbound for "
            f"{len(ids)} identities {_secs(inbound_s)} = {_secs(outbound_s + inbound_s)}"
        )
        del state
    out["compile_runs"] = runs
    out["compile"] = {
        k: statistics.median(r[k] for r in runs) for k in ("outbound_s", "inbound_s", "total_s")
    }
    out["compile_min"] = {k: min(r[k] for r in runs) for k in ("outbound_s", "inbound_s", "total_s")}
    out["compile_max"] = {k: max(r[k] for r in runs) for k in ("outbound_s", "inbound_s", "total_s")}

    # Where the time goes: the same calls MeshState makes, one at a time.
    bd: Result = {}
    table, bd["compile_outbound_s"] = _timed(lambda: mc.compile_outbound(snapshot, TRUST_DOMAIN))
    _, bd["outbound_digest_s"] = _timed(lambda: mc._outbound_digest(table.destinations))
    message, bd["outbound_to_pb_s"] = _timed(lambda: pb.Update(outbound=wire.outbound_to_pb(table)))
    outbound_wire, bd["outbound_serialize_s"] = _timed(message.SerializeToString)
    default = DefaultPolicy.ALLOW_AUTHENTICATED
    inbound_sizes = []
    index, compile_s = _timed(lambda: mc.InboundIndex(snapshot))  # built once per snapshot, as MeshState does
    convert_s = 0.0
    for w in ids:
        compiled, t1 = _timed(lambda w=w: mc.compile_inbound(snapshot, w, TRUST_DOMAIN, default, index))  # type: ignore[misc]
        data, t2 = _timed(lambda c=compiled: pb.Update(inbound=wire.inbound_to_pb(c)).SerializeToString())  # type: ignore[misc]
        compile_s += t1
        convert_s += t2
        inbound_sizes.append(len(data))
    bd["compile_inbound_all_s"] = compile_s
    bd["inbound_to_pb_and_serialize_all_s"] = convert_s
    # What every sidecar then does with the outbound part (proxy/config_client.py _handle).
    parsed, bd["sidecar_parse_outbound_s"] = _timed(lambda: pb.Update.FromString(outbound_wire))
    held, bd["sidecar_outbound_from_pb_s"] = _timed(lambda: wire.outbound_from_pb(parsed.outbound))
    # A pod added: the delta the controller computes once, and what every sidecar does with it.
    new_table = mc.compile_outbound(pod_added(spec, snapshot)[0], TRUST_DOMAIN)
    delta, bd["outbound_delta_s"] = _timed(lambda: mc.outbound_delta(table, new_table))
    delta_wire = pb.Update(outbound_delta=wire.outbound_delta_to_pb(delta)).SerializeToString()

    def sidecar_apply() -> mc.OutboundTable:
        update = pb.Update.FromString(delta_wire)
        return mc.apply_outbound_delta(held, wire.outbound_delta_from_pb(update.outbound_delta))

    applied, bd["sidecar_apply_delta_s"] = _timed(sidecar_apply)
    if applied.destinations != new_table.destinations:
        raise RuntimeError("the pod change's delta, applied, is not the new outbound table")
    out["breakdown"] = bd
    inbound_sizes.sort()
    out["sizes"] = {
        "outbound_bytes": len(outbound_wire),
        "destinations": len(table.destinations),
        "endpoints": sum(len(d.endpoints) for d in table.destinations),
        "inbound_bytes_min": inbound_sizes[0] if inbound_sizes else 0,
        "inbound_bytes_median": _percentile(inbound_sizes, 50),
        "inbound_bytes_max": inbound_sizes[-1] if inbound_sizes else 0,
        "pod_delta_bytes": len(delta_wire),
        "pod_delta_destinations": len(delta.upserted) + len(delta.removed),
    }
    out["rss_mb"] = _rss_mb()
    out["cpu_s"] = _self_cpu_seconds()
    return out


# ---------------------------------------------------------------------------------------------
# Phase 3: the controller (its own process, core 0)


class MemorySource:
    """A Source (controller/sources/__init__.py) holding the cluster in memory: ``run`` hands the
    first snapshot over at once; ``push`` hands a new one over the moment it is called, as a watch
    event handler of the Kubernetes source would."""

    def __init__(self, first: Snapshot) -> None:
        self.first = first
        self._on_change: OnChange | None = None

    async def run(self, on_change: OnChange) -> None:
        self._on_change = on_change
        on_change(self.first)
        await asyncio.Event().wait()  # until cancelled

    def push(self, snapshot: Snapshot) -> float:
        """Hand ``snapshot`` to the controller; returns the monotonic time of the change."""
        assert self._on_change is not None, "the controller has not started the source"
        now = time.monotonic()
        self._on_change(snapshot)
        return now


def installed_identity(svid: SVID) -> Any:
    """The controller's WorkloadIdentity with ``svid`` already installed, and no renewal."""
    from sidemesh.identity.client import CAClient
    from sidemesh.identity.workload import WorkloadIdentity

    class InstalledIdentity(WorkloadIdentity):
        async def start(self) -> None:  # no CA to renew from during the run
            return None

    identity = InstalledIdentity(svid.spiffe_id, typing.cast(CAClient, None), lambda: "")
    identity._install(svid)
    return identity


@dataclass(frozen=True, slots=True)
class ControllerParams:
    spec: ClusterSpec
    ca_dir: str
    log_path: str
    core: int | None
    ack_timeout: float


def _controller_child(p: ControllerParams, conn: Connection) -> None:
    _child_setup(p.core)
    # The controller logs as deployed (JSON lines, info), to a file rather than the terminal.
    fd = os.open(p.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    _run_in_child(lambda c: asyncio.run(_controller_main(p, c)), conn)


@dataclass(slots=True)
class Applied:
    started: float
    ended: float
    compile_s: float
    version: str


def _memory(pid: int | None = None) -> Result:
    status = _proc_status(pid or os.getpid())
    return {
        "rss_mb": status.get("VmRSS", 0) / MB,
        "hwm_mb": status.get("VmHWM", 0) / MB,
        "anon_mb": status.get("RssAnon", 0) / MB,
    }


async def _controller_main(p: ControllerParams, conn: Connection) -> None:
    from ca import keys
    from controller.config import ControllerConfig
    from controller.server import ConfigServer
    from sidemesh import logging as smlog
    from sidemesh.spiffe import WorkloadId

    smlog.setup("info")
    memory: Result = {"start": _memory()}
    snapshot, build_s = _timed(lambda: cluster_snapshot(p.spec))
    memory["snapshot"] = _memory()
    changes = {"policy": policy_changed(p.spec, snapshot)}
    changes["pod"] = pod_added(p.spec, changes["policy"][0])

    authority = keys.load(Path(p.ca_dir))
    svid = make_svid(
        authority, WorkloadId.parse(CONTROLLER_IDENTITY).spiffe_id(TRUST_DOMAIN), dns_names=(SERVER_NAME,)
    )
    source = MemorySource(snapshot)
    config = ControllerConfig(listen="127.0.0.1:0", metrics_listen="", trust_domain=TRUST_DOMAIN)
    server = ConfigServer(config, installed_identity(svid), source)

    applied: list[Applied] = []
    apply_done = asyncio.Event()
    original = server._apply

    async def timed_apply() -> None:  # what _apply does, timed from the outside
        started = time.monotonic()
        await original()
        applied.append(Applied(started, time.monotonic(), server.state.compile_seconds, server.state.version))
        apply_done.set()

    server._apply = timed_apply  # type: ignore[method-assign]
    started = time.monotonic()
    await server.start()
    await asyncio.wait_for(server.ready.wait(), 600)
    memory["serving"] = _memory()
    conn.send(
        {
            "event": "serving",
            "port": server.port,
            "pid": os.getpid(),
            "build_s": build_s,
            "start_to_ready_s": time.monotonic() - started,
            "compile_s": server.state.compile_seconds,
            "coalesce_s": config.coalesce.total_seconds(),
            "default_policy": config.default_policy,
            "version": server.state.version,
        }
    )
    inbox = Inbox(conn)
    try:
        while True:
            command = await inbox.get()
            if command[0] == "change":
                new, what = changes[command[1]]
                apply_done.clear()
                conn.send(
                    await _change(server, source, new, command[1], what, applied, apply_done, p.ack_timeout)
                )
            elif command[0] == "memory":
                memory[command[1]] = _memory()
                conn.send({"event": "memory", **memory[command[1]], "streams": len(server.streams)})
            elif command[0] == "stop":
                break
    finally:
        inbox.close()
        await server.stop(grace=0)
    memory["end"] = _memory()
    conn.send({"event": "stopped", "memory": memory, "applied": [dataclasses.asdict(a) for a in applied]})


def _selected_identities(snapshot: Snapshot, policy_ref: str) -> list[str]:
    policy = next(pol for pol in snapshot.policies if pol.ref == policy_ref)
    return sorted(
        {
            f"{w.namespace}/{w.service_account}"
            for w in snapshot.workloads
            if policy.selects(w.namespace, w.label_map)
        }
    )


async def _change(
    server: ConfigServer,
    source: MemorySource,
    snapshot: Snapshot,
    kind: str,
    what: str,
    applied: list[Applied],
    apply_done: asyncio.Event,
    ack_timeout: float,
) -> Result:
    cpu0 = _self_cpu_seconds()
    pushed = source.push(snapshot)
    deadline = pushed + ack_timeout
    try:
        await asyncio.wait_for(apply_done.wait(), ack_timeout)
    except TimeoutError:
        raise TimeoutError(f"the controller did not apply the change within {ack_timeout:.0f}s") from None
    apply = applied[-1]
    all_acked: float | None = None
    while time.monotonic() < deadline:
        if all(s.acked_version == apply.version for s in server.streams.values()):
            all_acked = time.monotonic()
            break
        await asyncio.sleep(0.01)
    acked = sum(1 for s in server.streams.values() if s.acked_version == apply.version)
    if kind == "pod":  # the new pod's identity's inbound changes, and the outbound table
        w = snapshot.workloads[-1]
        affected = [f"{w.namespace}/{w.service_account}"]
    else:
        affected = _selected_identities(snapshot, what)
    return {
        "event": "changed",
        "what": what,
        "pushed": pushed,
        "apply_started": apply.started,
        "apply_ended": apply.ended,
        "compile_s": apply.compile_s,
        "version": apply.version,
        "all_acked": all_acked,
        "acked": acked,
        "streams": len(server.streams),
        "affected_identities": affected,
        "cpu_s": _self_cpu_seconds() - cpu0,
    }


# ---------------------------------------------------------------------------------------------
# Phase 4: the sidecars' streams (one load process, core 1)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def scan_update(data: bytes) -> tuple[int, int, int]:
    """(version, inbound part bytes, outbound part bytes) of a serialized ``Update``, from its
    top-level fields only (1 version, 2 inbound, 3 outbound, 4 outbound delta: all
    length-delimited; the outbound bytes are the table's or the delta's)."""
    version, sizes, i = 0, [0, 0, 0, 0, 0], 0
    while i < len(data):
        start = i
        key, i = _varint(data, i)
        if key & 7 != 2:
            raise ValueError(f"unexpected wire type in Update: field {key >> 3}, type {key & 7}")
        length, i = _varint(data, i)
        if key >> 3 == 1:
            version = int(data[i : i + length])
        elif key >> 3 in (2, 3, 4):
            sizes[key >> 3] += i + length - start  # the whole field: tag, length, message
        i += length
    return version, sizes[2], sizes[3] + sizes[4]


@dataclass(frozen=True, slots=True)
class LoadParams:
    address: str
    ca_dir: str
    spec: ClusterSpec
    streams: int
    channels: int
    core: int | None
    timeout: float


@dataclass(slots=True)
class Arrival:
    at: float
    version: int
    size: int
    inbound: int
    outbound: int


@dataclass(slots=True)
class StreamProbe:
    index: int
    identity: str
    outbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    arrivals: list[Arrival] = field(default_factory=list)
    latest: int = 0
    error: str = ""


class Tracker:
    """Counts the streams holding at least version ``want``; ``done`` when every live one does."""

    def __init__(self, streams: Sequence[StreamProbe]) -> None:
        self.streams = streams
        self.want = 1
        self.count = 0
        self.done = asyncio.Event()

    def arm(self, want: int) -> None:
        self.want = want
        self.done.clear()
        self.count = sum(1 for s in self.streams if s.latest >= want)
        self._check()

    def seen(self, s: StreamProbe, version: int) -> None:
        previous, s.latest = s.latest, max(s.latest, version)
        if previous < self.want <= version:
            self.count += 1
            self._check()

    def lost(self) -> None:
        self._check()

    def _check(self) -> None:
        dead = sum(1 for s in self.streams if s.error and s.latest < self.want)
        if self.count + dead >= len(self.streams):
            self.done.set()


async def _stream(channel: grpc.aio.Channel, s: StreamProbe, tracker: Tracker) -> None:
    import grpc

    from sidemesh.api import config_pb2 as pb

    async def requests() -> AsyncIterator[Any]:
        yield pb.StreamRequest(outbound_deltas=True)  # as proxy/config_client.py
        while True:
            yield await s.outbox.get()

    method = channel.stream_stream(
        METHOD, request_serializer=pb.StreamRequest.SerializeToString, response_deserializer=None
    )
    call = method(requests())
    try:
        async for data in call:
            at = time.monotonic()
            raw = typing.cast(bytes, data)
            version, inbound, outbound = scan_update(raw)
            s.arrivals.append(Arrival(at, version, len(raw), inbound, outbound))
            s.outbox.put_nowait(pb.StreamRequest(ack_version=str(version)))
            tracker.seen(s, version)
        s.error = "the controller ended the stream"
    except grpc.aio.AioRpcError as exc:
        s.error = f"{exc.code().name}: {exc.details()}"
    except asyncio.CancelledError:
        call.cancel()
        raise
    tracker.lost()


def _load_child(p: LoadParams, conn: Connection) -> None:
    _child_setup(p.core)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no INFO line per connection at shutdown
    _run_in_child(lambda c: asyncio.run(_load_main(p, c)), conn)


def _first_at_least(s: StreamProbe, version: int) -> Arrival | None:
    return next((a for a in s.arrivals if a.version >= version), None)


async def _load_main(p: LoadParams, conn: Connection) -> None:
    import grpc

    from ca import keys
    from sidemesh.spiffe import WorkloadId

    authority = keys.load(Path(p.ca_dir))
    ids = identities(p.spec)
    channel_ids = [ids[c % len(ids)] for c in range(p.channels)]
    svids, certs_s = _timed(
        lambda: {
            name: make_svid(authority, WorkloadId.parse(name).spiffe_id(TRUST_DOMAIN))
            for name in sorted(set(channel_ids))
        }
    )
    conn.send({"event": "ready", "certs_s": certs_s, "identities": len(svids)})
    inbox = Inbox(conn)
    options = [
        ("grpc.ssl_target_name_override", SERVER_NAME),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),  # as proxy/config_client.py
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.use_local_subchannel_pool", 1),  # one TCP + TLS connection per channel
    ]
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    streams = [StreamProbe(i, channel_ids[i % p.channels]) for i in range(p.streams)]
    tracker = Tracker(streams)
    try:
        while True:
            command = await inbox.get()
            if command[0] == "sync":
                for name in channel_ids:
                    svid = svids[name]
                    creds = grpc.ssl_channel_credentials(svid.bundle_pem, svid.key_pem, svid.chain_pem)
                    channels.append(grpc.aio.secure_channel(p.address, creds, options=options))
                cpu0, started = _self_cpu_seconds(), time.monotonic()
                tasks = [
                    asyncio.create_task(_stream(channels[s.index % p.channels], s, tracker)) for s in streams
                ]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tracker.done.wait(), p.timeout)
                ended, cpu = time.monotonic(), _self_cpu_seconds() - cpu0
                firsts = [s.arrivals[0] if s.arrivals else None for s in streams]
                conn.send(
                    {
                        "event": "synced",
                        "started": started,
                        "ended": ended,
                        "first": [a.at - started if a else None for a in firsts],
                        "bytes": [a.size if a else 0 for a in firsts],
                        "full": sum(1 for a in firsts if a and a.inbound and a.outbound),
                        "version": max((s.latest for s in streams), default=0),
                        "errors": [s.error for s in streams if s.error],
                        "cpu_s": cpu,
                        "timed_out": not tracker.done.is_set(),
                    }
                )
            elif command[0] == "watch":
                want = int(command[1])
                tracker.arm(want)
                conn.send({"event": "armed", "want": want})
                cpu0 = _self_cpu_seconds()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tracker.done.wait(), p.timeout)
                got = [_first_at_least(s, want) for s in streams]
                conn.send(
                    {
                        "event": "updated",
                        "identity": [s.identity for s in streams],
                        "at": [a.at if a else None for a in got],
                        "version": [a.version if a else None for a in got],
                        "size": [a.size if a else None for a in got],
                        "inbound": [a.inbound if a else None for a in got],
                        "outbound": [a.outbound if a else None for a in got],
                        "messages": sum(1 for s in streams for a in s.arrivals if a.version >= want),
                        "errors": [s.error for s in streams if s.error],
                        "cpu_s": _self_cpu_seconds() - cpu0,
                        "timed_out": not tracker.done.is_set(),
                    }
                )
            elif command[0] == "stop":
                break
    finally:
        inbox.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)
    conn.send({"event": "stopped", "rss_mb": _rss_mb()})


# ---------------------------------------------------------------------------------------------
# The parent: children, RSS sampling, the sequence


class MemoryWatch:
    """Samples the controller's RSS every ``interval`` seconds while the parent waits; keeps the
    peak per phase, and stops the run if it passes ``limit``."""

    def __init__(self, limit_bytes: int, interval: float = 0.1) -> None:
        self.limit = limit_bytes
        self.interval = interval
        self.pid: int | None = None
        self.phase = ""
        self.peaks: dict[str, float] = {}
        self.children: list[Child] = []
        self._last = 0.0

    def sample(self) -> None:
        for child in self.children:
            if not child.proc.is_alive() and not child.conn.poll(0):
                raise RuntimeError(f"the {child.name} process exited ({child.proc.exitcode})")
        if self.pid is None or time.monotonic() - self._last < self.interval:
            return
        self._last = time.monotonic()
        try:
            rss = _proc_status(self.pid).get("VmRSS", 0)
        except OSError:
            return
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss / MB)
        if rss > self.limit:
            raise RuntimeError(
                f"the controller's RSS reached {rss / MB:,.0f} MB (limit {self.limit / MB:,.0f} MB, "
                "--rss-limit-mb): run stopped"
            )


class Child:
    def __init__(self, name: str, target: Callable[..., None], params: object, watch: MemoryWatch) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.watch = watch
        self.conn, theirs = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=target, args=(params, theirs), daemon=True, name=name)
        self.proc.start()
        theirs.close()
        watch.children.append(self)

    def send(self, *command: object) -> None:
        self.conn.send(command)

    def receive(self, event: str, timeout: float) -> Result:
        deadline = time.monotonic() + timeout
        while True:
            if self.conn.poll(0.05):
                try:
                    message: Result = self.conn.recv()
                except EOFError:
                    self.proc.join(5)
                    raise RuntimeError(f"the {self.name} process exited ({self.proc.exitcode})") from None
                if "error" in message:
                    raise RuntimeError(f"the {self.name} process failed:\n{message['error']}")
                if message.get("event") != event:
                    raise RuntimeError(f"the {self.name} process sent {message.get('event')}, not {event}")
                return message
            self.watch.sample()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.name} process sent no {event!r} within {timeout:.0f}s")

    def stop(self, wait: float = 0.0) -> None:
        if self in self.watch.children:
            self.watch.children.remove(self)
        if wait:
            self.proc.join(wait)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        if not self.conn.closed:
            self.conn.close()


def _latency_stats(values: Sequence[float]) -> Result:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_s": _percentile(ordered, 50),
        "p90_s": _percentile(ordered, 90),
        "p99_s": _percentile(ordered, 99),
        "max_s": ordered[-1] if ordered else float("nan"),
        "min_s": ordered[0] if ordered else float("nan"),
    }


def _summarize_change(changed: Result, updated: Result, controller_cpu_s: float) -> Result:
    pushed = changed["pushed"]
    affected = set(changed["affected_identities"])
    latencies = [at - pushed for at in updated["at"] if at is not None]
    missing = sum(1 for at in updated["at"] if at is None)
    groups: dict[str, list[int]] = {"affected": [], "unaffected": []}
    parts = {"inbound": 0, "outbound": 0}
    for i, size in enumerate(updated["size"]):
        if size is None:
            continue
        groups["affected" if updated["identity"][i] in affected else "unaffected"].append(size)
        parts["inbound"] += bool(updated["inbound"][i])
        parts["outbound"] += bool(updated["outbound"][i])
    sizes = {
        name: {
            "streams": len(v),
            "min_bytes": min(v, default=0),
            "max_bytes": max(v, default=0),
            "total_bytes": sum(v),
        }
        for name, v in groups.items()
    }
    return {
        "what": changed["what"],
        "version": changed["version"],
        "latency": _latency_stats(latencies),
        "all_updated_s": (max(latencies) if latencies and not missing else None),
        "missing": missing,
        "apply_started_after_s": changed["apply_started"] - pushed,
        "apply_s": changed["apply_ended"] - changed["apply_started"],
        "compile_s": changed["compile_s"],
        "all_acked_s": (changed["all_acked"] - pushed) if changed["all_acked"] is not None else None,
        "acked": changed["acked"],
        "streams": changed["streams"],
        "affected_identities": sorted(affected),
        "sizes": sizes,
        "streams_with_inbound_part": parts["inbound"],
        "streams_with_outbound_part": parts["outbound"],
        "total_bytes": sum(s["total_bytes"] for s in sizes.values()),
        "messages": updated["messages"],
        "errors": updated["errors"],
        "controller_cpu_s": controller_cpu_s,
        "load_cpu_s": updated["cpu_s"],
        "latencies_s": sorted(latencies),
    }


def _source_digest() -> str:
    """SHA-256 of the controller's and the shared package's sources as measured."""
    digest = hashlib.sha256()
    for path in sorted([*REPO_DIR.glob("controller/**/*.py"), *REPO_DIR.glob("sidemesh/**/*.py")]):
        digest.update(str(path.relative_to(REPO_DIR)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> Result:
    import grpc
    import yaml
    from google import protobuf
    from google.protobuf.internal import api_implementation

    return {
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "usable_cores": sorted(os.sched_getaffinity(0)),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{protobuf.__version__} ({api_implementation.Type()})",
        "pyyaml": f"{yaml.__version__} (libyaml {'available' if hasattr(yaml, 'CSafeLoader') else 'absent'})",
        "commit": _git_commit(),
        "source_sha256": _source_digest(),
    }


def _run(args: argparse.Namespace, tmp: Path, env: Result, progress: Progress) -> Result:
    from ca import keys

    spec = ClusterSpec(args.pods, args.services, args.policies, args.namespaces, args.service_accounts)
    usable = sorted(os.sched_getaffinity(0))
    server_core, client_core = (usable[0], usable[1]) if len(usable) >= 2 else (None, None)
    notes: list[str] = []
    if server_core is None:
        notes.append("Fewer than two usable cores: nothing is pinned; controller and load share the CPU.")
    limit = int(min(args.rss_limit_mb * MB, 0.8 * _mem_available()))
    watch = MemoryWatch(limit)
    report: Result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": env,
        "config": {
            **dataclasses.asdict(spec),
            "streams": args.streams,
            "channels": args.channels,
            "repeat": args.repeat,
            "wait_quiet": args.wait_quiet,
            "yaml": not args.no_yaml,
            "controller_core": server_core,
            "load_core": client_core,
            "rss_limit_mb": limit / MB,
        },
        "targets": {
            "update_p99_s": TARGET_UPDATE_P99_S,
            "compile_s": TARGET_COMPILE_S,
            "controller_rss_mb": TARGET_RSS_MB,
        },
        "notes": notes,
    }

    progress.phase(
        f"cluster: {spec.pods:,} pods, {spec.services:,} Services, {spec.policies:,} ServiceAuthorizations, "
        f"{spec.namespaces} namespaces, {spec.service_accounts} service accounts (own process, core {server_core})"
    )
    report["quiet_before_cluster"] = wait_quiet([], args.wait_quiet)
    mark = CpuMark.take([], None)
    cluster = Child(
        "cluster",
        _cluster_child,
        ClusterParams(spec, str(tmp), args.repeat, not args.no_yaml, server_core),
        watch,
    )
    try:
        built = _cluster_result(cluster)
    finally:
        cluster.stop()
    report["cluster"] = built
    built["cpu"] = CpuMark.take([], None).since(mark, extra_ours=built["cpu_s"])
    c = built["compile"]
    progress.detail(
        f"compile (median of {args.repeat}): outbound {_secs(c['outbound_s'])} + inbound "
        f"{_secs(c['inbound_s'])} = {_secs(c['total_s'])}; outbound part {built['sizes']['outbound_bytes'] / MB:.1f} MB "
        f"({built['sizes']['destinations']:,} destinations)"
    )

    progress.phase("CA keys bootstrapped into the temporary directory; the controller starts (core 0)")
    ca_dir = tmp / "ca"
    keys.bootstrap(ca_dir, TRUST_DOMAIN, dt.datetime.now(dt.UTC))
    log_path = tmp / "controller.log"
    controller = Child(
        "controller",
        _controller_child,
        ControllerParams(spec, str(ca_dir), str(log_path), server_core, args.timeout),
        watch,
    )
    load: Child | None = None
    controller_pid = typing.cast(int, controller.proc.pid)  # started: it has one
    try:
        watch.pid = controller_pid
        watch.phase = "start"
        serving = controller.receive("serving", timeout=600)
        report["controller"] = serving
        progress.detail(
            f"pid {serving['pid']}, 127.0.0.1:{serving['port']}: snapshot built in {_secs(serving['build_s'])}, "
            f"first compile {_secs(serving['compile_s'])} (server-measured), coalescing window "
            f"{_ms(serving['coalesce_s'])}"
        )

        progress.phase(
            f"load process (core {client_core}): client certificates, then {args.streams:,} streams over "
            f"{args.channels:,} channels"
        )
        load = Child(
            "load",
            _load_child,
            LoadParams(
                f"127.0.0.1:{serving['port']}",
                str(ca_dir),
                spec,
                args.streams,
                args.channels,
                client_core,
                args.timeout,
            ),
            watch,
        )
        ready = load.receive("ready", timeout=600)
        progress.detail(f"{ready['identities']} client certificates made in {_secs(ready['certs_s'])}")
        pids = [controller_pid, typing.cast(int, load.proc.pid)]
        report["quiet_before_streams"] = wait_quiet(pids, args.wait_quiet)
        watch.phase = "initial sync"
        mark = CpuMark.take(pids, controller_pid)
        cpu0 = _proc_cpu_seconds(controller_pid)
        load.send("sync")
        synced = load.receive("synced", timeout=args.timeout + 60)
        sync_cpu = _proc_cpu_seconds(controller_pid) - cpu0
        machine = CpuMark.take(pids, controller_pid).since(mark)
        controller.send("memory", "synced")
        mem_synced = controller.receive("memory", timeout=60)
        report["initial_sync"] = _summarize_sync(synced, sync_cpu, mem_synced, watch.peaks["initial sync"])
        s = report["initial_sync"]
        s["cpu"] = machine
        progress.detail(
            f"all {s['synced']:,} streams synced in {_secs(s['all_synced_s'])} (per stream p50 "
            f"{_secs(s['latency']['p50_s'])}, p99 {_secs(s['latency']['p99_s'])}); "
            f"{s['total_bytes'] / 1e9:.2f} GB sent; controller CPU {_secs(sync_cpu)}, RSS peak "
            f"{s['controller_rss_peak_mb']:,.0f} MB"
        )
        if s["errors"]:
            progress.detail(f"stream errors: {s['errors'][:3]} ({len(s['errors'])})")

        baseline = int(synced["version"])
        for n, (kind, label) in enumerate(
            (
                ("policy", "one ServiceAuthorization modified"),
                ("pod", "one pod added (the outbound table changes)"),
            )
        ):
            if kind == "pod" and args.no_pod_change:
                continue
            progress.phase(f"change {n + 1}: {label}")
            watch.phase = kind
            load.send("watch", baseline + 1)
            load.receive("armed", timeout=60)
            mark = CpuMark.take(pids, controller_pid)
            cpu0 = _proc_cpu_seconds(controller_pid)
            controller.send("change", kind)
            changed = controller.receive("changed", timeout=args.timeout + 60)
            updated = load.receive("updated", timeout=args.timeout + 60)
            cpu = _proc_cpu_seconds(controller_pid) - cpu0
            result = _summarize_change(changed, updated, cpu)
            result["cpu"] = CpuMark.take(pids, controller_pid).since(mark)
            result["controller_rss_peak_mb"] = watch.peaks.get(kind, 0.0)
            report[f"change_{kind}"] = result
            baseline = int(changed["version"])
            _print_change(result)

        progress.phase("stop the load and the controller")
        controller.send("memory", "changed")
        controller.receive("memory", timeout=60)
        load.send("stop")
        report["load_rss_mb"] = load.receive("stopped", timeout=120)["rss_mb"]
        load.stop(wait=30)  # its connections are gone before the controller stops
        controller.send("stop")
        stopped = controller.receive("stopped", timeout=120)
        report["controller_memory"] = stopped["memory"]
        report["controller_applied"] = stopped["applied"]
        report["controller_rss_peaks_sampled_mb"] = watch.peaks
    finally:
        if load is not None:
            load.stop()
        controller.stop()
    report["controller_log_lines"] = sum(1 for _ in log_path.open()) if log_path.exists() else 0
    _analyse(report)
    return report


def _cluster_result(cluster: Child) -> Result:
    """The cluster child sends one result dict with no event name."""
    deadline = time.monotonic() + 3600
    while True:
        if cluster.conn.poll(0.1):
            message: Result = cluster.conn.recv()
            if "error" in message:
                raise RuntimeError(f"the cluster process failed:\n{message['error']}")
            return message
        cluster.watch.sample()
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster process gave no result within an hour")


def _summarize_sync(synced: Result, controller_cpu_s: float, memory: Result, peak: float) -> Result:
    firsts = [t for t in synced["first"] if t is not None]
    return {
        "streams": len(synced["first"]),
        "synced": len(firsts),
        "full_first_updates": synced["full"],
        "all_synced_s": (synced["ended"] - synced["started"]) if not synced["timed_out"] else None,
        "latency": _latency_stats(firsts),
        "bytes_per_stream": max(synced["bytes"], default=0),
        "total_bytes": sum(synced["bytes"]),
        "errors": synced["errors"],
        "controller_cpu_s": controller_cpu_s,
        "load_cpu_s": synced["cpu_s"],
        "controller_rss_after_mb": memory["rss_mb"],
        "controller_rss_peak_mb": peak,
        "controller_hwm_so_far_mb": memory["hwm_mb"],
        "streams_connected": memory["streams"],
    }


def _print_change(r: Result) -> None:
    lat = r["latency"]
    _say(
        f"{r['what']}: applied {_ms(r['apply_started_after_s'])} after the push (coalescing window), "
        f"compile {_secs(r['compile_s'])}"
    )
    _say(
        f"update received by {lat['n']:,} streams: p50 {_secs(lat['p50_s'])}, p99 {_secs(lat['p99_s'])}, "
        f"max {_secs(lat['max_s'])}; all acked (controller view) "
        f"{_secs(r['all_acked_s']) if r['all_acked_s'] is not None else 'NOT within the timeout'}"
    )
    for name, s in r["sizes"].items():
        if s["streams"]:
            _say(
                f"{name} streams: {s['streams']:,}, {s['min_bytes']:,}-{s['max_bytes']:,} bytes each "
                f"(total {s['total_bytes']:,})"
            )
    if r["errors"] or r["missing"]:
        _say(f"missing {r['missing']}, errors {r['errors'][:3]}")


def _analyse(report: Result) -> None:
    notes: list[str] = report["notes"]
    compile_total = report["cluster"]["compile"]["total_s"]
    policy = report.get("change_policy")
    hwm = report.get("controller_memory", {}).get("end", {}).get("hwm_mb", 0.0)
    peak = max([*report.get("controller_rss_peaks_sampled_mb", {}).values(), hwm])
    report["controller_rss_peak_mb"] = peak
    report["target_met"] = {
        "compile": compile_total < TARGET_COMPILE_S,
        "update_p99": bool(
            policy and not policy["missing"] and policy["latency"]["p99_s"] <= TARGET_UPDATE_P99_S
        ),
        "controller_rss": peak < TARGET_RSS_MB,
    }
    cluster = report["cluster"]
    for key, what in (("dicts_equal", "build_snapshot from dicts"), ("yaml_equal", "load_directory")):
        if cluster.get(key) is False:
            notes.append(
                f"The Snapshot from {what} differs from the one built directly: the bench's direct "
                "construction no longer matches the parsers (a field was added?); compare before trusting "
                "the comparison of their times."
            )
    sync = report.get("initial_sync", {})
    phases = [("initial sync", sync, sync.get("all_synced_s"))]
    for kind in ("policy", "pod"):
        r = report.get(f"change_{kind}")
        if r:
            phases.append((f"the {kind} change", r, r["all_updated_s"]))
    for label, r, wall in phases:
        if not r or not wall:
            continue
        ctl, load = r["controller_cpu_s"] / wall, r["load_cpu_s"] / wall
        r["controller_cpu_share"], r["load_cpu_share"] = ctl, load
        if load >= 0.9:
            notes.append(
                f"During {label} the load process used {load:.0%} of its core (the controller {ctl:.0%} "
                "of its own): the load generator limits this figure too; it is an upper bound."
            )
    disturbed = []
    for label, r in (
        ("cluster and compile", cluster),
        ("initial sync", sync),
        ("policy change", report.get("change_policy")),
        ("pod change", report.get("change_pod")),
    ):
        if r and "cpu" in r and r["cpu"]["other_processes"] > OTHER_LOAD:
            disturbed.append(f"{label} {r['cpu']['other_processes']:.0%}")
    if disturbed:
        notes.append(
            "Other processes on the machine used CPU during: " + ", ".join(disturbed) + " (of a core, "
            "mean over the phase). Their timings are pessimistic; compare with a quiet run."
        )
    report["findings"] = _findings(report)
    if sync.get("errors"):
        notes.append(f"{len(sync['errors'])} streams failed during the initial sync: {sync['errors'][:3]}")
    if sync and sync["synced"] < sync["streams"]:
        notes.append(f"Only {sync['synced']} of {sync['streams']} streams received a first update.")


def _findings(report: Result) -> list[str]:
    """What this run's numbers say by themselves (the profile and the proposals: ANALYSIS)."""
    out: list[str] = []
    cfg, cl = report["config"], report["cluster"]
    outbound_mb = cl["sizes"]["outbound_bytes"] / MB
    bd, sz = cl["breakdown"], cl["sizes"]
    out.append(
        f"- The outbound part is {outbound_mb:.1f} MB ({sz['destinations']:,} destinations, "
        f"{sz['endpoints']:,} endpoints) and the same for every sidecar. It goes whole on a new "
        f"stream ({cfg['streams'] * outbound_mb / 1e3:.2f} GB for {cfg['streams']:,} streams; each "
        f"sidecar decodes it: `wire.outbound_from_pb` {_secs(bd['sidecar_outbound_from_pb_s'])} here). "
        f"A change to a Workload, Service or endpoint goes as a delta: for the pod added, "
        f"{sz['pod_delta_bytes']:,} bytes ({sz['pod_delta_destinations']} destinations; "
        f"`outbound_delta` {_secs(bd['outbound_delta_s'])} once in the controller, "
        f"`apply_outbound_delta` {_secs(bd['sidecar_apply_delta_s'])} per sidecar)."
    )
    c = cl["compile"]
    out.append(
        f"- Compile: {_secs(c['outbound_s'])} for the outbound table + {_secs(c['inbound_s'])} for "
        f"{cl['identities']} inbound parts (`compile_inbound` alone: "
        f"{_secs(cl['breakdown']['compile_inbound_all_s'])} for all of them)."
    )
    policy = report.get("change_policy")
    if policy:
        n = len(policy["affected_identities"])
        out.append(
            f"- The policy change reached {policy['streams']:,} streams with p99 "
            f"{_secs(policy['latency']['p99_s'])}: {_ms(policy['apply_started_after_s'])} coalescing, then "
            f"{_secs(policy['compile_s'])} in `MeshState.update` (no Workload, Service or endpoint "
            f"changed); the controller used {_secs(policy['controller_cpu_s'])} of CPU in all. The inbound "
            f"part changed for {n} {'identity' if n == 1 else 'identities'}: "
            f"{policy['sizes']['unaffected']['streams']:,} streams got "
            f"{policy['sizes']['unaffected']['max_bytes']} bytes (the version alone)."
        )
    mem = report.get("controller_memory", {})
    sync = report.get("initial_sync")
    if mem and sync and "synced" in mem and "serving" in mem:
        held = mem["synced"]["rss_mb"] - mem["serving"]["rss_mb"]
        expected = cfg["streams"] * outbound_mb
        if held > 0.5 * expected:
            out.append(
                f"- After the initial sync the controller's RSS stayed {held:,.0f} MB above its level "
                f"before ({cfg['streams']:,} streams x {outbound_mb:.1f} MB = {expected:,.0f} MB): as if "
                "each stream kept its last message until it sends the next one."
            )
    return out


# ---------------------------------------------------------------------------------------------
# Report


def _shown(argv: Sequence[str]) -> list[str]:
    """The command line without --results-dir (where the files went is not part of the result)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--results-dir":
            skip = True
        elif not arg.startswith("--results-dir="):
            out.append(arg)
    return out


def _equal_text(cluster: Result) -> str:
    checks = [("dicts", cluster.get("dicts_equal")), ("YAML", cluster.get("yaml_equal"))]
    return ", ".join(f"{name} {'equal' if ok else 'DIFFERENT'}" for name, ok in checks if ok is not None)


def _quiet(q: Result | None) -> str:
    if not q:
        return "-"
    return f"waited {q['waited_s']:.0f} s, then {q['other_processes']:.0%} of a core"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _spread(cluster: Result, key: str) -> str:
    return f"{cluster['compile_min'][key]:.2f}-{cluster['compile_max'][key]:.2f} s"


def _cpu(r: Result) -> str:
    text = f"{_secs(r['controller_cpu_s'])} / {_secs(r['load_cpu_s'])}"
    if "controller_cpu_share" in r:
        text += f" ({r['controller_cpu_share']:.0%} / {r['load_cpu_share']:.0%} of a core)"
    cpu = r.get("cpu")
    if cpu:
        text += (
            f"; controller event-loop thread {_secs(cpu['controller_loop_thread_s'])}, its other threads "
            f"(gRPC core) {_secs(cpu['controller_other_threads_s'])}; other processes "
            f"{cpu['other_processes']:.0%} of a core"
        )
    return text


def table_rows(report: Result) -> list[tuple[str, str]]:
    cfg, cl = report["config"], report["cluster"]
    c, bd, sz = cl["compile"], cl["breakdown"], cl["sizes"]
    met = report["target_met"]
    rows: list[tuple[str, str]] = [
        (
            "cluster",
            f"{cfg['pods']:,} pods, {cfg['services']:,} Services, {cfg['policies']:,} ServiceAuthorizations, "
            f"{cfg['namespaces']} namespaces, {cl['identities']} identities",
        ),
        ("Snapshot built directly in Python", _secs(cl["direct_s"])),
        (f"build_snapshot from {cl['documents']:,} dicts", _secs(cl["build_snapshot_s"])),
    ]
    if "yaml_load_s" in cl:
        rows.append(
            (
                f"load_directory: {cl['yaml_files']} YAML files, {cl['yaml_bytes'] / MB:.1f} MB",
                _secs(cl["yaml_load_s"]),
            )
        )
        rows.append(
            (
                "  the same files with yaml.CSafeLoader (libyaml), for comparison",
                _secs(cl["yaml_load_libyaml_s"]),
            )
        )
    rows += [
        (
            f"compile: MeshState.update + outbound() (whole table), median of {cfg['repeat']} (min-max)",
            f"{_secs(c['outbound_s'])} ({_spread(cl, 'outbound_s')})",
        ),
        (
            f"compile: inbound for all {cl['identities']} identities",
            f"{_secs(c['inbound_s'])} ({_spread(cl, 'inbound_s')})",
        ),
        (
            f"compile total (target < {TARGET_COMPILE_S:g} s)",
            f"{_secs(c['total_s'])} ({_spread(cl, 'total_s')}) — {_met(met['compile'])}",
        ),
        (
            "  other processes' CPU during cluster + compile (steal)",
            f"{cl['cpu']['other_processes']:.0%} of a core ({cl['cpu']['steal']:.0%})"
            if "cpu" in cl
            else "-",
        ),
        (
            "  outbound: compile_outbound (of which _digest) / to_pb / serialize",
            f"{_secs(bd['compile_outbound_s'])} ({_secs(bd['outbound_digest_s'])}) / "
            f"{_secs(bd['outbound_to_pb_s'])} / {_secs(bd['outbound_serialize_s'])}",
        ),
        (
            "  inbound: compile_inbound / to_pb + serialize, all identities",
            f"{_secs(bd['compile_inbound_all_s'])} / {_secs(bd['inbound_to_pb_and_serialize_all_s'])}",
        ),
        (
            "outbound part: bytes, destinations, endpoints",
            f"{sz['outbound_bytes']:,} B, {sz['destinations']:,}, {sz['endpoints']:,}",
        ),
        (
            "inbound part: bytes min / median / max",
            f"{sz['inbound_bytes_min']:,} / {sz['inbound_bytes_median']:,} / {sz['inbound_bytes_max']:,}",
        ),
        (
            "sidecar side, per whole outbound table: parse / outbound_from_pb",
            f"{_secs(bd['sidecar_parse_outbound_s'])} / {_secs(bd['sidecar_outbound_from_pb_s'])}",
        ),
        (
            "one pod added: delta bytes (destinations) / outbound_delta in the controller / applied per sidecar",
            f"{sz['pod_delta_bytes']:,} B ({sz['pod_delta_destinations']}) / {_secs(bd['outbound_delta_s'])} / "
            f"{_secs(bd['sidecar_apply_delta_s'])}",
        ),
    ]
    ctl = report.get("controller")
    if ctl:
        rows.append(("controller: first compile when serving (server-measured)", _secs(ctl["compile_s"])))
    s = report.get("initial_sync")
    if s:
        rows += [
            (
                f"initial sync: {s['streams']:,} streams, {cfg['channels']:,} TLS connections",
                f"all in {_secs(s['all_synced_s']) if s['all_synced_s'] is not None else 'TIMEOUT'} "
                f"({s['synced']:,} synced, {len(s['errors'])} errors)",
            ),
            (
                "  per stream: p50 / p99 / max",
                f"{_secs(s['latency']['p50_s'])} / {_secs(s['latency']['p99_s'])} / {_secs(s['latency']['max_s'])}",
            ),
            (
                "  bytes per stream / total",
                f"{s['bytes_per_stream']:,} B / {s['total_bytes'] / 1e9:.2f} GB",
            ),
            ("  CPU: controller / load process", _cpu(s)),
        ]
    for kind, label in (("policy", "policy change"), ("pod", "pod added")):
        r = report.get(f"change_{kind}")
        if not r:
            continue
        lat = r["latency"]
        target = (
            f" (target p99 ≤ {TARGET_UPDATE_P99_S:g} s): {_met(met['update_p99'])}"
            if kind == "policy"
            else ""
        )
        rows += [
            (
                f"{label}: received p50 / p99 / max{target}",
                f"{_secs(lat['p50_s'])} / {_secs(lat['p99_s'])} / {_secs(lat['max_s'])}",
            ),
            (
                f"  {label}: all {r['streams']:,} streams hold it / all acked",
                f"{_secs(r['all_updated_s']) if r['all_updated_s'] is not None else 'NO'} / "
                f"{_secs(r['all_acked_s']) if r['all_acked_s'] is not None else 'NO'}",
            ),
            (
                f"  {label}: coalescing wait / controller compile (MeshState.update)",
                f"{_ms(r['apply_started_after_s'])} / {_secs(r['compile_s'])}",
            ),
        ]
        for name, sizes in r["sizes"].items():
            if sizes["streams"]:
                rows.append(
                    (
                        f"  {label}: bytes per {name} stream ({sizes['streams']:,} streams)",
                        f"{sizes['min_bytes']:,}"
                        + (f"-{sizes['max_bytes']:,}" if sizes["max_bytes"] != sizes["min_bytes"] else ""),
                    )
                )
        rows.append((f"  {label}: CPU controller / load", _cpu(r)))
    mem = report.get("controller_memory", {})
    if mem:
        rows += [
            (
                "controller RSS: snapshot built / serving / after sync / after changes / stopped",
                " / ".join(
                    f"{mem[k]['rss_mb']:,.0f}"
                    for k in ("snapshot", "serving", "synced", "changed", "end")
                    if k in mem
                )
                + " MB",
            ),
            (
                f"controller RSS peak (target < {TARGET_RSS_MB:,.0f} MB)",
                f"{report['controller_rss_peak_mb']:,.0f} MB — {_met(met['controller_rss'])}",
            ),
        ]
    return rows


def print_table(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print()


def write_markdown(path: Path, report: Result, rows: Sequence[tuple[str, str]], argv: Sequence[str]) -> None:
    env, cfg = report["environment"], report["config"]
    ctl = report.get("controller", {})
    met = report["target_met"]
    lines = [
        "# Controller at scale",
        "",
        f"`python -m bench.controller {' '.join(_shown(argv))}`".replace(" `", "`"),
        "",
        f"{report['date']} (commit {env['commit']}; sources of controller/ and sidemesh/ as measured: "
        f"sha256 {env['source_sha256']}, the working tree may hold uncommitted changes).",
        "",
        "## Machine",
        "",
        f"- CPU: {env['cpu_model']}, nproc {env['nproc']}, {env['memory_gb']:.0f} GB RAM; kernel {env['kernel']}",
        f"- Python {env['python']}, grpcio {env['grpcio']}, protobuf {env['protobuf']}, PyYAML {env['pyyaml']}",
        "",
        "## Setup",
        "",
        f"- Cluster: {cfg['pods']:,} pods (Workloads with labels app/tier/version, ports http 8080, grpc "
        f"9090, metrics 9100) in {cfg['namespaces']} namespaces, {cfg['service_accounts']} service accounts, "
        f"{cfg['services']:,} Services (one per app; targetPort `http` by name, 9090 by number, a quarter "
        f"with `metrics` by name), {cfg['policies']:,} ServiceAuthorizations (one in five selects a whole "
        "tier, the rest one app; 2-4 rules of service accounts, namespaces and prefixes, every policy "
        "with an HTTP rule), every tenth namespace annotated default-policy deny.",
        "- Snapshot three ways: built directly in Python; `build_snapshot` from the documents as dicts; "
        f"`load_directory` of the same documents as YAML. Same content: {_equal_text(report['cluster'])}.",
        f"- Compile: fresh `MeshState`, `update(snapshot)` then `inbound(identity)` for every "
        f"identity, median of {cfg['repeat']} runs, in a process of its own on core "
        f"{cfg['controller_core']}. The breakdown calls the same functions one at a time.",
        f"- Controller: `ConfigServer` unchanged, plain asyncio, log level info to a file, coalescing "
        f"window {ctl.get('coalesce_s', 0) * 1e3:.0f} ms (the default), mesh default "
        f"{ctl.get('default_policy', '-')}, in its own process pinned to core {cfg['controller_core']}. "
        "Fed by `MemorySource` (bench/controller.py: an in-memory Source that calls `on_change` the moment "
        "a snapshot is pushed). Its SVID is signed directly with the key of a CA bootstrapped into a "
        "temporary directory and installed into its `WorkloadIdentity` (no CA server, no renewal).",
        f"- Sidecars: {cfg['streams']:,} streams over {cfg['channels']:,} grpc.aio channels (each its own TLS "
        f"connection with the client certificate of one identity, round robin over the cluster's "
        f"identities) from one process pinned to core {cfg['load_core']}. Each stream acks every update; it "
        "reads the top-level fields (version, sizes of the parts) and does not decode the parts.",
        "- Changes: the source pushes a new Snapshot; latency = time from the push (in the controller) to "
        "the arrival of that version on each stream (CLOCK_MONOTONIC, shared by the processes), so it "
        "includes the coalescing window. Bytes = gRPC message payload (no HTTP/2 or TLS framing).",
        "- Initial sync: all streams opened at once (TLS handshakes included), each timed until its "
        "first update arrived.",
        "- Controller RSS sampled by the parent every 100 ms, plus VmHWM at the end. CPU: per process "
        "from /proc, the controller split into its event-loop thread and its other threads (gRPC core: "
        "TLS, HTTP/2); 'other processes' = the machine's busy time minus all of this run's processes.",
        f"- Before the compile and before the streams the run waited for quiet (other processes under "
        f"{OTHER_LOAD:.0%} of a core; at most --wait-quiet {cfg['wait_quiet']:g} s): "
        f"{_quiet(report.get('quiet_before_cluster'))} and {_quiet(report.get('quiet_before_streams'))}.",
        "",
        "## Results",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k.strip()} | {v} |" for k, v in rows),
        "",
        "## Targets",
        "",
        f"- Every stream holds a policy change within {TARGET_UPDATE_P99_S:g} s (p99): **{_met(met['update_p99'])}**",
        f"- Compile (outbound + every identity's inbound) under {TARGET_COMPILE_S:g} s: **{_met(met['compile'])}**",
        f"- Controller under {TARGET_RSS_MB:,.0f} MB RSS: **{_met(met['controller_rss'])}**",
        "",
    ]
    if report["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    if report.get("findings"):
        lines += ["## Findings (from this run's numbers)", "", *report["findings"], ""]
    if (path.parent / ANALYSIS).exists():
        lines += [
            f"Profiles, experiments and proposed changes: [{ANALYSIS}]({ANALYSIS}) (written by hand; "
            "see its date for the code it was measured on).",
            "",
        ]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.controller",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pods", type=int, default=10_000, help="Workloads (default: %(default)s)")
    p.add_argument("--services", type=int, default=2_000, help="Services (default: %(default)s)")
    p.add_argument("--policies", type=int, default=1_000, help="ServiceAuthorizations (default: %(default)s)")
    p.add_argument("--namespaces", type=int, default=50, help="namespaces (default: %(default)s)")
    p.add_argument(
        "--service-accounts", type=int, default=500, help="service accounts in all (default: %(default)s)"
    )
    p.add_argument("--streams", type=int, default=1_000, help="sidecar streams (default: %(default)s)")
    p.add_argument(
        "--channels",
        type=int,
        default=0,
        help="TLS connections the streams share (default: one per stream, as sidecars)",
    )
    p.add_argument("--repeat", type=int, default=5, help="compile runs (default: %(default)s)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        help="before the compile and the streams, wait up to this long for other processes' CPU use "
        "to drop under a quarter of a core (default: %(default)s)",
    )
    p.add_argument("--no-yaml", action="store_true", help="skip the YAML directory load")
    p.add_argument("--no-pod-change", action="store_true", help="skip the pod-added change")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds for a sync or a change (default: %(default)s)"
    )
    p.add_argument(
        "--rss-limit-mb",
        type=float,
        default=12_000.0,
        help="stop if the controller's RSS passes this (default: %(default)s, at most 80%% of MemAvailable)",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where controller.md/.json go (default: bench/results)",
    )
    args = p.parse_args(argv)
    if args.channels == 0:
        args.channels = args.streams
    if min(args.pods, args.services, args.policies, args.namespaces, args.service_accounts) < 1:
        p.error("--pods, --services, --policies, --namespaces and --service-accounts must be positive")
    if args.streams < 1 or not 1 <= args.channels <= args.streams or args.repeat < 1:
        p.error("--streams and --repeat must be positive, 1 <= --channels <= --streams")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    progress = Progress(total=7)
    env = environment()
    progress.phase(
        f"{env['cpu_model']}, {env['nproc']} cores, {env['memory_gb']:.0f} GB; Python {env['python']}, "
        f"grpcio {env['grpcio']}, protobuf {env['protobuf']}"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="sidemesh-bench-controller-") as tmp:
            report = _run(args, Path(tmp), env, progress)
    except KeyboardInterrupt:
        print(
            "\ninterrupted; the processes it started are stopped and its temporary directory removed",
            file=sys.stderr,
        )
        return 130
    rows = table_rows(report)
    print_table(rows)
    for note in report["notes"]:
        print(f"  note: {note}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(args.results_dir / "controller.md", report, rows, argv)
    (args.results_dir / "controller.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.results_dir / 'controller.md'} and {args.results_dir / 'controller.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
