"""`sidemesh ca ...`: bootstrap keys, serve, issue a certificate, make a local token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ca import keys, sched
from ca.authn import Authenticator, KubernetesTokenAuthenticator, LocalTokenAuthenticator
from ca.config import CAConfig
from ca.errors import KeyMaterialError, SigningUnavailable
from sidemesh import config as cfg
from sidemesh import logging as smlog
from sidemesh.cli import CLIError, listen_error
from sidemesh.identity.bundle import spiffe_bundle
from sidemesh.identity.certificate import load_pem_certificates
from sidemesh.identity.client import CAClient, CAClientError
from sidemesh.identity.svid import (
    SVID,
    UNREADABLE,
    SvidError,
    foreign_roots,
    load_bundle,
    new_request,
    own_roots,
    pem_of,
    root_trust_domains,
)
from sidemesh.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeIdError, WorkloadId, validate_trust_domain


def _trust_domain(text: str) -> str:
    try:
        return validate_trust_domain(text)
    except SpiffeIdError as exc:
        hint = " (the name alone, without spiffe://)" if text.startswith("spiffe://") else ""
        raise argparse.ArgumentTypeError(f"{exc}{hint}") from None


def register(sub: Any) -> None:
    ca = sub.add_parser(
        "ca", help="the certificate authority", description="The Sidemesh certificate authority."
    )
    ca.set_defaults(group_parser=ca)  # alone: its help, on stderr
    ca_sub = ca.add_subparsers(title="ca commands", metavar="COMMAND")

    p = ca_sub.add_parser(
        "bootstrap",
        help="create a root and an intermediate CA",
        description=(
            "Create a new root and intermediate in DIR (ca-cert.pem, ca-key.pem, cert-chain.pem, "
            "root-cert.pem, root-key.pem). `ca serve --ca-dir DIR` signs with the intermediate."
        ),
    )
    p.add_argument("--dir", type=Path, required=True, help="where to write the files")
    p.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default=DEFAULT_TRUST_DOMAIN,
        help="SPIFFE trust domain: lowercase letters, digits, '.', '-', '_' (default: %(default)s)",
    )
    p.add_argument(
        "--root-lifetime",
        type=cfg.duration_arg(dt.timedelta(days=1)),
        default=dt.timedelta(days=3650),
        help="root lifetime, at least 1d (default: 3650d)",
    )
    p.add_argument(
        "--intermediate-lifetime",
        type=cfg.duration_arg(dt.timedelta(days=1)),
        default=dt.timedelta(days=365),
        help="intermediate lifetime, at least 1d; it never outlives the root (capped at its end) (default: 365d)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    p.set_defaults(handler=_bootstrap)

    p = ca_sub.add_parser(
        "serve",
        help="serve the CA over gRPC+TLS",
        description=(
            "Serve the CA: sign workload CSRs for callers authenticated by a bearer token. Every option "
            "can also be set by the environment variable named in its help."
        ),
        epilog="""examples:
  # on one machine (local mode): a CA, a token for shop/cart, its certificate
  sidemesh ca bootstrap --dir ca
  sidemesh ca local-token --file tokens.yaml --identity shop/cart > cart.token
  sidemesh ca serve --ca-dir ca --authenticator local --token-file tokens.yaml --listen 127.0.0.1:15012
  sidemesh ca issue --ca 127.0.0.1:15012 --bundle ca/root-cert.pem --token-file cart.token \\
      --identity shop/cart --out-dir cart

