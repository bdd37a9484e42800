"""`sidemesh ca serve` configuration: every option, its default and its environment variable."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from sidemesh.config import (
    ConfigError,
    check_distinct_listens,
    format_duration,
    log_level_option,
    option,
    parse_hostport,
    trust_domain_option,
)
from sidemesh.spiffe import SpiffeIdError, WorkloadId, validate_trust_domain

DEFAULT_DNS_NAMES = (
    "sidemesh-ca",
    "sidemesh-ca.sidemesh-system",
    "sidemesh-ca.sidemesh-system.svc",
    "sidemesh-ca.sidemesh-system.svc.cluster.local",
)  # (clients check sidemesh-ca.sidemesh-system.svc whatever address they dial: no localhost)


_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def dns_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a dNSName SAN (RFC 5280 4.2.1.6: a host name in preferred name
    syntax, ASCII: an internationalized name goes in as its A-labels), or None."""
    if not name or len(name) > 253:
        return "is not a DNS name (1 to 253 characters)"
    if not name.isascii():
        return "is not ASCII: give an internationalized name as its A-labels (xn--...)"
    if not all(_LABEL.match(label) for label in name.split(".")):
        return "is not a DNS name: labels of letters, digits and inner hyphens, 1 to 63 each, joined by dots"
    return None


@dataclass(frozen=True, slots=True)
class CAConfig:
    listen: str = option("0.0.0.0:15012", "gRPC (TLS) address to serve on", env="SIDEMESH_CA_LISTEN")
    metrics_listen: str = option(
        "0.0.0.0:15014",
        "address of /metrics and the /healthz/ready, /healthz/live probes; empty disables",
        env="SIDEMESH_CA_METRICS_LISTEN",
    )
    ca_dir: Path = option(
        Path("/var/run/secrets/sidemesh/ca"),
        "directory with ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem (see `ca bootstrap`)",
        env="SIDEMESH_CA_DIR",
    )
    trust_domain: str = trust_domain_option()
    authenticator: str = option(
        "kubernetes",
        "how callers prove who they are: Kubernetes TokenReview or a local token file",
        env="SIDEMESH_CA_AUTHENTICATOR",
        choices=("kubernetes", "local"),
    )
    token_file: Path | None = option(
        None, "local token file (with --authenticator local)", env="SIDEMESH_CA_TOKEN_FILE"
    )
    kubeconfig: Path | None = option(None, "kubeconfig; in-cluster config when unset", env="KUBECONFIG")
    token_review_cache: dt.timedelta = option(
        dt.timedelta(seconds=60),
        "how long a token TokenReview accepted is trusted without asking again (never past its exp); 0 disables",
        env="SIDEMESH_CA_TOKEN_REVIEW_CACHE",
    )
    default_ttl: dt.timedelta = option(
        dt.timedelta(hours=1), "certificate lifetime when the caller asks none", env="SIDEMESH_CA_DEFAULT_TTL"
    )
    min_ttl: dt.timedelta = option(
        dt.timedelta(minutes=5),
        "shortest lifetime; shorter requests are raised to it",
        env="SIDEMESH_CA_MIN_TTL",
    )
    max_ttl: dt.timedelta = option(
        dt.timedelta(hours=24), "longest lifetime; longer requests are cut to it", env="SIDEMESH_CA_MAX_TTL"
    )
    rate_limit: float = option(
        1.0, "signings per second per identity, sustained; 0 disables", env="SIDEMESH_CA_RATE_LIMIT"
    )
    rate_burst: int = option(20, "signings per identity allowed at once", env="SIDEMESH_CA_RATE_BURST")
    identity: str = option(
        "sidemesh-system/sidemesh-ca",
        "namespace/serviceaccount of the CA itself (its serving certificate's SPIFFE ID)",
        env="SIDEMESH_CA_IDENTITY",
    )
    dns_names: tuple[str, ...] = option(
        DEFAULT_DNS_NAMES, "DNS names in the CA's serving certificate", env="SIDEMESH_CA_DNS_NAMES"
    )
    control_plane_dns: tuple[str, ...] = option(
        (
            "sidemesh-system/sidemesh-controller=sidemesh-controller.sidemesh-system.svc",
            "sidemesh-system/sidemesh-injector=sidemesh-injector.sidemesh-system.svc",
        ),
        "NAMESPACE/SA=DNSNAME entries: DNS SANs the CA allows in that identity's certificate (control plane only)",
        env="SIDEMESH_CA_CONTROL_PLANE_DNS",
    )
    batch_helper_threads: bool = option(
        True,
        "run gRPC's I/O and completion-queue threads under SCHED_BATCH, so that they do not preempt the "
        "thread that signs (Linux; see docs/ca.md)",
        env="SIDEMESH_CA_BATCH_HELPER_THREADS",
    )
    log_level: str = log_level_option()

    def __post_init__(self) -> None:
        for name in self.dns_names:
            if problem := dns_name_problem(name):
                raise ConfigError("dns_names", f"{name!r} {problem}")
        parse_hostport("listen", self.listen)
        if self.metrics_listen:
            parse_hostport("metrics_listen", self.metrics_listen)
        check_distinct_listens([("listen", self.listen), ("metrics_listen", self.metrics_listen)])
        try:
            validate_trust_domain(self.trust_domain)
            WorkloadId.parse(self.identity)
        except SpiffeIdError as exc:
            raise ConfigError("trust_domain" if "trust domain" in str(exc) else "identity", str(exc)) from exc
        if self.authenticator == "local" and self.token_file is None:
            raise ConfigError("token_file", "required with --authenticator local")
        if not dt.timedelta(0) < self.min_ttl <= self.default_ttl <= self.max_ttl:
            wrong = (  # (the option that is out of order: it blamed --default-ttl whatever it was)
                "min_ttl" if not dt.timedelta(0) < self.min_ttl <= self.max_ttl else "default_ttl"
            )
            raise ConfigError(
                wrong,
                f"need 0 < --min-ttl <= --default-ttl <= --max-ttl (here {format_duration(self.min_ttl)}, "
                f"{format_duration(self.default_ttl)}, {format_duration(self.max_ttl)})",
            )
        for entry in self.control_plane_dns:
            ident, sep, name = entry.partition("=")
            try:
                WorkloadId.parse(ident)
            except SpiffeIdError as exc:
                raise ConfigError("control_plane_dns", f"{entry!r}: {exc}") from exc
            if not sep or not name:
                raise ConfigError("control_plane_dns", f"{entry!r} is not NAMESPACE/SA=DNSNAME")
            if problem := dns_name_problem(name):
                raise ConfigError("control_plane_dns", f"{entry!r}: {name!r} {problem}")
        if self.token_review_cache < dt.timedelta(0):
            raise ConfigError("token_review_cache", "must not be negative")
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ConfigError(
                "rate_limit" if self.rate_limit < 0 else "rate_burst",
                "need --rate-limit >= 0 and --rate-burst >= 1",
            )

    def allowed_dns(self, identity: WorkloadId) -> frozenset[str]:
        return self.allowed_dns_by_identity().get(identity, frozenset())

    def allowed_dns_by_identity(self) -> dict[WorkloadId, frozenset[str]]:
        """``control_plane_dns`` as a map (the servicer keeps it rather than parse it per request)."""
        names: dict[WorkloadId, set[str]] = {}
        for entry in self.control_plane_dns:
            ident, _, name = entry.partition("=")
            names.setdefault(WorkloadId.parse(ident), set()).add(name)
        return {identity: frozenset(dns) for identity, dns in names.items()}
