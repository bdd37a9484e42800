"""proxy.probes: SIDEMESH_APP_PROBES parsing (what the injector writes, the sidecar reads) and the
gRPC health messages, without sockets. The probes against real servers: tests/integration/test_app_probes.py."""

from __future__ import annotations

import json

import pytest

from injector import patch
from injector.settings import InjectionSettings
from proxy import probes
from proxy.probes import AppProbe, parse_app_probes, request_target


def test_reads_what_the_injector_writes() -> None:
    pod = {
        "metadata": {"name": "p"},
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {
                        "httpGet": {
                            "path": "/r",
                            "port": "http",
                            "httpHeaders": [{"name": "X", "value": "1"}],
                        },
                        "timeoutSeconds": 2,
                    },
                    "livenessProbe": {"tcpSocket": {"port": 8080}},
                    "startupProbe": {"grpc": {"port": 9090, "service": "s"}},
                }
            ]
        },
    }
    injected = patch.inject(pod, InjectionSettings()).pod
    proxy = injected["spec"]["initContainers"][1]
    text = next(e["value"] for e in proxy["env"] if e["name"] == "SIDEMESH_APP_PROBES")
    assert parse_app_probes(text) == {
        "/app-health/web/readyz": AppProbe("httpGet", 8080, 2, "/r", "HTTP", (("X", "1"),)),
        "/app-health/web/livez": AppProbe("tcpSocket", 8080, 1),
        "/app-health/web/startupz": AppProbe("grpc", 9090, 1, service="s"),
    }


def test_empty_means_no_probes() -> None:
    assert parse_app_probes("") == {}
    assert parse_app_probes("  ") == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{", "not JSON"),
        ("[]", "must be a JSON object"),
        (json.dumps({"/other/x": {"tcpSocket": {"port": 1}}}), "expected /app-health/"),
        (json.dumps({"/app-health/a/livez": {"exec": {}}}), "no httpGet, tcpSocket or grpc"),
        (json.dumps({"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}), "is not a port number"),
        (json.dumps({"/app-health/a/livez": {"tcpSocket": {"port": 0}}}), "is not a port number"),
        (
            json.dumps({"/app-health/a/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": 0}}),
            "timeoutSeconds",
        ),
        (json.dumps({"/app-health/a/livez": {"httpGet": {"port": 1, "scheme": "FTP"}}}), "scheme 'FTP'"),
    ],
)
def test_bad_values_say_which_entry(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_app_probes(value)


@pytest.mark.parametrize(
    ("service", "encoded"),
    [("", b""), ("cart", b"\x0a\x04cart"), ("x" * 200, b"\x0a\xc8\x01" + b"x" * 200)],
)
def test_grpc_health_request_encoding(service: str, encoded: bytes) -> None:
    assert probes._health_request(service) == encoded


@pytest.mark.parametrize(("data", "status"), [(b"\x08\x01", 1), (b"\x08\x02", 2), (b"", 0), (b"\x10\x01", 0)])
def test_grpc_health_response_decoding(data: bytes, status: int) -> None:
    assert probes._health_status(data) == status


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("healthz", "/healthz"),
        ("/a b", "/a%20b"),
        ("/a%20b", "/a%20b"),
        ("/p?x=1&y=a b", "/p?x=1&y=a%20b"),
        ("/x#frag", "/x"),
        ("/100%", "/100%25"),  # Go cannot parse it: the kubelet takes it whole as the path
        ("/a%zz?x=1", "/a%25zz%3Fx=1"),
        ("//healthz", "/"),  # an authority to Go's url.Parse
        ("//h/x?q=1", "/x?q=1"),
        ("/a[0]", "/a[0]"),
        ("///healthz", "///healthz"),  # not an authority to Go
        ("/a b/x%2Fy", "/a%20b/x/y"),  # not sendable as written: the decoded path escaped anew
        ("/a b(1)", "/a%20b%281%29"),
        ("/a%41", "/a%41"),  # sendable as written: kept
        ("/a%FF b", "/a%FF%20b"),  # bytes that are no UTF-8 stay those bytes
        ("/é%FF", "/%C3%A9%FF"),
        ("/a\tb?c", "/a%09b%3Fc"),  # a control byte: Go cannot parse it, the whole is the path
        ("//a b/x", "//a%20b/x"),  # an authority Go refuses: the whole is the path
        ("//h:xy/x", "//h:xy/x"),
    ],
)
def test_the_request_target_is_the_kubelets(path: str, target: str) -> None:
    """What the kubelet's formatURL (Go's net/url) sends for an httpGet path: a probe that passes
    without the mesh must pass with it (`/100%` was sent as is: 400 from a Go server)."""
    assert request_target(path) == target