"""
        + cfg.TRACING_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfg.add_arguments(p, CAConfig)
    p.set_defaults(handler=_serve)

    p = ca_sub.add_parser(
        "issue",
        help="obtain a certificate with a token and write it to files",
        description=(
            "Ask a running CA for an SVID and write key.pem (0600), cert-chain.pem and bundle.pem to --out-dir."
        ),
        epilog="""example:
  sidemesh ca issue --ca 127.0.0.1:15012 --bundle ca/root-cert.pem --token-file cart.token \\
      --identity shop/cart --out-dir cart
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ca", required=True, help="CA address, HOST:PORT")
    p.add_argument("--bundle", type=Path, required=True, help="trust bundle (root-cert.pem) to verify the CA")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--token", help="bearer token (prefer --token-file: arguments are visible in ps)")
    g.add_argument("--token-file", type=Path, help="file holding the bearer token")
    p.add_argument("--identity", required=True, help="NAMESPACE/SERVICEACCOUNT the token belongs to")
    p.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default=DEFAULT_TRUST_DOMAIN,
        help="SPIFFE trust domain: lowercase letters, digits, '.', '-', '_' (default: %(default)s)",
    )
    p.add_argument(
        "--ttl",
        type=cfg.duration_arg(dt.timedelta(seconds=1)),
        default=None,
        help="requested lifetime, e.g. 1h (default: the CA's)",
    )
    p.add_argument(
        "--out-dir", type=Path, required=True, help="directory for key.pem, cert-chain.pem, bundle.pem"
    )
    p.set_defaults(handler=_issue)

    p = ca_sub.add_parser(
        "local-token",
        help="add a token to a local token file (local mode)",
        description=(
            "Create a random token for NAMESPACE/SERVICEACCOUNT, append it to the token file used by "
            "`ca serve --authenticator local`, and print it."
        ),
    )
    p.add_argument("--file", type=Path, required=True, help="token file (created if missing)")
    p.add_argument("--identity", required=True, help="NAMESPACE/SERVICEACCOUNT")
    p.add_argument(
        "--expires-in",
        type=cfg.duration_arg(dt.timedelta(minutes=1)),
        default=None,
        help="token lifetime, at least 1m, e.g. 30d (default: never expires)",
    )
    p.set_defaults(handler=_local_token)

    p = ca_sub.add_parser(
        "bundle",
        help="print the trust bundle (PEM, or a SPIFFE bundle for federation)",
        description=(
            "Print the roots a workload trusts: as PEM (root-cert.pem's format), or as a SPIFFE bundle "
            "(a JWK Set with one x509-svid entry per root, as SPIRE and go-spiffe read it for federation)."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ca-dir", type=Path, help="the CA's directory (reads its root-cert.pem)")
    src.add_argument("--bundle-file", type=Path, help="a PEM file of root certificates")
    p.add_argument("--format", choices=["pem", "spiffe"], default="pem", help="output format (default: pem)")
    p.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default=None,
        help="the trust domain the bundle is for: roots naming only others are left out, with a warning "
        f"(default: with --ca-dir, the one its signing certificate names; else {DEFAULT_TRUST_DOMAIN})",
    )
    p.add_argument(
        "--refresh-hint",
        type=cfg.duration_arg(dt.timedelta(seconds=1)),
        default=None,
        help="spiffe format: how often a consumer should fetch the bundle again, e.g. 5m (default: none)",
    )
    p.add_argument(
        "--sequence",
        type=_uint64,
        default=None,
        help="spiffe format: the bundle's spiffe_sequence, 0 to 2^64-1 (default: none)",
    )
    p.set_defaults(handler=_bundle)


def _uint64(text: str) -> int:
    """spiffe_sequence is an unsigned 64-bit number (SPIFFE Trust Domain and Bundle, 4.1.2)."""
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 2^64-1")
    return int(text)


def _bootstrap(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC)
    for option, lifetime in (
        ("--root-lifetime", args.root_lifetime),
        ("--intermediate-lifetime", args.intermediate_lifetime),
    ):
        try:  # before anything is written: a certificate cannot end past the year 9999
            now + lifetime
        except OverflowError:
            raise CLIError(
                f"{option} {cfg.format_duration(lifetime)} goes past the year 9999; give less"
            ) from None
    try:
        authority = keys.bootstrap(
            args.dir,
            args.trust_domain,
            now,
            args.root_lifetime,
            args.intermediate_lifetime,
            force=args.force,
        )
    except (KeyMaterialError, SpiffeIdError) as exc:
        raise CLIError(str(exc)) from exc
    except OSError as exc:  # not a directory, not writable
        raise CLIError(
            f"cannot write --dir {args.dir}: {exc.strerror}; pick a directory you can write"
        ) from exc
    print(f"wrote a root and an intermediate CA for trust domain {args.trust_domain} to {args.dir}")
    print(f"  intermediate valid until {authority.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    print(
        f"  keep {args.dir / keys.ROOT_KEY} offline; `sidemesh ca serve --ca-dir {args.dir}` does not need it"
    )
    return 0


def make_authenticator(config: CAConfig) -> Authenticator:
    if config.authenticator == "local":
        assert config.token_file is not None
        try:
            return LocalTokenAuthenticator(config.token_file)
        except FileNotFoundError as exc:
            raise CLIError(
                f"--token-file {config.token_file}: no such file; create one with "
                f"`sidemesh ca local-token --file {config.token_file} --identity NS/SA`"
            ) from exc
        except (OSError, ValueError) as exc:  # there, but unreadable or broken: fix it, or start anew
            raise CLIError(
                f"{exc}; fix it, or move it away and create one with "
                f"`sidemesh ca local-token --file {config.token_file} --identity NS/SA`"
            ) from exc
    from kubernetes import client
    from kubernetes import config as kconfig

    try:
        if config.kubeconfig is not None:
            kconfig.load_kube_config(str(config.kubeconfig))
        else:
            kconfig.load_incluster_config()
    except Exception as exc:  # (a kubeconfig that is not YAML, or not a mapping: the client's own errors)
        why = " ".join(str(exc).split())
        raise CLIError(
            f"cannot reach the Kubernetes API ({why}); set --kubeconfig, or use --authenticator local"
        ) from exc
    return KubernetesTokenAuthenticator(
        client.ApiClient(), cache_for=config.token_review_cache, known_for=config.max_ttl
    )


def _serve(args: argparse.Namespace) -> int:
    from ca.server import CAServer

    config = cfg.load(CAConfig, args)
    smlog.setup(config.log_level)
    # The JSON lines never show the caller's source line, thread or process: do not collect them for
    # every record (the logging HOWTO's "Optimization"; half the cost of an audit line).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    authenticator = make_authenticator(config)
    try:
        server = CAServer(config, authenticator)
    except KeyMaterialError as exc:
        raise CLIError(str(exc)) from exc
    except SigningUnavailable as exc:  # its own serving certificate: an expired or future chain
        raise CLIError(
            f"{exc.detail}: put a signing certificate valid now into {config.ca_dir} (or check the clock)"
        ) from exc

    async def run() -> None:
        try:
            await server.start()
        except (RuntimeError, OSError) as exc:
            await server.stop(grace=0)
            raise listen_error(
                exc, {"--listen": config.listen, "--metrics-listen": config.metrics_listen}
            ) from exc
        if config.batch_helper_threads:  # this process is the CA's alone: its threads are ours to tune
            changed = sched.batch_helper_threads()
            logging.getLogger("sidemesh.ca").info(
                "gRPC helper threads under SCHED_BATCH", extra={"threads": changed}
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(grace=5.0)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run())
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a dependency; the proxy and injector use it too):
    its loop machinery is C, which the CA's every call runs through several times (grpc.aio's tasks,
    futures and completion-queue wake-ups). Measured: ~4-5% more signings per second on one core.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - plain asyncio works too
        return None
    return uvloop.new_event_loop


