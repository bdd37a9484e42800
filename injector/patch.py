"""Pod in, JSON Patch out (no I/O): the webhook and `sidemesh inject` share this.

As Istio's `createPatch`, the desired pod is built from the original and the two are diffed
(`diff.py`: JSON Patch with named lists aligned by name), so the patch is exactly what changed. A pod is skipped (empty patch) when it
opts out, uses the host's network, or was injected already: the `sidemesh.io/status` annotation
records what was added, which makes a second pass (`reinvocationPolicy: IfNeeded`) a no-op.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from injector import containers, probes
from injector.containers import PodOptions
from injector.diff import diff
from injector.errors import PodError
from injector.settings import InjectionSettings, Resources, quantity
from sidemesh.config import parse_cidr
from sidemesh.mesh.delivery import OPAQUE_PORTS
from sidemesh.mesh.resources import DEFAULT_POLICY_ANNOTATION
from sidemesh.policy.model import DefaultPolicy

Json = dict[str, Any]

INJECT = "sidemesh.io/inject"
OPT_OUT = frozenset({"false", "disabled"})  # as the namespace label says it: enabled / disabled
OPT_IN = frozenset({"", "true", "enabled"})
STATUS = "sidemesh.io/status"
NATIVE = "sidemesh.io/native-sidecar"
REWRITE_PROBES = "sidemesh.io/rewrite-app-probes"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
PROMETHEUS = {"prometheus.io/scrape": "true", "prometheus.io/port": "15020", "prometheus.io/path": "/metrics"}
MERGE_METRICS = "sidemesh.io/merge-metrics"
# Istio's and Linkerd's own opt-outs, as a pod moved from them carries them: honoured. Istio's
# injector reads any value but these as "no"; Linkerd's says "disabled".
ISTIO_INJECT = "sidecar.istio.io/inject"
ISTIO_YES = frozenset({"y", "yes", "true", "on"})
LINKERD_INJECT = "linkerd.io/inject"


def _other_mesh_opt_out(key: str, value: str) -> bool:
    value = value.strip().lower()
    return value not in ISTIO_YES if key == ISTIO_INJECT else key == LINKERD_INJECT and value == "disabled"


# Their annotations that have a Sidemesh equivalent, which is not read from them: a warning.
OTHER_MESH_ANNOTATIONS = {
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "sidemesh.io/exclude-outbound-cidrs",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "sidemesh.io/exclude-outbound-ports",
    "traffic.sidecar.istio.io/excludeInboundPorts": "sidemesh.io/exclude-inbound-ports",
    "traffic.sidecar.istio.io/includeOutboundIPRanges": None,
    "traffic.sidecar.istio.io/includeInboundPorts": None,
    "config.linkerd.io/skip-outbound-ports": "sidemesh.io/exclude-outbound-ports",
    "config.linkerd.io/skip-inbound-ports": "sidemesh.io/exclude-inbound-ports",
    "config.linkerd.io/opaque-ports": "sidemesh.io/opaque-ports",
    "sidecar.istio.io/rewriteAppHTTPProbers": "sidemesh.io/rewrite-app-probes",
    "prometheus.istio.io/merge-metrics": "sidemesh.io/merge-metrics",
}
# The app's scrape annotations, pointed at the sidecar, which serves its metrics and the app's
# there (an unmeshed Prometheus is refused by the app's port under strict mTLS), as Istio does.
MERGED = {"prometheus.io/port": "15020", "prometheus.io/path": "/stats/prometheus"}
EXCLUSIONS = {
    "sidemesh.io/exclude-inbound-ports": "--exclude-inbound-ports",
    "sidemesh.io/exclude-outbound-ports": "--exclude-outbound-ports",
    "sidemesh.io/exclude-outbound-cidrs": "--exclude-outbound-cidrs",
}
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
# Per-pod proxy resources (Linkerd: config.linkerd.io/proxy-cpu-request, ...): (part, resource name)
PROXY_RESOURCES = {
    "sidemesh.io/proxy-cpu-request": ("requests", "cpu"),
    "sidemesh.io/proxy-cpu-limit": ("limits", "cpu"),
    "sidemesh.io/proxy-memory-request": ("requests", "memory"),
    "sidemesh.io/proxy-memory-limit": ("limits", "memory"),
}

_FIX = 'fix the annotation, or opt the pod out with sidemesh.io/inject: "false"'


@dataclass(frozen=True, slots=True)
class Result:
    injected: bool
    reason: str
    patch: list[Json] = field(default_factory=list)
    pod: Json = field(default_factory=dict)  # the pod as it is after the patch
    warnings: list[str] = field(default_factory=list)  # for the AdmissionResponse (kubectl shows them)


def pod_name(pod: Any) -> str:
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    if not isinstance(meta, dict):
        return ""
    return str(meta.get("name") or meta.get("generateName") or "")


def _map(obj: Json, key: str, where: str) -> Json:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PodError(f"{where}.{key} must be a map, not {type(value).__name__}")
    return value


def _list(obj: Json, key: str, where: str) -> list[Json]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PodError(f"{where}.{key} must be a list of objects")
    return value


def _bool(annotations: dict[str, str], key: str, default: bool) -> bool:
    value = annotations.get(key)
    if value is None:
        return default
    if value.strip().lower() not in ("true", "false"):
        raise PodError(f'annotation {key}: {value!r} is not "true" or "false"; {_FIX}')
    return value.strip().lower() == "true"


def _exclusion(key: str, value: str) -> str:
    items = [part.strip() for part in value.split(",") if part.strip()]
    for item in items:
        if key.endswith("cidrs"):
            try:
                parse_cidr(item)
            except ValueError as exc:
                raise PodError(f"annotation {key}: {exc}; {_FIX}") from None
        elif item == "*" and key.endswith("inbound-ports"):
            if len(items) == 1:
                continue
            raise PodError(
                f"annotation {key}: '*' (no inbound capture) cannot be combined with port numbers; {_FIX}"
            )
        elif not _PORT_RE.match(item) or not 1 <= int(item) <= 65535:
            raise PodError(f"annotation {key}: {item!r} is not a port number (1-65535); {_FIX}")
    return ",".join(items)


def pod_options(annotations: dict[str, str], settings: InjectionSettings) -> PodOptions:
    """Validate the pod's sidemesh.io annotations; a bad value is a PodError naming the annotation."""
    policy = annotations.get(DEFAULT_POLICY_ANNOTATION) or settings.default_policy  # empty: as absent
    choices = tuple(d.value for d in DefaultPolicy)
    if policy not in choices:
        raise PodError(
            f"annotation {DEFAULT_POLICY_ANNOTATION}: {policy!r} is not one of {', '.join(choices)}; {_FIX}"
        )
    exclusions = []
    for key, flag in EXCLUSIONS.items():
        if key in annotations and (value := _exclusion(key, annotations[key])):
            exclusions.append((flag, value))
    return PodOptions(
        native=_bool(annotations, NATIVE, settings.native_sidecar is not False),  # auto: native
        default_policy=policy,
        exclusions=tuple(exclusions),
        proxy_resources=_proxy_resources(annotations, settings.proxy_resources),
    )


