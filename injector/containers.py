"""The containers and volumes the injector adds to a pod (no I/O).

- `sidemesh-init` runs `sidemesh proxy init` as root with NET_ADMIN and NET_RAW only (iptables needs
  both; nothing else is granted), and the pod's exclusion annotations as flags.
- `sidemesh-proxy` runs `sidemesh proxy run` as 1337 with nothing: read-only root filesystem, every
  capability dropped, no privilege escalation, seccomp RuntimeDefault. Its identity comes from a
  projected ServiceAccount token (audience `sidemesh-ca`) and the trust bundle ConfigMap, mounted
  where `proxy run`'s --token-file and --bundle-file defaults point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from injector.probes import APP_PROBES_ENV, HEALTH_PORT
from injector.settings import InjectionSettings, Resources

Json = dict[str, Any]

INIT_NAME = "sidemesh-init"
PROXY_NAME = "sidemesh-proxy"
TOKEN_VOLUME = "sidemesh-token"
BUNDLE_VOLUME = "sidemesh-trust-bundle"
BUNDLE_CONFIGMAP = "sidemesh-trust-bundle"
TOKEN_DIR = "/var/run/secrets/tokens/sidemesh-ca"
BUNDLE_DIR = "/var/run/sidemesh/bundle"
TOKEN_AUDIENCE = "sidemesh-ca"
TOKEN_EXPIRATION_SECONDS = 3600
WAIT_TIMEOUT = "120s"
CONTAINER_NAMES = frozenset({INIT_NAME, PROXY_NAME})
VOLUME_NAMES = frozenset({TOKEN_VOLUME, BUNDLE_VOLUME})


@dataclass(frozen=True, slots=True)
class PodOptions:
    """What the pod's annotations ask for, validated (see `patch.py`)."""

    native: bool
    default_policy: str
    exclusions: Sequence[tuple[str, str]] = ()  # (proxy init flag, value)
    app_probes: str = ""  # SIDEMESH_APP_PROBES JSON, empty when no probe was rewritten
    app_metrics: str = ""  # SIDEMESH_APP_METRICS JSON, empty when the app's metrics are not merged
    proxy_resources: Resources | None = None  # None: the settings'


def _probe(path: str, period: int, failures: int) -> Json:
    return {
        "httpGet": {"path": path, "port": HEALTH_PORT, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def init_container(settings: InjectionSettings, options: PodOptions) -> Json:
    args = [
        "proxy",
        "init",
        "--proxy-uid",
        str(settings.proxy_uid),
        "--proxy-gid",
        str(settings.proxy_uid),
    ]
    for flag, value in options.exclusions:
        args += [flag, value]
    if settings.iptables_mode != "auto":
        args += ["--iptables-mode", settings.iptables_mode]
    return {
        "name": INIT_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["sidemesh"],
        "args": args,
        "resources": settings.init_resources.to_k8s(),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            # Nothing is written but iptables-legacy's lock, which proxy init moves to /dev/shm
            # when /run is read-only (proxy/iptables/apply.py _env); nf_tables takes none, and
            # `ip addr` and the rules live in the kernel.
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _field_env(name: str, path: str) -> Json:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


# A classic sidecar gets SIGTERM with the app: its outbound listeners stay this long (Istio's
# terminationDrainDuration, 5 s by default), so the app's own calls while it shuts down (flushes,
# deregistration) still go out; capped a second under the pod's terminationGracePeriodSeconds.
CLASSIC_DRAIN_GRACE_S = 5


def classic_drain_grace(termination_grace_s: int) -> int:
    return max(0, min(CLASSIC_DRAIN_GRACE_S, termination_grace_s - 1))


def proxy_container(settings: InjectionSettings, options: PodOptions, termination_grace_s: int = 30) -> Json:
    env = [
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("POD_IP", "status.podIP"),
        _field_env("SIDEMESH_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        {"name": "SIDEMESH_WORKLOAD", "value": "$(POD_NAMESPACE)/$(POD_NAME)"},
        {"name": "SIDEMESH_TRUST_DOMAIN", "value": settings.trust_domain},
        {"name": "SIDEMESH_DEFAULT_POLICY", "value": options.default_policy},
        {"name": "SIDEMESH_MODE", "value": settings.mode},
        {"name": "SIDEMESH_LOG_LEVEL", "value": settings.log_level},
        {"name": "SIDEMESH_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
        {"name": "SIDEMESH_BUNDLE_FILE", "value": f"{BUNDLE_DIR}/root-cert.pem"},
        # Python's -OO: no docstrings in memory (1.2 MB of a sidecar's RSS, whose budget is 40 MB)
        # and no asserts (ours only narrow types); the image holds the bytecode compiled for it.
        {"name": "PYTHONOPTIMIZE", "value": "2"},
    ]
    if options.app_probes:
        env.append({"name": APP_PROBES_ENV, "value": options.app_probes})
    if options.app_metrics:
        env.append({"name": "SIDEMESH_APP_METRICS", "value": options.app_metrics})
    if not options.native and (drain_grace := classic_drain_grace(termination_grace_s)):
        env.append({"name": "SIDEMESH_DRAIN_GRACE", "value": f"{drain_grace}s"})
    if settings.access_log:
        env.append({"name": "SIDEMESH_ACCESS_LOG", "value": "true"})
    if settings.tracing_endpoint:  # docs/observability.md
        env += [
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": settings.tracing_endpoint},
            {"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": settings.otlp_protocol()},
            {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
            {"name": "OTEL_TRACES_SAMPLER_ARG", "value": f"{settings.tracing_sampling_ratio:g}"},
        ]
    container: Json = {
        "name": PROXY_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["sidemesh"],
        "args": [
            "proxy",
            "run",
            "--controller",
            settings.controller_address,
            "--ca-address",
            settings.ca_address,
        ],
        "env": env,
        "ports": [{"name": "http-health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "resources": (options.proxy_resources or settings.proxy_resources).to_k8s(),
        "securityContext": {
            "runAsUser": settings.proxy_uid,
            "runAsGroup": settings.proxy_uid,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": _probe("/healthz/ready", 1, 600),
        "readinessProbe": _probe("/healthz/ready", 5, 3),
        "livenessProbe": _probe("/healthz/live", 10, 6),
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": True},
        ],
    }
    if options.native:
        # An init container that keeps running: started after sidemesh-init, and the next container
        # starts only once its startupProbe passes; stopped after the app, so Jobs complete.
        container["restartPolicy"] = "Always"
    else:
        # A classic sidecar is the first container; the kubelet starts the next one only when this
        # hook returns, so the app starts once the proxy is ready (holdApplicationUntilProxyStarts).
        container["lifecycle"] = {
            "postStart": {"exec": {"command": ["sidemesh", "proxy", "wait", "--timeout", WAIT_TIMEOUT]}}
        }
    return container


def volumes() -> list[Json]:
    return [
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": TOKEN_AUDIENCE,
                            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                            "path": "token",
                        }
                    }
                ]
            },
        },
        {"name": BUNDLE_VOLUME, "configMap": {"name": BUNDLE_CONFIGMAP}},
    ]