def _issue(args: argparse.Namespace) -> int:
    try:
        identity = WorkloadId.parse(args.identity).spiffe_id(args.trust_domain)
    except SpiffeIdError as exc:
        raise CLIError(f"{exc}; --identity takes NAMESPACE/SERVICEACCOUNT") from exc
    try:
        port = cfg.parse_hostport("ca", args.ca)[1]
    except cfg.ConfigError:
        port = 0
    if port == 0:  # (grpc would dial a port over 65535 modulo 65536)
        raise CLIError(f"--ca {args.ca!r} is not HOST:PORT with a port of 1-65535")
    try:
        token = args.token if args.token is not None else args.token_file.read_text().strip()
    except OSError as exc:
        raise CLIError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        token = ""  # not a token: said below
    if not token or not token.isascii() or not token.isprintable():  # one line of printable ASCII
        where = "--token-file" if args.token is None else "--token"
        raise CLIError(
            f"{where} must be one token, as `sidemesh ca local-token` prints it or a ServiceAccount "
            "token (not the token file that `sidemesh ca serve --token-file` reads)"
        )
    try:
        roots = own_roots(load_bundle(args.bundle.read_bytes()), identity.trust_domain)
    except OSError as exc:
        raise CLIError(
            f"cannot read --bundle {args.bundle}: {exc.strerror}; give the CA's root-cert.pem"
        ) from exc
    except SvidError as exc:
        raise CLIError(f"--bundle {args.bundle}: {exc}; give the CA's root-cert.pem") from exc
    bundle = pem_of(roots)
    ttl = int(args.ttl.total_seconds()) if args.ttl else 0
    created = not args.out_dir.exists()
    try:  # before asking the CA: a certificate issued and then not written helps nobody
        args.out_dir.mkdir(parents=True, exist_ok=True)
        probe = args.out_dir / f".sidemesh-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                args.out_dir.rmdir()
        raise CLIError(
            f"cannot write --out-dir {args.out_dir}: {exc.strerror}; pick another directory"
        ) from exc

    async def run() -> SVID:
        client = CAClient(args.ca, bundle)
        try:
            key, csr = new_request(identity)
            resp = await client.sign(token, csr, ttl)
            return SVID.from_pem(key, list(resp.cert_chain), list(resp.trust_bundle), identity)
        finally:
            await client.close()

    try:
        svid = asyncio.run(run())
    except (CAClientError, SvidError) as exc:
        if created:  # nothing was issued: no empty directory left behind
            with contextlib.suppress(OSError):
                args.out_dir.rmdir()
        if isinstance(exc, SvidError):
            raise CLIError(str(exc)) from exc
        hint = {
            "UNAVAILABLE": "is the CA running at that address, and is --bundle its root-cert.pem?",
            "DEADLINE_EXCEEDED": "the CA did not answer in time: is --ca the CA's gRPC port (15012)?",
            "UNAUTHENTICATED": "check the token (and that it belongs to --identity)",
            "PERMISSION_DENIED": "--identity must be the identity the token belongs to",
        }.get(exc.code.name, "")
        # (unavailable or out of time: nothing refused anything, the CA was not reached)
        what = (
            "could not reach the CA"
            if exc.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
            else "the CA refused"
        )
        raise CLIError(f"{what} at {args.ca}: {exc}{'; ' + hint if hint else ''}") from exc
    keys.write_file(args.out_dir / "key.pem", svid.key_pem)
    (args.out_dir / "cert-chain.pem").write_bytes(svid.chain_pem)
    (args.out_dir / "bundle.pem").write_bytes(svid.bundle_pem)
    print(
        f"issued {svid.spiffe_id} serial {svid.serial_hex}, valid until {svid.not_after:%Y-%m-%d %H:%M:%S} UTC"
    )
    print(f"  wrote key.pem, cert-chain.pem, bundle.pem to {args.out_dir}")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    if args.format != "spiffe" and (args.refresh_hint is not None or args.sequence is not None):
        # (a PEM bundle has neither: they were dropped without a word)
        raise CLIError("--refresh-hint and --sequence are fields of the SPIFFE bundle: add --format spiffe")
    path = args.ca_dir / keys.ROOTS if args.ca_dir is not None else args.bundle_file
    try:
        roots = load_bundle(path.read_bytes())
    except OSError as exc:
        hint = " (the directory `sidemesh ca bootstrap --dir` wrote)" if args.ca_dir is not None else ""
        raise CLIError(f"cannot read {path}: {exc.strerror}{hint}") from exc
    except SvidError as exc:
        raise CLIError(f"{path}: {exc}") from exc
    for number, cert in enumerate(roots, 1):
        if not cert.is_ca:  # (a consumer would take a workload's key as an authority for the domain)
            raise CLIError(
                f"{path}: certificate {number} ({cert.subject or 'no subject'}) is not a CA certificate "
                "(basicConstraints CA:true): a trust bundle holds CA certificates only (X509-SVID 6.1); "
                "remove it"
            )
    # Only this trust domain's roots: a consumer trusts every root of the bundle for it (X509-SVID
    # 6.2), so another trust domain's root would mint IDs of ours; workloads leave them out too.
    if args.trust_domain is None:
        args.trust_domain = _ca_trust_domain(args.ca_dir) if args.ca_dir is not None else DEFAULT_TRUST_DOMAIN
    for root in foreign_roots(roots, args.trust_domain):
        print(
            f"sidemesh ca bundle: left out {root.subject!r}: it names trust domain "
            f"{', '.join(sorted(root_trust_domains(root)))}, not {args.trust_domain}",
            file=sys.stderr,
        )
    try:
        roots = own_roots(roots, args.trust_domain)
    except SvidError as exc:
        raise CLIError(f"{path}: {exc}; give --trust-domain the bundle's trust domain") from exc
    if args.format == "pem":
        sys.stdout.write(pem_of(roots).decode())
        return 0
    refresh = int(args.refresh_hint.total_seconds()) if args.refresh_hint is not None else None
    try:
        doc = spiffe_bundle(roots, refresh_hint=refresh, sequence=args.sequence)
    except ValueError as exc:
        raise CLIError(f"{path}: {exc}") from exc
    print(json.dumps(doc, indent=2))
    return 0


