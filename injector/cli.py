"""`sidemesh injector serve` (the webhook) and `sidemesh inject` (the same patcher, offline)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from injector.config import InjectorConfig
from injector.errors import PodError, SettingsError
from injector.settings import InjectionSettings, SettingsFile, load_settings
from injector.tls import CertificateFiles, ServingCertificate
from sidemesh import config as cfg
from sidemesh import logging as smlog
from sidemesh.cli import CLIError, listen_error

log = logging.getLogger("sidemesh.injector")
VERSION_WAIT_S = 5.0  # the longest the start waits for the API server's and the nodes' versions
NATIVE_RECHECK_S = 600.0  # nativeSidecar auto is asked again this often (nodes come and go, upgrade)
NODES_WAIT_S = 120.0  # ... with this long for it (a large cluster's nodes, page by page)

SERVE_DESCRIPTION = """\
Serve the mutating admission webhook (POST /mutate, AdmissionReview admission.k8s.io/v1) over HTTPS:
pods created in a namespace labelled sidemesh.io/inject=enabled get the sidemesh-init container and
the sidemesh-proxy sidecar (not: opted out, hostNetwork, Windows; refused: an app running as the
proxy's UID). GET /healthz answers 200 while it serves, 503 during --shutdown-delay after SIGTERM.

The serving certificate comes from --tls-cert/--tls-key (reloaded when the files change) or, without
them, from the mesh CA (SVID of --identity with --server-name as DNS name, renewed automatically).
With --webhook-configuration set, the injector keeps that MutatingWebhookConfiguration's caBundle
equal to --bundle-file. What goes into pods is read from --settings-file, reloaded when it changes.
Every option can also be set by the environment variable named in its help.
"""

INJECT_DESCRIPTION = """\
Add the Sidemesh sidecar to workloads in YAML, exactly as the injector webhook would: Pods, and the
pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs
and CronJobs (also inside a List). Other documents are printed unchanged; workloads that opt out
(sidemesh.io/inject: "false"), use hostNetwork or are injected already are left as they are.
The result goes to stdout, a line per workload to stderr. Comments in the input are not kept.
"""

INJECT_EPILOG = """\
examples:
  sidemesh inject deploy.yaml | kubectl apply -f -
  kubectl get deploy web -o yaml | sidemesh inject - | kubectl apply -f -
  sidemesh inject --settings manifests/mesh-config.yaml --native-sidecar false k8s/*.yaml
"""


def register(sub: Any) -> None:
    injector = sub.add_parser(
        "injector", help="the sidecar injector webhook", description="The Sidemesh sidecar injector."
    )
    injector.set_defaults(group_parser=injector)  # alone: its help, on stderr
    injector_sub = injector.add_subparsers(title="injector commands", metavar="COMMAND")
    p = injector_sub.add_parser(
        "serve",
        help="serve the mutating admission webhook over HTTPS",
        description=SERVE_DESCRIPTION,
        epilog=cfg.TRACING_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfg.add_arguments(p, InjectorConfig)
    p.set_defaults(handler=_serve)


def register_inject(sub: Any) -> None:
    p = sub.add_parser(
        "inject",
        help="add the sidecar to workloads in YAML files (offline)",
        description=INJECT_DESCRIPTION,
        epilog=INJECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML file(s); - reads stdin")
    p.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="injection settings: the mesh ConfigMap manifest or its config.yaml (default: built-in defaults)",
    )
    p.add_argument("--image", default=None, help="sidecar and init container image (overrides the settings)")
    p.add_argument(
        "--native-sidecar",
        choices=("true", "false"),
        default=None,
        help="native sidecar (Kubernetes 1.29+) or classic (default: the settings' nativeSidecar; its auto is "
        "native here, offline); a pod's sidemesh.io/native-sidecar annotation wins",
    )
    p.set_defaults(handler=_inject)


def _inject(args: argparse.Namespace) -> int:
    from injector.offline import NotAnObject, inject_yaml

    try:
        settings = load_settings(args.settings) if args.settings else InjectionSettings()
        overrides: dict[str, Any] = {}
        if args.image is not None and not args.image.strip():  # (an unset shell variable: the default
            raise CLIError(
                "--image is empty: give an image reference, or leave --image out"
            )  # went in silently)
        if args.image:
            overrides["image"] = args.image
        if args.native_sidecar:
            overrides["native_sidecar"] = args.native_sidecar == "true"
        settings = dataclasses.replace(settings, **overrides)
    except SettingsError as exc:
        raise CLIError(f"settings {exc}; fix --settings or the flags") from exc
    texts = []
    for name in args.files:
        try:
            texts.append(sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8"))
        except OSError as exc:
            raise CLIError(f"{name}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:  # e.g. UTF-16, as PowerShell's `>` writes it
            raise CLIError(
                f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 and try again"
            ) from exc
    outputs, reports = [], []
    for name, one in zip(args.files, texts, strict=True):  # each on its own: an error names its file
        where = "standard input" if name == "-" else name
        try:
            text, found = inject_yaml([one], settings)
        except yaml.YAMLError as exc:
            raise CLIError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from exc
        except NotAnObject as exc:
            raise CLIError(f"{where}: {exc}; is it a Kubernetes manifest (YAML or JSON)?") from exc
        except PodError as exc:
            message = str(exc)
            if "sidemesh.io/inject" not in message:  # (the annotation errors say it already)
                message += '; or opt the workload out with the annotation sidemesh.io/inject: "false"'
            raise CLIError(f"{where}: {message}" if len(texts) > 1 else message) from exc
        if text:
            outputs.append(text)
        reports.extend(found)
    sys.stdout.write("---\n".join(outputs))
    for report in reports:
        print(report, file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = cfg.load(InjectorConfig, args)
    smlog.setup(config.log_level)
    try:
        settings = SettingsFile(config.settings_file)
    except SettingsError as exc:
        raise CLIError(
            f"injection settings {exc}; fix --settings-file (the mesh ConfigMap's config.yaml)"
        ) from exc
    serving = ServingCertificate()
    files = None
    if config.tls_cert is not None and config.tls_key is not None:
        files = CertificateFiles(serving, config.tls_cert, config.tls_key)
        try:
            files.load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise CLIError(f"cannot load --tls-cert/--tls-key: {exc}") from exc
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    return asyncio.run(serve(config, settings, serving, files))


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


async def serve(
    config: InjectorConfig,
    settings: SettingsFile,
    serving: ServingCertificate,
    files: CertificateFiles | None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``): the webhook, the reloads and the caBundle upkeep."""

    from injector import cabundle
    from injector.server import WebhookServer, create_app
    from sidemesh.httpd import HTTPServer
    from sidemesh.identity.client import CAClient
    from sidemesh.prometheus import CONTENT_TYPE, CollectorRegistry, exposition
    from sidemesh.spiffe import SpiffeIdError, WorkloadId
    from sidemesh.telemetry import start_tracing

    keeper = None
    api = None
    if config.webhook_configuration:
        try:
            api = cabundle.api_client_from(config.kubeconfig)
        except Exception as exc:
            raise CLIError(
                f"cannot reach the Kubernetes API ({exc}); set --kubeconfig, or --webhook-configuration '' "
                "to leave the caBundle alone"
            ) from exc
        webhooks = cabundle.WebhookConfigurations(api)
        keeper = cabundle.CABundleKeeper(
            webhooks, config.webhook_configuration, config.bundle_file.read_bytes
        )
    native = await _native_sidecars(api, config)
    tasks: list[asyncio.Task[None]] = []
    client = identity = None
    if files is None:
        try:
            bundle = config.bundle_file.read_bytes()
        except OSError as exc:
            raise CLIError(f"{config.bundle_file}: {exc.strerror}; check --bundle-file") from exc
        client = CAClient(config.ca_address, bundle)
        identity = cabundle.serving_identity(
            config.identity,
            config.trust_domain,
            config.server_name,
            client,
            config.token_file,
            config.bundle_file,
        )
        cabundle.serve_with(identity, serving, keeper)
        await identity.start()
        log.info("waiting for the serving certificate from the CA", extra={"ca": config.ca_address})
        await identity.wait_ready()
    host, port = cfg.parse_hostport("listen", config.listen)
    registry = CollectorRegistry()
    try:
        own_id = str(WorkloadId.parse(config.identity).spiffe_id(config.trust_domain))
    except SpiffeIdError:
        own_id = ""  # serving a certificate from files: no identity of its own
    tracing = start_tracing("sidemesh-injector", registry, {"sidemesh.identity": own_id})
    stopping = asyncio.Event()
    app = create_app(
        _resolving(settings, native),
        lambda: serving.loaded and not stopping.is_set(),
        registry,
        tracing,
        closing=stopping.is_set,
    )
    server = WebhookServer(app, serving, host, port)
    metrics = None
    option = "--listen"
    try:
        await server.start()
        if config.metrics_listen:
            option = "--metrics-listen"
            metrics = HTTPServer(
                {
                    "/metrics": lambda: (200, CONTENT_TYPE, exposition(registry)),
                }
            )
            await metrics.start(*cfg.parse_hostport("metrics_listen", config.metrics_listen))
    except OSError as exc:  # a port in use, an address not this machine's
        await server.stop()
        for task in tasks:
            task.cancel()
        address = config.listen if option == "--listen" else config.metrics_listen
        raise listen_error(exc, {option: address}) from exc
    if keeper is not None:
        tasks.append(asyncio.create_task(keeper.run(), name="cabundle"))
    tasks.append(asyncio.create_task(_reload_loop(config, settings, files, keeper), name="reload"))
    auto = lambda: settings.current.native_sidecar is None  # noqa: E731
    tasks.append(asyncio.create_task(native.watch(auto), name="native-sidecars"))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Endpoints are removed from the webhook's Service only once the kubelet saw the pod go (or
    # its readiness fail): until then the API server still calls here, and under failurePolicy
    # Fail a refused call is a pod that cannot be created. So: not ready, still serving, a while.
    stopping.set()
    delay = config.shutdown_delay.total_seconds()
    log.info("stopping: not ready, still answering admissions", extra={"for_s": delay})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_second_signal(loop), delay)  # a second SIGTERM/SIGINT: at once
    await server.stop()
    if metrics is not None:
        await metrics.stop()
    if tracing is not None:
        await tracing.close()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if identity is not None:
        await identity.stop()
    if client is not None:
        await client.close()
    log.info("injector stopped")
    return 0


def _resolving(settings: SettingsFile, native: NativeSidecars) -> Callable[[], InjectionSettings]:
    """The current settings with nativeSidecar "auto" decided, resolved once per settings object
    and answer."""
    last: list[Any] = [None, None, None]

    def current() -> InjectionSettings:
        raw = settings.current
        if last[0] is not raw or last[2] is not native.supported:
            last[0], last[1], last[2] = raw, raw.resolved(native.supported), native.supported
        resolved: InjectionSettings = last[1]
        return resolved

    return current


async def _on_daemon_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a thread of its own that nobody waits for at exit (the default executor's
    threads are joined when the loop closes: a call retried by urllib3 after we stopped waiting for
    it held up the injector's exit by 20 s)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not done.done():
            done.set_result(value) if ok else done.set_exception(value)

    def work() -> None:
        try:
            result: tuple[bool, Any] = (True, fn(*args))
        except Exception as exc:
            result = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody wants the answer
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=work, name="sidemesh-injector-version", daemon=True).start()
    return await done


class NativeSidecars:
    """nativeSidecar auto's answer, kept current: asked at start (at most VERSION_WAIT_S, so that a
    slow API server does not hold the webhook up), then again every NATIVE_RECHECK_S with up to
    NODES_WAIT_S for the answer (at once after a start that got none: a large cluster's nodes take
    longer than the start may wait). Nodes are added and upgraded: a cluster that finishes its
    upgrade to 1.29 gets native sidecars without a restart, one that gains an old node classic."""

    def __init__(self, supported: bool, api: Any = None, known: bool = True) -> None:
        self.supported = supported
        self.api = api  # None: no cluster to ask (local runs)
        self.known = known

    async def watch(self, auto: Callable[[], bool]) -> None:
        from injector import cabundle

        loop = asyncio.get_running_loop()
        due = loop.time() + (NATIVE_RECHECK_S if self.known else VERSION_WAIT_S)
        was_auto = auto()
        while self.api is not None:
            await asyncio.sleep(min(VERSION_WAIT_S, max(0.0, due - loop.time())))
            now_auto = auto()
            switched, was_auto = now_auto and not was_auto, now_auto
            if not now_auto or (loop.time() < due and not switched):
                continue  # the settings decide (nothing to ask), or not yet
            # (settings switched back to auto: what was known may be old, or was never asked)
            due = loop.time() + NATIVE_RECHECK_S
            try:
                supported, version = await asyncio.wait_for(
                    _on_daemon_thread(cabundle.native_sidecars_supported, self.api), NODES_WAIT_S
                )
            except Exception as exc:
                log.warning(
                    "cannot read the API server's or the nodes' versions; nativeSidecar auto keeps "
                    + ("native" if self.supported else "classic")
                    + " sidecars",
                    extra={"error": str(exc) or type(exc).__name__},
                )
                continue
            if supported != self.supported or not self.known:
                log.info(
                    "nativeSidecar auto: " + ("native sidecars" if supported else "classic sidecars"),
                    extra={"kubernetes": version},
                )
            self.supported, self.known = bool(supported), True


async def _native_sidecars(api: Any, config: InjectorConfig) -> NativeSidecars:
    """For nativeSidecar "auto" (now, or after a settings reload): whether the cluster takes native
    sidecars (API server and every kubelet 1.29+). Asked once, with --webhook-configuration or
    without (cert-manager setups), at most VERSION_WAIT_S: an API server that does not answer does
    not keep the webhook down, and gets classic sidecars, which every version runs."""
    from injector import cabundle

    try:
        if api is None:
            api = cabundle.api_client_from(config.kubeconfig)
    except Exception as exc:  # no API server here (local runs, tests): auto means native
        log.info(
            "no Kubernetes API to ask its version: nativeSidecar auto means native", extra={"error": str(exc)}
        )
        return NativeSidecars(True)
    try:
        supported, version = await asyncio.wait_for(
            _on_daemon_thread(cabundle.native_sidecars_supported, api), VERSION_WAIT_S
        )
    except Exception as exc:  # the caBundle keeper reports API trouble; this is only a default
        log.warning(
            "cannot read the API server's or the nodes' versions yet: nativeSidecar auto means classic "
            "sidecars (they run everywhere) until they are read; set nativeSidecar: true in the "
            "injection settings when the API server and every kubelet run 1.29 or later (reading "
            "nodes needs list on nodes)",
            extra={"error": str(exc) or type(exc).__name__},
        )
        return NativeSidecars(False, api, known=False)
    log.info(
        "nativeSidecar auto: "
        + ("native sidecars" if supported else "classic sidecars (native ones need 1.29+ everywhere)"),
        extra={"kubernetes": version},
    )
    return NativeSidecars(bool(supported), api)


async def _second_signal(loop: asyncio.AbstractEventLoop) -> None:
    again = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, again.set)
    await again.wait()


async def _reload_loop(
    config: InjectorConfig,
    settings: SettingsFile,
    files: CertificateFiles | None,
    keeper: Any,
) -> None:
    bundle_stamp = _stamp(config.bundle_file)
    while True:
        await asyncio.sleep(config.reload_interval.total_seconds())
        # Settings, serving certificate and caBundle each on their own: whatever one of them does,
        # the others (and the next round) go on (an escaped error ended all three for good).
        for what, step in (("settings", settings.reload), ("certificate", files.reload if files else None)):
            if step is None:
                continue
            try:
                step()
            except Exception:
                log.exception("reload failed; keeping what is in force", extra={"what": what})
        stamp = _stamp(config.bundle_file)
        if stamp != bundle_stamp and keeper is not None:
            keeper.poke()
        bundle_stamp = stamp
