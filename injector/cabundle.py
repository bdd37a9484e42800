"""Keep the webhook trusted: its caBundle, and its serving certificate from our own CA.

The API server calls `https://sidemesh-injector.sidemesh-system.svc:443/mutate` and verifies the
certificate by that DNS name against `webhooks[].clientConfig.caBundle`. In a cluster the injector
asks the mesh CA for the SVID of `sidemesh-system/sidemesh-injector` with that DNS name as an extra
SAN (the CA allows it for that identity only: `ca serve --control-plane-dns`), serves with it
(renewed at half life like any SVID), and writes the mesh trust bundle into the caBundle of its
MutatingWebhookConfiguration. The manifests leave caBundle out, so `kubectl apply` never resets it;
the injector checks it again every minute and after every bundle change.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from injector.tls import ServingCertificate
from sidemesh.identity.client import CAClient
from sidemesh.identity.svid import SVID
from sidemesh.identity.workload import WorkloadIdentity, token_from_file
from sidemesh.spiffe import WorkloadId

log = logging.getLogger("sidemesh.injector.cabundle")

RESYNC_SECONDS = 60.0
Json = dict[str, Any]


def ca_bundle_patch(configuration: Json, bundle_pem: bytes) -> list[Json]:
    """JSON Patch that sets every webhook's caBundle to ``bundle_pem``; empty when all are current.

    Each change is guarded by a `test` of the webhook's name at that index, so a concurrent edit of
    the list makes the API server refuse the patch instead of writing to the wrong webhook."""
    wanted = base64.b64encode(bundle_pem).decode()
    ops: list[Json] = []
    for i, webhook in enumerate(configuration.get("webhooks") or []):
        if (webhook.get("clientConfig") or {}).get("caBundle") == wanted:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": webhook.get("name")})
        if "clientConfig" not in webhook:
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig", "value": {"caBundle": wanted}})
        else:
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": wanted})
    return ops


class WebhookConfigurations:
    """The two calls the injector makes to the API server (RBAC: get and patch, one resourceName)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api = client.AdmissionregistrationV1Api(api_client)

    def get(self, name: str) -> Json:
        # _preload_content=False: the raw urllib3 response, so the JSON is read as the server wrote it
        resp: Any = self.api.read_mutating_webhook_configuration(name, _preload_content=False)
        data: Json = json.loads(resp.data)
        return data

    def patch(self, name: str, ops: list[Json]) -> None:
        self.api.patch_mutating_webhook_configuration(name, ops, _preload_content=False)


def api_client_from(kubeconfig: Path | None) -> Any:
    from kubernetes import client
    from kubernetes import config as kconfig

    if kubeconfig is not None:
        kconfig.load_kube_config(str(kubeconfig))
    else:
        kconfig.load_incluster_config()
    return client.ApiClient()


NATIVE_SIDECARS_SINCE = (1, 29)  # SidecarContainers on by default (beta; GA in 1.33)


def _kubelet_version(text: str) -> tuple[int, int] | None:
    """``v1.28.5-eks-5e0fdde`` -> (1, 28); None if it does not read as a version."""
    major, _, rest = text.lstrip("v").partition(".")
    minor = "".join(itertools.takewhile(str.isdigit, rest))
    return (int(major), int(minor)) if major.isdigit() and minor else None


NODES_PAGE = 500


