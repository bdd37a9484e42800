"""Cancellation that a library turned into an error.

grpc.aio can answer a cancellation that lands inside a call with an error (StatusCode.CANCELLED)
instead of CancelledError. A retry loop that catches that error would sleep into its backoff and
retry: the cancellation is lost, and whoever stops the loop (a sidecar's drain on SIGTERM) waits
forever. Such loops call :func:`stop_if_cancelling` first in their error handler."""

from __future__ import annotations

import asyncio


def stop_if_cancelling(error: BaseException) -> None:
    """Raise CancelledError (from ``error``) when the current task is being cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error