def _ca_trust_domain(ca_dir: Path) -> str:
    """The trust domain the CA directory's signing certificate names (ours name one), else the default."""
    try:
        cert = load_pem_certificates((ca_dir / keys.CA_CERT).read_bytes())[0]
    except (OSError, ValueError):
        return DEFAULT_TRUST_DOMAIN
    named = sorted(root_trust_domains(cert))
    return named[0] if len(named) == 1 and named[0] != UNREADABLE else DEFAULT_TRUST_DOMAIN


def _local_token(args: argparse.Namespace) -> int:
    try:
        identity = WorkloadId.parse(args.identity)
    except SpiffeIdError as exc:
        raise CLIError(str(exc)) from exc
    doc: dict[str, Any] = {"tokens": []}
    if args.file.exists():
        doc = _token_file(args.file)
    token = secrets.token_urlsafe(32)
    entry: dict[str, Any] = {
        "token": token,
        "namespace": identity.namespace,
        "serviceAccount": identity.service_account,
    }
    if args.expires_in is not None:
        try:
            entry["expiresAt"] = (dt.datetime.now(dt.UTC) + args.expires_in).strftime("%Y-%m-%dT%H:%M:%SZ")
        except OverflowError:
            raise CLIError(
                f"--expires-in {cfg.format_duration(args.expires_in)} goes past the year 9999; give less"
            ) from None
    doc["tokens"].append(entry)
    try:
        args.file.parent.mkdir(parents=True, exist_ok=True)
        keys.write_file(args.file, yaml.safe_dump(doc, sort_keys=False).encode())
    except OSError as exc:
        raise CLIError(f"cannot write --file {args.file}: {exc.strerror}; pick a file you can write") from exc
    sys.stdout.write(token + "\n")
    return 0


def _token_file(path: Path) -> dict[str, Any]:
    """An existing local token file, read to add to it: `tokens:` and nothing else (anything
    else is some other file, which would be rewritten without its comments)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CLIError(f"cannot read --file {path}: {exc.strerror}; give a local token file") from exc
    except UnicodeDecodeError as exc:
        raise CLIError(
            f"--file {path} is not YAML text (not UTF-8); give a local token file or a new path"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CLIError(
            f"--file {path} is not YAML text ({getattr(exc, 'problem', None) or 'unreadable'}{where}); "
            "give a local token file or a new path"
        ) from exc
    if doc is None:
        return {"tokens": []}
    if not isinstance(doc, dict) or set(doc) - {"tokens"}:
        keys = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise CLIError(
            f"--file {path} is not a local token file (it holds {keys}, not only `tokens:`); give a new path"
        )
    if doc.get("tokens") is None:
        doc["tokens"] = []
    if not isinstance(doc["tokens"], list):
        raise CLIError(f"--file {path}: `tokens:` is not a list; fix the file or give a new path")
    return doc