def _proxy_resources(annotations: dict[str, str], base: Resources) -> Resources:
    """The settings' proxy resources with the pod's annotations over them; a request above its limit
    is refused here (the API server would refuse the pod with the sidecar's name, not the annotation)."""
    parts = {"requests": dict(base.requests), "limits": dict(base.limits)}
    given = {key: annotations[key].strip() for key in PROXY_RESOURCES if key in annotations}
    for key, value in given.items():
        part, name = PROXY_RESOURCES[key]
        try:
            if quantity(value) < 0:
                raise ValueError
        except ValueError:
            raise PodError(
                f"annotation {key}: {value!r} is not a resource quantity (e.g. 200m, 1, 256Mi, 1Gi); {_FIX}"
            ) from None
        parts[part][name] = value
    if not given:
        return base
    for name in ("cpu", "memory"):
        request, limit = parts["requests"].get(name), parts["limits"].get(name)
        if request is not None and limit is not None and quantity(request) > quantity(limit):
            raise PodError(
                f"the proxy's {name} request {request} is above its limit {limit}: set both "
                f"sidemesh.io/proxy-{name}-request and sidemesh.io/proxy-{name}-limit; {_FIX}"
            )
    return Resources(requests=parts["requests"], limits=parts["limits"])


MIRROR = "kubernetes.io/config.mirror"