def oldest_kubelet(api: Any) -> tuple[tuple[int, int], str] | None:
    """The oldest kubelet version among the nodes, and that node's name (None: no node says one).
    Read page by page, as the server wrote it (the client's models are not needed)."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    oldest: tuple[tuple[int, int], str] | None = None
    token = None
    while True:
        kwargs: dict[str, Any] = {"limit": NODES_PAGE, "_preload_content": False, "_request_timeout": (3, 5)}
        if token:
            kwargs["_continue"] = token
        resp: Any = core.list_node(**kwargs)
        page = json.loads(resp.data)
        for node in page.get("items") or ():
            version = _kubelet_version(
                str(((node.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", ""))
            )
            if version is not None and (oldest is None or version < oldest[0]):
                oldest = (version, str((node.get("metadata") or {}).get("name", "?")))
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return oldest


def native_sidecars_supported(api: Any) -> tuple[bool, str]:
    """Whether the cluster takes native sidecars: an API server of Kubernetes 1.29+ (on by default;
    on 1.28 the API server refuses a pod whose init container has probes) and no kubelet older than
    that (kubelets may be three minor versions behind the API server, as during an upgrade, which
    does the control plane first; an old kubelet runs a native sidecar as an ordinary init
    container, which never exits: the pod would stay in Init for good). With the versions, as
    they said them."""
    from kubernetes import client

    # Read as the server wrote it (_preload_content=False): the client's model refuses a /version
    # that leaves out a field it expects, and only these three matter here.
    resp: Any = client.VersionApi(api).get_code(_preload_content=False, _request_timeout=(3, 5))
    info = json.loads(resp.data)
    major, minor = (
        int("".join(c for c in str(info.get(k, "")) if c.isdigit()) or 0) for k in ("major", "minor")
    )
    version = str(info.get("gitVersion", f"{major}.{minor}"))
    if (major, minor) < NATIVE_SIDECARS_SINCE:
        return False, version
    oldest = oldest_kubelet(api)
    if oldest is not None and oldest[0] < NATIVE_SIDECARS_SINCE:
        return False, f"{version}, kubelet {oldest[0][0]}.{oldest[0][1]} on node {oldest[1]}"
    return True, version


class CABundleKeeper:
    """Writes the bundle into the webhook configuration when it differs; retries on failure."""

    def __init__(self, webhooks: WebhookConfigurations, name: str, bundle: Callable[[], bytes]) -> None:
        self.webhooks = webhooks
        self.name = name
        self.bundle = bundle
        self.synced: bytes | None = None
        self.last_error: str | None = None
        self._wake = asyncio.Event()

    def sync(self) -> bool:
        """One round (blocking: the kubernetes client is synchronous). True when it patched."""
        bundle = self.bundle()
        ops = ca_bundle_patch(self.webhooks.get(self.name), bundle)
        if ops:
            self.webhooks.patch(self.name, ops)
            log.info("webhook caBundle updated", extra={"webhook_configuration": self.name})
        self.synced = bundle
        return bool(ops)

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sync)
                self.last_error = None
                delay = RESYNC_SECONDS
            except Exception as exc:  # API errors, timeouts, an unreadable bundle: retry soon
                self.last_error = str(exc)
                log.warning(
                    "cannot update the webhook caBundle; retrying",
                    extra={"webhook_configuration": self.name, "error": str(exc)},
                )
                delay = 5.0
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives as
            # the event fires, and the keeper would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()


def serving_identity(
    identity: str,
    trust_domain: str,
    server_name: str,
    ca: CAClient,
    token_file: Path,
    bundle_file: Path | None,
) -> WorkloadIdentity:
    """The injector's own SVID, with ``server_name`` as a DNS SAN (renewed by WorkloadIdentity)."""
    spiffe_id = WorkloadId.parse(identity).spiffe_id(trust_domain)
    return WorkloadIdentity(
        spiffe_id, ca, token_from_file(token_file), bundle_file=bundle_file, dns_names=(server_name,)
    )


def serve_with(
    identity: WorkloadIdentity, serving: ServingCertificate, keeper: CABundleKeeper | None
) -> None:
    """Every new SVID (or trust bundle) goes into the serving context, and wakes the caBundle keeper."""

    def installed(svid: SVID) -> None:
        serving.load_pem(svid.chain_pem, svid.key_pem)
        if keeper is not None:
            keeper.poke()

    identity.on_rotate(installed)
    if identity.svid is not None:
        installed(identity.svid)
