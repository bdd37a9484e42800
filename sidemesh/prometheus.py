"""Prometheus exposition for every component: imported for its one effect, no ``*_created`` series.

In the text format Prometheus scrapes (0.0.4) prometheus-client writes each counter's and
histogram's creation time as a gauge family of its own (``sidemesh_proxy_requests_created``...),
one more series for every series counted; Envoy's and Istio's exposition have none, and queries
do not use them. Counters still reset to zero on a restart, which ``rate()`` handles."""

from __future__ import annotations

import prometheus_client

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