def skip_reason(pod: Json) -> str | None:
    """Why this pod gets no sidecar, or None to inject it."""
    meta = _map(pod, "metadata", "pod")
    annotations = _map(meta, "annotations", "metadata")
    labels = _map(meta, "labels", "metadata")
    asked = False  # sidemesh.io/inject says "true" or "enabled" itself
    for where, values in (("annotation", annotations), ("label", labels)):
        value = str(values.get(INJECT, "")).strip().lower()
        if value in OPT_OUT:
            return f'opted out: {where} {INJECT}: "{value}"'
        if value not in OPT_IN:  # "no", "off", "0": a mistake, not a choice to guess
            raise PodError(
                f'{where} {INJECT}: {values.get(INJECT)!r} is not "false" or "disabled" (no sidecar), '
                f'nor "true" or "enabled"; fix the {where}'
            )
        asked = asked or bool(value)
    if not asked:  # another mesh's opt-out, kept from before the move: that pod had no sidecar there
        for where, values in (("annotation", annotations), ("label", labels)):
            for key in (ISTIO_INJECT, LINKERD_INJECT):
                if key in values and _other_mesh_opt_out(key, str(values[key])):
                    return (
                        f'opted out: {where} {key}: "{values[key]}" (another mesh\'s opt-out, honoured; '
                        f'{INJECT}: "enabled" injects it anyway)'
                    )
    if MIRROR in annotations:  # the API server refuses a mirror pod with a projected token volume
        return "mirror pod of a static pod: the kubelet runs it, and the API server would refuse it injected"
    spec = _map(pod, "spec", "pod")
    if _is_windows(spec):
        return "Windows pod: the sidecar and its iptables init container run on Linux only"
    if STATUS in annotations:
        return f"already injected ({STATUS} is set)"
    if spec.get("hostNetwork") is True:
        return "hostNetwork pod: it shares the node's network, which the sidecar must not capture"
    for key in ("initContainers", "containers"):
        if any(c.get("name") == containers.PROXY_NAME for c in _list(spec, key, "spec")):
            return f"already has a container named {containers.PROXY_NAME}"
    return None


