"""The CA's gRPC client, used by every workload (and by `sidemesh ca issue`)."""

from __future__ import annotations

from grpclib.client import Channel, UnaryUnaryMethod

from sidemesh import grpc_client
from sidemesh.api import ca_pb2
from sidemesh.grpc_client import Status

# The name every client checks in the CA's serving certificate, whatever address it dials.
CA_SERVER_NAME = "sidemesh-ca.sidemesh-system.svc"
SIGN = "/sidemesh.ca.v1.CertificateAuthority/Sign"

# Codes after which trying again later can succeed.
RETRYABLE = frozenset(
    {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.RESOURCE_EXHAUSTED, Status.UNKNOWN}
)


class CAClientError(Exception):
    def __init__(self, code: Status, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class CAClient:
    """A channel to the CA that verifies it against the trust bundle. :meth:`set_bundle` replaces
    the bundle (a root rotation): the next call goes over a new channel that trusts the new one.
    The channel dials on the first call, and again on the call after a lost connection (the
    caller's retry loop owns the schedule)."""

    def __init__(
        self, address: str, bundle_pem: bytes, server_name: str = CA_SERVER_NAME, timeout: float = 10.0
    ) -> None:
        self.address = address
        self.server_name = server_name
        self.timeout = timeout
        self._bundle = bundle_pem
        self._channel: Channel | None = None  # opened in a call: a channel belongs to its loop
        self._retired: list[Channel] = []  # closed at the next call (one may be running on it)

    def set_bundle(self, bundle_pem: bytes) -> None:
        if bundle_pem == self._bundle:
            return
        self._bundle = bundle_pem
        if self._channel is not None:
            self._retired.append(self._channel)
            self._channel = None

    async def sign(self, token: str, csr_pem: str, ttl_seconds: int = 0) -> ca_pb2.SignResponse:
        return await self.call(
            ca_pb2.SignRequest(csr=csr_pem, ttl_seconds=ttl_seconds), {"authorization": f"Bearer {token}"}
        )

    async def call(self, request: ca_pb2.SignRequest, metadata: dict[str, str]) -> ca_pb2.SignResponse:
        """Sign with the metadata as given (sign() sends the token; tests send none, or a trace)."""
        while self._retired:
            await grpc_client.close(self._retired.pop())
        for attempt in (1, 2):
            try:
                if self._channel is None:
                    self._channel = grpc_client.channel(
                        self.address, grpc_client.tls_context(self._bundle), self.server_name
                    )
                method = UnaryUnaryMethod(self._channel, SIGN, ca_pb2.SignRequest, ca_pb2.SignResponse)
                return await grpc_client.call_in_own_task(
                    method(request, timeout=self.timeout, metadata=metadata)
                )
            except grpc_client.CALL_ERRORS as exc:
                if attempt == 1 and grpc_client.connection_lost(exc):
                    # h2 fails every call on a connection at the server's GOAWAY, those a graceful
                    # stop lets finish too (python-hyper/h2#1181): a CA rolling out failed the Signs
                    # in flight. Once more, at once, on a new connection.
                    if self._channel is not None:
                        await grpc_client.close(self._channel)
                        self._channel = None
                    continue
                code, message = grpc_client.status_of(exc)
                raise CAClientError(code, message) from exc
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for channel in [*self._retired, *([self._channel] if self._channel else [])]:
            await grpc_client.close(channel)
        self._retired.clear()
        self._channel = None
