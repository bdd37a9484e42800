"""A real OTLP/gRPC trace receiver for tests: the one `sidemesh demo` uses (sidemesh/otlp_receiver.py)."""

from __future__ import annotations

from sidemesh.otlp_receiver import SPAN_KINDS, ReceivedSpan, Receiver, ReceiverThread, trace_tree

__all__ = ["SPAN_KINDS", "ReceivedSpan", "Receiver", "ReceiverThread", "trace_tree"]
