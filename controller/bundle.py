"""The trust bundle in every meshed namespace: the ConfigMap ``sidemesh-trust-bundle``.

Injected pods mount the roots they trust from a ConfigMap in their own namespace (a ConfigMap
volume cannot reach into another namespace), so the controller keeps one in every namespace
labelled for injection, as istiod does for ``istio-ca-root-cert``: created when missing, replaced
when its data is not exactly the controller's own trust bundle (the file of ``--bundle-file``),
left alone when it is. Nothing is ever deleted: a namespace that leaves the mesh keeps its
ConfigMap (its pods may still mount it).

Level-triggered: every ``interval`` a round lists the labelled namespaces and reads each one's
ConfigMap, which also repairs a deleted or edited one and retries whatever failed (an error in
one namespace never stops the others). A change of the bundle file starts a round at once, and a
watch on the labelled namespaces brings a newly labelled one its ConfigMap within moments. What to
write is decided by the pure :func:`plan`; the rest is the sync ``kubernetes`` client in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from controller.sources.kube_convert import Obj, backoff_delay, metadata_of
from sidemesh.identity.svid import load_bundle

log = logging.getLogger("sidemesh.controller.bundle")

CONFIGMAP_NAME = "sidemesh-trust-bundle"
BUNDLE_KEY = "root-cert.pem"
MANAGED_BY_LABEL, MANAGED_BY = "app.kubernetes.io/managed-by", "sidemesh"
INJECT_SELECTOR = "sidemesh.io/inject=enabled"
POD_SECURITY_ENFORCE = "pod-security.kubernetes.io/enforce"


# -- what to write (pure) -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """One ConfigMap to create (POST) or replace (PUT), and the body to send."""

    namespace: str
    verb: Literal["create", "replace"]
    body: Obj


def bundle_text(pem: bytes) -> str:
    """The bundle file as ConfigMap data; ValueError unless it is PEM certificates."""
    load_bundle(pem)  # an empty or broken file must never reach every meshed namespace
    return pem.decode()


def desired_write(namespace: str, existing: Obj | None, bundle: str) -> Write | None:
    """None when ``existing`` already holds exactly ``bundle``. A replacement keeps the existing
    object's metadata (resourceVersion included: a concurrent change fails it with 409)."""
    data = {BUNDLE_KEY: bundle}
    if existing is None:
        meta = {"name": CONFIGMAP_NAME, "namespace": namespace, "labels": {MANAGED_BY_LABEL: MANAGED_BY}}
        return Write(
            namespace, "create", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}
        )
    if existing.get("data") == data and not existing.get("binaryData"):
        return None
    meta = {k: v for k, v in metadata_of(existing).items() if k != "managedFields"}
    body = {k: v for k, v in existing.items() if k not in ("binaryData", "metadata", "data")}
    body.update(apiVersion="v1", kind="ConfigMap", metadata=meta, data=data)
    return Write(namespace, "replace", body)


def plan(namespaces: Iterable[Obj], existing: Mapping[str, Obj | None], bundle: str) -> list[Write]:
    """The writes that leave every namespace holding exactly ``bundle``.

    ``namespaces``: Namespace objects as listed. ``existing``: for each namespace whose ConfigMap
    could be read, that ConfigMap, or None when there is none; a namespace missing from it is
    skipped (its read failed: the next round tries again), and so is one being deleted (the API
    server refuses new objects there).
    """
    writes = []
    for ns in namespaces:
        meta = metadata_of(ns)
        name = _name(ns)
        terminating = meta.get("deletionTimestamp") or (ns.get("status") or {}).get("phase") == "Terminating"
        if name in existing and not terminating:
            write = desired_write(name, existing[name], bundle)
            if write is not None:
                writes.append(write)
    return writes


# -- the namespace watch (a hint; the rounds are the truth) -------------------------------------


class _NamespaceWatch:
    """Labelled namespaces as they come and go, from a daemon thread. It restarts without a
    resourceVersion whenever it ends (the server then sends every current one as ADDED): it only
    makes the publisher look sooner, so it needs none of the reflector's bookkeeping."""

    def __init__(
        self,
        list_fn: Callable[..., Any],
        post: Callable[[str, Obj], None],
        *,
        timeout_seconds: int,
        request_timeout: float,
        backoff_max: float,
    ) -> None:
        self._list_fn, self._post = list_fn, post
        self._timeout, self._request_timeout, self._backoff_max = (
            timeout_seconds,
            request_timeout,
            backoff_max,
        )
        self._watch = watch.Watch(return_type="object")  # events as plain JSON dicts
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sidemesh-bundle-watch", daemon=True)

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()  # shuts the socket down: a blocked read returns at once

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started, events, error = time.monotonic(), 0, ""
            try:
                for event in self._watch.stream(
                    self._list_fn,
                    timeout_seconds=self._timeout,
                    _request_timeout=(self._request_timeout, self._timeout + self._request_timeout),
                ):
                    if self._stop.is_set():
                        return
                    obj, kind = event.get("raw_object"), event.get("type")
                    if isinstance(obj, dict) and kind in ("ADDED", "MODIFIED", "DELETED"):
                        events += 1
                        self._post(kind, obj)
            except Exception as exc:  # refused, reset, 403: the rounds still run; retry with backoff
                error = repr(exc)
            if self._stop.is_set():
                return
            if not error and (events or time.monotonic() - started >= 1.0):
                failures = 0
                continue
            failures += 1
            delay = backoff_delay(failures, 0.5, self._backoff_max)
            log.warning(
                "namespace watch failed; the periodic check still runs",
                extra={"error": error or "ended at once", "failures": failures, "delay": delay},
            )
            self._stop.wait(delay)


