"""The Kubernetes source: list+watch what the mesh is made of and hand the controller whole Snapshots.

One daemon thread per kind runs client-go's reflector loop with the sync `kubernetes` client: list
(paged), remember the list's resourceVersion, watch from it with bookmarks and a server-side
timeout, move the resourceVersion on every event and bookmark, resume from it when a watch ends or
drops (exponential backoff, capped, on errors), relist on 410 Gone. The threads only post what
they saw to the event loop, which owns the stores, converts objects into domain values with the
pure functions below, calls ``on_change`` once every kind has been listed, and writes each
ServiceAuthorization's ``status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import ipaddress
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

from kubernetes import client, watch
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from controller.sources import OnChange
from sidemesh.clock import SYSTEM_CLOCK, Clock
from sidemesh.mesh.resources import (
    DEFAULT_POLICY_ANNOTATION,
    EndpointAddress,
    Namespace,
    ResourceError,
    Service,
    ServiceEndpoints,
    Snapshot,
    Workload,
    WorkloadPort,
    parse_namespace,
    parse_service,
)
from sidemesh.policy import crd
from sidemesh.policy.model import Authorization, DefaultPolicy

log = logging.getLogger("sidemesh.controller.kubernetes")

GROUP, VERSION, PLURAL = "sidemesh.io", "v1alpha1", "serviceauthorizations"
MESHED_ANNOTATION = "sidemesh.io/status"  # the injector records what it injected here
PROXY_CONTAINER = "sidemesh-proxy"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
KINDS = ("namespaces", "serviceaccounts", "pods", "services", "endpointslices", PLURAL)
ACCEPTED_MESSAGE = "valid; sent to the sidecars of the workloads it selects"

Obj = dict[str, Any]  # an object as the API server sends it (JSON)
T = TypeVar("T")


# -- conversions (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Converted(Generic[T]):
    value: T | None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SliceEndpoints:
    namespace: str
    service: str
    endpoints: tuple[EndpointAddress, ...]


class Condition(TypedDict):
    type: str
    status: str
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int


class AuthorizationStatus(TypedDict):
    conditions: list[Condition]
    selectedWorkloads: int


@dataclass(frozen=True, slots=True)
class PolicyObject:
    """A ServiceAuthorization as stored: what status write-back needs, and the parse outcome."""

    namespace: str
    name: str
    uid: str
    generation: int
    observed: AuthorizationStatus | None  # its status as last seen from the API server
    policy: Authorization | None
    error: str | None = None

    @property
    def key(self) -> str:
        return self.uid or f"{self.namespace}/{self.name}"


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def object_key(obj: Obj) -> str:
    meta = _meta(obj)
    return (
        f"{meta['namespace']}/{meta.get('name', '')}" if meta.get("namespace") else str(meta.get("name", ""))
    )


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in value.items())) if isinstance(value, dict) else ()


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _tcp(port: Obj) -> bool:
    return port.get("protocol") in (None, "TCP")


def workload_from_pod(pod: Obj) -> Converted[Workload]:
    """A running pod with an IP -> Workload; an invalid default-policy annotation is dropped and
    reported (the pod keeps its identity and the namespace or mesh default applies)."""
    meta, spec, status = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
    ref = f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"
    if not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed"):
        return Converted(None)
    try:
        address = str(ipaddress.ip_address(status["podIP"]))
    except ValueError:
        return Converted(None, (f"Pod {ref}: status.podIP {status['podIP']!r} is not an IP address",))
    errors: list[str] = []
    annotations = _pairs(meta.get("annotations"))
    policy = dict(annotations).get(DEFAULT_POLICY_ANNOTATION)
    if policy is not None and policy not in {d.value for d in DefaultPolicy}:
        errors.append(
            f"Pod {ref}: annotation {DEFAULT_POLICY_ANNOTATION}={policy!r} is not one of deny, "
            "allow-authenticated, allow-all; ignored"
        )
        annotations = tuple(a for a in annotations if a[0] != DEFAULT_POLICY_ANNOTATION)
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    init = [c for c in spec.get("initContainers") or [] if isinstance(c, dict)]
    meshed = MESHED_ANNOTATION in dict(annotations) or any(
        c.get("name") == PROXY_CONTAINER for c in containers + init
    )
    # Native sidecars (init containers that keep running) serve too.
    serving = containers + [c for c in init if c.get("restartPolicy") == "Always"]
    ports: dict[int, WorkloadPort] = {}
    for c in serving:
        if c.get("name") == PROXY_CONTAINER:
            continue  # the sidecar's own ports are not the application's
        for p in c.get("ports") or []:
            if isinstance(p, dict) and isinstance(p.get("containerPort"), int) and _tcp(p):
                ports.setdefault(
                    p["containerPort"], WorkloadPort(p["containerPort"], str(p.get("name") or ""))
                )
    workload = Workload(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "default")),
        service_account=str(spec.get("serviceAccountName") or "default"),
        address=address,
        labels=_pairs(meta.get("labels")),
        annotations=annotations,
        ports=tuple(sorted(ports.values(), key=lambda wp: wp.port)),
        meshed=meshed,
    )
    return Converted(workload, tuple(errors))


def service_from(obj: Obj) -> Converted[Service]:
    """The same parser as local mode: TCP ports, named or numbered targetPort, headless -> no IP."""
    try:
        return Converted(parse_service(obj))
    except ResourceError as exc:
        return Converted(None, (str(exc),))


def namespace_from(obj: Obj) -> Converted[Namespace]:
    try:
        return Converted(parse_namespace(obj))
    except ResourceError as exc:
        return Converted(None, (str(exc),))


def service_account_from(obj: Obj) -> Converted[str]:
    return Converted(object_key(obj))


def slice_from(obj: Obj) -> Converted[SliceEndpoints]:
    """Ready endpoints of one EndpointSlice: each address x each port, with the pod behind it."""
    meta = _meta(obj)
    ns, service = str(meta.get("namespace", "default")), (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service or obj.get("addressType") not in ("IPv4", "IPv6"):
        return Converted(None)  # not a service's slice, or FQDN addresses (not ours to route)
    ports = [
        (str(p.get("name") or ""), p["port"])
        for p in obj.get("ports") or []
        if isinstance(p, dict) and isinstance(p.get("port"), int) and _tcp(p)
    ]
    found: list[EndpointAddress] = []
    for ep in obj.get("endpoints") or []:
        if not isinstance(ep, dict) or (ep.get("conditions") or {}).get("ready") is False:
            continue  # ready: true or unknown (absent) counts as ready
        ref = ep.get("targetRef") or {}
        workload = (
            f"{ref.get('namespace') or ns}/{ref['name']}"
            if ref.get("kind") == "Pod" and ref.get("name")
            else None
        )
        for address in ep.get("addresses") or []:
            found.extend(EndpointAddress(str(address), name, port, workload) for name, port in ports)
    return Converted(SliceEndpoints(ns, str(service), tuple(found)))


def observed_status(obj: Obj) -> AuthorizationStatus | None:
    """Our part of a ServiceAuthorization's status, in the shape we write it."""
    status = obj.get("status")
    if not isinstance(status, dict):
        return None
    conditions = [
        Condition(
            type="Accepted",
            status=str(c.get("status", "")),
            reason=str(c.get("reason", "")),
            message=str(c.get("message", "")),
            lastTransitionTime=str(c.get("lastTransitionTime", "")),
            observedGeneration=_int(c.get("observedGeneration"), -1),
        )
        for c in status.get("conditions") or []
        if isinstance(c, dict) and c.get("type") == "Accepted"
    ]
    selected = status.get("selectedWorkloads")
    return AuthorizationStatus(
        conditions=conditions, selectedWorkloads=selected if isinstance(selected, int) else -1
    )


