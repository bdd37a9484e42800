"""Prometheus metrics for every component: prometheus-client's metric classes, without the rest.

Every component takes what it counts with from here (``CollectorRegistry``, ``Counter``...), and
writes its ``/metrics`` or ``/stats/prometheus`` page with :func:`exposition`:

- Loaded without the package's ``__init__``. prometheus-client's ``__init__`` also imports its
  exposition module, and with it an HTTP server, a WSGI server, ``urllib.request`` (email parsing,
  ``http.client``), and the process, platform and GC collectors: 4.2 MB of RSS in a sidecar (whose
  budget is 40 MB) that serves its page from its own health server and uses none of them. So the
  modules that hold the metric classes (``metrics``, ``metrics_core``, ``registry``, ``samples``,
  ``utils``, and what they import) are imported under an empty stand-in for the package, which is
  then taken away: ``prometheus_client`` itself is not in sys.modules afterwards, so whatever
  imports it later (``import prometheus_client``, ``from prometheus_client import X``, any other
  of its modules) runs its real ``__init__`` the usual way, under the import system's locks, and
  that ``__init__`` finds the metric modules loaded and uses them (one ``Counter`` class, one
  default registry, to which its collectors then register). The one difference from a normal
  import: the modules loaded here that the ``__init__`` does not import by name (``samples``,
  ``utils``, ``values``...) are not attributes of the package object; ``from
  prometheus_client.utils import ...``, as the package's own code writes it, works. Where the
  package was imported already (a test, another library), it is used as it is.
- :func:`exposition` writes the text format Prometheus scrapes (0.0.4) as prometheus-client's
  ``generate_latest`` does, byte for byte (tests/unit/test_prometheus.py compares them): that
  function lives in the exposition module.
- No ``*_created`` series. In the text format prometheus-client writes each counter's and
  histogram's creation time as a gauge family of its own (``sidemesh_proxy_requests_created``...),
  one more series for every series counted; Envoy's and Istio's exposition have none, and queries
  do not use them. Counters still reset to zero on a restart, which ``rate()`` handles.
"""

from __future__ import annotations

import importlib.util
import re
import sys


def _import_metric_modules() -> None:
    """Import the modules with the metric classes under an empty stand-in for the package (made
    from its import spec, never executed), then take the stand-in away. Nothing to do where the
    package was imported already."""
    if "prometheus_client" in sys.modules:
        return
    spec = importlib.util.find_spec("prometheus_client")
    if spec is None or spec.submodule_search_locations is None:
        return  # (not installed as a package: the imports below say so)
    sys.modules["prometheus_client"] = importlib.util.module_from_spec(spec)
    try:
        for name in ("metrics", "metrics_core", "registry", "samples", "utils"):
            importlib.import_module(f"prometheus_client.{name}")
    finally:
        del sys.modules["prometheus_client"]


_import_metric_modules()

# (Each module is in sys.modules now: these take from it, the package itself is not imported.)
from prometheus_client.metrics import Counter, Gauge, Histogram, disable_created_metrics  # noqa: E402
from prometheus_client.metrics_core import (  # noqa: E402
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry  # noqa: E402
from prometheus_client.samples import Sample  # noqa: E402
from prometheus_client.utils import floatToGoString  # noqa: E402

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
