"""The gRPC API shared by the components: `.proto` sources and their generated, committed stubs.

Regenerate with `make protos`; `tests/unit/test_api_stubs.py` fails when the stubs are stale.
"""
