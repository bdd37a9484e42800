"""hpack's module loggers, silenced.

hpack (HPACK, HTTP/2's header compression, under h2: so under grpclib and the sidecar's HTTP/2
proxy) logs at debug level for every header field and integer it codes, with the fields' values:
a workload's token in the CA call's ``authorization`` among them, written out whenever debug
logging is on for the process. With debug off each line still costs a Logger.debug and an
isEnabledFor call: about 70 per gRPC call in each sidecar. :func:`quiet_hpack` puts a no-op in
place of the two loggers (hpack calls only their ``debug``). Every module of the mesh that makes
hpack run calls it when imported: ``sidemesh.grpc_client`` (the CA's Sign, the controller's
stream) and ``proxy.http2``.
"""

from __future__ import annotations

import hpack.hpack
import hpack.table


class QuietLog:
    """Stands in for hpack's module loggers."""

    @staticmethod
    def debug(*args: object, **kwargs: object) -> None:
        pass


def quiet_hpack() -> None:
    hpack.hpack.log = QuietLog()  # type: ignore[assignment]
    hpack.table.log = QuietLog()  # type: ignore[assignment]
