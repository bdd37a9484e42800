"""The injector webhook under uvicorn over HTTPS, called as the API server calls it.

Its serving certificate comes from our own CA (SVID of sidemesh-system/sidemesh-injector with the
DNS name of its Service), and the client verifies it the way the API server does: against the
caBundle (the mesh trust bundle), by that DNS name. Then: every bad input gets its clear error and
the server keeps answering; one log line per admission; the certificate is replaced without a
restart (files and CA rotation) and new handshakes see the new one; the caBundle keeper against a
stand-in API server speaking the real wire format; `sidemesh injector serve` as a process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import http.client
import http.server
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from cryptography import x509

from ca.authn import LocalTokenAuthenticator
from injector import cabundle
from injector.config import INJECTOR_SERVER_NAME
from injector.server import MAX_BODY, WebhookServer, create_app
from injector.settings import InjectionSettings
from injector.tls import CertificateFiles, ServingCertificate
from sidemesh.identity.client import CAClient
from sidemesh.identity.svid import SVID
from sidemesh.identity.workload import WorkloadIdentity
from tests.integration.conftest import RunningCA, StartCA
from tests.support.net import ipv6_loopback

INJECTOR = "sidemesh-system/sidemesh-injector"
CONTROL_PLANE_DNS = (
    "sidemesh-system/sidemesh-controller=sidemesh-controller.sidemesh-system.svc",
    f"{INJECTOR}={INJECTOR_SERVER_NAME}",
)
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"generateName": "web-7d9c6b5f4-", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "web:1"}]},
}
Json = dict[str, Any]


def review(uid: str = "b8f3c0e2-4d1a-4c7e-9f00-000000000001", **request: Any) -> Json:
    req = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop",
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": POD,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    req.update(request)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}


# -- a client that verifies like the API server --------------------------------------------------


class _Connection(http.client.HTTPSConnection):
    """Dials ``address`` (127.0.0.1) but verifies the certificate for the Service's DNS name."""

    def __init__(
        self, port: int, context: ssl.SSLContext, server_name: str, address: str = "127.0.0.1"
    ) -> None:
        super().__init__(server_name, port, context=context, timeout=10)
        self._ctx = context
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), timeout=10)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


@dataclass
class Client:
    port: int
    bundle: bytes
    server_name: str = INJECTOR_SERVER_NAME
    address: str = "127.0.0.1"

    def connect(self) -> _Connection:
        ctx = ssl.create_default_context(cadata=self.bundle.decode())
        return _Connection(self.port, ctx, self.server_name, self.address)

    @staticmethod
    def call(conn: _Connection, method: str, path: str, body: bytes | None = None) -> tuple[int, Json]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        conn.request(method, path, body=body, headers=headers)
        with conn.getresponse() as resp:  # closed even when the read fails (its socket with it)
            data = resp.read()
        return resp.status, json.loads(data) if data else {}

    def post(self, body: Any, conn: _Connection | None = None) -> tuple[int, Json]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        own = conn is None
        conn = conn or self.connect()
        try:
            return self.call(conn, "POST", "/mutate?timeout=5s", data)
        finally:
            if own:
                conn.close()


def peer_serial(conn: _Connection) -> str:
    assert isinstance(conn.sock, ssl.SSLSocket)
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


# -- fixtures ------------------------------------------------------------------------------------


async def start_injector_ca(start_ca: StartCA, tmp_path: Path) -> tuple[RunningCA, Path]:
    tokens = tmp_path / "injector-tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {
                        "token": "injector-token",
                        "namespace": "sidemesh-system",
                        "serviceAccount": "sidemesh-injector",
                    },
                    {"token": "web-token", "namespace": "shop", "serviceAccount": "web"},
                ]
            }
        )
    )
    token_file = tmp_path / "token"
    token_file.write_text("injector-token\n")
    ca = await start_ca(
        authenticator=LocalTokenAuthenticator(tokens), token_file=tokens, control_plane_dns=CONTROL_PLANE_DNS
    )
    return ca, token_file


@dataclass
class Injector:
    ca: RunningCA
    identity: WorkloadIdentity
    serving: ServingCertificate
    server: WebhookServer
    client: Client
    settings: list[InjectionSettings] = field(default_factory=lambda: [InjectionSettings()])


@pytest.fixture
async def injector(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Injector]:
    ca, token_file = await start_injector_ca(start_ca, tmp_path)
    ca_client = CAClient(ca.address, ca.bundle)
    identity = cabundle.serving_identity(
        INJECTOR, "cluster.local", INJECTOR_SERVER_NAME, ca_client, token_file, bundle_file=None
    )
    serving = ServingCertificate()
    cabundle.serve_with(identity, serving, keeper=None)
    await identity.start()
    await asyncio.wait_for(identity.wait_ready(), 10)
    holder: list[InjectionSettings] = [InjectionSettings()]
    # On the wildcard, as the Deployment has it (both families: the API server dials the pod IP)
    server = WebhookServer(create_app(lambda: holder[-1], lambda: serving.loaded), serving, "0.0.0.0", 0)
    port = await server.start()
    yield Injector(ca, identity, serving, server, Client(port, ca.bundle), holder)
    await server.stop()
    await identity.stop()
    await ca_client.close()