# -- the publisher --------------------------------------------------------------------------------


class BundlePublisher:
    def __init__(
        self,
        api_client: Any,
        bundle_file: Path,
        label_selector: str = INJECT_SELECTOR,
        interval: float = 30.0,
        *,
        watch_namespaces: bool = True,
        bundle_poll: float = 1.0,
        request_timeout: float = 10.0,
        watch_timeout_seconds: int = 300,
        backoff_max: float = 30.0,
    ) -> None:
        self._core = client.CoreV1Api(api_client)
        self.bundle_file = bundle_file
        self.label_selector = label_selector
        self.interval = interval
        self.watch_namespaces = watch_namespaces
        self.bundle_poll = bundle_poll
        self.request_timeout = request_timeout
        self.watch_timeout_seconds = watch_timeout_seconds
        self.backoff_max = backoff_max
        self.bundle: str | None = None  # what is published: the last good content of the file
        self.watcher: _NamespaceWatch | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._problem: str | None = None
        self._current: dict[str, tuple[str, str]] = {}  # namespace -> (uid, bundle) seen in place
        self._nudged: dict[str, Obj] = {}  # namespaces the watch reported since the last look
        self._pod_security: dict[str, str] = {}  # namespace -> the Pod Security level warned about

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_event(kind: str, ns: Obj) -> None:  # on the loop
            name = _name(ns)
            if kind == "DELETED":  # deleted, or no longer labelled: we leave its ConfigMap alone
                self._current.pop(name, None)
            elif name:
                self._nudged[name] = ns
                wake.set()

        def post(kind: str, ns: Obj) -> None:  # in the watch thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
                loop.call_soon_threadsafe(on_event, kind, ns)

        if self.watch_namespaces:
            self.watcher = _NamespaceWatch(
                functools.partial(self._core.list_namespace, label_selector=self.label_selector),
                post,
                timeout_seconds=self.watch_timeout_seconds,
                request_timeout=self.request_timeout,
                backoff_max=self.backoff_max,
            )
            self.watcher.thread.start()
        due = loop.time()
        try:
            while True:
                wake.clear()
                if self._reload_bundle():
                    due = loop.time()
                if self.bundle is not None and loop.time() >= due:
                    self._nudged.clear()
                    await self._round()
                    due = loop.time() + self.interval
                elif self.bundle is not None and self._nudged:
                    nudged, self._nudged = list(self._nudged.values()), {}
                    await self._sync(nudged, recheck=False)
                until_due = self.bundle_poll if self.bundle is None else max(0.0, due - loop.time())
                # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that arrives as the
                # event is set, and a watch event can set it at any moment.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(until_due, self.bundle_poll)):
                        await wake.wait()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
                await asyncio.to_thread(self.watcher.thread.join, 2.0)  # daemon: never holds up exit

    def _reload_bundle(self) -> bool:
        """Re-read the bundle file when it changed; True when the bundle to publish changed."""
        try:
            st = os.stat(self.bundle_file)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return False
            pem = self.bundle_file.read_bytes()
            self._stamp = stamp
            text = bundle_text(pem)
        except (OSError, ValueError) as exc:
            problem = f"{self.bundle_file}: {exc.strerror if isinstance(exc, OSError) else exc}"
            if problem != self._problem:
                self._problem = problem
                state = "keeping the last good one" if self.bundle is not None else "nothing is published"
                log.error(f"trust bundle unreadable; {state}", extra={"error": problem})
            return False
        self._problem = None
        if text == self.bundle:
            return False
        self.bundle = text
        log.info(
            "trust bundle to publish", extra={"file": str(self.bundle_file), "roots": len(load_bundle(pem))}
        )
        return True

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        """One API call in a worker thread; the object as JSON (ApiException on an error status)."""

        def call() -> Obj:
            response = fn(*args, **kwargs, _preload_content=False, _request_timeout=self.request_timeout)
            try:
                body: Obj = json.loads(response.data)
                return body
            finally:
                response.release_conn()

        return await asyncio.to_thread(call)

    async def _round(self) -> None:
        try:
            listed = await self._call(self._core.list_namespace, label_selector=self.label_selector)
        except Exception as exc:
            log.warning(
                "cannot list namespaces to publish the trust bundle; trying again next round",
                extra=_error(exc, selector=self.label_selector),
            )
            return
        namespaces = [n for n in listed.get("items") or [] if isinstance(n, dict) and _name(n)]
        names = set(map(_name, namespaces))
        self._current = {k: v for k, v in self._current.items() if k in names}
        await self._sync(namespaces, recheck=True)

    async def _sync(self, namespaces: list[Obj], *, recheck: bool) -> None:
        """Read each namespace's ConfigMap, then write what :func:`plan` says. ``recheck=False``
        (a watch event): skip namespaces whose ConfigMap was seen current since they appeared."""
        bundle = self.bundle
        assert bundle is not None
        for ns in namespaces:
            self._check_pod_security(ns)
        uids = {_name(n): str(metadata_of(n).get("uid") or "") for n in namespaces}
        if not recheck:
            namespaces = [n for n in namespaces if self._current.get(_name(n)) != (uids[_name(n)], bundle)]
        existing: dict[str, Obj | None] = {}
        for name in map(_name, namespaces):
            try:
                existing[name] = await self._call(self._core.read_namespaced_config_map, CONFIGMAP_NAME, name)
            except ApiException as exc:
                if exc.status == 404:
                    existing[name] = None
                else:
                    self._failed(name, "read", exc)
            except Exception as exc:
                self._failed(name, "read", exc)
        for name, cm in existing.items():
            if cm is not None and desired_write(name, cm, bundle) is None:
                self._current[name] = (uids[name], bundle)
        for write in plan(namespaces, existing, bundle):
            await self._write(write, uids[write.namespace], bundle)

    def _check_pod_security(self, ns: Obj) -> None:
        """A meshed namespace that enforces Pod Security baseline or restricted refuses every
        injected pod (the init container's NET_ADMIN and NET_RAW), and only the ReplicaSets'
        events would say so: said once per namespace and level, in the controller's log."""
        name = _name(ns)
        labels = metadata_of(ns).get("labels") or {}
        level = str(labels.get(POD_SECURITY_ENFORCE, "")) if isinstance(labels, dict) else ""
        if level not in ("baseline", "restricted"):
            self._pod_security.pop(name, None)
            return
        if self._pod_security.get(name) == level:
            return
        self._pod_security[name] = level
        log.warning(
            "meshed namespace enforces Pod Security: its injected pods will be refused (the sidecar's "
            "init container needs NET_ADMIN and NET_RAW); label it "
            f"{POD_SECURITY_ENFORCE}=privileged, or take {INJECT_SELECTOR} off it",
            extra={"namespace": name, "level": level},
        )

    async def _write(self, write: Write, uid: str, bundle: str) -> None:
        ns = write.namespace
        if write.verb == "replace" and write.body.get("immutable") is True:
            # The API server refuses any change to its data (422, "field is immutable"), every
            # round for good; only deleting it lets the controller create it anew.
            log.warning(
                "cannot publish the trust bundle in this namespace: its ConfigMap is immutable; trying "
                "again next round",
                extra={
                    "namespace": ns,
                    "configmap": CONFIGMAP_NAME,
                    "hint": f"kubectl -n {ns} delete configmap {CONFIGMAP_NAME} (the controller creates it "
                    "again, mutable, with the current roots)",
                },
            )
            return
        try:
            if write.verb == "create":
                await self._call(self._core.create_namespaced_config_map, ns, write.body)
            else:
                await self._call(self._core.replace_namespaced_config_map, CONFIGMAP_NAME, ns, write.body)
        except ApiException as exc:
            if exc.status == 409:  # created or changed meanwhile (another replica?): look again next round
                log.info(
                    "trust bundle ConfigMap changed meanwhile; checking again next round",
                    extra=_error(exc, namespace=ns, configmap=CONFIGMAP_NAME),
                )
            else:
                self._failed(ns, write.verb, exc)
            return
        except Exception as exc:
            self._failed(ns, write.verb, exc)
            return
        self._current[ns] = (uid, bundle)
        log.info(
            "trust bundle ConfigMap created" if write.verb == "create" else "trust bundle ConfigMap updated",
            extra={"namespace": ns, "configmap": CONFIGMAP_NAME},
        )

    def _failed(self, namespace: str, action: str, exc: Exception) -> None:
        extra = _error(exc, namespace=namespace, configmap=CONFIGMAP_NAME, action=action)
        if isinstance(exc, ApiException) and exc.status == 403:
            extra["hint"] = "does the controller's ClusterRole allow get, create and update on configmaps?"
        log.warning("cannot publish the trust bundle in this namespace; trying again next round", extra=extra)


def _name(obj: Obj) -> str:
    return str(metadata_of(obj).get("name") or "")


def _error(exc: Exception, **extra: Any) -> dict[str, Any]:
    if isinstance(exc, ApiException):
        return {**extra, "status": exc.status, "error": str(exc.reason)}
    return {**extra, "error": repr(exc)}
