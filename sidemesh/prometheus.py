"""Prometheus metrics for every component: prometheus-client's metric classes, without the rest.

Every component takes what it counts with from here (``CollectorRegistry``, ``Counter``...), and
writes its ``/metrics`` page with :func:`exposition`:

- Loaded without the package's ``__init__``. prometheus-client's ``__init__`` also imports its
  exposition module, and with it an HTTP server, a WSGI server, ``urllib.request`` (email parsing,
  ``http.client``), and the process, platform and GC collectors: 4.2 MB of RSS in a sidecar (whose
  budget is 40 MB) that serves its page from its own health server and uses none of them. So the
  modules that hold the metric classes (``metrics``, ``metrics_core``, ``registry``, ``samples``,
  ``utils``, and what they import) are loaded from the installed package's files as a package of
  our own, ``sidemesh._prometheus_client``, whose ``__init__`` never runs. ``prometheus_client``
  itself is left alone: whatever imports it (a test, another library) gets the real package, with
  its own classes and default registry, as if the mesh were not there. The two copies work
  together: every component counts in registries made here, and prometheus-client's functions that
  take a registry or a collector (``generate_latest``, ``CollectorRegistry.register``) only call
  their methods, so they take either copy's (``==`` between two copies' metric families is
  False: each compares with its own class). In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
  never a sidecar's) the classes are the real package's: there a process's values live in files
  that take one writer each.
- :func:`exposition` writes the text format Prometheus scrapes (0.0.4) as prometheus-client's
  ``generate_latest`` does, byte for byte (tests/unit/test_prometheus.py compares them): that
  function lives in the exposition module.
- No ``*_created`` series. In the text format prometheus-client writes each counter's and
  histogram's creation time as a gauge family of its own (``sidemesh_proxy_requests_created``...),
  one more series for every series counted; Envoy's and Istio's exposition have none, and queries
  do not use them. Counters still reset to zero on a restart, which ``rate()`` handles.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from typing import TYPE_CHECKING

PRIVATE_COPY = "sidemesh._prometheus_client"  # (also tests/unit/test_prometheus.py)


def _metric_modules() -> list[types.ModuleType]:
    """prometheus-client's metrics, metrics_core, registry, samples and utils modules, loaded from
    the installed package's files as a package of our own (PRIVATE_COPY), whose ``__init__`` never
    runs: their relative imports (``from . import values``) stay inside it. In multiprocess mode
    (PROMETHEUS_MULTIPROC_DIR), the real package's: there each process's values live in files
    with one writer each, and two copies of the values module in one process would be two
    writers of one file (and created series are then turned off in the real package)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):  # noqa: SIM112
        return [
            importlib.import_module(f"prometheus_client.{name}")
            for name in ("metrics", "metrics_core", "registry", "samples", "utils")
        ]
    if PRIVATE_COPY not in sys.modules:
        installed = importlib.util.find_spec("prometheus_client")
        if installed is None or not installed.submodule_search_locations:
            raise ImportError(
                "prometheus-client is not installed as a package (pip install prometheus-client)"
            )
        spec = importlib.machinery.ModuleSpec(PRIVATE_COPY, None, is_package=True)
        spec.submodule_search_locations = list(installed.submodule_search_locations)
        sys.modules[PRIVATE_COPY] = importlib.util.module_from_spec(spec)
    return [
        importlib.import_module(f"{PRIVATE_COPY}.{name}")
        for name in ("metrics", "metrics_core", "registry", "samples", "utils")
    ]


if TYPE_CHECKING:  # (the same files: the same types)
    from prometheus_client.metrics import Counter, Gauge, Histogram, disable_created_metrics
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector, CollectorRegistry
    from prometheus_client.samples import Sample
    from prometheus_client.utils import floatToGoString
else:
    _metrics, _metrics_core, _registry, _samples, _utils = _metric_modules()
    Counter, Gauge, Histogram = _metrics.Counter, _metrics.Gauge, _metrics.Histogram
    disable_created_metrics = _metrics.disable_created_metrics
    CounterMetricFamily, GaugeMetricFamily = (
        _metrics_core.CounterMetricFamily,
        _metrics_core.GaugeMetricFamily,
    )
    HistogramMetricFamily, Metric = _metrics_core.HistogramMetricFamily, _metrics_core.Metric
    Collector, CollectorRegistry = _registry.Collector, _registry.CollectorRegistry
    Sample = _samples.Sample
    floatToGoString = _utils.floatToGoString

disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = [
    "CONTENT_TYPE",
    "Collector",
    "CollectorRegistry",
    "Counter",
    "CounterMetricFamily",
    "Gauge",
    "GaugeMetricFamily",
    "Histogram",
    "HistogramMetricFamily",
    "Metric",
    "exposition",
    "floatToGoString",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The text format's types for OpenMetrics' (as generate_latest maps them), and its name suffixes.
_TYPE = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}
_SUFFIX = {"counter": "_total", "info": "_info"}
# Samples the text format has no place for in their family: each kind becomes a gauge family.
_APART = ("_created", "_gsum", "_gcount")


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def _name(name: str, pattern: re.Pattern[str] = _METRIC_NAME) -> str:
    """A metric or label name as the text format takes it (prometheus-client would escape any
    other; the mesh names its metrics and labels, so another name is a mistake here)."""
    if pattern.match(name) is None:
        raise ValueError(f"{name!r} is not a name the Prometheus text format takes")
    return name


def _line(sample: Sample) -> str:
    labels = ""
    if sample.labels:
        pairs = ",".join(
            f'{_name(k, _LABEL_NAME)}="{_label_value(v)}"' for k, v in sorted(sample.labels.items())
        )
        labels = f"{{{pairs}}}"
    timestamp = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
    return f"{_name(sample.name)}{labels} {floatToGoString(sample.value)}{timestamp}\n"  # type: ignore[no-untyped-call]


def exposition(registry: Collector) -> bytes:
    """The text format 0.0.4 of a registry: ``# HELP`` and ``# TYPE`` per
    family, a line per sample with its labels sorted by name, counters named ``*_total``, and the
    samples the format has no place for (``*_created``, a gauge histogram's ``*_gsum``/``*_gcount``)
    as gauge families of their own after their family, as prometheus-client writes it."""
    out: list[str] = []
    for family in registry.collect():
        name = family.name + _SUFFIX.get(family.type, "")
        documentation = _help(family.documentation)
        out.append(f"# HELP {_name(name)} {documentation}\n")
        out.append(f"# TYPE {name} {_TYPE.get(family.type, family.type)}\n")
        apart: dict[str, list[str]] = {}
        for sample in family.samples:
            suffix = next((s for s in _APART if sample.name == family.name + s), None)
            if suffix is None:
                out.append(_line(sample))
            else:
                apart.setdefault(suffix, []).append(_line(sample))
        for suffix, lines in sorted(apart.items()):
            out.append(f"# HELP {family.name}{suffix} {documentation}\n")
            out.append(f"# TYPE {family.name}{suffix} gauge\n")
            out.extend(lines)
    return "".join(out).encode()
