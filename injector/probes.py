"""Rewrite the app's probes to the sidecar's health port (no I/O).

Under the iptables capture the kubelet's probe connections to the pod IP are redirected to the
sidecar's inbound listener like any other inbound connection: a plaintext HTTP or gRPC probe is
refused in strict mode, and a TCP probe is accepted by the sidecar itself, so it would report the
app alive even when it is not listening. So every network probe (httpGet, tcpSocket, grpc) of an app
container becomes `httpGet :15020/app-health/<container>/<kind>` (the health port is never
captured), and the original is recorded in the sidecar's SIDEMESH_APP_PROBES environment variable
(JSON, path -> probe); the sidecar runs it against the app on 127.0.0.1, which is not captured
either. `exec` probes run inside the container and never cross the capture: left as they are.

The app's own native sidecars (init containers with `restartPolicy: Always`) keep running beside
the app, under the capture: their probes are rewritten too. In classic mode their startup probe
is not: it runs and passes before the capture is installed, and the proxy that would answer the
rewritten one only starts after it.

A probe is also left alone when it names another `host` (it does not go to this pod), when its
named port does not resolve (the kubelet would fail it anyway; rewriting would hide the mistake),
or when it already targets one of the proxy's own ports.

The app's `httpGet` lifecycle hooks cross the capture the same way (the kubelet sends them to the
pod IP): a strict sidecar refused them, so a pod with a `postStart` hook was killed
(FailedPostStartHook) and a `preStop` one silently never drained. They become
`/app-health/<container>/poststart` and `/prestop` too (Istio rewrites them likewise), with the
time the kubelet gives them: the pod's grace period for `preStop`, ``POST_START_S`` for `postStart`
(which the kubelet does not bound).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from injector.errors import PodError

Json = dict[str, Any]

HEALTH_PORT = 15020
PROXY_PORTS = frozenset({15000, 15001, 15006, HEALTH_PORT})
APP_PROBES_ENV = "SIDEMESH_APP_PROBES"
KINDS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
HOOKS = {"postStart": "poststart", "preStop": "prestop"}
POST_START_S = 600
DEFAULT_GRACE_S = 30  # terminationGracePeriodSeconds when the pod does not say
MIN_PRE_STOP_S = 2  # the kubelet gives a preStop hook at least this long (a grace period of 0 too)
_HANDLERS = ("httpGet", "tcpSocket", "grpc", "exec")


def app_health_path(container: str, kind: str) -> str:
    return f"/app-health/{container}/{kind}"


def _resolve_port(port: Any, container: Json) -> int | None:
    if isinstance(port, bool):
        return None
    if isinstance(port, int):
        return port
    if isinstance(port, str):
        for p in container.get("ports") or []:
            if isinstance(p, dict) and p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def _handler(probe: Json, kind: str, where: str) -> Json:
    handler = probe[kind] or {}
    if not isinstance(handler, dict):
        raise PodError(f"{where}.{kind} must be a map, not {type(handler).__name__}")
    return handler


def _headers(get: Json, where: str) -> list[Json]:
    """httpGet.httpHeaders as the kubelet reads them (a header without a value sends an empty one)."""
    headers = get.get("httpHeaders") or []
    if not isinstance(headers, list) or not all(isinstance(h, dict) and h.get("name") for h in headers):
        raise PodError(f"{where}.httpGet.httpHeaders must be a list of {{name, value}} maps")
    return [{"name": str(h["name"]), "value": str(h.get("value") or "")} for h in headers]


def _original(probe: Json, container: Json, where: str = "probe") -> Json | None:
    """The record the sidecar needs to run ``probe`` itself, or None to leave the probe alone.
    A handler of the wrong shape is a PodError naming it (it was a crash: a 500 from the webhook)."""
    timeout = probe.get("timeoutSeconds", 1)
    if "httpGet" in probe:
        get = _handler(probe, "httpGet", where)
        if get.get("host"):
            return None
        port = _resolve_port(get.get("port"), container)
        if port is None or port in PROXY_PORTS:
            return None
        record: Json = {"path": get.get("path") or "/", "port": port, "scheme": get.get("scheme") or "HTTP"}
        if headers := _headers(get, where):
            record["httpHeaders"] = headers
        return {"httpGet": record, "timeoutSeconds": timeout}
    if "tcpSocket" in probe:
        tcp = _handler(probe, "tcpSocket", where)
        port = _resolve_port(tcp.get("port"), container)
        if tcp.get("host") or port is None or port in PROXY_PORTS:
            return None
        return {"tcpSocket": {"port": port}, "timeoutSeconds": timeout}
    if "grpc" in probe:
        grpc = _handler(probe, "grpc", where)
        port = _resolve_port(grpc.get("port"), container)
        if port is None or port in PROXY_PORTS:
            return None
        return {"grpc": {"port": port, "service": grpc.get("service") or ""}, "timeoutSeconds": timeout}
    return None  # exec, or no handler at all


def rewrite_container(
    container: Json, fields: tuple[str, ...] = tuple(KINDS)
) -> tuple[Json, dict[str, Json]]:
    """The container with its network probes (of ``fields``) pointed at the sidecar, and path ->
    original probe."""
    name = str(container.get("name", ""))
    out = container
    records: dict[str, Json] = {}
    for field in fields:
        kind = KINDS[field]
        probe = container.get(field)
        if not isinstance(probe, dict):
            continue
        record = _original(probe, container, f"container {name}: {field}")
        if record is None:
            continue
        path = app_health_path(name, kind)
        records[path] = record
        if out is container:
            out = copy.copy(container)
        rewritten = {k: v for k, v in probe.items() if k not in _HANDLERS}
        rewritten["httpGet"] = {"path": path, "port": HEALTH_PORT, "scheme": "HTTP"}
        out[field] = rewritten
    return out, records


def rewrite_hooks(
    container: Json, grace: int, excluded: frozenset[int] | None = frozenset(), classic: bool = False
) -> tuple[Json, dict[str, Json]]:
    """The container with its `httpGet` lifecycle hooks pointed at the sidecar, and path -> the
    original as a probe record (``grace``: the pod's terminationGracePeriodSeconds). A hook on an
    inbound port the capture lets through (``excluded``; None: every port, `*`) reaches the app
    without the sidecar: left alone (rewritten, it would depend on the sidecar's drain)."""
    lifecycle = container.get("lifecycle")
    if not isinstance(lifecycle, dict):
        return container, {}
    name = str(container.get("name", ""))
    hooks = lifecycle
    records: dict[str, Json] = {}
    for hook, kind in HOOKS.items():
        handler = lifecycle.get(hook)
        if not isinstance(handler, dict) or "httpGet" not in handler:
            continue
        timeout = POST_START_S if hook == "postStart" else max(grace, MIN_PRE_STOP_S)
        as_probe = {"httpGet": handler["httpGet"], "timeoutSeconds": timeout}
        record = _original(as_probe, container, f"container {name}: lifecycle.{hook}")
        if record is None or excluded is None or record["httpGet"]["port"] in excluded:
            continue
        path = app_health_path(name, kind)
        if hook == "preStop":  # classic: the sidecar is stopped as it starts, its drain waits
            record["drainWaits"] = classic  # (said either way: without it, a sidecar waits)
        records[path] = record
        if hooks is lifecycle:
            hooks = dict(lifecycle)
        hooks[hook] = {"httpGet": {"path": path, "port": HEALTH_PORT, "scheme": "HTTP"}}
    if hooks is lifecycle:
        return container, {}
    out = copy.copy(container)
    out["lifecycle"] = hooks
    return out, records


def encode(records: dict[str, Json]) -> str:
    """The SIDEMESH_APP_PROBES value: compact JSON, keys sorted so a pod's patch is stable."""
    return json.dumps(records, sort_keys=True, separators=(",", ":"))
