"""Sidemesh: what the components share (SPIFFE IDs, identity, policy, API, config, CLI)."""

__version__ = "0.1.0"
