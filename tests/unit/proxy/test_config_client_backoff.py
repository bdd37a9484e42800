"""The controller stream's reconnect schedule (time is the only thing faked here)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.config_client import RECONNECT_BACKOFF_MAX, ConfigClient
from tests.support.cancel import CancelBecomesError, stops_on_one_cancel


class _Identity:
    async def wait_ready(self) -> None:
        return None

    def on_rotate(self, callback: Any) -> None:
        pass


class _Scripted(ConfigClient):
    """Each session follows the script: "fail" (never got an update) or "ok" (streamed, then lost)."""

    def __init__(self, script: list[str]) -> None:
        super().__init__("127.0.0.1:1", "controller", _Identity(), lambda *a: None)  # type: ignore[arg-type]
        self.script = script

    async def _session(self) -> None:
        if not self.script:
            raise asyncio.CancelledError
        if self.script.pop(0) == "ok":
            self.connected = True
        raise ConnectionError("the controller ended the stream")


async def _delays(monkeypatch: pytest.MonkeyPatch, script: list[str]) -> list[float]:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr("proxy.config_client.asyncio.sleep", fake_sleep)
    monkeypatch.setattr("proxy.config_client.random.random", lambda: 1.0)  # the top of every jitter range
    with pytest.raises(asyncio.CancelledError):
        await _Scripted(script).run()
    return slept


async def test_backoff_is_capped_at_a_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    delays = await _delays(monkeypatch, ["fail"] * 10)
    assert delays[:4] == [1.0, 2.0, 4.0, RECONNECT_BACKOFF_MAX]
    assert max(delays) == RECONNECT_BACKOFF_MAX


async def test_a_stream_that_delivered_config_starts_a_fresh_schedule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long outage, a healthy stream, then the controller dies again: the first retry after the
    # second loss must not carry the first outage's attempts.
    delays = await _delays(monkeypatch, ["fail"] * 5 + ["ok", "fail"])
    assert delays[5] == 1.0, delays
    assert delays[6] == 2.0, delays


class _CancelledByGrpc(ConfigClient):
    """A session whose cancellation comes out as a gRPC error, as grpc.aio can turn it into
    StatusCode.CANCELLED when the cancel lands inside the call."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1", "controller", _Identity(), lambda *a: None)  # type: ignore[arg-type]
        self.grpc = CancelBecomesError(ConnectionError("the call was cancelled"))

    async def _session(self) -> None:
        await self.grpc.call()


async def test_stopping_ends_the_client_even_when_the_cancel_comes_back_as_an_error() -> None:
    client = _CancelledByGrpc()
    assert await stops_on_one_cancel(asyncio.create_task(client.run()), client.grpc)


class _Broken(ConfigClient):
    """A session that fails with an error no handler foresaw (a library's bug, an odd peer)."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1", "controller", _Identity(), lambda *a: None)  # type: ignore[arg-type]
        self.sessions = 0

    async def _session(self) -> None:
        self.sessions += 1
        if self.sessions > 3:
            raise asyncio.CancelledError
        raise KeyError("stream id 1")


async def test_an_unexpected_error_ends_the_session_not_the_stream(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It killed the client's task before: the sidecar kept its configuration and never dialled the
    controller again. Now it is logged with its traceback and the stream is dialled again."""

    async def fake_sleep(delay: float) -> None:
        pass

    monkeypatch.setattr("proxy.config_client.asyncio.sleep", fake_sleep)
    client = _Broken()
    with pytest.raises(asyncio.CancelledError):
        await client.run()
    assert client.sessions == 4 and client.last_error == "'stream id 1'" and not client.connected
    assert any(r.exc_info and "unexpected error" in r.getMessage() for r in caplog.records)
