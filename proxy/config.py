"""`sidemesh proxy run` configuration: every option, its default and its environment variable."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from proxy.probes import parse_app_metrics, parse_app_probes
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

PROXY_UID = 1337


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    workload: str = option(
        "", "NAMESPACE/NAME of this workload in the mesh configuration", env="SIDEMESH_WORKLOAD"
    )
    controller: str = option(
        "",
        "controller address HOST:PORT (the config stream); empty: read --config-dir",
        env="SIDEMESH_CONTROLLER",
    )
    controller_name: str = option(
        "sidemesh-controller.sidemesh-system.svc",
        "DNS name the controller's certificate must carry",
        env="SIDEMESH_CONTROLLER_NAME",
    )
    service_account: str = option(
        "",
        "this workload's service account (with --controller; POD's spec.serviceAccountName)",
        env="SIDEMESH_SERVICE_ACCOUNT",
    )
    config_dir: Path | None = option(
        None, "directory of mesh YAML (local mode; reloaded on change)", env="SIDEMESH_CONFIG_DIR"
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
    trust_domain: str = trust_domain_option()
    mode: str = option(
        "strict",
        "inbound plaintext: refused (strict) or unauthenticated (permissive)",
        env="SIDEMESH_MODE",
        choices=("strict", "permissive"),
    )
    default_policy: str = option(
        "allow-authenticated",
        "mesh default for workloads no ServiceAuthorization selects",
        env="SIDEMESH_DEFAULT_POLICY",
        choices=tuple(d.value for d in DefaultPolicy),
    )
    capture: str = option(
        "iptables",
        "how traffic reaches the proxy: iptables redirect, or explicit listeners (local mode)",
        env="SIDEMESH_CAPTURE",
        choices=("iptables", "none"),
    )
    inbound_listen: str = option("0.0.0.0:15006", "inbound (mTLS) listener", env="SIDEMESH_INBOUND_LISTEN")
    outbound_listen: str = option(
        "127.0.0.1:15001", "outbound capture listener (iptables mode)", env="SIDEMESH_OUTBOUND_LISTEN"
    )
    outbound: tuple[str, ...] = option(
        (), "local mode: LISTEN=SERVICE:PORT maps, e.g. 127.0.1.1:18080=cart.shop:80", env="SIDEMESH_OUTBOUND"
    )
    admin_listen: str = option(
        "127.0.0.1:15000",
        "admin endpoint: /config, /certs, /connections, /stats/routes (what `sidemesh top` reads), /healthz/ready",
        env="SIDEMESH_ADMIN_LISTEN",
    )
    health_listen: str = option(
        "0.0.0.0:15020",
        "/healthz/ready, /healthz/live, /metrics, the app's rewritten probes (/app-health/...) and "
        "POST /quitquitquit (from the pod itself)",
        env="SIDEMESH_HEALTH_LISTEN",
    )
    app_host: str = option(
        "127.0.0.1",
        "the app's address for inbound connections in local mode (--capture none) and for the app's "
        "probes; under the iptables capture they go to the address the caller asked for (the pod's)",
        env="SIDEMESH_APP_HOST",
    )
    passthrough: bool = option(
        True,
        "let connections to destinations outside the mesh through in plaintext",
        env="SIDEMESH_PASSTHROUGH",
    )
    connect_timeout: dt.timedelta = option(
        dt.timedelta(seconds=5),
        "upstream connect (and TLS handshake) timeout",
        env="SIDEMESH_CONNECT_TIMEOUT",
    )
    detect_timeout: dt.timedelta = option(
        dt.timedelta(seconds=1),
        "how long a new connection's first bytes are awaited to detect its protocol (inbound, and "
        "outbound to destinations not marked opaque); nothing decided by then: opaque TCP",
        env="SIDEMESH_DETECT_TIMEOUT",
    )
    undecided_timeout: dt.timedelta = option(
        dt.timedelta(seconds=10),
        "an outbound connection whose detection timed out (the app sent nothing, or bytes that decided "
        "nothing) is closed unless the destination has sent a byte this long after the app connected "
        "(a server-speaks-first protocol answers at once; an idle or trickling connection never gets an "
        'answer); counted as sidemesh_proxy_connections_timed_out_total{reason="undecided"}; 0: never',
        env="SIDEMESH_UNDECIDED_TIMEOUT",
    )
    undecided_dial_rate: float = option(
        20.0,
        "outbound connections whose detection timed out dial their destination (an mTLS handshake) at "
        "most this many a second (after a burst of as many), in arrival order; one whose turn would come "
        "after its --undecided-timeout is never dialed (closed at that timeout). Connections that sent "
        "something decisive dial at once",
        env="SIDEMESH_UNDECIDED_DIAL_RATE",
    )
    idle_timeout: dt.timedelta = option(
        dt.timedelta(hours=1), "close connections idle this long", env="SIDEMESH_IDLE_TIMEOUT"
    )
    request_head_timeout: dt.timedelta = option(
        dt.timedelta(seconds=10),
        "an HTTP/1.1 request head must arrive whole this long after its first byte, else 408 and the "
        'connection is closed (slow clients); counted as sidemesh_proxy_connections_timed_out_total{reason="head"}',
        env="SIDEMESH_REQUEST_HEAD_TIMEOUT",
    )
    drain_timeout: dt.timedelta = option(
        dt.timedelta(seconds=20),
        "on SIGTERM, how long open connections may finish",
        env="SIDEMESH_DRAIN_TIMEOUT",
    )
    max_connections: int = option(
        4_096,
        "open connections per direction (inbound, outbound) at most; more are reset at once and counted "
        'as sidemesh_proxy_connections_total{decision="overflow"} (each outbound connection uses two '
        "file descriptors: keep this under half the open-files limit)",
        env="SIDEMESH_MAX_CONNECTIONS",
    )
    drain_grace: dt.timedelta = option(
        dt.timedelta(0),
        "on SIGTERM, keep the app's outbound listeners open at least this long even with no connection "
        "open, counted from the answer to the app's preStop hook when the drain waits for one, never past "
        "--drain-timeout (for classic sidecars, whose app may still call out while it shuts down; the "
        "injector sets 5s)",
        env="SIDEMESH_DRAIN_GRACE",
    )
    app_probes: str = option(
        "",
        "the app's original HTTP/TCP/gRPC probes, JSON written by the injector (/app-health/<container>/<kind>)",
        env="SIDEMESH_APP_PROBES",
    )
    app_metrics: str = option(
        "",
        "the app's own metrics page, JSON written by the injector from its prometheus.io annotations "
        '({"port": 9102, "path": "/metrics"}): merged with the sidecar\'s on the health port\'s '
        "/stats/prometheus, so a Prometheus outside the mesh still scrapes the app under strict mTLS",
        env="SIDEMESH_APP_METRICS",
    )
    access_log: bool = option(
        False,
        "one JSON line per HTTP request and per TCP connection (identities, decision, bytes, duration); "
        "off by default, as in Istio and Linkerd (denials are logged either way)",
        env="SIDEMESH_ACCESS_LOG",
    )
    access_log_sample: float = option(
        1.0,
        "fraction of successful requests and connections logged, 0 to 1 (denials and errors: always)",
        env="SIDEMESH_ACCESS_LOG_SAMPLE",
    )
    log_level: str = log_level_option()

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError("max_connections", f"{self.max_connections} must be at least 1")
        if not self.undecided_dial_rate > 0:
            raise ConfigError("undecided_dial_rate", f"{self.undecided_dial_rate:g} must be more than 0")
        if self.request_head_timeout <= dt.timedelta(0):
            raise ConfigError("request_head_timeout", "must be more than 0")
        if self.idle_timeout <= dt.timedelta(0):
            raise ConfigError("idle_timeout", "must be more than 0")
        if self.connect_timeout <= dt.timedelta(0):
            raise ConfigError("connect_timeout", "must be more than 0")
        check_trust_domain(self.trust_domain)
        if self.undecided_timeout < dt.timedelta(0):
            raise ConfigError("undecided_timeout", "must not be negative")
        if not 0.0 <= self.access_log_sample <= 1.0:
            raise ConfigError("access_log_sample", f"{self.access_log_sample:g} is not between 0 and 1")
        if not self.workload:
            raise ConfigError("workload", "required: NAMESPACE/NAME (POD_NAMESPACE/POD_NAME in a pod)")
        if "/" not in self.workload:
            raise ConfigError(
                "workload", f"{self.workload!r} is not NAMESPACE/NAME (e.g. shop/{self.workload})"
            )
        for name in ("inbound_listen", "outbound_listen", "admin_listen", "health_listen"):
            parse_hostport(name, getattr(self, name))
        parse_dial_address("ca_address", self.ca_address)  # (grpc dials a port over 65535 modulo 65536)
        check_distinct_listens(
            [
                (name, getattr(self, name))
                for name in ("inbound_listen", "outbound_listen", "admin_listen", "health_listen")
                if name != "outbound_listen" or self.capture == "iptables"  # (bound with the capture only)
            ]
            + [("outbound", entry.partition("=")[0]) for entry in self.outbound]
        )
        for entry in self.outbound:
            listen, sep, target = entry.partition("=")
            if not sep or ":" not in target:
                raise ConfigError("outbound", f"{entry!r} is not LISTEN=SERVICE:PORT")
            parse_hostport("outbound", listen)
            service, _, port = target.rpartition(":")
            if not service or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ConfigError(
                    "outbound", f"{entry!r}: {target!r} is not SERVICE:PORT (e.g. cart.shop:80, port 1-65535)"
                )
        try:
            parse_app_probes(self.app_probes)
        except ValueError as exc:
            raise ConfigError("app_probes", str(exc)) from exc
        try:
            parse_app_metrics(self.app_metrics)
        except ValueError as exc:
            raise ConfigError("app_metrics", str(exc)) from exc
        if bool(self.controller) == (self.config_dir is not None):
            raise ConfigError(
                "controller", "give either --controller (the config stream) or --config-dir (local files)"
            )
        if self.controller:
            parse_dial_address("controller", self.controller)
            if not self.service_account:
                raise ConfigError("service_account", "required with --controller")

    def outbound_maps(self) -> list[tuple[tuple[str, int], str]]:
        out = []
        for entry in self.outbound:
            listen, _, target = entry.partition("=")
            out.append((parse_hostport("outbound", listen), target))
        return out