def authorization_from(obj: Obj) -> Converted[PolicyObject]:
    """Parse with the shared CRD parser; an invalid policy is kept (its status says why) and
    reported, never fatal."""
    meta = _meta(obj)
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    generation = _int(meta.get("generation"), 0)
    base = PolicyObject(ns, name, str(meta.get("uid", "")), generation, observed_status(obj), None)
    try:
        doc = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, **obj}  # list items may omit them
        return Converted(dataclasses.replace(base, policy=crd.parse(doc)))
    except crd.PolicyError as exc:
        where = (
            f"{crd.KIND} {exc}" if str(exc).startswith(f"{ns}/{name}:") else f"{crd.KIND} {ns}/{name}: {exc}"
        )
        return Converted(dataclasses.replace(base, error=str(exc)), (where,))


CONVERTERS: dict[str, Callable[[Obj], Converted[Any]]] = {
    "namespaces": namespace_from,
    "serviceaccounts": service_account_from,
    "pods": workload_from_pod,
    "services": service_from,
    "endpointslices": slice_from,
    PLURAL: authorization_from,
}


def convert(kind: str, obj: Obj) -> Converted[Any]:
    """Never raises: an object we cannot read becomes an error line."""
    try:
        return CONVERTERS[kind](obj)
    except Exception as exc:  # a malformed object must not stop the others
        return Converted(None, (f"{kind} {object_key(obj)}: cannot be read: {exc!r}",))


