"""The CA's gRPC client, used by every workload (and by `sidemesh ca issue`)."""

from __future__ import annotations

import grpc

from sidemesh.api import ca_pb2, ca_pb2_grpc

# The name every client checks in the CA's serving certificate, whatever address it dials.
CA_SERVER_NAME = "sidemesh-ca.sidemesh-system.svc"

# Codes after which trying again later can succeed.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
    }
)


class CAClientError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class CAClient:
    """A channel to the CA that verifies it against the trust bundle. :meth:`set_bundle` replaces
    the bundle (a root rotation): the next call goes over a new channel that trusts the new one."""

    def __init__(
        self, address: str, bundle_pem: bytes, server_name: str = CA_SERVER_NAME, timeout: float = 10.0
    ) -> None:
        self.address = address
        self.server_name = server_name
        self.timeout = timeout
        self._bundle = bundle_pem
        self._channel = self._open(bundle_pem)
        self._stub = ca_pb2_grpc.CertificateAuthorityStub(self._channel)
        self._retired: list[grpc.aio.Channel] = []

    def _open(self, bundle_pem: bytes) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=bundle_pem)
        options = [
            ("grpc.ssl_target_name_override", self.server_name),
            # The caller (the renewal loop) owns the retry schedule; grpc's own reconnect backoff
            # (up to 120 s by default) would otherwise delay recovery after a CA outage.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        return grpc.aio.secure_channel(self.address, creds, options=options)

    def set_bundle(self, bundle_pem: bytes) -> None:
        if bundle_pem == self._bundle:
            return
        self._bundle = bundle_pem
        self._retired.append(self._channel)
        self._channel = self._open(bundle_pem)
        self._stub = ca_pb2_grpc.CertificateAuthorityStub(self._channel)

    async def sign(self, token: str, csr_pem: str, ttl_seconds: int = 0) -> ca_pb2.SignResponse:
        while self._retired:
            await self._retired.pop().close(None)
        try:
            return await self._stub.Sign(
                ca_pb2.SignRequest(csr=csr_pem, ttl_seconds=ttl_seconds),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise CAClientError(exc.code(), exc.details() or "") from exc

    async def close(self) -> None:
        for channel in [*self._retired, self._channel]:
            await channel.close(None)
        self._retired.clear()
