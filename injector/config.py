"""`sidemesh injector serve` configuration: every option, its default and its environment variable.

What goes into pods (image, resources, ...) is not here but in the injection settings file
(`settings.py`), which is reloaded while the injector runs.
"""

from __future__ import annotations

import datetime as dt
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
from sidemesh.spiffe import SpiffeIdError, WorkloadId

INJECTOR_SERVER_NAME = "sidemesh-injector.sidemesh-system.svc"


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    listen: str = option(
        "0.0.0.0:8443", "HTTPS address the webhook serves on", env="SIDEMESH_INJECTOR_LISTEN"
    )
    settings_file: Path = option(
        Path("/etc/sidemesh/injector/config.yaml"),
        "injection settings (the mesh ConfigMap's config.yaml); reloaded when it changes",
        env="SIDEMESH_INJECTOR_SETTINGS",
    )
    tls_cert: Path | None = option(
        None,
        "serving certificate chain PEM, reloaded when it changes; unset: get one from the CA",
        env="SIDEMESH_INJECTOR_TLS_CERT",
    )
    tls_key: Path | None = option(None, "serving key PEM (with --tls-cert)", env="SIDEMESH_INJECTOR_TLS_KEY")
    webhook_configuration: str = option(
        "sidemesh-injector",
        "MutatingWebhookConfiguration whose caBundle the injector keeps equal to --bundle-file; empty: leave it",
        env="SIDEMESH_INJECTOR_WEBHOOK_CONFIGURATION",
    )
    bundle_file: Path = option(
        Path("/var/run/sidemesh/bundle/root-cert.pem"),
        "trust bundle PEM: verifies the CA, and is the webhook's caBundle",
        env="SIDEMESH_BUNDLE_FILE",
    )
    ca_address: str = option(
        "sidemesh-ca.sidemesh-system.svc:15012", "CA address HOST:PORT", env="SIDEMESH_CA_ADDRESS"
    )
    token_file: Path = option(
        Path("/var/run/secrets/tokens/sidemesh-ca/token"),
        "projected ServiceAccount token (audience sidemesh-ca)",
        env="SIDEMESH_TOKEN_FILE",
    )
    trust_domain: str = trust_domain_option()
    identity: str = option(
        "sidemesh-system/sidemesh-injector",
        "NAMESPACE/SERVICEACCOUNT of the injector",
        env="SIDEMESH_INJECTOR_IDENTITY",
    )
    server_name: str = option(
        INJECTOR_SERVER_NAME,
        "DNS name in the serving certificate (the webhook Service's name, which the API server verifies)",
        env="SIDEMESH_INJECTOR_SERVER_NAME",
    )
    metrics_listen: str = option(
        "0.0.0.0:15016",
        "Prometheus /metrics address (plain HTTP); empty disables",
        env="SIDEMESH_INJECTOR_METRICS_LISTEN",
    )
    kubeconfig: Path | None = option(None, "kubeconfig; in-cluster config when unset", env="KUBECONFIG")
    reload_interval: dt.timedelta = option(
        dt.timedelta(seconds=2),
        "how often the settings and certificate files are checked for changes",
        env="SIDEMESH_INJECTOR_RELOAD_INTERVAL",
    )
    shutdown_delay: dt.timedelta = option(
        dt.timedelta(seconds=5),
        "on SIGTERM, keep answering admissions this long while /healthz says 503, so that the API "
        "server stops calling this pod before it stops listening (as a preStop sleep does); keep it "
        "well under the pod's terminationGracePeriodSeconds (30 s by default), which kills it after",
        env="SIDEMESH_INJECTOR_SHUTDOWN_DELAY",
    )
    log_level: str = log_level_option()

    def __post_init__(self) -> None:
        parse_hostport("listen", self.listen)
        if self.metrics_listen:
            parse_hostport("metrics_listen", self.metrics_listen)
        check_distinct_listens([("listen", self.listen), ("metrics_listen", self.metrics_listen)])
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "tls_cert", "give both --tls-cert and --tls-key, or neither (certificate from the CA)"
            )
        check_trust_domain(self.trust_domain)
        if self.tls_cert is None:
            parse_dial_address("ca_address", self.ca_address)
            try:
                WorkloadId.parse(self.identity)
            except SpiffeIdError as exc:
                raise ConfigError("identity", str(exc)) from exc
        if self.reload_interval <= dt.timedelta(0):
            raise ConfigError("reload_interval", "must be positive")
        if self.shutdown_delay < dt.timedelta(0):
            raise ConfigError("shutdown_delay", "must not be negative")