def group_endpoints(slices: Iterable[SliceEndpoints]) -> tuple[ServiceEndpoints, ...]:
    """Merge the slices of each service (a service with only unready endpoints still appears,
    empty, so that nobody falls back to selector matching for it)."""
    merged: dict[tuple[str, str], set[EndpointAddress]] = defaultdict(set)
    for s in slices:
        merged[(s.namespace, s.service)].update(s.endpoints)
    return tuple(
        ServiceEndpoints(ns, svc, tuple(sorted(eps, key=lambda e: (e.address, e.port, e.port_name))))
        for (ns, svc), eps in sorted(merged.items())
    )


def assemble(entries: Mapping[str, Mapping[str, Converted[Any]]]) -> Snapshot:
    """Converted objects of every kind -> the Snapshot the controller compiles."""

    def values(kind: str, cls: type[T]) -> list[T]:
        return [e.value for e in entries.get(kind, {}).values() if isinstance(e.value, cls)]

    policies = [p.policy for p in values(PLURAL, PolicyObject) if p.policy is not None]
    return Snapshot(
        services=tuple(sorted(values("services", Service), key=lambda s: (s.namespace, s.name))),
        workloads=tuple(sorted(values("pods", Workload), key=lambda w: (w.namespace, w.name))),
        namespaces=tuple(sorted(values("namespaces", Namespace), key=lambda n: n.name)),
        policies=tuple(sorted(policies, key=lambda p: (p.namespace, p.name))),
        errors=tuple(sorted(err for by_key in entries.values() for e in by_key.values() for err in e.errors)),
        endpoints=group_endpoints(values("endpointslices", SliceEndpoints)),
    )


def selected_workloads(policy: Authorization, workloads: Iterable[Workload]) -> int:
    return sum(1 for w in workloads if w.meshed and policy.selects(w.namespace, w.label_map))