def _dict(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def _is_windows(spec: Json) -> bool:
    return (
        _dict(spec.get("os")).get("name") == "windows"
        or _dict(spec.get("nodeSelector")).get("kubernetes.io/os") == "windows"
    )


def _proxy_uid_users(spec: Json, uid: int) -> list[str]:
    """The pod's own containers that would run as the proxy's UID or GID (a container's own
    runAsUser/runAsGroup, else the pod's): the capture lets that user's traffic out as it is (so
    that the proxy's own is not captured), so the app's would leave unencrypted and strict peers
    would refuse it (Istio reserves UID 1337 likewise)."""
    pod_ctx = _dict(spec.get("securityContext"))
    found = []
    for key in ("initContainers", "containers"):
        for container in _list(spec, key, "spec"):
            ctx = _dict(container.get("securityContext"))
            for name in ("runAsUser", "runAsGroup"):
                value = ctx.get(name, pod_ctx.get(name))
                if value == uid:
                    where = "securityContext" if name in ctx else "the pod's securityContext"
                    found.append(f"container {container.get('name')} ({name} {value}, from {where})")
    return found


def _check(pod: Any) -> tuple[Json, Json, dict[str, str]]:
    if not isinstance(pod, dict):
        raise PodError("the object is not a pod (not a JSON object)")
    meta = _map(pod, "metadata", "pod")
    annotations = _map(meta, "annotations", "metadata")
    if not all(isinstance(v, str) for v in annotations.values()):
        raise PodError("metadata.annotations values must be strings")
    spec = _map(pod, "spec", "pod")
    app = _list(spec, "containers", "spec")
    if not app:
        raise PodError("spec.containers is missing or empty: not a pod we can inject")
    for key in ("initContainers", "containers"):
        for container in _list(spec, key, "spec"):
            where = f"spec.{key}[{container.get('name')!r}]"
            for port in _list(container, "ports", where):
                number = port.get("containerPort")
                if not isinstance(number, int) or isinstance(number, bool):
                    raise PodError(f"{where}.ports: containerPort must be a port number, not {number!r}")
        names = [c.get("name") for c in _list(spec, key, "spec")]
        if clash := containers.CONTAINER_NAMES.intersection(n for n in names if isinstance(n, str)):
            raise PodError(f"spec.{key} already has a container named {sorted(clash)[0]}; rename it")
    vol_names = [v.get("name") for v in _list(spec, "volumes", "spec")]
    if bad := [n for n in vol_names if not isinstance(n, str)]:
        raise PodError(f"spec.volumes: a volume's name must be a string, not {bad[0]!r}")
    if clash := containers.VOLUME_NAMES.intersection(vol_names):
        raise PodError(f"spec.volumes already has a volume named {sorted(clash)[0]}; rename it")
    return meta, spec, annotations


def _excluded_inbound(options: PodOptions) -> frozenset[int] | None:
    """The inbound ports the capture lets through (None: all, `*`)."""
    value = dict(options.exclusions).get(EXCLUSIONS["sidemesh.io/exclude-inbound-ports"], "")
    items = [item.strip() for item in value.split(",") if item.strip()]
    return None if "*" in items else frozenset(int(item) for item in items)


def _rewritten(desired: Json, original: Json) -> bool:
    """Whether the injected pod's copy of the ``original`` init container has a rewritten probe."""
    name = original.get("name")
    for c in _list(desired["spec"], "initContainers", "spec"):
        if c.get("name") == name:
            return any(
                isinstance(c.get(f), dict) and c[f] != original.get(f)
                for f in ("livenessProbe", "readinessProbe")
            )
    return False


def _format_quantity(name: str, value: Decimal) -> str:
    """A quantity as Kubernetes writes it back: cpu in whole cores or millicores (rounded up, as
    the API server keeps at most milli precision), other resources in the largest binary unit that
    divides them, else as a number."""
    if name == "cpu":
        milli = math.ceil(value * 1000)
        return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"
    whole = math.ceil(value)
    for suffix, power in (("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if whole and whole % (1 << power) == 0:
            return f"{whole >> power}{suffix}"
    return str(whole)


def pod_level_resources(spec: Json, proxy: Json) -> Json | None:
    """The pod-level ``spec.resources`` (KEP-2837, beta from Kubernetes 1.34) padded with the proxy's
    own requests and limits, or None when the pod sets none. The API server refuses a pod whose
    pod-level requests are below its containers' (the proxy's counted, native or classic) or a
    container limit above the pod's: without this every such pod was refused after the webhook
    allowed it, as Istio's sidecars were (istio/istio#57393; the padding is #58769's proposal)."""
    pod = spec.get("resources")
    if not isinstance(pod, dict) or not pod:
        return None
    out = dict(pod)
    pod_limits = pod.get("limits")
    if isinstance(pod_limits, dict):
        # A pod-level request the API server would default (`sidemesh inject` of a template: the
        # webhook sees the pod defaulted already): the pod's limit when no container asks for that
        # resource. Left unset, the proxy's own request would become the pod's whole request.
        asked = {
            name
            for c in (*_list(spec, "containers", "spec"), *_list(spec, "initContainers", "spec"))
            for part in ("requests", "limits")
            for name in ((c.get("resources") or {}).get(part) or {})
        }
        defaulted = {n: q for n, q in pod_limits.items() if n not in asked}
        if defaulted:
            given = pod.get("requests")
            out["requests"] = {**defaulted, **(given if isinstance(given, dict) else {})}
    requests, limits = proxy.get("requests") or {}, proxy.get("limits") or {}
    # What the API server counts: a request defaults to its limit (defaulting runs again after the
    # webhook); a pod limit grows by the proxy's limit, or by its request when it has none (the
    # pod's request may not pass its limit).
    effective = {**limits, **requests}
    padding = {"requests": effective, "limits": {**effective, **limits}}
    for part in ("requests", "limits"):
        values, extra = out.get(part), padding[part]
        if not isinstance(values, dict):
            continue
        padded = dict(values)
        for name, qty in values.items():
            if name in extra and isinstance(qty, str | int | float):
                try:
                    total = quantity(str(qty)) + quantity(str(extra[name]))
                except ValueError:
                    raise PodError(
                        f"spec.resources.{part}.{name}: {qty!r} is not a resource quantity"
                    ) from None
                padded[name] = _format_quantity(name, total)
        out[part] = padded
    return out


def desired_pod(pod: Json, settings: InjectionSettings) -> Json:
    """The injected pod; shares unchanged sub-objects with ``pod`` and never modifies it."""
    meta, spec, annotations = _check(pod)
    if users := _proxy_uid_users(spec, settings.proxy_uid):
        raise PodError(
            f"{', '.join(users)} would run as {settings.proxy_uid}, the proxy's own user and group: the "
            "capture lets that traffic out unencrypted, past the mesh; run the app as another user"
        )
    options = pod_options(annotations, settings)
    app: list[Json] = []
    records: dict[str, Json] = {}
    rewrite = _bool(annotations, REWRITE_PROBES, settings.rewrite_app_probes)
    grace = spec.get("terminationGracePeriodSeconds")
    grace = grace if isinstance(grace, int) and not isinstance(grace, bool) else probes.DEFAULT_GRACE_S
    excluded = _excluded_inbound(options)
    for container in _list(spec, "containers", "spec"):
        if rewrite:
            container, found = probes.rewrite_container(container)
            records.update(found)
            container, found = probes.rewrite_hooks(container, grace, excluded, classic=not options.native)
            records.update(found)
        app.append(container)
    app_init: list[Json] = []
    for container in _list(spec, "initContainers", "spec"):
        if rewrite and container.get("restartPolicy") == "Always":
            # The app's own native sidecar: it runs beside the app, under the capture. Classic
            # mode: its startup probe passes before the capture exists, and before the proxy runs.
            fields = tuple(probes.KINDS) if options.native else ("livenessProbe", "readinessProbe")
            container, found = probes.rewrite_container(container, fields)
            records.update(found)
            if options.native:  # (classic: its postStart runs before the proxy does)
                container, found = probes.rewrite_hooks(container, grace, excluded)
                records.update(found)
        app_init.append(container)
    if records:
        options = dataclasses.replace(options, app_probes=probes.encode(records))
    if (app_metrics := _app_metrics(annotations, excluded)) is not None:
        options = dataclasses.replace(options, app_metrics=app_metrics)
    init = containers.init_container(settings, options)
    proxy = containers.proxy_container(settings, options, grace)
    new_spec = dict(spec)
    if options.native:
        # iptables first, then the proxy; the app's own init containers run meshed after both.
        new_spec["initContainers"] = [init, proxy, *app_init]
        new_spec["containers"] = app
    else:
        # The proxy only starts with the containers: the app's init containers run before the
        # capture is installed (they could not reach anything through a proxy not yet running).
        new_spec["initContainers"] = [*app_init, init]
        new_spec["containers"] = [proxy, *app]
    new_spec["volumes"] = [*_list(spec, "volumes", "spec"), *containers.volumes()]
    if (padded := pod_level_resources(spec, proxy.get("resources") or {})) is not None:
        new_spec["resources"] = padded
    status = {
        "version": settings.version,
        "initContainers": [init["name"], proxy["name"]] if options.native else [init["name"]],
        "containers": [] if options.native else [proxy["name"]],
        "volumes": sorted(containers.VOLUME_NAMES),
        "native": options.native,
    }
    new_annotations = dict(annotations)
    new_annotations[STATUS] = json.dumps(status, sort_keys=True, separators=(",", ":"))
    new_annotations.setdefault(DEFAULT_CONTAINER, str(app[0].get("name", "")))
    if not any(key.startswith("prometheus.io/") for key in annotations):
        new_annotations.update(PROMETHEUS)  # the app's own scrape settings win: the sidecar's stay off
    elif options.app_metrics:
        new_annotations.update(MERGED)
        if "prometheus.io/scheme" in annotations:
            new_annotations["prometheus.io/scheme"] = "http"
    new_meta = dict(meta)
    new_meta["annotations"] = new_annotations
    return {**pod, "metadata": new_meta, "spec": new_spec}


# The pod annotations sidemesh reads (injector, controller, sidecar): any other sidemesh.io/ key is
# likely a typo, which would otherwise be ignored without a word (kubectl shows the warning).
POD_ANNOTATIONS = frozenset(
    {
        INJECT,
        STATUS,
        NATIVE,
        REWRITE_PROBES,
        DEFAULT_POLICY_ANNOTATION,
        OPAQUE_PORTS,
        MERGE_METRICS,
        *EXCLUSIONS,
        *PROXY_RESOURCES,
    }
)


MAX_UNKNOWN_HINTS = 5


def _app_metrics(annotations: dict[str, str], excluded: frozenset[int] | None = frozenset()) -> str | None:
    """SIDEMESH_APP_METRICS for a pod whose app asks to be scraped (``prometheus.io/scrape:
    "true"`` and a ``prometheus.io/port`` other than the sidecar's), unless ``sidemesh.io/
    merge-metrics: "false"`` or the port is excluded from the capture (``excluded``; None: every
    port), which a scraper reaches directly; None when its metrics stay where they are."""
    if annotations.get("prometheus.io/scrape", "").strip().lower() != "true":
        return None
    if not _bool(annotations, MERGE_METRICS, True):
        return None
    port = annotations.get("prometheus.io/port", "").strip()
    if not port.isdigit() or not 1 <= int(port) <= 65535 or int(port) == probes.HEALTH_PORT:
        return None
    if excluded is None or int(port) in excluded:
        return None
    path = annotations.get("prometheus.io/path", "").strip() or "/metrics"
    scheme = annotations.get("prometheus.io/scheme", "").strip().upper() or "HTTP"
    if scheme not in ("HTTP", "HTTPS") or not path.startswith("/"):
        return None
    return json.dumps({"port": int(port), "path": path, "scheme": scheme}, separators=(",", ":"))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_unknown(key: str) -> bool:
    return key.startswith("sidemesh.io/") and key not in POD_ANNOTATIONS


def _unknown_annotation(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(POD_ANNOTATIONS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"sidemesh: annotation {key} is not one sidemesh reads: ignored{hint}"


def inject(pod: Any, settings: InjectionSettings) -> Result:
    """Decide, build and diff. Raises PodError when the pod cannot be injected as it is."""
    if not isinstance(pod, dict):
        raise PodError("the object is not a pod (not a JSON object)")
    reason = skip_reason(pod)
    if reason is not None:
        # (another mesh's opt-out is not this one's: whoever made the pod is told, as its callers
        # of a strict mesh will refuse it)
        said = [f"sidemesh: no sidecar: {reason}"] if "another mesh's opt-out" in reason else []
        return Result(False, reason, [], pod, said)
    desired = desired_pod(pod, settings)
    annotations = _map(_map(pod, "metadata", "pod"), "annotations", "metadata")
    # Another mesh's annotations with an equivalent here (a pod moved from Istio or Linkerd): not
    # read from them, so say which to set (its exclusions would otherwise be captured silently).
    others = [
        f"sidemesh: annotation {key} is another mesh's and is not read: "
        + (
            f"set {instead} instead"
            if (instead := OTHER_MESH_ANNOTATIONS[key])
            else "Sidemesh has no equivalent"
        )
        for key in sorted(annotations)
        if key in OTHER_MESH_ANNOTATIONS
    ]
    unknown = [key for key in sorted(annotations) if _is_unknown(key)]
    # A hint for the first few only: each costs ~0.5 ms of the webhook's event loop (difflib), and
    # a pod with thousands of them held it past the API server's timeout for every other pod.
    warnings = [*others, *(_unknown_annotation(key) for key in unknown[:MAX_UNKNOWN_HINTS])]
    if len(unknown) > MAX_UNKNOWN_HINTS:
        warnings.append(
            f"sidemesh: {len(unknown) - MAX_UNKNOWN_HINTS} more sidemesh.io/ annotations it does not read: ignored"
        )
    spec = _map(pod, "spec", "pod")
    before, after = spec.get("resources"), desired["spec"].get("resources")
    if isinstance(before, dict) and isinstance(after, dict) and before != after:
        changes = [
            f"{part} {name} {(before.get(part) or {}).get(name, '(unset)')} -> {value}"
            for part in ("requests", "limits")
            for name, value in (after.get(part) or {}).items()
            if (before.get(part) or {}).get(name) != value
        ]
        warnings.append(
            f"sidemesh: the pod-level resources (spec.resources) now include the sidecar's: {', '.join(changes)}"
        )
    if annotations.get("prometheus.io/scrape", "").strip().lower() == "true" and (
        _bool(annotations, MERGE_METRICS, True) and _app_metrics(annotations) is None
    ):
        port = (annotations.get("prometheus.io/port") or "").strip()
        if not port.isdigit() or int(port) > 65535:  # (a port, excluded or the sidecar's: fine)
            warnings.append(
                "sidemesh: prometheus.io/scrape without a usable prometheus.io/port (a port number): "
                "the app's metrics stay where they are, and its ports refuse a Prometheus outside "
                "the mesh under strict mTLS; give the port, and the sidecar serves them on 15020 "
                "(/stats/prometheus)"
            )
    policy = spec.get("dnsPolicy")
    if policy in ("Default", "None") and not all(
        _is_ip(address.rpartition(":")[0].strip("[]"))
        for address in (settings.controller_address, settings.ca_address)
    ):
        warnings.append(
            f"sidemesh: dnsPolicy {policy}: the sidecar finds the controller and the CA "
            f"({settings.controller_address}, {settings.ca_address}) by cluster DNS names, which "
            + (
                "the node's resolver does not know"
                if policy == "Default"
                else "only a dnsConfig naming the cluster DNS resolves"
            )
            + ": the pod would never be ready; use ClusterFirst (ClusterFirstWithHostNet), or IP addresses in the injection settings"
        )
    native = pod_options(annotations, settings).native
    if not native and [
        c for c in _list(spec, "initContainers", "spec") if c.get("restartPolicy") != "Always"
    ]:
        warnings.append(
            "sidemesh: with a classic sidecar the app's init containers run before the capture and "
            "the proxy exist: what they send to meshed Services goes out in plaintext, which strict "
            "callees refuse (a wait-for-db, a migration); use native sidecars for this pod "
            '(sidemesh.io/native-sidecar: "true"; Kubernetes 1.29+), where they run meshed'
        )
    if not native and spec.get("restartPolicy") in ("Never", "OnFailure"):
        warnings.append(
            "sidemesh: a classic sidecar keeps a pod that should end (a Job's) running: have the app "
            "POST http://127.0.0.1:15020/quitquitquit when it is done, or use native sidecars "
            "(Kubernetes 1.29+, nativeSidecar or the sidemesh.io/native-sidecar annotation)"
        )
    if not native:
        # The app's own native sidecars run (and are probed) from the start of the init phase, but
        # a classic proxy answers their rewritten probes only once every init container is done.
        for container in _list(spec, "initContainers", "spec"):
            probed = [f for f in ("livenessProbe", "readinessProbe") if isinstance(container.get(f), dict)]
            if container.get("restartPolicy") == "Always" and probed and _rewritten(desired, container):
                warnings.append(
                    f"sidemesh: init container {container.get('name')} is a native sidecar whose "
                    f"{' and '.join(probed)} the classic proxy answers only after every init container "
                    "has finished (a long init container after it gets it restarted): use native "
                    'sidecars for this pod (sidemesh.io/native-sidecar: "true"; the cluster runs them)'
                )
    for container in [*_list(spec, "initContainers", "spec"), *_list(spec, "containers", "spec")]:
        for port in container.get("ports") or ():
            number = port.get("containerPort") if isinstance(port, dict) else None
            if number in probes.PROXY_PORTS:
                warnings.append(
                    f"sidemesh: container {container.get('name')} declares port {number}, one of the "
                    f"sidecar's ({', '.join(map(str, sorted(probes.PROXY_PORTS)))}): if it listens there, "
                    "one of the two cannot bind it and the pod crash-loops; move the app's port"
                )
    return Result(True, "injected", diff(pod, desired), desired, warnings)
