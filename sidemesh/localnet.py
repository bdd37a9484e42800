"""Talking to the mesh's own processes on this machine, never through a proxy.

An ``http_proxy`` (``https_proxy``, ``grpc_proxy``, ``all_proxy``) in the user's environment is for
the internet. Followed, it took even 127.x.y.z (which no usual ``no_proxy`` lists, and whose CIDR
forms urllib ignores) to the proxy: the demo's gRPC channels to the CA and the controller, and its
own readiness checks, failed, blaming the component for the proxy's error.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

PROXY_VARIABLES = frozenset(
    name for base in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy") for name in (base, base.upper())
)

# urllib without proxies (the environment's are ignored).
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def without_proxies(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a child process of the local mesh: the proxy variables left out."""
    return {k: v for k, v in env.items() if k not in PROXY_VARIABLES}
