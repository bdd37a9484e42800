"""`sidemesh controller serve` configuration: every option, its default and its environment variable."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from sidemesh.config import (
    ConfigError,
    check_distinct_listens,
    check_trust_domain,
    log_level_option,
    option,
    parse_dial_address,
    parse_hostport,
    trust_domain_option,
)
from sidemesh.policy.model import DefaultPolicy
from sidemesh.spiffe import SpiffeIdError, WorkloadId

CONTROLLER_SERVER_NAME = "sidemesh-controller.sidemesh-system.svc"


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    listen: str = option(
        "0.0.0.0:15010",
        "gRPC (mTLS) address sidecars stream their configuration from",
        env="SIDEMESH_CONTROLLER_LISTEN",
    )
    metrics_listen: str = option(
        "0.0.0.0:15015",
        "Prometheus /metrics and status address; empty disables",
        env="SIDEMESH_CONTROLLER_METRICS_LISTEN",
    )
    status_from: str = option(
        "127.0.0.0/8,::1/128",
        "comma-separated networks that may read /status (it lists every connected sidecar's identity and "
        "address); /metrics and /healthz/ready answer everyone. The default is the controller's own pod: "
        "kubectl -n sidemesh-system port-forward deploy/sidemesh-controller 15015",
        env="SIDEMESH_CONTROLLER_STATUS_FROM",
    )
    source: str = option(
        "kubernetes",
        "where the mesh is read from: the Kubernetes API, or a directory of YAML (local mode)",
        env="SIDEMESH_CONTROLLER_SOURCE",
        choices=("kubernetes", "directory"),
    )
    config_dir: Path | None = option(
        None, "directory of mesh YAML (with --source directory)", env="SIDEMESH_CONFIG_DIR"
    )
    kubeconfig: Path | None = option(None, "kubeconfig; in-cluster config when unset", env="KUBECONFIG")
    trust_domain: str = trust_domain_option()
    default_policy: str = option(
        "allow-authenticated",
        "mesh default for workloads no ServiceAuthorization selects",
        env="SIDEMESH_DEFAULT_POLICY",
        choices=tuple(d.value for d in DefaultPolicy),
    )
    coalesce: dt.timedelta = option(
        dt.timedelta(milliseconds=100),
        "changes within this window go out as one update",
        env="SIDEMESH_CONTROLLER_COALESCE",
    )
    ca_address: str = option(
        "sidemesh-ca.sidemesh-system.svc:15012", "CA address HOST:PORT", env="SIDEMESH_CA_ADDRESS"
    )
    token_file: Path = option(
        Path("/var/run/secrets/tokens/sidemesh-ca/token"),
        "projected ServiceAccount token (audience sidemesh-ca)",
        env="SIDEMESH_TOKEN_FILE",
    )
    bundle_file: Path = option(
        Path("/var/run/sidemesh/bundle/root-cert.pem"), "trust bundle PEM", env="SIDEMESH_BUNDLE_FILE"
    )
    publish_bundle: bool = option(
        True,
        "keep the ConfigMap sidemesh-trust-bundle (the trust bundle file) in every namespace labelled "
        "sidemesh.io/inject=enabled, for injected pods to mount (with --source kubernetes)",
        env="SIDEMESH_CONTROLLER_PUBLISH_BUNDLE",
    )
    identity: str = option(
        "sidemesh-system/sidemesh-controller",
        "NAMESPACE/SERVICEACCOUNT of the controller",
        env="SIDEMESH_CONTROLLER_IDENTITY",
    )
    server_name: str = option(
        CONTROLLER_SERVER_NAME,
        "DNS name in the controller's certificate that sidecars verify",
        env="SIDEMESH_CONTROLLER_SERVER_NAME",
    )
    log_level: str = log_level_option()

    def status_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return tuple(ipaddress.ip_network(n.strip()) for n in self.status_from.split(",") if n.strip())
        except ValueError as exc:
            raise ConfigError("status_from", f"{exc} (give networks like 127.0.0.0/8,10.0.0.0/8)") from exc

    def __post_init__(self) -> None:
        parse_hostport("listen", self.listen)
        parse_dial_address("ca_address", self.ca_address)  # (grpc dials a port over 65535 modulo 65536)
        check_trust_domain(self.trust_domain)
        if not self.server_name.strip():
            raise ConfigError("server_name", "must not be empty (the DNS name sidecars verify)")
        if self.metrics_listen:
            parse_hostport("metrics_listen", self.metrics_listen)
        check_distinct_listens([("listen", self.listen), ("metrics_listen", self.metrics_listen)])
        self.status_networks()
        if self.source == "directory" and self.config_dir is None:
            raise ConfigError("config_dir", "required with --source directory")
        try:
            WorkloadId.parse(self.identity)
        except SpiffeIdError as exc:
            raise ConfigError("identity", str(exc)) from exc
        if self.coalesce.total_seconds() < 0:
            raise ConfigError("coalesce", "must not be negative")
