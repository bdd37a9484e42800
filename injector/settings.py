"""Injection settings: what the injector writes into a pod (image, resources, addresses, defaults).

They live in the mesh ConfigMap (`sidemesh-mesh`, key `config.yaml`), mounted into the injector as a
file and re-read when the kubelet updates it, so a change applies to the next pod without a restart.
`sidemesh inject --settings FILE` reads the same YAML. Keys are camelCase, as in Kubernetes; an
unknown key is an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from injector.errors import SettingsError
from sidemesh import __version__, kubeyaml
from sidemesh.config import otlp_endpoint_problem, parse_dial_address, url_port
from sidemesh.policy.model import DefaultPolicy
from sidemesh.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeIdError, validate_trust_domain

log = logging.getLogger("sidemesh.injector.settings")

DEFAULT_IMAGE = "ghcr.io/sidemesh/sidemesh:latest"
_QUANTITY_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
# Container resources as the API server takes them: the standard ones, hugepages of a page size,
# and extended resources (a name under a domain other than kubernetes.io, e.g. nvidia.com/gpu).
_STANDARD_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage"})
# A qualified name (Kubernetes' IsQualifiedName): a DNS subdomain prefix, a name part of at most 63.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_NAME_PART_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _resource_kind(name: str) -> str | None:
    """ "standard", "hugepages", "extended", or None for a name no container may use (Kubernetes'
    IsStandardContainerResourceName and IsExtendedResourceName: a name with kubernetes.io/ in it
    is native, so standard or nothing; an extended one is a qualified name, "requests." + it too)."""
    if name in _STANDARD_RESOURCES:
        return "standard"
    if name.startswith("hugepages-"):
        try:
            return "hugepages" if quantity(name.removeprefix("hugepages-")) > 0 else None
        except ValueError:
            return None
    prefix, slash, part = ("requests." + name).partition("/")
    if (
        slash
        and "kubernetes.io/" not in name
        and not name.startswith("requests.")
        and len(prefix) <= 253
        and _SUBDOMAIN_RE.match(prefix)
        and len(part) <= 63
        and _NAME_PART_RE.match(part)
    ):
        return "extended"
    return None


def check_resources(key: str, res: Resources) -> None:
    """``res`` as the API server checks a container's resources (a pod it refuses is refused after
    the webhook said yes: every meshed pod, until the settings are put right): names a container
    may use, quantities of 0 or more, no request above its limit; hugepages and extended resources
    cannot be overcommitted (request equal to the limit, and a limit for every request) and
    extended ones are whole numbers."""
    for part, values in (("requests", res.requests), ("limits", res.limits)):
        for name, qty in values.items():
            kind = _resource_kind(name)
            if kind is None:
                raise SettingsError(
                    f"{key}.{part}",
                    f"{name!r} is not a container resource (cpu, memory, ephemeral-storage, "
                    "hugepages-<size>, or an extended resource such as example.com/device)",
                )
            try:
                value = quantity(qty)
            except ValueError:
                value = Decimal(-1)
            if value < 0:
                raise SettingsError(
                    f"{key}.{part}", f"{name}: {qty!r} is not a resource quantity of 0 or more"
                )
            if kind == "extended" and value != value.to_integral_value():
                raise SettingsError(
                    f"{key}.{part}", f"{name}: {qty!r} is not a whole number (an extended resource)"
                )
    huge = [n for n in (*res.requests, *res.limits) if _resource_kind(n) == "hugepages"]
    for name in huge:
        page = quantity(name.removeprefix("hugepages-"))
        for part, values in (("requests", res.requests), ("limits", res.limits)):
            if name in values and quantity(values[name]) % page:
                raise SettingsError(f"{key}.{part}", f"{name}: {values[name]} is not a whole number of pages")
    if huge and not {"cpu", "memory"} & {*res.requests, *res.limits}:
        raise SettingsError(
            key, "hugepages need a cpu or memory request or limit too (the API server's rule)"
        )
    for name, request in res.requests.items():
        limit = res.limits.get(name)
        kind = _resource_kind(name)
        if kind in ("hugepages", "extended"):
            if limit is None or quantity(request) != quantity(limit):
                raise SettingsError(
                    f"{key}.requests", f"{name}: cannot be overcommitted: set its limit, equal to the request"
                )
        elif limit is not None and quantity(request) > quantity(limit):
            raise SettingsError(f"{key}.requests", f"{name}: {request} is above the limit {limit}")


_QUANTITY_SUFFIXES = {
    **{"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18},
    **{f"{p}i": 10 * (i + 1) for i, p in enumerate("KMGTPE")},  # binary: powers of 2
}


MAX_QUANTITY = Decimal(2**63 - 1)


def quantity(text: str) -> Decimal:
    """The value of a Kubernetes resource quantity ("500m", "1.5Gi", "2e3"); ValueError if it is none."""
    match = _QUANTITY_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a resource quantity")
    number, suffix = text[: match.start(3)] if match.group(3) else text, match.group(3) or ""
    if suffix not in _QUANTITY_SUFFIXES:  # a decimal exponent: "1e3" ("1E" alone is exa)
        exponent, base = int(suffix[1:]), Decimal(10)
    else:
        exponent = _QUANTITY_SUFFIXES[suffix]
        base = Decimal(2) if suffix.endswith("i") else Decimal(10)
    if abs(exponent) > 64:  # (Kubernetes keeps quantities within 64 bits; 1e999999999 overflowed)
        raise ValueError(f"{text!r} is not a resource quantity Kubernetes can hold")
    value = Decimal(number) * base**exponent
    if value > MAX_QUANTITY:
        raise ValueError(f"{text!r} is not a resource quantity Kubernetes can hold")
    return value


OTLP_GRPC_PORT = 4317  # the OTLP specification's default port for OTLP/gRPC (4318: OTLP/HTTP)


@dataclass(frozen=True, slots=True)
class Resources:
    """A container's `resources`: requests and limits, resource name -> quantity."""

    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)

    def to_k8s(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.limits:
            out["limits"] = dict(self.limits)
        if self.requests:
            out["requests"] = dict(self.requests)
        return out


@dataclass(frozen=True, slots=True)
class InjectionSettings:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    log_level: str = "info"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    default_policy: str = DefaultPolicy.ALLOW_AUTHENTICATED.value
    mode: str = "strict"
    # True: native sidecars (Kubernetes 1.29+); False: classic; None ("auto", the default): native
    # when the API server is 1.29 or later (the injector asks it at start; offline: native).
    native_sidecar: bool | None = None
    rewrite_app_probes: bool = True
    controller_address: str = "sidemesh-controller.sidemesh-system.svc:15010"
    ca_address: str = "sidemesh-ca.sidemesh-system.svc:15012"
    proxy_uid: int = 1337
    proxy_resources: Resources = Resources(
        requests={"cpu": "100m", "memory": "128Mi"}, limits={"cpu": "2", "memory": "512Mi"}
    )
    init_resources: Resources = Resources(
        requests={"cpu": "10m", "memory": "32Mi"}, limits={"cpu": "500m", "memory": "128Mi"}
    )
    # OTLP endpoint the sidecars export spans to (their OTEL_EXPORTER_OTLP_ENDPOINT); empty: no tracing.
    # The default is the Jaeger addon, as Istio points at its Zipkin: without it spans are dropped.
    tracing_endpoint: str = "http://jaeger.sidemesh-system.svc:4318"
    # Their OTEL_EXPORTER_OTLP_PROTOCOL: http/protobuf or grpc. Unset: grpc for an endpoint on port
    # 4317 (OTLP/gRPC's port: the settings of earlier versions said so), otherwise OTLP/HTTP, the
    # OTLP specification's default (the OTLP/gRPC exporter is built on grpcio, 14 MB more in every
    # sidecar: docs/design-choices.md).
    tracing_protocol: str = ""
    tracing_sampling_ratio: float = 0.01  # parent-based: a caller's decision wins
    access_log: bool = False  # the sidecars' per-request JSON access log (SIDEMESH_ACCESS_LOG)
    # The init container's iptables backend (SIDEMESH_IPTABLES_MODE): auto, legacy or nft.
    iptables_mode: str = "auto"
    version: str = __version__

    def otlp_protocol(self) -> str:
        """The sidecars' OTLP protocol: tracingProtocol, or by the endpoint's port when unset."""
        if self.tracing_protocol:
            return self.tracing_protocol
        return "grpc" if url_port(self.tracing_endpoint) == OTLP_GRPC_PORT else "http/protobuf"

    def resolved(self, native_supported: bool) -> InjectionSettings:
        """With nativeSidecar "auto" decided: native when the cluster supports native sidecars."""
        if self.native_sidecar is not None:
            return self
        return dataclasses.replace(self, native_sidecar=native_supported)

    def __post_init__(self) -> None:
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise SettingsError("image", f"{self.image!r} is not an image reference")
        _one_of("imagePullPolicy", self.image_pull_policy, ("Always", "IfNotPresent", "Never"))
        _one_of("logLevel", self.log_level, ("debug", "info", "warning", "error"))
        _one_of("defaultPolicy", self.default_policy, tuple(d.value for d in DefaultPolicy))
        _one_of("mode", self.mode, ("strict", "permissive"))
        try:
            validate_trust_domain(self.trust_domain)
        except SpiffeIdError as exc:
            raise SettingsError("trustDomain", str(exc)) from exc
        for key, value in (("controllerAddress", self.controller_address), ("caAddress", self.ca_address)):
            try:
                parse_dial_address(key, value)  # (as every injected sidecar checks it: else they crash-loop)
            except ValueError as exc:
                raise SettingsError(key, f"{value!r} is not HOST:PORT with a port of 1-65535") from exc
        if self.tracing_endpoint:  # the sidecars' OTEL_EXPORTER_OTLP_ENDPOINT: /v1/traces is appended
            problem = otlp_endpoint_problem(self.tracing_endpoint, path_appended=True)
            if problem is None and urllib.parse.urlsplit(self.tracing_endpoint).path.rstrip("/").endswith(
                "/v1/traces"
            ):
                problem = "ends in /v1/traces, which the sidecars append: give the collector's base URL"
            if problem is not None:
                raise SettingsError(
                    "tracingEndpoint",
                    f"{self.tracing_endpoint!r} {problem} (OTLP/HTTP, e.g. http://HOST:4318; :4317 with "
                    "tracingProtocol: grpc)",
                )
        if self.tracing_protocol:
            _one_of("tracingProtocol", self.tracing_protocol, ("http/protobuf", "grpc"))
        _one_of("iptablesMode", self.iptables_mode, ("auto", "legacy", "nft"))
        if not 0.0 <= self.tracing_sampling_ratio <= 1.0:
            raise SettingsError(
                "tracingSamplingRatio", f"{self.tracing_sampling_ratio} is not between 0 and 1"
            )
        if not 1 <= self.proxy_uid <= 2**31 - 1:
            raise SettingsError("proxyUID", f"{self.proxy_uid} is not a non-root user id")
        for key, res in (("proxyResources", self.proxy_resources), ("initResources", self.init_resources)):
            check_resources(key, res)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(key, f"{value!r} is not one of {', '.join(choices)}")


# YAML key -> (field name, expected Python type)
_KEYS: dict[str, tuple[str, type]] = {
    "image": ("image", str),
    "imagePullPolicy": ("image_pull_policy", str),
    "logLevel": ("log_level", str),
    "trustDomain": ("trust_domain", str),
    "defaultPolicy": ("default_policy", str),
    "mode": ("mode", str),
    "nativeSidecar": ("native_sidecar", bool),  # or "auto"
    "rewriteAppProbes": ("rewrite_app_probes", bool),
    "controllerAddress": ("controller_address", str),
    "caAddress": ("ca_address", str),
    "proxyUID": ("proxy_uid", int),
    "proxyResources": ("proxy_resources", Resources),
    "initResources": ("init_resources", Resources),
    "tracingEndpoint": ("tracing_endpoint", str),
    "tracingProtocol": ("tracing_protocol", str),
    "tracingSamplingRatio": ("tracing_sampling_ratio", float),
    "accessLog": ("access_log", bool),
    "iptablesMode": ("iptables_mode", str),
}


def _resources(key: str, raw: Any) -> Resources:
    if not isinstance(raw, dict) or set(raw) - {"requests", "limits"}:
        raise SettingsError(key, "must be a map with requests and/or limits")
    parts: dict[str, dict[str, str]] = {}
    for part in ("requests", "limits"):
        values = raw.get(part) or {}
        if not isinstance(values, dict):
            raise SettingsError(f"{key}.{part}", "must be a map of resource name to quantity")
        parts[part] = {str(k): str(v) for k, v in values.items()}
    return Resources(requests=parts["requests"], limits=parts["limits"])


def parse_settings(
    text: str, base: InjectionSettings | None = None, source: str = "config.yaml"
) -> InjectionSettings:
    """Settings from the YAML text of the ConfigMap's `config.yaml`; absent keys keep their defaults.
    ``source``: what errors name (the file read)."""
    try:
        raw = kubeyaml.load(text)  # (as kubectl reads the ConfigMap's manifest)
    except yaml.YAMLError as exc:
        raise SettingsError(source, f"not YAML: {' '.join(str(exc).split())}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(source, "must be a map of settings (or the mesh ConfigMap's manifest)")
    if raw.get("kind") == "ConfigMap":  # a whole ConfigMap manifest: take its config.yaml
        data = raw.get("data") or {}
        data = data.get("config.yaml") if isinstance(data, dict) else None
        if not isinstance(data, str):
            raise SettingsError(source, "the ConfigMap has no data key config.yaml")
        return parse_settings(data, base)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _KEYS:
            raise SettingsError(str(key), f"unknown setting; known: {', '.join(_KEYS)}")
        name, kind = _KEYS[key]
        if key == "nativeSidecar" and value == "auto":
            values[name] = None
        elif kind is Resources:
            values[name] = _resources(key, value)
        elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            values[name] = value
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)  # YAML writes 1.0 as 1 too
        else:
            raise SettingsError(key, f"{value!r} is not a {kind.__name__}")
    settings = dataclasses.replace(base or InjectionSettings(), **values)
    if "defaultPolicy" in raw:
        # The controller computes each workload's default and sends it, and injected sidecars
        # stream from it: this only sets an environment variable they do not read (a sidecar
        # reading a directory does). Set here, `deny` was silently not in force.
        log.warning(
            "defaultPolicy in the injection settings is not in force: injected sidecars take their "
            "default from the controller; set its SIDEMESH_DEFAULT_POLICY (manifests/controller.yaml), "
            "or the sidemesh.io/default-policy annotation of a namespace or pod",
            extra={"defaultPolicy": settings.default_policy},
        )
    return settings


def load_settings(path: Path) -> InjectionSettings:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(str(path), f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise SettingsError(
            str(path), f"is not UTF-8 text (byte {exc.start}): save it as UTF-8 YAML"
        ) from exc
    return parse_settings(text, source=str(path))


class SettingsFile:
    """The settings file, re-read when it changes (a ConfigMap volume swaps a symlink: the stat of the
    resolved file changes). A bad new version is logged and the last good settings stay in force."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self.current = load_settings(path)
        self.last_error: str | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def reload(self) -> bool:
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            settings = load_settings(self.path)
        except Exception as exc:  # (whatever it is: said, and the file read again when it changes)
            self.last_error = str(exc) if isinstance(exc, SettingsError) else f"{type(exc).__name__}: {exc}"
            log.error("injection settings invalid; keeping the last good ones", extra={"error": str(exc)})
            return False
        self.last_error = None
        if settings == self.current:
            return False
        self.current = settings
        log.info("injection settings reloaded", extra={"file": str(self.path), "image": settings.image})
        return True
