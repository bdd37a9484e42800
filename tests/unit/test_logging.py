"""sidemesh.logging: one JSON object per line, with the record's extras and a UTC timestamp."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest

from sidemesh import logging as smlog
from sidemesh.logging import (
    FLUSH_BYTES,
    FLUSH_S,
    LINES_PER_EVENT,
    BufferedLines,
    JsonFormatter,
    PerEventLimit,
)


def record(created: float, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("sidemesh.proxy.access", logging.INFO, "f.py", 1, "request %s", ("x",), None)
    rec.created, rec.msecs = created, (created % 1) * 1000
    rec.__dict__.update(extra)
    return rec


def test_lines_carry_the_time_of_each_record_and_its_extras() -> None:
    fmt = JsonFormatter()
    first = json.loads(fmt.format(record(1_764_900_000.25, status=200, path="/a")))
    same_second = json.loads(fmt.format(record(1_764_900_000.5)))
    next_second = json.loads(fmt.format(record(1_764_900_061.125)))  # the cached second moves on
    assert first["ts"] == "2025-12-05T02:00:00.250Z" and same_second["ts"] == "2025-12-05T02:00:00.500Z"
    assert next_second["ts"] == "2025-12-05T02:01:01.125Z"
    assert first["event"] == "request x" and first["level"] == "info"
    assert first["logger"] == "sidemesh.proxy.access" and (first["status"], first["path"]) == (200, "/a")
    assert "pathname" not in first and "process" not in first and "thread" not in first


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


FIELDS = {"direction": "inbound", "status": 200, "path": "/a", "source": None, "bytes": {"up": 1}}


@pytest.mark.parametrize("now", [1_764_900_000.25, 1_764_900_061.9995, 1_764_900_002.0])
def test_buffered_lines_are_the_formatters_lines(monkeypatch: pytest.MonkeyPatch, now: float) -> None:
    monkeypatch.setattr(time, "time", lambda: now)  # the record below and the buffered line alike
    stream = CountingStream()
    BufferedLines("sidemesh.proxy.access", stream).info("request", FIELDS)  # no loop: written at once
    rec = logging.LogRecord("sidemesh.proxy.access", logging.INFO, "f.py", 1, "request", None, None)
    rec.__dict__.update(FIELDS)
    assert stream.getvalue() == JsonFormatter().format(rec) + "\n"


def test_a_timer_left_by_a_closed_loop_does_not_hold_lines_back() -> None:
    stream = CountingStream()
    lines = BufferedLines("sidemesh.proxy.access", stream)

    async def one_line() -> None:
        lines.info("request", {"n": 1})  # its timer dies with this loop

    asyncio.run(one_line())
    lines.info("request", {"n": 2})  # no loop now: both go out at once
    assert [json.loads(x)["n"] for x in stream.getvalue().splitlines()] == [1, 2]


async def test_buffered_lines_go_out_together_within_the_flush_interval() -> None:
    stream = CountingStream()
    lines = BufferedLines("sidemesh.proxy.access", stream)
    for i in range(3):
        lines.info("request", {"n": i})
    assert stream.getvalue() == ""
    await asyncio.sleep(FLUSH_S + 0.1)
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1, 2]
    assert stream.writes == 1
    big = "x" * 1000
    written = 0
    while stream.writes == 1 and written <= FLUSH_BYTES // 1000:  # past the size bound: out at once
        lines.info("request", {"n": written, "pad": big})
        written += 1
    assert stream.writes == 2 and len(stream.getvalue().splitlines()) == 3 + written
    lines.info("request", {"n": -1})
    lines.flush()  # as the drain does
    assert json.loads(stream.getvalue().splitlines()[-1])["n"] == -1


def test_each_event_is_held_to_its_lines_a_second_and_the_next_line_says_how_many_were_held() -> None:
    now = [100.0]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(PerEventLimit(per_second=3, clock=lambda: now[0], loggers=("test.sidemesh",)))
    logger = logging.getLogger("test.sidemesh.limit")
    other = logging.getLogger("test.sidemeshother")  # not below "test.sidemesh": never held
    other.addHandler(handler)
    other.propagate = False
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(50):  # a flood of one event, with another event among it
            logger.warning("connection denied", extra={"n": i})
            if i == 10:
                logger.warning("bad request")
        for _ in range(20):
            other.warning("admission")
        logger.warning({"an": "unhashable message"})  # (any object may be a message)
        for _ in range(20):
            logger.error("configuration error")  # errors are never held back
        now[0] = 101.2
        logger.warning("connection denied", extra={"n": 50})
        logger.warning("connection denied", extra={"n": 51})
    finally:
        logger.removeHandler(handler)
        other.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    denied = [(line["n"], line.get("suppressed")) for line in lines if line["event"] == "connection denied"]
    assert denied == [(0, None), (1, None), (2, None), (50, 47), (51, None)]
    assert [line["event"] for line in lines].count("bad request") == 1
    assert [line["event"] for line in lines].count("admission") == 20
    assert [line["event"] for line in lines].count("configuration error") == 20


def test_setup_limits_lines_per_event() -> None:
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        smlog.setup("info")
        ours = [h for h in root.handlers if getattr(h, "_sidemesh", False)]
        assert len(ours) == 1 and any(isinstance(f, PerEventLimit) for f in ours[0].filters)
        limit = ours[0].filters[0]
        assert isinstance(limit, PerEventLimit) and limit.per_second == LINES_PER_EVENT
        assert "sidemesh.proxy.http" in limit.loggers and "sidemesh.proxy" not in limit.loggers
    finally:
        for h in list(root.handlers):
            if h not in before[0]:
                root.removeHandler(h)
        root.setLevel(before[1])
