"""`sidemesh proxy ...`: the init step (iptables) and the sidecar."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import TYPE_CHECKING, Any

from proxy import heap
from proxy.config import ProxyConfig
from sidemesh import config as cfg
from sidemesh import logging as smlog
from sidemesh.cli import CLIError, listen_error

if TYPE_CHECKING:
    from proxy.sidecar import Sidecar


def register(sub: Any, subcommand: str | None = None) -> None:
    """The ``proxy`` group. With ``subcommand`` (the one the arguments name: ``run`` in every
    meshed pod) ``init``'s parser, and with it the iptables code, is left out unless named: a
    sidecar would keep that code in memory for nothing (0.15-0.25 MB). Help, or any other word,
    gets every subcommand."""
    proxy = sub.add_parser("proxy", help="the sidecar proxy", description="The Sidemesh sidecar proxy.")
    proxy.set_defaults(group_parser=proxy)  # alone: its help, on stderr
    proxy_sub = proxy.add_subparsers(title="proxy commands", metavar="COMMAND")
    if subcommand not in ("run", "wait"):
        from proxy.iptables.cli import register_init

        register_init(proxy_sub)
    from proxy.probes import register_wait

    register_wait(proxy_sub)
    p = proxy_sub.add_parser(
        "run",
        help="run the sidecar",
        description=(
            "Run the sidecar: mTLS between workloads with SPIFFE identities from the CA, allow rules from "
            "ServiceAuthorizations. With --capture iptables it serves the connections `proxy init` redirects "
            "(inbound 15006, outbound 15001); with --capture none (local mode) it serves --outbound maps. Every "
            "option can also be set by the environment variable named in its help."
        ),
        epilog="""examples:
  # in a pod, as injected: every option comes from the environment the injector sets
  sidemesh proxy run
  # on one machine: calls to 127.0.0.1:18080 go to the Service cart.shop:80 over mTLS
  sidemesh proxy run --capture none --workload shop/frontend-1 --config-dir mesh \\
      --ca-address 127.0.0.1:15012 --token-file frontend.token --bundle-file ca/root-cert.pem \\
      --outbound 127.0.0.1:18080=cart.shop:80

environment also read: POD_IP (with --capture iptables: the pod's address, for apps bound to it only)

"""
        + cfg.TRACING_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfg.add_arguments(p, ProxyConfig)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    config = cfg.load(ProxyConfig, args)
    smlog.setup(config.log_level)
    heap.tune()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        pass
    return asyncio.run(_main(config))


async def stop_sidecar(sidecar: Sidecar, quit_only: bool) -> None:
    """SIGTERM: the whole drain. /quitquitquit alone: the app is done (no preStop comes, no more
    calls of its own), so no grace either, as Istio skips its drain there (the injected 5 s kept a
    finished Job's pod running for nothing)."""
    await sidecar.drain(grace=0 if quit_only else None, pre_stop=not quit_only)


async def _main(config: ProxyConfig) -> int:
    from proxy.sidecar import ListenError, Sidecar
    from sidemesh.identity.client import CAClient
    from sidemesh.identity.keygen import new_request_in_child
    from sidemesh.identity.svid import SvidError, load_bundle
    from sidemesh.identity.workload import WorkloadIdentity, token_from_file
    from sidemesh.mesh.compile import CompileError, compile_sidecar
    from sidemesh.policy.model import DefaultPolicy
    from sidemesh.spiffe import SpiffeIdError, WorkloadId

    try:
        bundle = config.bundle_file.read_bytes()
        if config.config_dir is not None:
            if not config.config_dir.is_dir():
                raise CLIError(
                    f"--config-dir {config.config_dir} is not a directory: give the directory of "
                    "Workload, Service and ServiceAuthorization YAML (docs/sidecar.md)"
                )
            from sidemesh.mesh import directory  # (local mode only: YAML is 1 MB of a sidecar)

            snapshot = directory.load_directory(config.config_dir)
            default = DefaultPolicy(config.default_policy)
            spiffe_id = compile_sidecar(snapshot, config.workload, config.trust_domain, default).identity
        else:
            namespace = config.workload.split("/", 1)[0]
            spiffe_id = WorkloadId(namespace, config.service_account).spiffe_id(config.trust_domain)
        try:  # (unreadable, it started and never became ready: "keeping the current one", of none)
            load_bundle(bundle)
        except SvidError as exc:
            raise CLIError(
                f"--bundle-file {config.bundle_file}: {exc}; give the CA's root certificates in PEM "
                "(`sidemesh ca bundle`)"
            ) from exc
    except OSError as exc:
        raise CLIError(f"{exc.filename}: {exc.strerror}; check --bundle-file and --config-dir") from exc
    except CompileError as exc:
        unread = "; ".join(e for e in snapshot.errors if "cannot read" in e)
        also = f" (files that could not be read: {unread})" if unread else ""
        raise CLIError(f"{exc}; add a Workload named {config.workload} to {config.config_dir}{also}") from exc
    except SpiffeIdError as exc:
        raise CLIError(f"{exc}; check --workload and --service-account") from exc
    client = CAClient(config.ca_address, bundle)
    identity = WorkloadIdentity(
        spiffe_id,
        client,
        token_from_file(config.token_file),
        bundle_file=config.bundle_file,
        keygen=new_request_in_child,  # (this process never loads cryptography: keygen.py)
    )
    # The access log goes out in batches (sidemesh/logging.py BufferedLines), flushed by the drain.
    lines = smlog.BufferedLines("sidemesh.proxy.access") if config.access_log else None
    sidecar = Sidecar(config, identity, access_lines=lines)
    try:
        try:
            await sidecar.start()
        except OSError as exc:
            await identity.stop()
            if isinstance(exc, ListenError):  # (the bind's own error: a name, an address not ours)
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                raise listen_error(cause, {exc.option: exc.address}) from exc
            raise CLIError(
                f"cannot listen: {(exc.strerror or str(exc)).lower()}; stop the process that holds "
                "it (ss -ltnp shows which) or pick another address"
            ) from exc
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        quit_requested = asyncio.create_task(sidecar.quit_requested.wait())
        stop_requested = asyncio.create_task(stop.wait())
        await asyncio.wait((quit_requested, stop_requested), return_when=asyncio.FIRST_COMPLETED)
        quit_only = quit_requested.done() and not stop_requested.done()
        quit_requested.cancel()
        stop_requested.cancel()
        await stop_sidecar(sidecar, quit_only)
        await client.close()
        return 0
    finally:
        if lines is not None:
            lines.flush()
