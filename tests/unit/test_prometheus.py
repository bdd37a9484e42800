"""sidemesh.prometheus: the metric classes without the package's __init__, and the text format
written exactly as prometheus-client's own generate_latest writes it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import Enum, Info, Summary
from prometheus_client.metrics_core import (
    GaugeHistogramMetricFamily,
    InfoMetricFamily,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)

from sidemesh.prometheus import (
    PRIVATE_COPY,
    Collector,
    CollectorRegistry,
    Counter,
    CounterMetricFamily,
    Gauge,
    GaugeMetricFamily,
    Histogram,
    HistogramMetricFamily,
    Metric,
    exposition,
)

AWKWARD = [
    "",
    "plain",
    'quote " inside',
    "back\\slash",
    "new\nline",
    "ünïcödé ✓",
    "\\n literal",
    "tab\there",
    "{}=,",
]


class Families(Collector):
    """Families of every kind the text format maps, built directly (as proxy/metrics.py does)."""

    def __init__(self, rng: random.Random) -> None:
        self.value = rng.choice(AWKWARD)

    def collect(self) -> Iterator[Metric]:
        value = self.value
        counter = CounterMetricFamily("fam_counter", f"A counter. {value}", labels=["b_label", "a_label"])
        counter.add_metric([value, "x"], 3.0, created=1_700_000_000.25, timestamp=1_700_000_001.5)
        counter.add_metric(["y", value], float("inf"))
        yield counter
        gauge = GaugeMetricFamily("fam_gauge", "A gauge\\ with\nhelp.", labels=["peer"])
        gauge.add_metric([value], -0.0)
        gauge.add_metric(["nan"], float("nan"))
        gauge.add_metric(["big"], 1e21)
        gauge.add_metric(["small"], 1.5e-7)
        yield gauge
        histogram = HistogramMetricFamily("fam_histogram", "A histogram.", labels=["code"])
        histogram.add_metric(["200"], [("0.005", 1.0), ("0.1", 4.0), ("+Inf", 5.0)], 0.25)
        yield histogram
        gauge_histogram = GaugeHistogramMetricFamily("fam_gh", "A gauge histogram.", labels=["l"])
        gauge_histogram.add_metric([value], [("1.0", 2.0), ("+Inf", 3.0)], gsum_value=4.5)
        yield gauge_histogram
        summary = SummaryMetricFamily("fam_summary", "A summary.", count_value=3, sum_value=1.5)
        yield summary
        info = InfoMetricFamily("fam_info", "An info.", value={"version": value, "arch": "x86_64"})
        yield info
        stateset = StateSetMetricFamily("fam_state", "A state set.", value={"on": True, "off": False})
        yield stateset
        unknown = UnknownMetricFamily("fam_unknown", "", value=7)
        yield unknown


def _registry(rng: random.Random) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter("requests", "Requests served.", ["method", "path"], registry=registry)
    for _ in range(20):
        requests.labels(rng.choice(["GET", "POST"]), rng.choice(AWKWARD)).inc(rng.randint(1, 1_000_000))
    Gauge("open_connections", "Open now.", registry=registry).set(rng.random() * 100)
    latency = Histogram("latency_seconds", "Latency.", ["peer"], registry=registry, buckets=(0.001, 0.25, 10))
    for _ in range(50):
        latency.labels(rng.choice(AWKWARD)).observe(rng.expovariate(10))
    Summary("sizes", "Sizes.", registry=registry).observe(12.5)
    Info("build", "Build.", registry=registry).info({"version": rng.choice(AWKWARD) or "v", "commit": "abc"})
    Enum("phase", "Phase.", states=["starting", "ready"], registry=registry).state("ready")
    registry.register(Families(rng))
    return registry


@pytest.mark.parametrize("seed", range(25))
def test_the_text_format_is_prometheus_clients_byte_for_byte(seed: int) -> None:
    registry = _registry(random.Random(seed))
    ours = exposition(registry)
    assert ours == generate_latest(registry)
    # (the families' own created sample is written, apart, as generate_latest does)
    assert b"_created" in ours
    assert b"# TYPE fam_gh histogram" in ours and b"# TYPE fam_gh_gsum gauge" in ours


def test_the_text_format_of_an_empty_registry_is_empty() -> None:
    assert exposition(CollectorRegistry()) == b"" == generate_latest(CollectorRegistry())


def test_a_name_the_text_format_cannot_take_is_refused() -> None:
    class Odd(Collector):
        def collect(self) -> Iterator[Metric]:
            family = GaugeMetricFamily("odd", "Odd.", labels=["bad-label"])
            family.add_metric(["v"], 1)
            yield family

    registry = CollectorRegistry()
    registry.register(Odd())
    with pytest.raises(ValueError, match="'bad-label' is not a name"):
        exposition(registry)


def test_counters_have_no_created_series() -> None:
    registry = CollectorRegistry()
    Counter("hits", "Hits.", registry=registry).inc()
    Histogram("took", "Took.", registry=registry).observe(1)
    assert b"_created" not in exposition(registry)


def _fresh(code: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_the_package_init_and_its_http_server_are_not_loaded() -> None:
    loaded = _fresh(
        "import json, sys\n"
        "import sidemesh.prometheus as p\n"
        "r = p.CollectorRegistry(); p.Counter('c', 'C.', registry=r).inc()\n"
        "page = p.exposition(r).decode()\n"
        "print(json.dumps({'page': page, 'counter': p.Counter.__module__, 'modules': sorted(m for m in sys.modules\n"
        "    if m.startswith(('prometheus_client', 'http', 'urllib.request', 'wsgiref', 'email', 'socketserver',\n"
        "        'platform')))}))\n"
    )
    assert loaded["page"] == "# HELP c_total C.\n# TYPE c_total counter\nc_total 1.0\n"
    assert loaded["counter"] == f"{PRIVATE_COPY}.metrics"
    assert loaded["modules"] == []


def test_prometheus_client_itself_is_left_alone() -> None:
    """Importing the package afterwards gets the real one, as without the mesh: its own classes,
    its default registry with the process collector, created series on (its default); its
    generate_latest and registries take the mesh's metrics, and the mesh's registries take its."""
    loaded = _fresh(
        "import json\n"
        "import sidemesh.prometheus as p\n"
        "import prometheus_client\n"
        "from prometheus_client import REGISTRY, generate_latest, Counter\n"
        "from prometheus_client.parser import text_string_to_metric_families\n"
        "Counter('hits', 'Hits.').inc(2)\n"
        "names = sorted(f.name for f in text_string_to_metric_families(generate_latest(REGISTRY).decode()))\n"
        "ours = p.CollectorRegistry(); p.Counter('c', 'C.', registry=ours).inc()\n"
        "Counter('theirs', 'T.', registry=ours).inc()\n"
        "mixed = prometheus_client.CollectorRegistry(); p.Counter('c', 'C.', registry=mixed).inc()\n"
        "print(json.dumps({'names': names, 'same': Counter is p.Counter,\n"
        "    'ours': p.exposition(ours).decode(), 'by_them': generate_latest(ours).decode(),\n"
        "    'mixed': p.exposition(mixed) == generate_latest(mixed)}))\n"
    )
    names = loaded["names"]
    assert isinstance(names, list)
    assert "hits" in names and "hits_created" in names and "process_cpu_seconds" in names
    assert loaded["same"] is False and loaded["mixed"] is True
    ours = loaded["ours"]
    assert isinstance(ours, str) and "c_total 1.0" in ours and "theirs_total 1.0" in ours
    assert loaded["by_them"] == ours


def test_the_package_imports_as_usual_afterwards() -> None:
    """Whatever imports prometheus-client after sidemesh.prometheus runs its real __init__ the usual
    way: its modules that depend on the __init__ import (asgi), the default registry gets its
    collectors, names it lacks are plainly missing (hasattr), its submodules are its attributes,
    and threads asking for names at the same moment all get them, also while sidemesh.prometheus
    is being imported."""
    race = (
        "import json, threading\n"
        "errors = []\n"
        "go = threading.Barrier(5)\n"
        "def ours():\n"
        "    go.wait()\n"
        "    import sidemesh.prometheus\n"
        "def worker(name):\n"
        "    go.wait()\n"
        "    try:\n"
        "        exec(f'from prometheus_client import {name}', {})\n"
        "    except Exception as exc:\n"
        "        errors.append(f'{name}: {exc!r}')\n"
        "names = ('REGISTRY', 'start_http_server', 'generate_latest', 'Summary')\n"
        "threads = [threading.Thread(target=worker, args=(n,)) for n in names] + [threading.Thread(target=ours)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(json.dumps({'errors': errors}))\n"
    )
    for _ in range(5):
        assert _fresh(race) == {"errors": []}
    loaded = _fresh(
        "import json\n"
        "import sidemesh.prometheus\n"
        "from prometheus_client.registry import REGISTRY\n"
        "from prometheus_client.exposition import generate_latest\n"
        "from prometheus_client.asgi import make_asgi_app\n"
        "import prometheus_client\n"
        "page = generate_latest(REGISTRY).decode()\n"
        "import prometheus_client.utils, prometheus_client.values\n"
        "print(json.dumps({'process': 'process_cpu_seconds_total' in page, 'gc': 'python_gc_' in page,\n"
        "    'asgi': callable(make_asgi_app), 'twisted': hasattr(prometheus_client, 'twisted'),\n"
        "    'attributes': [prometheus_client.utils.INF, prometheus_client.values.ValueClass.__name__]}))\n"
    )
    assert loaded == {
        "process": True,
        "gc": True,
        "asgi": True,
        "twisted": False,
        "attributes": [float("inf"), "MutexValue"],
    }


def test_multiprocess_mode_counts_with_the_real_package(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR: each process's values go to files with one writer each, so the mesh
    and an app in one process must share one values module: the real package's. (Two copies
    wrote over each other's entries, and the aggregate lost series or could not be read.)"""
    code = (
        "import json\n"
        "import sidemesh.prometheus as p\n"
        "import prometheus_client as pc\n"
        "from prometheus_client import multiprocess\n"
        "theirs, ours = pc.CollectorRegistry(), p.CollectorRegistry()\n"
        "app = pc.Counter('app_requests', 'App.', ['path'], registry=theirs)\n"
        "mesh = p.Counter('sidemesh_m', 'M.', ['k'], registry=ours)\n"
        "app.labels('/').inc(5)\n"
        "mesh.labels('a-long-label-value-' + 'x' * 40).inc(1)\n"
        "app.labels('/b').inc(2)\n"
        "mesh.labels('a-long-label-value-' + 'x' * 40).inc(1)\n"
        "merged = pc.CollectorRegistry(); multiprocess.MultiProcessCollector(merged)\n"
        "print(json.dumps({'same': p.Counter is pc.Counter, 'samples': sorted(\n"
        "    [s.name, sorted(s.labels.items()), s.value] for f in merged.collect() for s in f.samples)}))\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["same"] is True
    assert loaded["samples"] == [
        ["app_requests_total", [["path", "/"]], 5.0],
        ["app_requests_total", [["path", "/b"]], 2.0],
        ["sidemesh_m_total", [["k", "a-long-label-value-" + "x" * 40]], 2.0],
    ]


def test_a_package_imported_before_changes_nothing() -> None:
    loaded = _fresh(
        "import json, prometheus_client\n"
        "import sidemesh.prometheus as p\n"
        "r = p.CollectorRegistry(); p.Counter('c', 'C.', registry=r).inc()\n"
        "print(json.dumps({'same': p.exposition(r) == prometheus_client.generate_latest(r),\n"
        "    'created': b'_created' in prometheus_client.generate_latest(r)}))\n"
    )
    assert loaded == {"same": True, "created": False}
