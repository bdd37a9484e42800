"""bench.tracing's OTLP/HTTP collector takes what OpenTelemetry's own OTLP/HTTP exporter sends (the
exporter injected sidecars use), and counts its spans."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bench.tracing import HttpCollector


def test_the_http_collector_counts_the_spans_of_a_real_exporter() -> None:
    collector = HttpCollector()
    try:
        for compression in (Compression.NoCompression, Compression.Gzip):
            exporter = OTLPSpanExporter(
                endpoint=f"http://127.0.0.1:{collector.port}/v1/traces", compression=compression, timeout=5
            )
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            tracer = provider.get_tracer("test")
            for name in ("a", "b", "c"):
                with tracer.start_as_current_span(name):
                    pass
            provider.shutdown()
        assert collector.spans == 6
    finally:
        collector.stop()
