"""The Kubernetes source: list+watch what the mesh is made of and hand the controller whole Snapshots.

One daemon thread per kind runs client-go's reflector loop with the sync `kubernetes` client: list
(paged), remember the list's resourceVersion, watch from it with bookmarks and a server-side
timeout, move the resourceVersion on every event and bookmark, resume from it when a watch ends or
drops (exponential backoff, capped, on errors), relist on 410 Gone. The threads only post what
they saw to the event loop, which owns the stores, converts objects into domain values with the
pure functions of ``kube_convert``, calls ``on_change`` once every kind has been listed, and
writes each ServiceAuthorization's ``status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes import client, watch
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from controller.sources import OnChange
from controller.sources.kube_convert import (
    GROUP,
    KINDS,
    PLURAL,
    VERSION,
    AuthorizationStatus,
    Converted,
    Obj,
    PolicyObject,
    assemble,
    backoff_delay,
    convert,
    desired_status,
    metadata_of,
    object_key,
    selected_workloads,
)
from sidemesh.clock import SYSTEM_CLOCK, Clock
from sidemesh.mesh.resources import Snapshot, Workload

log = logging.getLogger("sidemesh.controller.kubernetes")
T = TypeVar("T")


class ListError(Exception):
    """One kind could not be listed: what the API server said, and what to check."""

    def __init__(self, kind: str, status: int | None, reason: str | None) -> None:
        hint = {
            401: "the kubeconfig's credentials were refused",
            403: f"the kubeconfig's user may not list {kind} (RBAC: list on pods, services, "
            "endpointslices, namespaces and serviceauthorizations)",
            404: f"no {kind} resource here: are the sidemesh CRDs installed (manifests/crds)?",
        }.get(status or 0, "is the API server healthy?")
        super().__init__(f"listing {kind} failed: {status} {reason}; {hint}")


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


MAX_CONDITIONS = 8  # the CRD's maxItems for status.conditions


@dataclass(frozen=True, slots=True)
class Settings:
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    watch_timeout_seconds: int = 300
    request_timeout: float = 30.0
    # A watch that sends nothing for this long is taken as dead (a half-open connection: the API
    # server sends a BOOKMARK about every minute); resumed from its resourceVersion.
    watch_idle_seconds: float = 120.0
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
            except urllib3.exceptions.ReadTimeoutError:
                if self._stop.is_set():
                    break
                log.info(
                    "watch silent; reconnecting",
                    extra=self._extra(idle_seconds=self._s.watch_idle_seconds),
                )
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
        paged = True
        while True:
            kwargs: dict[str, Any] = {"_preload_content": False}
            if paged:
                kwargs["limit"] = self._s.list_page_size
            if token:
                kwargs["_continue"] = token
            try:
                response = self._list_fn(**kwargs, _request_timeout=self._s.request_timeout)
            except ApiException as exc:
                if exc.status != 410 or not token:
                    raise
                # The continue token outlived etcd's compaction (a long list in a big cluster):
                # paging again would expire again. One list, unpaged, as client-go's pager does.
                log.info("list continue token expired; listing in one page", extra=self._extra())
                items, version, token, paged = [], None, None, False
                continue
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
            _request_timeout=(
                self._s.request_timeout,
                min(timeout + self._s.request_timeout, self._s.watch_idle_seconds),
            ),
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
            version = metadata_of(obj).get("resourceVersion")
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
        watch_idle_seconds: float = 120.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = Settings(
            backoff_initial,
            resync_backoff_max,
            watch_timeout_seconds,
            request_timeout,
            watch_idle_seconds,
            list_page_size,
            status_retry_seconds,
        )
        self.clock = clock
        core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
        self._custom = custom
        self._lists: dict[str, Callable[..., Any]] = {
            "namespaces": core.list_namespace,
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

    def list_once(self) -> Snapshot:
        """The cluster as one list of every kind shows it: no watch, no status written (what
        `sidemesh authz check --kubeconfig` reads: a check must not write to the cluster, and
        watch threads left blocked at exit could abort the interpreter)."""
        stop = threading.Event()
        for kind in KINDS:
            try:
                _Watcher(kind, self._lists[kind], self._apply, stop, self.settings)._list()
            except ApiException as exc:
                raise ListError(kind, exc.status, exc.reason) from exc
        return assemble(self.entries)

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
                log.error(
                    "invalid resource: an invalid ServiceAuthorization allows nothing until fixed, an invalid default-policy annotation counts as deny, anything else is ignored; everything else still applies",
                    extra={"error": error},
                )
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
            enforced = p.policy or p.stand_in  # an invalid policy's stand-in blocks what it selects
            selected = selected_workloads(enforced, workloads[p.namespace]) if enforced else 0
            desired = desired_status(p, selected, previous, now)
            # Against what we wrote last (not against the live object: two controller replicas
            # would take each other's writes, stamped a second apart, for overwrites, for good).
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
                    {
                        "status": {
                            **status,
                            "conditions": [*p.other_conditions[: MAX_CONDITIONS - 1], *status["conditions"]],
                        }
                    },
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
