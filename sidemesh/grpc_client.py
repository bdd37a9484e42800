"""gRPC calls a workload makes (the CA's Sign, the controller's config stream), over grpclib.

The CA and the controller serve with grpcio. A sidecar is only ever their client, and grpcio's
client cost every sidecar 14 MB of RSS at ready (its C core mapped and touched, threads and their
arenas) and six threads beside its event loop. grpclib is gRPC in Python on h2, which the sidecar carries
anyway for HTTP/2: its channel lives on the sidecar's own loop and costs about 1 MB.

grpclib has no reconnect backoff of its own (a channel dials again on the next call): the callers'
retry loops own the schedule, as they did with grpcio's backoff turned down.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable
from typing import TypeVar

import h2.exceptions
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from sidemesh.config import parse_hostport
from sidemesh.hpack_log import quiet_hpack

__all__ = [
    "CALL_ERRORS",
    "Channel",
    "RawCodec",
    "Status",
    "call_in_own_task",
    "channel",
    "close",
    "connection_lost",
    "status_of",
    "tls_context",
]

quiet_hpack()  # (the CA call's token is among the fields hpack would log: sidemesh/hpack_log.py)

T = TypeVar("T")

# What a call can end with besides its answer; status_of names each as a gRPC status.
CALL_ERRORS = (GRPCError, StreamTerminatedError, ProtocolError, h2.exceptions.H2Error, OSError, TimeoutError)


def tls_context(bundle_pem: bytes) -> ssl.SSLContext:
    """A client context that trusts only ``bundle_pem`` and checks the server's DNS name (the name
    given to :func:`channel`), offering h2 as gRPC requires (grpcio servers refuse a handshake
    without it). Raises ``ssl.SSLError`` for a bundle with no certificate in it (an empty one too:
    ``create_default_context`` took empty data as none given, and trusted the system's roots)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # (verifies the chain and the name)
    try:
        ctx.load_verify_locations(cadata=bundle_pem.decode("ascii", "replace"))
    except ValueError as exc:  # "Empty certificate data"
        raise ssl.SSLError(f"the trust bundle holds no certificate ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


def channel(
    address: str,
    context: ssl.SSLContext,
    server_name: str,
    keepalive: float | None = None,
    keepalive_timeout: float = 20.0,
) -> Channel:
    """A channel to ``address`` (HOST:PORT) over TLS that checks ``server_name`` in the server's
    certificate whatever address it dials. ``keepalive``: seconds between pings while a call is
    open; the connection is dropped when one goes unanswered for ``keepalive_timeout`` (a partition
    without a FIN). Call from a coroutine: the channel belongs to the running loop."""
    host, port = parse_hostport("address", address)
    settings: dict[str, object] = {"ssl_target_name_override": server_name}
    if keepalive is not None:
        settings.update(
            _keepalive_time=keepalive,
            _keepalive_timeout=keepalive_timeout,
            _http2_max_pings_without_data=0,  # a quiet stream is the one that needs them
            _http2_min_sent_ping_interval_without_data=keepalive,
        )
    # (HTTP/2 windows: grpclib's 4 MiB, so a controller's whole table, megabytes, needs few updates)
    return _Channel(host, port, ssl=context, config=Configuration(**settings))  # type: ignore[arg-type]


# grpclib closes a connection (an unanswered keepalive ping, a closed channel) with the transport's
# close(): over TLS that waits for the peer's close_notify, 30 s by default, and the calls on it
# learn that the connection is gone only then. Behind a partition that is the whole wait.
TLS_SHUTDOWN_TIMEOUT = 1.0


class _Channel(Channel):
    """grpclib's channel, dialling with a short TLS shutdown (TLS_SHUTDOWN_TIMEOUT)."""

    async def _create_connection(self) -> H2Protocol:
        _, protocol = await self._loop.create_connection(
            self._protocol_factory,
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._config.ssl_target_name_override if self._ssl is not None else None,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if self._ssl is not None else None,
        )
        return protocol


def connection_lost(exc: BaseException) -> bool:
    """The call failed with its connection (lost, or broken by the server's GOAWAY), not with an
    answer: another connection may serve it."""
    return isinstance(exc, (StreamTerminatedError, ProtocolError, h2.exceptions.H2Error))


async def call_in_own_task(call: Awaitable[T]) -> T:
    """Await a grpclib call in a task of its own. grpclib ends a call at its deadline, or when its
    connection is lost, by cancelling the task it runs in, and never uncancels it: run in the
    caller's task, that task stayed "being cancelled" (``Task.cancelling()``), and a retry loop that
    stops on that (sidemesh/cancel.py) stopped for good after one slow answer from the CA. A
    cancellation of the caller still reaches the call (awaiting a task cancels it with the caller)."""
    return await asyncio.ensure_future(call)


async def close(channel: Channel) -> None:
    """Close the channel's connection at once. grpclib's ``close`` starts TLS's close_notify
    exchange and returns: the transport outlived its owner (a loop closed under it logged "Event
    loop is closed" from its callbacks). The connection is aborted instead, and its end awaited."""
    protocol = channel._protocol  # grpclib's open connection, None when it never dialled
    transport = getattr(getattr(protocol, "connection", None), "_transport", None)
    if transport is not None:
        transport.abort()
    channel.close()
    if transport is not None:
        await asyncio.sleep(0)  # (connection_lost runs on the loop's next turn)


def status_of(exc: BaseException) -> tuple[Status, str]:
    """The gRPC status a failed call ended with, and its message. The server's status when it sent
    one; otherwise the call never got an answer: DEADLINE_EXCEEDED for a timeout, UNAVAILABLE for a
    connection that failed, was refused at TLS, or was lost (as grpcio reports these)."""
    if isinstance(exc, GRPCError):
        return exc.status, exc.message or ""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return Status.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(exc, ssl.SSLError):  # (one made with a message alone prints as a tuple)
        return Status.UNAVAILABLE, f"TLS: {exc.args[0] if len(exc.args) == 1 else exc}"
    if isinstance(exc, OSError):
        return Status.UNAVAILABLE, f"connection error: {exc.strerror or exc}"
    return Status.UNAVAILABLE, f"connection lost: {exc}"


class RawCodec(CodecBase):
    """Messages as the bytes on the wire (a probe's few bytes need no protobuf classes)."""

    __content_subtype__ = "proto"

    def encode(self, message: bytes, message_type: object) -> bytes:
        return message

    def decode(self, data: bytes, message_type: object) -> bytes:
        return data