def desired_status(
    p: PolicyObject, selected: int, previous: AuthorizationStatus | None, now: dt.datetime
) -> AuthorizationStatus:
    """The status to write; lastTransitionTime moves only when the condition's status does."""
    status = "True" if p.policy is not None else "False"
    before = next((c for c in previous["conditions"] if c["type"] == "Accepted"), None) if previous else None
    since = (
        before["lastTransitionTime"]
        if before and before["status"] == status and before["lastTransitionTime"]
        else now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    condition = Condition(
        type="Accepted",
        status=status,
        reason="Accepted" if p.policy is not None else "Invalid",
        message=ACCEPTED_MESSAGE if p.policy is not None else (p.error or "invalid")[:32768],
        lastTransitionTime=since,
        observedGeneration=p.generation,
    )
    return AuthorizationStatus(conditions=[condition], selectedWorkloads=selected)


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...): doubling, capped."""
    return 0.0 if failures <= 0 else min(maximum, initial * 2 ** min(failures - 1, 30))


# -- the watch threads ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reset:
    kind: str
    items: list[Obj]


@dataclass(frozen=True, slots=True)
class _Event:
    kind: str
    type: str
    obj: Obj


@dataclass(frozen=True, slots=True)
class Settings:
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    watch_timeout_seconds: int = 300
    request_timeout: float = 30.0
    list_page_size: int = 500
    status_retry_seconds: float = 10.0


class _Watcher:
    """List+watch of one kind, in its own daemon thread; posts _Reset and _Event messages."""

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        post: Callable[[_Reset | _Event], None],
        stop: threading.Event,
        settings: Settings,
    ) -> None:
        self.kind, self._list_fn, self._post, self._stop, self._s = kind, list_fn, post, stop, settings
        self._watch = watch.Watch(return_type="object")  # events as plain JSON dicts
        self.resource_version: str | None = None
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name=f"sidemesh-watch-{kind}", daemon=True)

    def interrupt(self) -> None:
        self._watch.stop()  # shuts the socket down: a blocked read returns at once

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = 0.0
            try:
                if self.resource_version is None:
                    self._list()
                if not self._follow():
                    self.failures += 1
                    delay = self._backoff()
                    log.warning("watch ended at once without events", extra=self._extra(delay=delay))
            except ApiException as exc:
                if self._stop.is_set():
                    break
                self.failures += 1
                if exc.status == 410:
                    self.resource_version = None  # relist: events we would need are gone
                    delay = 0.0 if self.failures == 1 else self._backoff(self.failures - 1)
                    log.info("resourceVersion expired; relisting", extra=self._extra(delay=delay))
                else:
                    delay = self._backoff()
                    extra = self._extra(delay=delay, status=exc.status, error=str(exc.reason))
                    if exc.status in (403, 404):
                        extra["hint"] = "are the sidemesh CRDs installed and the controller's RBAC applied?"
                    log.warning("API server refused list/watch", extra=extra)
            except Exception as exc:  # connection refused/reset/timed out, bad JSON: retry, never die
                if self._stop.is_set():
                    break
                self.failures += 1
                delay = self._backoff()
                log.warning(
                    "list/watch failed; reconnecting", extra=self._extra(delay=delay, error=repr(exc))
                )
            if delay:
                self._stop.wait(delay)

    def _backoff(self, failures: int | None = None) -> float:
        n = self.failures if failures is None else failures
        return backoff_delay(n, self._s.backoff_initial, self._s.backoff_max)

    def _extra(self, **more: Any) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "resource_version": self.resource_version,
            "failures": self.failures,
            **more,
        }

    def _list(self) -> None:
        items: list[Obj] = []
        version, token = None, None
        while True:
            kwargs: dict[str, Any] = {"limit": self._s.list_page_size, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            response = self._list_fn(**kwargs, _request_timeout=self._s.request_timeout)
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
            meta = body.get("metadata") or {}
            version = version or meta.get("resourceVersion")
            items.extend(i for i in body.get("items") or [] if isinstance(i, dict))
            token = meta.get("continue")
            if not token:
                break
        if not version:
            raise ValueError(f"{self.kind} list has no metadata.resourceVersion")
        self._post(_Reset(self.kind, items))
        self.resource_version = str(version)
        log.debug("listed", extra=self._extra(items=len(items)))

    def _follow(self) -> bool:
        """Watch from the current resourceVersion until the server ends the watch. False when it
        ended at once without a single event (a server closing on us: back off)."""
        if self._stop.is_set():
            return True
        started, events = time.monotonic(), 0
        timeout = self._s.watch_timeout_seconds
        stream = self._watch.stream(
            self._list_fn,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(self._s.request_timeout, timeout + self._s.request_timeout),
        )
        for event in stream:
            if self._stop.is_set():
                return True
            obj, kind = event.get("raw_object"), event.get("type")
            if not isinstance(obj, dict):
                continue
            if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                log.warning("unexpected watch event", extra=self._extra(type=kind))
                continue
            self.failures, events = 0, events + 1
            version = _meta(obj).get("resourceVersion")
            if version:
                self.resource_version = str(version)
            if kind != "BOOKMARK":  # a bookmark only moves the resourceVersion
                self._post(_Event(self.kind, kind, obj))
        if events or time.monotonic() - started >= min(1.0, timeout / 2):
            self.failures = 0
            return True
        return False


async def _in_thread(fn: Callable[[], T], name: str) -> T:
    """Run ``fn`` in a daemon thread (never holds up interpreter exit, unlike the executor)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


# -- the source -----------------------------------------------------------------------------------


