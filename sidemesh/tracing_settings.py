"""The ``OTEL_*`` variables that configure tracing, read into :class:`TracingSettings` (no I/O, and
no OpenTelemetry import: a sidecar with tracing off never loads the SDK, ``sidemesh.telemetry``).

A bad value is warned about and ignored, as the SDK environment specification says.
"""

from __future__ import annotations

import enum
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from sidemesh import semconv
from sidemesh.config import otlp_endpoint_problem, url_port

log = logging.getLogger("sidemesh.telemetry")


class Format(enum.Enum):
    W3C = "w3c"
    B3_SINGLE = "b3"
    B3_MULTI = "b3multi"


SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
PROTOCOLS = ("grpc", "http/protobuf")
# The SDK environment specification: integer values SHOULD be taken from 0 to 2**31 - 1 (a larger
# queue size overflowed the SDK's deque; a larger delay its timer: the export thread died).
INT_MAX = 2**31 - 1
OTLP_HTTP_PORT = 4318  # the OTLP specification's port for OTLP/HTTP (4317: OTLP/gRPC)


def _ignored(variable: str, problem: str, instead: str) -> None:
    """A bad ``OTEL_*`` value is warned about and otherwise ignored, as the SDK environment
    specification says ("generate a warning and gracefully ignore the setting"; for
    OTEL_TRACES_SAMPLER_ARG "MUST be logged and MUST be otherwise ignored"): tracing configuration
    never stops a component, a sidecar's traffic least of all."""
    log.warning(
        "%s: %s; ignored, %s", variable, problem, instead, extra={"variable": variable, "problem": problem}
    )


@dataclass(frozen=True, slots=True)
class TracingSettings:
    endpoint: str  # the OTLP endpoint as given (the HTTP exporter's full URL, /v1/traces included)
    protocol: str = "grpc"
    sampler: str = "parentbased_always_on"
    ratio: float = 1.0
    timeout: float = 10.0  # seconds per export (OTEL_EXPORTER_OTLP_TIMEOUT is in milliseconds)
    max_queue_size: int = 2048
    schedule_delay_ms: float = 5000
    max_export_batch_size: int = 512
    export_timeout_ms: float = 30000  # OTEL_BSP_EXPORT_TIMEOUT: the batch processor's wait for an export
    service_name: str = ""  # OTEL_SERVICE_NAME; empty: the component's default
    # OTEL_PROPAGATORS: the formats a new trace's headers are written in (incoming ones are all read)
    new_trace_formats: tuple[Format, ...] = (Format.W3C,)
    compression: str = "none"  # OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION: gzip or none
    # OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS: the methods spans name as they are (others: _OTHER)
    known_methods: frozenset[str] = semconv.DEFAULT_KNOWN_METHODS