# -- the webhook -----------------------------------------------------------------------------------


async def test_good_review(injector: Injector) -> None:
    status, body = await asyncio.to_thread(injector.client.post, review())
    assert status == 200
    if ipv6_loopback():  # IPv6-only and IPv6-first clusters: it listened on IPv4 only, no pod could start
        v6 = dataclasses.replace(injector.client, address="::1")
        assert (await asyncio.to_thread(v6.post, review()))[0] == 200
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "b8f3c0e2-4d1a-4c7e-9f00-000000000001"
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    pod = jsonpatch.apply_patch(POD, json.loads(base64.b64decode(response["patch"])))
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["sidemesh-init", "sidemesh-proxy"]

    # what the API server does next: reinvocation with the patched pod changes nothing
    status, body = await asyncio.to_thread(injector.client.post, review(object=pod))
    assert body["response"] == {"uid": "b8f3c0e2-4d1a-4c7e-9f00-000000000001", "allowed": True}


@pytest.mark.parametrize(
    ("ciphers", "ok"),
    [("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384", False), ("ECDHE-ECDSA-AES128-GCM-SHA256", True)],
)
async def test_tls_1_2_clients_get_forward_secret_aead_suites_only(
    injector: Injector, ciphers: str, ok: bool
) -> None:
    """As the API server and istiod offer: TLS 1.2 with ECDHE and AES-GCM or ChaCha20 (Python's
    default list also took CBC suites)."""
    ctx = ssl.create_default_context(cadata=injector.ca.bundle.decode())
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)

    def handshake() -> str:
        raw = socket.create_connection(("127.0.0.1", injector.client.port), timeout=5)
        with raw, ctx.wrap_socket(raw, server_hostname=INJECTOR_SERVER_NAME) as s:
            return str(s.cipher()[0])

    if ok:
        assert await asyncio.to_thread(handshake) == ciphers
    else:
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(handshake)


async def test_a_classic_sidecar_in_a_job_pod_comes_with_a_warning(injector: Injector) -> None:
    """AdmissionResponse.warnings: kubectl prints them, controllers record them as events."""
    injector.settings.append(InjectionSettings(native_sidecar=False))
    job_pod = {**POD, "spec": {**POD["spec"], "restartPolicy": "Never"}}
    status, body = await asyncio.to_thread(injector.client.post, review(object=job_pod))
    assert status == 200 and body["response"]["allowed"] is True
    (warning,) = body["response"]["warnings"]
    assert "quitquitquit" in warning
    status, body = await asyncio.to_thread(injector.client.post, review())  # a Deployment's: none
    assert "warnings" not in body["response"]


async def test_serving_certificate_is_an_svid_for_the_service_name(injector: Injector) -> None:
    conn = injector.client.connect()
    try:
        status, _ = await asyncio.to_thread(Client.call, conn, "GET", "/healthz")
        assert status == 200
        assert isinstance(conn.sock, ssl.SSLSocket)
        cert = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True) or b"")
    finally:
        conn.close()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [INJECTOR_SERVER_NAME]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-injector"
    ]


async def test_wrong_name_or_wrong_bundle_is_refused(injector: Injector, tmp_path: Path) -> None:
    wrong_name = Client(injector.client.port, injector.ca.bundle, "sidemesh-injector.other.svc")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await asyncio.to_thread(wrong_name.post, review())
    from ca import keys

    other = keys.bootstrap(
        tmp_path / "other-ca", "cluster.local", injector.ca.authority.cert.not_valid_before_utc
    )
    wrong_bundle = Client(injector.client.port, "".join(other.bundle_pem).encode())
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(wrong_bundle.post, review())


BAD_INPUTS: list[tuple[str, bytes | Json, int, str]] = [
    ("not JSON", b"{this is not json", 400, "the body is not JSON"),
    ("empty body", b"", 400, "the body is not JSON"),
    ("JSON array", b"[]", 400, "not a JSON object"),
    (
        "nested too deep",
        b'{"uid": "u", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        "the body is not JSON",
    ),
    (
        "wrong version",
        {**review(), "apiVersion": "admission.k8s.io/v1beta1"},
        400,
        "apiVersion 'admission.k8s.io/v1beta1'",
    ),
    ("wrong kind", {**review(), "kind": "TokenReview"}, 400, "expected kind AdmissionReview"),
    (
        "missing request",
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
        400,
        "has no request",
    ),
    ("missing uid", review(uid=""), 400, "has no uid"),
    ("missing object", review(object=None), 200, "has no object"),
    ("object not a pod", review(object=["x"]), 200, "not a JSON object"),
    (
        "pod without containers",
        review(object={"metadata": {}, "spec": {}}),
        200,
        "spec.containers is missing",
    ),
    (
        "bad annotation",
        review(
            object={**POD, "metadata": {"annotations": {"sidemesh.io/exclude-outbound-cidrs": "nowhere"}}}
        ),
        200,
        "sidemesh.io/exclude-outbound-cidrs: 'nowhere' is not a CIDR",
    ),
]