def api_client_from(kubeconfig: Path | None) -> Any:
    """A ``kubernetes.client.ApiClient`` from a kubeconfig file, or from the pod's in-cluster config."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        kube_config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    else:
        kube_config.load_incluster_config(client_configuration=configuration)
    # One long-lived connection per watch, plus status writes.
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize, len(KINDS) + 4)
    return client.ApiClient(configuration)


class KubernetesSource:
    def __init__(
        self,
        api_client: Any,
        resync_backoff_max: float = 30.0,
        *,
        backoff_initial: float = 0.5,
        watch_timeout_seconds: int = 300,
        request_timeout: float = 30.0,
        list_page_size: int = 500,
        status_retry_seconds: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = Settings(
            backoff_initial,
            resync_backoff_max,
            watch_timeout_seconds,
            request_timeout,
            list_page_size,
            status_retry_seconds,
        )
        self.clock = clock
        core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
        self._custom = custom
        self._lists: dict[str, Callable[..., Any]] = {
            "namespaces": core.list_namespace,
            "serviceaccounts": core.list_service_account_for_all_namespaces,
            "pods": core.list_pod_for_all_namespaces,
            "services": core.list_service_for_all_namespaces,
            "endpointslices": client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces,
            PLURAL: functools.partial(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL),
        }
        self.entries: dict[str, dict[str, Converted[Any]]] = {kind: {} for kind in KINDS}
        self.listed: set[str] = set()
        self.snapshot: Snapshot | None = None
        self.watchers: list[_Watcher] = []
        self._written: dict[str, AuthorizationStatus] = {}  # what we last wrote, by policy uid

    async def run(self, on_change: OnChange) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Reset | _Event] = asyncio.Queue()
        stop, status_wanted = threading.Event(), asyncio.Event()

        def post(message: _Reset | _Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, message)
            except RuntimeError:  # the loop is closed: we are shutting down
                stop.set()

        self.watchers = [_Watcher(kind, self._lists[kind], post, stop, self.settings) for kind in KINDS]
        for w in self.watchers:
            w.thread.start()
        writer = asyncio.create_task(self._write_statuses(status_wanted), name="sidemesh-status-writer")
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                for message in batch:
                    self._apply(message)
                if len(self.listed) < len(KINDS):
                    continue  # never serve a half-known cluster
                self._publish(assemble(self.entries), on_change)
                status_wanted.set()
        finally:
            stop.set()
            for w in self.watchers:
                w.interrupt()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            watchers = self.watchers

            def join() -> None:
                for w in watchers:
                    w.thread.join()

            with contextlib.suppress(TimeoutError):  # daemon threads: they cannot hold up exit
                await asyncio.wait_for(_in_thread(join, "sidemesh-source-stop"), 2.0)

    def _apply(self, message: _Reset | _Event) -> None:
        if isinstance(message, _Reset):
            self.entries[message.kind] = {object_key(o): convert(message.kind, o) for o in message.items}
            self.listed.add(message.kind)
        elif message.type == "DELETED":
            self.entries[message.kind].pop(object_key(message.obj), None)
        else:
            self.entries[message.kind][object_key(message.obj)] = convert(message.kind, message.obj)

    def _publish(self, snapshot: Snapshot, on_change: OnChange) -> None:
        if snapshot == self.snapshot:
            return  # e.g. a pod's status heartbeat: nothing the mesh uses changed
        known = set(self.snapshot.errors) if self.snapshot else set()
        if self.snapshot is None:
            log.info(
                "initial list complete",
                extra={k: len(v) for k, v in self.entries.items()},
            )
        for error in snapshot.errors:
            if error not in known:
                log.error("invalid resource ignored; everything else still applies", extra={"error": error})
        self.snapshot = snapshot
        on_change(snapshot)

    # -- ServiceAuthorization status -------------------------------------------------------------

    def status_plan(self) -> list[tuple[PolicyObject, AuthorizationStatus]]:
        """Statuses that differ from what we last wrote (or, first, from what the object has)."""
        workloads: dict[str, list[Workload]] = defaultdict(list)
        for w in self.snapshot.workloads if self.snapshot else ():
            workloads[w.namespace].append(w)
        now, plan, live = self.clock.now(), [], set()
        for entry in self.entries[PLURAL].values():
            p = entry.value
            if not isinstance(p, PolicyObject):
                continue
            live.add(p.key)
            previous = self._written.get(p.key) or p.observed
            selected = selected_workloads(p.policy, workloads[p.namespace]) if p.policy else 0
            desired = desired_status(p, selected, previous, now)
            if desired != previous:
                plan.append((p, desired))
        for gone in set(self._written) - live:
            del self._written[gone]
        return plan

    async def _write_statuses(self, wanted: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        retry: asyncio.TimerHandle | None = None

        def again() -> None:
            nonlocal retry
            retry = None
            wanted.set()

        try:
            while True:
                await wanted.wait()
                wanted.clear()
                plan = self.status_plan()
                if not plan:
                    continue
                results = await _in_thread(functools.partial(self._patch_all, plan), "sidemesh-status-write")
                for (p, status), outcome in zip(plan, results, strict=True):
                    if outcome == "written":
                        self._written[p.key] = status
                if "failed" in results and retry is None:
                    retry = loop.call_later(self.settings.status_retry_seconds, again)
        finally:
            if retry is not None:
                retry.cancel()

    def _patch_all(self, plan: list[tuple[PolicyObject, AuthorizationStatus]]) -> list[str]:
        """In a thread: one merge patch of the status subresource per policy. Never raises."""
        outcomes = []
        for p, status in plan:
            try:
                self._custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    p.namespace,
                    PLURAL,
                    p.name,
                    {"status": status},
                    _request_timeout=self.settings.request_timeout,
                )
                outcomes.append("written")
            except ApiException as exc:
                outcomes.append("gone" if exc.status == 404 else "failed")
                if exc.status != 404:
                    log.warning(
                        "cannot write ServiceAuthorization status",
                        extra={
                            "policy": f"{p.namespace}/{p.name}",
                            "status": exc.status,
                            "error": str(exc.reason),
                        },
                    )
            except Exception as exc:
                outcomes.append("failed")
                log.warning(
                    "cannot write ServiceAuthorization status",
                    extra={"policy": f"{p.namespace}/{p.name}", "error": repr(exc)},
                )
        return outcomes
