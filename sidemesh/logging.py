"""Structured logs: one JSON object per line on stderr, one event per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from sidemesh.later import Later

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


# At most this many lines of one event (logger and message) a second from the data path's loggers:
# a caller refused or denied connection after connection, or sending malformed request after
# request, wrote a line each, thousands a second (the denials metric still counts every one). The
# next line let through after some were held back says how many (``suppressed``). The access log
# (BufferedLines) and the other components' lines (the injector's line per admission) are not held.
LINES_PER_EVENT = 10
# ... the data path's loggers (and those below them), below error level: configuration errors,
# the sidecar's own lines and every error are never held back.
LIMITED_LOGGERS = (
    "sidemesh.proxy.http",
    "sidemesh.proxy.http2",
    "sidemesh.proxy.inbound",
    "sidemesh.proxy.outbound",
    "sidemesh.proxy.relay",
)
KEYS_KEPT = 1024  # events tracked at once (more: the table starts again)
FLUSH_S = 0.25  # BufferedLines: a line waits at most this long ...
FLUSH_BYTES = 64 * 1024  # ... or until this much waits


class _Stamps:
    """ISO 8601 UTC timestamps with milliseconds; the date part made once a second, not per line."""

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def of(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int(msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamps = _Stamps()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._stamps.of(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class PerEventLimit(logging.Filter):
    """Lets through at most ``per_second`` records below ERROR of each event (logger and message
    template) of ``loggers`` and the loggers below them in each second; the first one through after
    others were held back carries ``suppressed``, their number."""

    def __init__(
        self,
        per_second: int = LINES_PER_EVENT,
        clock: Callable[[], float] = time.monotonic,
        loggers: tuple[str, ...] = LIMITED_LOGGERS,
    ) -> None:
        super().__init__()
        self.per_second = per_second
        self.loggers, self._below = frozenset(loggers), tuple(name + "." for name in loggers)
        self._clock = clock
        self._events: dict[tuple[str, str], list[float | int]] = {}  # -> [second, passed, held]

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if record.levelno >= logging.ERROR or not (name in self.loggers or name.startswith(self._below)):
            return True
        second = int(self._clock())
        msg = record.msg
        key = (name, msg if isinstance(msg, str) else type(msg).__name__)  # (any object may be a msg)
        state = self._events.get(key)
        if state is None:
            if len(self._events) >= KEYS_KEPT:
                self._events.clear()
            state = self._events[key] = [second, 0, 0]
        elif state[0] != second:
            state[0], state[1] = second, 0
        if state[1] >= self.per_second:
            state[2] += 1
            return False
        state[1] += 1
        if state[2]:
            record.suppressed = state[2]
            state[2] = 0
        return True


def setup(level: str = "info") -> None:
    """Send every log record to stderr as a JSON line. Safe to call more than once.

    The JSON lines carry no source file, thread or process of a record, so the logging module is
    told not to collect them (its documented optimizations: the caller's frame lookup and a getpid
    system call per record cost more than the line itself; the access log writes one per request)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_sidemesh", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(PerEventLimit())
    handler._sidemesh = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


class BufferedLines:
    """INFO lines of one logger (the sidecar's access log) in ``JsonFormatter``'s layout, built
    without the logging module (no LogRecord, no handler lock) and written in batches: at most
    ``FLUSH_S`` after the first line waiting, or once ``FLUSH_BYTES`` wait, one write for the lot,
    as Envoy writes its access logs (its default flush interval is 1 s). A line per request through
    the logging module, one write each, cost a sidecar about as much CPU as the request. The level
    check stays with the caller (``logging.getLogger(name).isEnabledFor(INFO)``). Lines still waiting
    when the process is killed are lost: ``flush`` at exit."""

    def __init__(self, logger: str, stream: TextIO | None = None) -> None:
        self.logger = logger
        self._stream = stream  # None: sys.stderr when written (where setup() sends the other lines)
        self._stamps = _Stamps()
        self._lines: list[str] = []
        self._size = 0
        self._later = Later(FLUSH_S, self.flush)

    def info(self, event: str, fields: Mapping[str, Any]) -> None:
        now = time.time()
        out: dict[str, Any] = {
            "ts": self._stamps.of(now, (now - int(now)) * 1000),
            "level": "info",
            "logger": self.logger,
            "event": event,
            **fields,
        }
        line = json.dumps(out, default=str, separators=(",", ":"))
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= FLUSH_BYTES:
            self.flush()
        else:
            self._later.due()

    def flush(self) -> None:
        self._later.cancel()
        if not self._lines:
            return
        data = "\n".join(self._lines) + "\n"
        self._lines, self._size = [], 0
        stream = self._stream or sys.stderr
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr: nothing to tell it to
            pass