async def test_every_bad_input_gets_its_error_and_the_server_keeps_answering(injector: Injector) -> None:
    conn = injector.client.connect()  # one keep-alive connection, as the API server reuses them
    try:
        for name, body, http_status, message in BAD_INPUTS:
            status, answer = await asyncio.to_thread(injector.client.post, body, conn)
            assert status == http_status, name
            if http_status == 400:
                assert message in answer["error"], name
            else:
                assert answer["response"]["allowed"] is False, name
                assert answer["response"]["status"]["code"] == 400, name
                assert message in answer["response"]["status"]["message"], name
            # and a good review right after each bad one, on the same connection
            status, answer = await asyncio.to_thread(injector.client.post, review(), conn)
            assert status == 200 and answer["response"]["allowed"] is True, name
    finally:
        conn.close()


async def test_other_methods_paths_and_sizes(injector: Injector) -> None:
    conn = injector.client.connect()
    try:
        assert (await asyncio.to_thread(Client.call, conn, "GET", "/mutate"))[0] == 405
        assert (await asyncio.to_thread(Client.call, conn, "POST", "/validate", b"{}"))[0] == 404
        status, body = await asyncio.to_thread(injector.client.post, b" " * (MAX_BODY + 1), conn)
    finally:
        conn.close()
    assert status == 413 and "over" in body["error"]
    status, body = await asyncio.to_thread(injector.client.post, review())
    assert status == 200


