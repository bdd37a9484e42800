"""`sidemesh controller serve`."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import TYPE_CHECKING, Any

from controller.config import ControllerConfig
from sidemesh import config as cfg
from sidemesh import logging as smlog
from sidemesh.cli import CLIError, listen_error

if TYPE_CHECKING:
    from controller.bundle import BundlePublisher


def register(sub: Any) -> None:
    ctl = sub.add_parser("controller", help="the control plane", description="The Sidemesh controller.")
    ctl.set_defaults(group_parser=ctl)  # alone: its help, on stderr
    ctl_sub = ctl.add_subparsers(title="controller commands", metavar="COMMAND")
    p = ctl_sub.add_parser(
        "serve",
        help="watch the mesh and stream configuration to the sidecars",
        description=(
            "Watch Services, EndpointSlices, Pods, Namespaces and ServiceAuthorizations once (from the Kubernetes "
            "API, or a directory of YAML with --source directory) and stream each sidecar its configuration over "
            "gRPC with mTLS. Every option can also be set by the environment variable named in its help."
        ),
        epilog="""examples:
  # in the cluster (as the manifests run it): the Kubernetes API, the CA's Service
  sidemesh controller serve
  # on one machine: a directory of manifests, a CA started as in `sidemesh ca serve --help`, with a
  # token from `sidemesh ca local-token --identity sidemesh-system/sidemesh-controller`
  sidemesh controller serve --source directory --config-dir mesh --ca-address 127.0.0.1:15012 \\
      --bundle-file ca/root-cert.pem --token-file controller.token --listen 127.0.0.1:15010

"""
        + cfg.TRACING_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfg.add_arguments(p, ControllerConfig)
    p.set_defaults(handler=_serve)


def make_source(config: ControllerConfig) -> Any:
    if config.source == "directory":
        from controller.sources.directory import DirectorySource

        assert config.config_dir is not None
        if not config.config_dir.is_dir():
            raise CLIError(f"{config.config_dir} is not a directory; create it or fix --config-dir")
        return DirectorySource(config.config_dir)
    from controller.sources.kubernetes import KubernetesSource, api_client_from

    try:
        return KubernetesSource(api_client_from(config.kubeconfig))
    except Exception as exc:
        raise CLIError(
            f"cannot reach the Kubernetes API ({exc}); set --kubeconfig, or use --source directory"
        ) from exc


def make_publisher(config: ControllerConfig) -> BundlePublisher | None:
    """The trust bundle publisher (``controller/bundle.py``), or None when it is not wanted."""
    if config.source != "kubernetes" or not config.publish_bundle:
        return None
    from controller.bundle import BundlePublisher
    from controller.sources.kubernetes import api_client_from

    try:
        return BundlePublisher(api_client_from(config.kubeconfig), config.bundle_file)
    except Exception as exc:
        raise CLIError(
            f"cannot reach the Kubernetes API ({exc}); set --kubeconfig, or --publish-bundle false"
        ) from exc


def _serve(args: argparse.Namespace) -> int:
    from controller.server import ConfigServer
    from sidemesh.identity.client import CAClient
    from sidemesh.identity.workload import WorkloadIdentity, token_from_file
    from sidemesh.spiffe import WorkloadId

    config = cfg.load(ControllerConfig, args)
    smlog.setup(config.log_level)
    source = make_source(config)
    publisher = make_publisher(config)
    from sidemesh.identity.svid import SvidError, load_bundle

    try:
        bundle = config.bundle_file.read_bytes()
        load_bundle(bundle)  # (refused now, with the file: else every renewal failed on it, for good)
    except OSError as exc:
        raise CLIError(f"{config.bundle_file}: {exc.strerror}; check --bundle-file") from exc
    except SvidError as exc:
        raise CLIError(f"{config.bundle_file}: {exc}; give the CA's root-cert.pem as --bundle-file") from exc

    async def run() -> None:
        client = CAClient(config.ca_address, bundle)
        spiffe_id = WorkloadId.parse(config.identity).spiffe_id(config.trust_domain)
        identity = WorkloadIdentity(
            spiffe_id,
            client,
            token_from_file(config.token_file),
            bundle_file=config.bundle_file,
            dns_names=(config.server_name,),
        )
        server = ConfigServer(config, identity, source)
        try:
            await server.start()
        except (RuntimeError, OSError) as exc:
            await server.stop()
            await client.close()
            raise listen_error(
                exc, {"--listen": config.listen, "--metrics-listen": config.metrics_listen}
            ) from exc
        publishing = (
            asyncio.create_task(publisher.run(), name="sidemesh-bundle-publisher") if publisher else None
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if publishing is not None:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        await server.stop()
        await client.close()

    asyncio.run(run())
    return 0
