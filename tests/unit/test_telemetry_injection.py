"""Injected sidecars get the OTEL_* variables from the injection settings (tracingEndpoint,
tracingProtocol, tracingSamplingRatio), and the shipped manifests point the control plane at the
Jaeger addon."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from injector.containers import PodOptions, proxy_container
from injector.errors import SettingsError
from injector.settings import InjectionSettings, parse_settings
from sidemesh.telemetry import settings_from_env

ROOT = Path(__file__).resolve().parents[2]
JAEGER = "http://jaeger.sidemesh-system.svc:4317"  # the control plane: OTLP/gRPC (grpcio is there)
JAEGER_HTTP = "http://jaeger.sidemesh-system.svc:4318"  # the sidecars: OTLP/HTTP


def _env(settings: InjectionSettings) -> dict[str, str]:
    container = proxy_container(settings, PodOptions(native=True, default_policy="allow-authenticated"))
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_sidecars_trace_to_the_settings_endpoint_at_the_settings_ratio() -> None:
    env = _env(
        parse_settings(
            "tracingEndpoint: http://otel.monitoring:4317\ntracingProtocol: grpc\ntracingSamplingRatio: 1\n"
        )
    )
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel.monitoring:4317"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "1"
    tracing = settings_from_env(env)  # what the sidecar will make of them
    assert tracing is not None and tracing.ratio == 1.0 and tracing.endpoint == "http://otel.monitoring:4317"
    assert tracing.protocol == "grpc"


def test_by_default_sidecars_export_over_otlp_http_to_the_jaeger_addon() -> None:
    """OTLP/HTTP: the OTLP/gRPC exporter would load grpcio into every sidecar."""
    env = _env(InjectionSettings())
    assert (env["OTEL_EXPORTER_OTLP_ENDPOINT"], env["OTEL_EXPORTER_OTLP_PROTOCOL"]) == (
        JAEGER_HTTP,
        "http/protobuf",
    )
    tracing = settings_from_env(env)
    assert tracing is not None and tracing.protocol == "http/protobuf"
    assert tracing.endpoint == JAEGER_HTTP + "/v1/traces"  # (the generic variable: the path is added)
    assert 4318 in _jaeger_ports()


def test_an_empty_endpoint_turns_sidecar_tracing_off() -> None:
    env = _env(parse_settings("tracingEndpoint: ''\n"))
    assert not any(name.startswith("OTEL_") for name in env)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("tracingEndpoint: jaeger:4317", "tracingEndpoint"),
        # accepted once, and every span was lost (the URL the sidecar then exported to in brackets)
        ("tracingEndpoint: 'http://'", "tracingEndpoint.*has no host"),  # (http:/v1/traces)
        ("tracingEndpoint: http://c:99999", "tracingEndpoint.*no valid port"),
        ("tracingEndpoint: http://fd00::1:4317", "tracingEndpoint.*brackets"),  # (host fd00)
        ("tracingEndpoint: 'http://c: 4318'", "tracingEndpoint.*whitespace"),
        ("tracingEndpoint: http://c:4318?x=1", "tracingEndpoint.*query"),  # (?x=1/v1/traces)
        ("tracingEndpoint: http://c:4318/v1/traces", "tracingEndpoint.*base URL"),  # (/v1/traces/v1/traces)
        ("tracingEndpoint: 'http://[fd00::1:4318'", "tracingEndpoint.*not a URL"),  # (was an internal error)
        ("tracingSamplingRatio: 2", "tracingSamplingRatio"),
        ("tracingProtocol: http/json", "tracingProtocol"),
        ("tracingSamplingRatio: lots", "tracingSamplingRatio"),
    ],
)
def test_bad_tracing_settings_are_named(text: str, key: str) -> None:
    with pytest.raises(SettingsError, match=key):
        parse_settings(text)


def test_the_default_is_the_jaeger_addon_at_one_percent() -> None:
    settings = InjectionSettings()
    assert (settings.tracing_endpoint, settings.otlp_protocol(), settings.tracing_sampling_ratio) == (
        JAEGER_HTTP,
        "http/protobuf",
        0.01,
    )


@pytest.mark.parametrize(
    ("text", "protocol"),
    [
        # Settings written for an earlier version (OTLP/gRPC on 4317) keep working: the spans went
        # over OTLP/HTTP to a gRPC port, and every one was lost.
        ("tracingEndpoint: http://otel-collector.monitoring:4317\n", "grpc"),
        ("tracingEndpoint: http://otel-collector.monitoring:4318\n", "http/protobuf"),
        ("tracingEndpoint: https://otlp.example.com\n", "http/protobuf"),
        ("tracingEndpoint: http://[fd00::1]:4317/\n", "grpc"),
        ("tracingEndpoint: http://c:4318/otlp/\n", "http/protobuf"),  # a base path is fine
        ("tracingEndpoint: http://c:4317\ntracingProtocol: http/protobuf\n", "http/protobuf"),  # as told
        ("tracingEndpoint: http://c:4318\ntracingProtocol: grpc\n", "grpc"),
    ],
)
def test_the_protocol_follows_the_port_unless_given(text: str, protocol: str) -> None:
    env = _env(parse_settings(text))
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == protocol


def _jaeger_ports() -> set[int]:
    docs = yaml.safe_load_all((ROOT / "manifests/addons/jaeger/jaeger.yaml").read_text())
    service = next(d for d in docs if d and d["kind"] == "Service")
    return {p["port"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("component", ["ca", "controller", "injector"])
def test_the_control_plane_exports_to_the_jaeger_addon(component: str) -> None:
    docs = yaml.safe_load_all((ROOT / f"manifests/{component}.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == JAEGER
    assert 4317 in _jaeger_ports()  # OTLP gRPC, the exporters' default protocol