def _get(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


# OTEL_PROPAGATORS names -> the trace header format each writes; baggage and none write no trace header.
PROPAGATORS: dict[str, Format | None] = {
    "tracecontext": Format.W3C,
    "b3": Format.B3_SINGLE,
    "b3multi": Format.B3_MULTI,
    "baggage": None,  # the app's baggage header passes through; the mesh adds none
    "none": None,
}


DEFAULT_PROPAGATORS = "tracecontext,baggage"


def _unknown_propagators(names: list[str]) -> list[tuple[str, str, str]]:
    """(variable, problem, instead) for each of ``names`` (lower case) the mesh does not know."""
    known = any(name in PROPAGATORS for name in names)
    instead = "the others are used" if known else f"the default {DEFAULT_PROPAGATORS} is used"
    problems = (
        f"{name!r} is not one of {', '.join(PROPAGATORS)}" for name in names if name not in PROPAGATORS
    )
    return [("OTEL_PROPAGATORS", problem, instead) for problem in problems]


def new_trace_formats(environ: Mapping[str, str]) -> tuple[Format, ...]:
    """OTEL_PROPAGATORS (default ``tracecontext,baggage``) as the formats a new trace is written in,
    in the order given, each once. A name the mesh does not write (jaeger, xray, ottrace) is warned
    about and skipped (when it was the only one: as if the variable were unset)."""
    raw = environ.get("OTEL_PROPAGATORS", "").strip().lower() or DEFAULT_PROPAGATORS
    formats: list[Format] = []
    names = [n.strip() for n in raw.split(",")]
    known = any(name in PROPAGATORS for name in names)
    for unknown in _unknown_propagators(names):
        _ignored(*unknown)
    for name in names:
        fmt = PROPAGATORS.get(name)
        if fmt is not None and fmt not in formats:
            formats.append(fmt)
    if not known:
        return new_trace_formats({"OTEL_PROPAGATORS": DEFAULT_PROPAGATORS})
    return tuple(formats)


def _number(
    environ: Mapping[str, str],
    name: str,
    default: float,
    minimum: float,
    maximum: float = math.inf,
    instead: str | None = None,
) -> float:
    """The variable's number, or ``default`` (with a warning) when it is no number in range."""
    raw = environ.get(name, "").strip()
    if not raw:  # (blank is unset, as the specification says; the gRPC exporter float()ed it)
        _withhold(environ, name)
        return default
    try:
        value = float(raw)
    except ValueError:
        problem = f"{raw!r} is not a number"
    else:
        if not math.isfinite(value):  # (nan passed the checks below; inf stopped the export thread)
            problem = f"{raw!r} is not a finite number"
        elif value < minimum:
            problem = f"{raw} is below {minimum:g}"
        elif value > maximum:
            problem = f"{raw} is above {maximum:.0f}" if maximum == INT_MAX else f"{raw} is above {maximum:g}"
        else:
            return value
    _ignored(name, problem, f"{instead} is used" if instead else f"the default {default:g} is used")
    _withhold(environ, name)
    return default


def _withhold(environ: Mapping[str, str], name: str) -> None:
    """An ignored value is taken out of this process's environment: the SDK and the OTLP exporters
    read some variables themselves (an exporter float()s its timeout) and raise on what they cannot
    use, which stopped the component."""
    if environ is os.environ:
        os.environ.pop(name, None)


# SpanLimits parameter -> its variable, and the parameter whose value stands when it is unset.
SPAN_LIMITS = {
    "max_attributes": ("OTEL_ATTRIBUTE_COUNT_LIMIT", None),
    "max_events": ("OTEL_SPAN_EVENT_COUNT_LIMIT", None),
    "max_links": ("OTEL_SPAN_LINK_COUNT_LIMIT", None),
    "max_span_attributes": ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "max_attributes"),
    "max_event_attributes": ("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "max_attributes"),
    "max_link_attributes": ("OTEL_LINK_ATTRIBUTE_COUNT_LIMIT", "max_attributes"),
    "max_attribute_length": ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", None),
    "max_span_attribute_length": ("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "max_attribute_length"),
}
# (variable, problem, instead): values withhold_unusable changed, warned about once tracing is on
_withheld: list[tuple[str, str, str]] = []


def limit_value(raw: str) -> int | None:
    """A limit variable's value: an integer from 0 to 2^31 - 1 (as the SDK parses it: int(); a
    larger one overflowed the SDK's per-span deques, failing every span); None if not."""
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 0 <= value <= INT_MAX else None


def limit_problem(variable: str, raw: str) -> tuple[str, str, str]:
    """(variable, problem, instead) for a limit value ``limit_value`` refuses."""
    return variable, f"{raw!r} is not an integer from 0 to {INT_MAX}", "as if unset"


def withhold_unusable() -> None:
    """Values OpenTelemetry's own code reads when it is imported, and raises on, are taken out of
    this process's environment before that (a component importing it stopped): the span limits the
    SDK reads (any value that is no integer from 0 to 2^31 - 1, a blank one included), and names in
    OTEL_PROPAGATORS the API cannot load (FastAPI imports it: ``xray``, a typo, ``TraceContext``):
    the variable keeps the names the mesh knows, in lower case. Called before any such import (the
    CLI's start, ``sidemesh.telemetry``'s) and by ``settings_from_env``, which warns about each
    once tracing is on."""
    for variable, _ in SPAN_LIMITS.values():
        raw = os.environ.get(variable)
        if raw is not None and limit_value(raw.strip()) is None:
            del os.environ[variable]
            if raw.strip():
                _withheld.append(limit_problem(variable, raw.strip()))
    raw = os.environ.get("OTEL_PROPAGATORS")
    if raw is None:
        return
    if not raw.strip():  # (blank is unset, as the specification says: no warning)
        del os.environ["OTEL_PROPAGATORS"]
        return
    names = [n.strip().lower() for n in raw.split(",")]
    known = [n for n in names if n in PROPAGATORS]
    _withheld.extend(_unknown_propagators(names))
    if known:
        os.environ["OTEL_PROPAGATORS"] = ",".join(known)
    else:
        del os.environ["OTEL_PROPAGATORS"]


def settings_from_env(environ: Mapping[str, str] | None = None) -> TracingSettings | None:
    """The tracing settings, or None when tracing is off. A bad value is warned about and ignored
    (its default is used; a bad endpoint leaves tracing off), as the SDK specification says."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter == "none":
        return None
    if exporter != "otlp":
        _ignored("OTEL_TRACES_EXPORTER", f"{exporter!r}: only otlp and none are supported", "otlp is used")
    found = _get(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    given = _get(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    # (enum values are read case-insensitively, as the SDK environment specification says)
    # Unset (or not one we know): OTLP/HTTP for an endpoint on its port (4318: the injection
    # settings' default, copied here, sent gRPC to an HTTP port and every span was lost), else gRPC.
    by_port = "http/protobuf" if found is not None and url_port(found[1]) == OTLP_HTTP_PORT else "grpc"
    protocol = by_port if given is None else given[1].lower()
    if protocol not in PROTOCOLS:
        assert given is not None
        _ignored(given[0], f"{given[1]!r} is not one of {', '.join(PROTOCOLS)}", f"{by_port} is used")
        protocol = by_port
    if found is None:
        return None
    name, endpoint = found
    appended = protocol == "http/protobuf" and name == "OTEL_EXPORTER_OTLP_ENDPOINT"
    if (problem := otlp_endpoint_problem(endpoint, path_appended=appended)) is not None:
        _ignored(name, f"{endpoint!r} {problem}", "tracing is off")
        return None
    if appended:
        endpoint = endpoint.rstrip("/") + "/v1/traces"  # the spec: only the generic variable gets the path
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if sampler not in SAMPLERS:
        _ignored(
            "OTEL_TRACES_SAMPLER",
            f"{sampler!r} is not one of {', '.join(SAMPLERS)}",
            "parentbased_always_on is used",
        )
        sampler = "parentbased_always_on"
    # (a ratio: 0.01 is 1%; above 1 is no ratio, and is ignored as the SDK ignores it)
    ratio = _number(env, "OTEL_TRACES_SAMPLER_ARG", 1.0, 0.0, 1.0) if sampler.endswith("ratio") else 1.0
    timeout_ms = _number(
        env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 0, 1, INT_MAX, instead="OTEL_EXPORTER_OTLP_TIMEOUT's"
    ) or _number(env, "OTEL_EXPORTER_OTLP_TIMEOUT", 10000, 1, INT_MAX)
    queue = int(_number(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048, 1, INT_MAX))
    batch = int(_number(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, 1, INT_MAX))
    if batch > queue:  # (the SDK specification: a batch is at most the queue)
        _ignored(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", f"{batch} is above the queue's {queue}", f"{queue} is used"
        )
    if environ is None:
        withhold_unusable()  # (before the SDK's import, also when this runs first: the sidecar)
    while _withheld:
        _ignored(*_withheld.pop(0))
    return TracingSettings(
        endpoint=endpoint,
        protocol=protocol,
        sampler=sampler,
        ratio=ratio,
        timeout=timeout_ms / 1000,
        max_queue_size=queue,
        schedule_delay_ms=_number(env, "OTEL_BSP_SCHEDULE_DELAY", 5000, 1, INT_MAX),
        max_export_batch_size=min(batch, queue),
        export_timeout_ms=_number(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000, 1, INT_MAX),
        service_name=env.get("OTEL_SERVICE_NAME", "").strip(),
        new_trace_formats=new_trace_formats(env),
        compression=_compression(env),
        known_methods=_known_methods(env),
    )


def _known_methods(environ: Mapping[str, str]) -> frozenset[str]:
    raw = environ.get(semconv.KNOWN_METHODS_VARIABLE, "")
    if not raw.strip():  # (empty is unset, as the SDK environment specification reads every variable)
        return semconv.DEFAULT_KNOWN_METHODS
    methods, bad = semconv.known_methods_from(raw)
    if bad:
        _ignored(
            semconv.KNOWN_METHODS_VARIABLE, f"{', '.join(map(repr, bad))} are no HTTP methods", "left out"
        )
    return methods


def _compression(environ: Mapping[str, str]) -> str:
    """OTEL_EXPORTER_OTLP_TRACES_COMPRESSION, else OTEL_EXPORTER_OTLP_COMPRESSION: gzip or none
    (the SDK environment specification's values); given to the exporter, which then reads neither
    (the gRPC one raised on anything but gzip, "none" included)."""
    found = _get(environ, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")
    if found is None:
        return "none"
    name, raw = found
    if raw.lower() in ("gzip", "none"):
        return raw.lower()
    _ignored(name, f"{raw!r} is not one of gzip, none", "no compression is used")
    return "none"
