"""sidemesh.logging: one JSON object per line, with the record's extras and a UTC timestamp."""

from __future__ import annotations

import json
import logging

from sidemesh.logging import JsonFormatter


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