async def test_a_client_that_never_sends_a_whole_request_is_closed(
    injector: Injector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the TLS handshake: nothing, half a head, or a head and half a body. Each is closed
    once it has been silent for the deadline (here 0.5 s); uvicorn alone held them forever, and
    thousands held the injector's memory past its limit. A body that keeps coming, slowly, over
    more than the deadline, and a normal request are unaffected."""
    from injector import server as server_module

    monkeypatch.setattr(server_module, "REQUEST_IDLE_S", 0.5)
    ctx = ssl.create_default_context(cadata=injector.client.bundle.decode())
    partial = [
        b"",
        b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Le",
        b'POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"uid":',
    ]
    for sent in partial:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", injector.client.port, ssl=ctx, server_hostname=INJECTOR_SERVER_NAME
        )
        writer.write(sent)
        began = time.monotonic()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), 5) in (b"", b"HTTP/1.1 400 Bad Request\r\n")
        assert time.monotonic() - began < 3, sent
        writer.close()
    body = json.dumps(review()).encode()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", injector.client.port, ssl=ctx, server_hostname=INJECTOR_SERVER_NAME
    )
    writer.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    writer.write(b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    step = len(body) // 6 + 1
    for i in range(0, len(body), step):  # 6 pieces, 0.25 s apart: 1.5 s in all, never 0.5 s silent
        writer.write(body[i : i + step])
        await writer.drain()
        await asyncio.sleep(0.25)
    answer_bytes = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer_bytes.startswith(b"HTTP/1.1 200"), answer_bytes[:100]
    status, answer = await asyncio.to_thread(injector.client.post, review())
    assert status == 200 and answer["response"]["allowed"] is True


async def test_not_a_pod_create_is_allowed_untouched(injector: Injector) -> None:
    status, body = await asyncio.to_thread(injector.client.post, review(operation="UPDATE", oldObject=POD))
    assert status == 200 and body["response"]["allowed"] is True and "patch" not in body["response"]


async def test_one_log_line_per_admission(injector: Injector, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidemesh.injector")
    pod = {**POD, "metadata": {"name": "legacy", "annotations": {"sidemesh.io/inject": "false"}}}
    await asyncio.to_thread(injector.client.post, review())
    await asyncio.to_thread(injector.client.post, review(object=pod, namespace="old"))
    await asyncio.to_thread(injector.client.post, b"nope")
    records = [r for r in caplog.records if r.getMessage() == "admission"]
    assert len(records) == 3
    first, second, third = (r.__dict__ for r in records)
    assert (
        first["namespace"] == "shop" and first["pod"] == "web-7d9c6b5f4-" and first["outcome"] == "injected"
    )
    assert second["namespace"] == "old" and second["pod"] == "legacy" and second["outcome"] == "skipped"
    assert "opted out" in second["reason"]
    assert third["outcome"] == "bad request" and records[2].levelno == logging.WARNING
    assert all(isinstance(r["duration_ms"], float) for r in (first, second, third))


async def test_settings_in_force_are_read_per_admission(injector: Injector) -> None:
    injector.settings.append(InjectionSettings(image="registry.local/sidemesh:2", native_sidecar=False))
    _, body = await asyncio.to_thread(injector.client.post, review())
    ops = json.loads(base64.b64decode(body["response"]["patch"]))
    proxy = next(op["value"] for op in ops if op["path"] == "/spec/containers/0")
    assert proxy["name"] == "sidemesh-proxy" and proxy["image"] == "registry.local/sidemesh:2"


async def test_concurrent_admissions(injector: Injector) -> None:
    results = await asyncio.gather(
        *(asyncio.to_thread(injector.client.post, review(uid=f"uid-{i}")) for i in range(32))
    )
    assert sorted(body["response"]["uid"] for _, body in results) == sorted(f"uid-{i}" for i in range(32))


# -- the serving certificate, replaced without a restart ---------------------------------------------


async def test_rotation_from_the_ca_reaches_new_handshakes(injector: Injector) -> None:
    before = injector.client.connect()
    try:
        await asyncio.to_thread(Client.call, before, "GET", "/healthz")
        old = peer_serial(before)
        svid = await injector.identity.renew()  # what the renewal loop does at half life
        assert injector.serving.serial == svid.serial_hex != old
        after = injector.client.connect()
        try:
            await asyncio.to_thread(Client.call, after, "GET", "/healthz")
            assert peer_serial(after) == svid.serial_hex
        finally:
            after.close()
        # the open connection keeps its session and goes on working
        assert (await asyncio.to_thread(injector.client.post, review(), before))[0] == 200
        assert peer_serial(before) == old
    finally:
        before.close()


async def issue_injector_svid(ca: RunningCA, token_file: Path) -> SVID:
    client = CAClient(ca.address, ca.bundle)
    try:
        identity = cabundle.serving_identity(
            INJECTOR, "cluster.local", INJECTOR_SERVER_NAME, client, token_file, None
        )
        return await identity.renew()
    finally:
        await client.close()


async def ready_to_serve(start_ca: StartCA, tmp_path: Path) -> tuple[RunningCA, int]:
    """A CA, the injector's serving SVID and a settings file in ``tmp_path``, and a free port for
    an injector process to listen on."""
    ca, token_file = await start_injector_ca(start_ca, tmp_path)
    write_pair(tmp_path, await issue_injector_svid(ca, token_file))
    (tmp_path / "config.yaml").write_text("image: registry.local/sidemesh:1\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return ca, probe.getsockname()[1]


def write_pair(dir: Path, svid: SVID) -> None:
    (dir / "tls.crt.tmp").write_bytes(svid.chain_pem)
    (dir / "tls.key.tmp").write_bytes(svid.key_pem)
    os.replace(dir / "tls.crt.tmp", dir / "tls.crt")
    os.replace(dir / "tls.key.tmp", dir / "tls.key")


async def test_certificate_files_are_reloaded(start_ca: StartCA, tmp_path: Path) -> None:
    ca, token_file = await start_injector_ca(start_ca, tmp_path)
    first, second = await issue_injector_svid(ca, token_file), await issue_injector_svid(ca, token_file)
    write_pair(tmp_path, first)
    serving = ServingCertificate()
    files = CertificateFiles(serving, tmp_path / "tls.crt", tmp_path / "tls.key")
    files.load()
    server = WebhookServer(create_app(InjectionSettings), serving, "127.0.0.1", 0)
    client = Client(await server.start(), ca.bundle)
    try:
        established = client.connect()
        await asyncio.to_thread(Client.call, established, "GET", "/healthz")
        assert peer_serial(established) == first.serial_hex
        assert files.reload() is False  # nothing changed

        write_pair(tmp_path, second)
        assert files.reload() is True
        fresh = client.connect()
        await asyncio.to_thread(Client.call, fresh, "GET", "/healthz")
        assert peer_serial(fresh) == second.serial_hex
        assert (await asyncio.to_thread(client.post, review(), established))[0] == 200
        assert peer_serial(established) == first.serial_hex

        # half-written update: a certificate whose key is not there yet keeps the current pair
        (tmp_path / "tls.crt").write_bytes(first.chain_pem)
        assert files.reload() is False and files.last_error
        third = client.connect()
        assert (await asyncio.to_thread(Client.call, third, "GET", "/healthz"))[0] == 200
        assert peer_serial(third) == second.serial_hex
        for conn in (established, fresh, third):
            conn.close()
    finally:
        await server.stop()


# -- the caBundle, against a stand-in API server ------------------------------------------------------


@dataclass
class FakeWebhookAPI:
    """GET and PATCH (application/json-patch+json) of one MutatingWebhookConfiguration."""

    config: Json
    patches: list[tuple[str, list[Json]]] = field(default_factory=list)
    fail_next: int = 0

    def __post_init__(self) -> None:
        api = self
        prefix = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Json) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _target(self) -> bool:
                name = self.path.split("?")[0].removeprefix(prefix)
                if not self.path.startswith(prefix) or name != api.config["metadata"]["name"]:
                    self._status(
                        404,
                        "NotFound",
                        f"mutatingwebhookconfigurations.admissionregistration.k8s.io {name!r} not found",
                    )
                    return False
                if api.fail_next:
                    api.fail_next -= 1
                    self._status(503, "ServiceUnavailable", "etcdserver: leader changed")
                    return False
                return True

            def do_GET(self) -> None:
                if self._target():
                    self._send(200, api.config)

            def do_PATCH(self) -> None:
                if not self._target():
                    return
                ctype = self.headers.get("Content-Type", "")
                ops = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                api.patches.append((ctype, ops))
                if ctype != "application/json-patch+json":
                    self._status(
                        415,
                        "UnsupportedMediaType",
                        f"the body of the request was in an unknown format: {ctype}",
                    )
                    return
                try:
                    api.config = jsonpatch.apply_patch(api.config, ops)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    self._status(
                        422,
                        "Invalid",
                        f"the server rejected our request due to an error in our request: {exc}",
                    )
                    return
                self._send(200, api.config)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def api_client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{self.server.server_port}"
        return client.ApiClient(configuration)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api() -> Iterator[FakeWebhookAPI]:
    webhook = yaml.safe_load((Path(__file__).resolve().parents[2] / "manifests" / "webhook.yaml").read_text())
    webhook["webhooks"].append(
        {**webhook["webhooks"][0], "name": "second.sidemesh.io", "clientConfig": {"caBundle": "b2xk"}}
    )
    api = FakeWebhookAPI(webhook)
    yield api
    api.close()


def test_cabundle_patch_is_guarded_and_minimal() -> None:
    config = {
        "webhooks": [
            {"name": "a", "clientConfig": {"caBundle": base64.b64encode(b"X").decode()}},
            {"name": "b"},
        ]
    }
    assert cabundle.ca_bundle_patch(config, b"X") == [
        {"op": "test", "path": "/webhooks/1/name", "value": "b"},
        {"op": "add", "path": "/webhooks/1/clientConfig", "value": {"caBundle": "WA=="}},
    ]
    assert (
        cabundle.ca_bundle_patch(jsonpatch.apply_patch(config, cabundle.ca_bundle_patch(config, b"X")), b"X")
        == []
    )


async def test_cabundle_keeper_writes_and_keeps_the_bundle(fake_api: FakeWebhookAPI) -> None:
    bundle = [b"-----BEGIN CERTIFICATE-----\nroot one\n-----END CERTIFICATE-----\n"]
    keeper = cabundle.CABundleKeeper(
        cabundle.WebhookConfigurations(fake_api.api_client()), "sidemesh-injector", lambda: bundle[-1]
    )
    assert await asyncio.to_thread(keeper.sync) is True
    ctype, ops = fake_api.patches[-1]
    assert ctype == "application/json-patch+json"
    assert [op["op"] for op in ops] == ["test", "add", "test", "add"]
    wanted = base64.b64encode(bundle[-1]).decode()
    assert [w["clientConfig"]["caBundle"] for w in fake_api.config["webhooks"]] == [wanted, wanted]
    assert await asyncio.to_thread(keeper.sync) is False  # current: no second patch
    assert len(fake_api.patches) == 1

    # kubectl apply of the manifests cannot reset it (no caBundle there), but someone else might;
    # and the API server may fail for a while: the loop retries and heals both
    fake_api.config["webhooks"][0]["clientConfig"].pop("caBundle")
    fake_api.fail_next = 1
    bundle.append(b"-----BEGIN CERTIFICATE-----\nroot two\n-----END CERTIFICATE-----\n")
    task = asyncio.create_task(keeper.run())
    try:
        for _ in range(200):
            if keeper.last_error is not None:
                break
            await asyncio.sleep(0.01)
        assert keeper.last_error is not None and "503" in keeper.last_error
        keeper.poke()  # what a bundle change does; the retry would come within 5 s anyway
        for _ in range(300):
            if keeper.synced == bundle[-1]:
                break
            await asyncio.sleep(0.01)
        wanted = base64.b64encode(bundle[-1]).decode()
        assert [w["clientConfig"]["caBundle"] for w in fake_api.config["webhooks"]] == [wanted, wanted]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_cabundle_keeper_reports_a_missing_configuration(fake_api: FakeWebhookAPI) -> None:
    from kubernetes.client.exceptions import ApiException

    keeper = cabundle.CABundleKeeper(
        cabundle.WebhookConfigurations(fake_api.api_client()), "other", lambda: b"x"
    )
    with pytest.raises(ApiException, match="404"):
        await asyncio.to_thread(keeper.sync)


# -- `sidemesh injector serve`, the process --------------------------------------------------------


async def _read_until(stream: asyncio.StreamReader, event: str, seen: list[Json]) -> Json:
    while True:
        line = await asyncio.wait_for(stream.readline(), 20)
        if not line:
            raise AssertionError(f"the injector exited before logging {event!r}: {seen}")
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            seen.append(record)
            if record.get("event") == event:
                return record


async def _injector_process(
    tmp_path: Path, settings: Path, *args: str, listen: str = "127.0.0.1:0"
) -> asyncio.subprocess.Process:
    """`sidemesh injector serve` with the serving certificate of ``write_pair``, no caBundle upkeep."""
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "sidemesh"), "injector", "serve",
        "--listen", listen,
        "--tls-cert", str(tmp_path / "tls.crt"),
        "--tls-key", str(tmp_path / "tls.key"),
        "--settings-file", str(settings),
        "--webhook-configuration", "",
        *args,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_the_serve_command(start_ca: StartCA, tmp_path: Path) -> None:
    ca, token_file = await start_injector_ca(start_ca, tmp_path)
    write_pair(tmp_path, await issue_injector_svid(ca, token_file))
    settings = tmp_path / "config.yaml"
    settings.write_text("image: registry.local/sidemesh:1\n")
    proc = await _injector_process(tmp_path, settings, "--reload-interval", "100ms", "--shutdown-delay", "1s")
    assert proc.stderr is not None
    seen: list[Json] = []
    try:
        started = await _read_until(proc.stderr, "injector serving", seen)
        client = Client(int(started["address"].rsplit(":", 1)[1]), ca.bundle)

        def image() -> str:
            status, body = client.post(review())
            assert status == 200, body
            ops = json.loads(base64.b64decode(body["response"]["patch"]))
            init = next(op["value"] for op in ops if op["path"] == "/spec/initContainers")
            return str(init[0]["image"])

        assert await asyncio.to_thread(image) == "registry.local/sidemesh:1"
        settings.write_text("image: registry.local/sidemesh:2\n")
        await _read_until(proc.stderr, "injection settings reloaded", seen)
        assert await asyncio.to_thread(image) == "registry.local/sidemesh:2"
        settings.write_text("image: [broken\n")
        await _read_until(proc.stderr, "injection settings invalid; keeping the last good ones", seen)
        assert await asyncio.to_thread(image) == "registry.local/sidemesh:2"
        # Not UTF-8: it ended the reload task for good, silently (settings, certificate and
        # caBundle upkeep with it); now said, and the next good version is taken.
        settings.write_bytes(b"image: \xff\xfe\n")
        bad = await _read_until(proc.stderr, "injection settings invalid; keeping the last good ones", seen)
        assert "is not UTF-8 text" in bad["error"], bad
        settings.write_text("image: registry.local/sidemesh:3\n")
        await _read_until(proc.stderr, "injection settings reloaded", seen)
        assert await asyncio.to_thread(image) == "registry.local/sidemesh:3"
        admissions = [r for r in seen if r.get("event") == "admission"]
        assert admissions and admissions[0]["outcome"] == "injected" and admissions[0]["namespace"] == "shop"
        # SIGTERM: not ready at once, still answering admissions for --shutdown-delay, then gone.
        proc.send_signal(signal.SIGTERM)
        await _read_until(proc.stderr, "stopping: not ready, still answering admissions", seen)
        conn = client.connect()
        try:
            assert (await asyncio.to_thread(Client.call, conn, "GET", "/healthz"))[0] == 503
            assert await asyncio.to_thread(image) == "registry.local/sidemesh:3"
        finally:
            conn.close()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
    assert code == 0


def _kubeconfig(path: Path, port: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.mark.parametrize("api", ["1.28", "silent", "1.30 with a 1.28 node", "1.30"])
async def test_native_sidecar_auto_asks_the_api_server_and_never_waits_for_long(
    start_ca: StartCA, tmp_path: Path, api: str
) -> None:
    """nativeSidecar auto: a 1.28 API server gets classic sidecars, also without
    --webhook-configuration (cert-manager setups), and so does a newer one with a kubelet older
    than 1.29 (native sidecars on it never let the pod start); an API server that accepts the
    connection and never answers does not keep the webhook from serving (it was blocked for good)
    and gets classic sidecars, which every version runs (native ones were refused by 1.28)."""
    ca, token_file = await start_injector_ca(start_ca, tmp_path)
    write_pair(tmp_path, await issue_injector_svid(ca, token_file))
    settings = tmp_path / "config.yaml"
    settings.write_text("nativeSidecar: auto\n")
    minor = "28+" if api == "1.28" else "30"
    version = json.dumps({"major": "1", "minor": minor, "gitVersion": f"v1.{minor}-eks-1"}).encode()
    kubelets = ["v1.30.2", "v1.28.9"] if "node" in api else ["v1.30.2"]
    nodes = json.dumps(
        {
            "kind": "NodeList",
            "apiVersion": "v1",
            "metadata": {},
            "items": [
                {"metadata": {"name": f"n{i}"}, "status": {"nodeInfo": {"kubeletVersion": v}}}
                for i, v in enumerate(kubelets)
            ],
        }
    ).encode()

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if api == "silent":
                time.sleep(30)
                return
            body = nodes if self.path.startswith("/api/v1/nodes") else version
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    started = time.monotonic()
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", server.server_address[1])
    proc = await _injector_process(
        tmp_path, settings, "--kubeconfig", str(kubeconfig), "--shutdown-delay", "0s"
    )
    assert proc.stderr is not None
    seen: list[Json] = []
    try:
        serving = await _read_until(proc.stderr, "injector serving", seen)
        assert time.monotonic() - started < 15
        client = Client(int(serving["address"].rsplit(":", 1)[1]), ca.bundle)
        status, body = await asyncio.to_thread(client.post, review())
        assert status == 200, body
        ops = json.loads(base64.b64decode(body["response"]["patch"]))
        pod = jsonpatch.apply_patch(POD, ops)
        proxy_in_containers = any(c["name"] == "sidemesh-proxy" for c in pod["spec"]["containers"])
        assert proxy_in_containers is (api != "1.30"), seen  # native only where all run 1.29+
    finally:
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        await asyncio.wait_for(proc.wait(), 20)
        server.shutdown()
        server.server_close()
    # (--shutdown-delay 0s) nothing holds the exit: not a /version call given up on, retried by urllib3
    assert time.monotonic() - stopping < 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "/nonexistent"], "--tls-cert: give both --tls-cert and --tls-key"),
        (["--tls-cert", "/nonexistent/c", "--tls-key", "/nonexistent/k"], "cannot load --tls-cert/--tls-key"),
        (["--settings-file", "/nonexistent/config.yaml"], "fix --settings-file"),
        (["--listen", "nowhere"], "--listen: 'nowhere' is not HOST:PORT"),
    ],
)
async def test_serve_refuses_bad_configuration(args: list[str], message: str, tmp_path: Path) -> None:
    settings = tmp_path / "config.yaml"
    settings.write_text("")
    base = ["--settings-file", str(settings)]
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "sidemesh"), "injector", "serve", *base, *args,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert message in err.decode()


async def test_the_serve_command_in_a_cluster(
    start_ca: StartCA, fake_api: FakeWebhookAPI, tmp_path: Path
) -> None:
    """In-cluster mode: the serving SVID from the CA, the caBundle written through the API server."""
    ca, token_file = await start_injector_ca(start_ca, tmp_path)
    (tmp_path / "root-cert.pem").write_bytes(ca.bundle)
    (tmp_path / "config.yaml").write_text("")
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "fake", "cluster": {"server": f"http://127.0.0.1:{fake_api.server.server_port}"}}
        ],
        "users": [{"name": "injector", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "injector"}}],
        "current-context": "fake",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "sidemesh"), "injector", "serve",
        "--listen", "127.0.0.1:0",
        "--ca-address", ca.address,
        "--token-file", str(token_file),
        "--bundle-file", str(tmp_path / "root-cert.pem"),
        "--kubeconfig", str(tmp_path / "kubeconfig"),
        "--settings-file", str(tmp_path / "config.yaml"),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[Json] = []
    try:
        started = await _read_until(proc.stderr, "injector serving", seen)
        await _read_until(proc.stderr, "webhook caBundle updated", seen)
        wanted = base64.b64encode(ca.bundle).decode()
        assert [w["clientConfig"]["caBundle"] for w in fake_api.config["webhooks"]] == [wanted, wanted]
        # the API server's view: trust the caBundle, check the Service's DNS name
        client = Client(int(started["address"].rsplit(":", 1)[1]), base64.b64decode(wanted))
        status, body = await asyncio.to_thread(client.post, review())
        assert status == 200 and body["response"]["patchType"] == "JSONPatch"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
    assert code == 0


# -- the injector restarted while the API server calls it (issue 9: "the injector down") -----------


@dataclass
class Outcome:
    at: float
    kind: str  # "injected" | "refused" (no answer: failurePolicy decides) | "bad" (an answer that is wrong)
    detail: str = ""


def _call_like_the_api_server(client: Client, reference: Json | None) -> Outcome:
    """One admission as the API server makes it (5 s timeout). What it gets is either a whole
    answer whose patch yields the reference pod, or no answer at all; anything else is bad."""
    at = time.monotonic()
    try:
        conn = client.connect()
        conn.timeout = 5
        try:
            status, body = client.post(review(uid=f"uid-{at}"), conn)
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if isinstance(exc, ValueError):  # a response body that is not JSON: cut in the middle
            return Outcome(at, "bad", f"unparsable answer: {exc}")
        return Outcome(at, "refused", type(exc).__name__)
    response = body.get("response", {})
    if status != 200 or not response.get("allowed") or response.get("uid") != f"uid-{at}":
        return Outcome(at, "bad", f"{status} {str(body)[:200]}")
    try:
        pod = jsonpatch.apply_patch(POD, json.loads(base64.b64decode(response["patch"])))
    except (KeyError, ValueError, jsonpatch.JsonPatchException) as exc:
        return Outcome(at, "bad", f"patch: {exc}")
    if reference is not None and pod != reference:
        return Outcome(at, "bad", "a different pod than the reference")
    return Outcome(at, "injected", json.dumps(pod, sort_keys=True))


async def test_injector_restarted_under_admissions_never_half_injects(
    start_ca: StartCA, tmp_path: Path
) -> None:
    """The API server keeps calling while the injector gets SIGTERM and a new process takes its
    port. Every call either gets the whole patch (the same injected pod every time) or no answer
    (then `failurePolicy: Fail` refuses the pod and its ReplicaSet retries); never a partial or
    malformed answer. Calls in flight at the SIGTERM are answered (uvicorn's graceful shutdown), and
    calls keep being answered for --shutdown-delay after it (here 1 s; /healthz says 503 meanwhile)."""
    ca, port = await ready_to_serve(start_ca, tmp_path)

    async def start() -> asyncio.subprocess.Process:
        proc = await _injector_process(
            tmp_path, tmp_path / "config.yaml", "--shutdown-delay", "1s", listen=f"127.0.0.1:{port}"
        )
        assert proc.stderr is not None
        await _read_until(proc.stderr, "injector serving", [])
        readers.append(asyncio.create_task(proc.stderr.read()))  # a full pipe would stall its logging
        return proc

    readers: list[asyncio.Task[bytes]] = []
    client = Client(port, ca.bundle)
    first = await start()
    reference = await asyncio.to_thread(_call_like_the_api_server, client, None)
    assert reference.kind == "injected", reference
    expected = json.loads(reference.detail)
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            outcomes.append(_call_like_the_api_server(client, expected))
            time.sleep(0.01)

    callers = [asyncio.create_task(asyncio.to_thread(caller)) for _ in range(4)]
    second: asyncio.subprocess.Process | None = None
    try:
        await asyncio.sleep(1.5)
        down_at = time.monotonic()
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 20) == 0
        gone_at = time.monotonic()  # after --shutdown-delay (1 s) of answering
        await asyncio.sleep(0.5)  # nobody listening for a moment: calls get no answer
        second = await start()
        up_at = time.monotonic()
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.gather(*callers)
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 20)
    bad = [o for o in outcomes if o.kind == "bad"]
    refused = [o for o in outcomes if o.kind == "refused"]
    injected = [o for o in outcomes if o.kind == "injected"]
    # The figures, for bench.reliability (which runs this test):
    print(
        f"injector restart: {len(outcomes)} calls, {len(injected)} injected, {len(refused)} unanswered, "
        f"{len(bad)} bad, down {up_at - down_at:.2f} s"
    )
    assert not bad, bad[:3]
    assert any(o.at < down_at for o in injected) and any(o.at > up_at for o in injected)
    assert refused, "the injector was down for 0.5 s: some calls must have found nobody"
    # Only calls made while it was down got no answer (0.2 s of slack for a call's own connect);
    # during the shutdown delay after SIGTERM every call was answered.
    assert gone_at - down_at >= 0.9
    assert all(down_at + 0.8 <= o.at <= up_at for o in refused), [(o.at - down_at, o.detail) for o in refused]
    assert any(down_at + 0.1 <= o.at <= down_at + 0.8 for o in injected)


async def test_serve_on_an_address_in_use_names_the_option(start_ca: StartCA, tmp_path: Path) -> None:
    """A port in use was a traceback (exit 1); as ca serve and controller serve: one line naming
    the option, exit 2."""
    ca, token_file = await start_injector_ca(start_ca, tmp_path)
    write_pair(tmp_path, await issue_injector_svid(ca, token_file))
    settings = tmp_path / "config.yaml"
    settings.write_text("")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for args, option in (
            ((), "--listen"),
            (("--metrics-listen", f"127.0.0.1:{port}"), "--metrics-listen"),
        ):
            listen = f"127.0.0.1:{port}" if option == "--listen" else "127.0.0.1:0"
            proc = await _injector_process(tmp_path, settings, *args, listen=listen)
            assert proc.stderr is not None
            err = (await asyncio.wait_for(proc.stderr.read(), 20)).decode()
            assert await asyncio.wait_for(proc.wait(), 20) == 2, err
            assert f"cannot listen on {option} 127.0.0.1:{port}: address already in use" in err, err
            assert "Traceback" not in err


async def test_a_bad_opentelemetry_provider_variable_fails_no_admission(
    start_ca: StartCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI 0.165 traces every request through OpenTelemetry's global providers unless told not
    to; with OTEL_PYTHON_TRACER_PROVIDER naming nothing installed, every request was a 500 (with
    the webhook's failurePolicy: Fail, no pod could be created). The injector traces its own."""
    for kind in ("TRACER", "METER", "LOGGER"):
        monkeypatch.setenv(f"OTEL_PYTHON_{kind}_PROVIDER", "bogus")
    ca, token_file = await start_injector_ca(start_ca, tmp_path)
    write_pair(tmp_path, await issue_injector_svid(ca, token_file))
    serving = ServingCertificate()
    CertificateFiles(serving, tmp_path / "tls.crt", tmp_path / "tls.key").load()
    server = WebhookServer(create_app(InjectionSettings), serving, "127.0.0.1", 0)
    client = Client(await server.start(), ca.bundle)
    try:
        conn = client.connect()
        assert (await asyncio.to_thread(Client.call, conn, "GET", "/healthz"))[0] == 200
        assert (await asyncio.to_thread(client.post, review(), conn))[0] == 200
        conn.close()
    finally:
        await server.stop()
