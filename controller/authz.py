"""`sidemesh authz check`: may A call B? Answered by the same compile and evaluation code the
controller and the sidecars run, against a directory of manifests or a live cluster."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidemesh.cli import CLIError
from sidemesh.mesh import directory
from sidemesh.mesh.compile import EXCLUDE_INBOUND, compile_inbound, excluded_inbound_ports, target_port
from sidemesh.mesh.resources import Snapshot, Workload
from sidemesh.policy.evaluate import evaluate
from sidemesh.policy.model import Decision, DefaultPolicy, Peer, Request
from sidemesh.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeIdError, WorkloadId, validate_trust_domain

_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")  # RFC 9110 9.1: a token


def register(sub: Any) -> None:
    authz = sub.add_parser(
        "authz", help="inspect authorization", description="Inspect ServiceAuthorization decisions."
    )
    authz.set_defaults(group_parser=authz)  # alone: its help, on stderr
    authz_sub = authz.add_subparsers(title="authz commands", metavar="COMMAND")
    p = authz_sub.add_parser(
        "check",
        help="may a source call a destination? prints allow or deny and why",
        description=(
            "Evaluate one request the way the destination's sidecar would, and print ALLOW or DENY with the reason "
            "(policy and rule, or the default), one line per workload --to names. Exit status: 0 allow (every workload), 1 deny (any "
            "of them), 2 error (a bad option or input, said on stderr, as are warnings). Example: sidemesh authz check "
            "--dir mesh/ --from shop/frontend --to shop/cart --port 8080 --method GET --path /cart/1 (mesh/ holding the YAML the controller reads, as in the demo)"
        ),
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="NAMESPACE/SERVICEACCOUNT of the caller, or 'unauthenticated' for a plaintext client",
    )
    p.add_argument(
        "--to",
        dest="target",
        required=True,
        help="NAMESPACE/NAME of the destination: a workload (pod), a Service, or a service account",
    )
    p.add_argument(
        "--port",
        type=int,
        required=True,
        help="destination port (the app's port, e.g. a Service's targetPort)",
    )
    p.add_argument("--method", help="HTTP method (omit for an opaque TCP connection)")
    p.add_argument("--path", help="HTTP path (with --method)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--dir", type=Path, help="a directory of mesh YAML (what `controller serve --source directory` reads)"
    )
    where.add_argument("--kubeconfig", type=Path, help="read a live cluster with this kubeconfig")
    p.add_argument(
        "--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain (default: %(default)s)"
    )
    p.add_argument(
        "--default-policy",
        default="allow-authenticated",
        choices=[d.value for d in DefaultPolicy],
        help="the mesh default (default: %(default)s)",
    )
    p.set_defaults(handler=_check)


@dataclass(frozen=True, slots=True)
class Verdict:
    workload: str
    decision: Decision


def targets(snapshot: Snapshot, namespace: str, name: str) -> list[Workload]:
    """Workloads named NAME, behind Service NAME, or running as service account NAME."""
    in_ns = [w for w in snapshot.workloads if w.namespace == namespace]
    service = next((s for s in snapshot.services if s.namespace == namespace and s.name == name), None)
    picked = [
        w
        for w in in_ns
        if w.name == name
        or w.service_account == name
        or (
            service is not None
            and service.selector
            and all(w.label_map.get(k) == v for k, v in service.selector)
        )
    ]
    return sorted(picked, key=lambda w: w.ref)


def check(
    snapshot: Snapshot,
    peer: Peer,
    target: WorkloadId,
    request: Request,
    trust_domain: str,
    mesh_default: DefaultPolicy,
) -> list[Verdict]:
    verdicts = []
    for w in targets(snapshot, target.namespace, target.service_account):
        unguarded = _unguarded(w, request.port)
        if unguarded is not None:  # nothing stands between the caller and the app: reachable
            verdicts.append(Verdict(w.ref, Decision(True, unguarded)))
            continue
        asked = request
        declared = _declaring_service(snapshot, w, request.port)
        if request.method is not None and (request.port in w.opaque_ports or declared is not None):
            # The sidecar carries this port as opaque TCP: no request is seen, no HTTP rule matches
            # (through a Service declaring it so: through another one, that caller's sidecar parses).
            asked = Request(request.peer, request.port)
        inbound = compile_inbound(
            snapshot, WorkloadId(w.namespace, w.service_account), trust_domain, mesh_default
        )
        me = next(x for x in inbound.workloads if x.ref == w.ref)
        policies = [p for p in inbound.policies if p.ref in me.policies]
        decision = evaluate(policies, me.default_policy, asked, trust_domain)
        if asked is not request:
            how = "" if declared is None else f" through Service {declared}, which declares it so"
            decision = dataclasses.replace(
                decision,
                reason=f"{decision.reason} (port {request.port} is opaque{how}: checked as a TCP connection)",
            )
        verdicts.append(Verdict(w.ref, decision))
    return verdicts


def _declaring_service(snapshot: Snapshot, w: Workload, port: int) -> str | None:
    """A Service selecting ``w`` whose opaque port (annotation, appProtocol or name) targets
    ``port`` there (NAMESPACE/NAME), or None."""
    for svc in snapshot.services:
        if (
            svc.namespace == w.namespace
            and svc.selector
            and all(w.label_map.get(k) == v for k, v in svc.selector)
        ):
            for sp in svc.ports:
                if sp.port in svc.delivery.opaque_ports and target_port(sp.target_port, w) == port:
                    return f"{svc.namespace}/{svc.name}"
    return None


def _unguarded(workload: Workload, port: int) -> str | None:
    """Why no sidecar enforces policy for this workload's port, or None when one does: the pod has
    no sidecar, or its sidecar does not capture the port (``sidemesh.io/exclude-inbound-ports``)."""
    if not workload.meshed:
        return "no sidecar enforces policy here (the workload is not meshed): any caller reaches it"
    excluded = excluded_inbound_ports(workload)
    if excluded is None or port in excluded:
        return (
            f"no sidecar enforces policy here (port {port} is excluded from inbound capture by "
            f"{EXCLUDE_INBOUND}): any caller reaches it"
        )
    return None


def _load(args: argparse.Namespace) -> Snapshot:
    if args.dir is not None:
        if not args.dir.is_dir():
            raise CLIError(f"{args.dir} is not a directory")
        return directory.load_directory(args.dir)
    from controller.sources.kubernetes import KubernetesSource, ListError, api_client_from

    try:  # one list of each kind; read-only (the controller writes the statuses, not a check)
        return KubernetesSource(api_client_from(args.kubeconfig), request_timeout=30.0).list_once()
    except ListError as exc:  # (the API server's whole answer was five lines of headers and body)
        raise CLIError(f"cannot read the cluster: {exc}") from exc
    except Exception as exc:
        why = " ".join(str(exc).split())
        raise CLIError(f"cannot read the cluster: {why}; check --kubeconfig") from exc


def _as_the_sidecar_sees(path: str) -> str:
    """``--path`` normalized as the inbound sidecar normalizes a request's before authorizing it
    (``sidemesh.policy.paths.normalize_path``: ``/cart/../debug`` is ``/debug``, ``%61`` is ``a``)."""
    from sidemesh.policy.paths import BadPath, normalize_path

    if not path.startswith("/"):
        raise CLIError(f"--path {path!r} must start with / (the sidecar answers 400 otherwise)")
    path = path.partition("?")[0]  # (the query is not part of what policies match)
    try:  # the bytes as given (os.fsencode: a byte that is not UTF-8 stays that byte)
        normal = normalize_path(os.fsencode(path)).decode("latin-1")
    except BadPath as exc:
        raise CLIError(f"--path {path!r}: {exc} (the sidecar answers 400)") from exc
    if normal != path:
        print(f"note: the sidecar sees the path as {normal}", file=sys.stderr)
    return normal


def _check(args: argparse.Namespace) -> int:
    try:
        target = WorkloadId.parse(args.target)
        if args.source == "unauthenticated":
            peer = Peer()
        else:
            src = WorkloadId.parse(args.source)
            peer = Peer(args.trust_domain, src.namespace, src.service_account)
        validate_trust_domain(args.trust_domain)
    except SpiffeIdError as exc:
        raise CLIError(
            f"{exc}; --from and --to take NAMESPACE/NAME, --trust-domain a name such as cluster.local"
        ) from exc
    if args.method is not None and _METHOD.fullmatch(args.method) is None:
        raise CLIError(f"--method {args.method!r} is not an HTTP method (a token, such as GET or POST)")
    if args.path and not args.method:
        raise CLIError("--path needs --method (an HTTP request has both)")
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port {args.port} is not a port number")
    snapshot = _load(args)
    for error in snapshot.errors:
        print(
            f"warning: invalid resource (a ServiceAuthorization allows nothing until it is fixed; "
            f"an invalid default-policy annotation counts as deny; a file that is not YAML contributes "
            f"nothing; anything else is ignored): {error}",
            file=sys.stderr,
        )
    if peer.authenticated:
        runs_as = [
            w
            for w in snapshot.workloads
            if (w.namespace, w.service_account) == (peer.namespace, peer.service_account)
        ]
        if runs_as and not any(w.meshed for w in runs_as):
            # No sidecar to present that identity: such a caller connects in plaintext (ALLOW for
            # the service account was not what its pods get).
            print(
                f"note: the pods running as {args.source} have no sidecar: they call in plaintext, as "
                "the unauthenticated principal (a strict-mode workload refuses them before any policy)",
                file=sys.stderr,
            )
            peer = Peer()
    path = args.path or ("/" if args.method else None)
    if path is not None:
        path = _as_the_sidecar_sees(path)
    request = Request(
        peer,
        args.port,
        args.method or None,  # as given: methods are case-sensitive, as the sidecars compare them
        path,
    )
    verdicts = check(snapshot, peer, target, request, args.trust_domain, DefaultPolicy(args.default_policy))
    if not verdicts:
        raise CLIError(f"no workload, Service or service account {args.target} found; check --to")
    for v in verdicts:
        word = (
            "ALLOW"
            if v.decision.allowed and not v.decision.audit
            else ("ALLOW (audit)" if v.decision.allowed else "DENY")
        )
        print(f"{word} {args.source} -> {v.workload}:{args.port}: {v.decision.reason}")
    return 0 if all(v.decision.allowed for v in verdicts) else 1
