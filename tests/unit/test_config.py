from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pytest

from ca.config import CAConfig
from sidemesh.config import ConfigError, add_arguments, format_duration, load, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("2d", 172800), ("90", 90), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize(
    "text", ["", "5 minutes", "h", "1x", "-5m", "\u0663s", "\u0663", "1_000", "inf", "nan", "1e3", "5\xa0"]
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(dt.timedelta(hours=24)) == "1d"
    assert format_duration(dt.timedelta(minutes=5)) == "5m"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, CAConfig)
    return parser.parse_args(argv)


def test_flag_over_env_over_default() -> None:
    env = {"SIDEMESH_CA_DEFAULT_TTL": "2h", "SIDEMESH_TRUST_DOMAIN": "env.example"}
    config = load(CAConfig, _parse(["--trust-domain", "flag.example"]), env)
    assert config.trust_domain == "flag.example"
    assert config.default_ttl == dt.timedelta(hours=2)
    assert config.max_ttl == dt.timedelta(hours=24)
    assert config.ca_dir == Path("/var/run/secrets/sidemesh/ca")


@pytest.mark.parametrize(
    ("argv", "env", "option"),
    [
        (["--default-ttl", "forever"], {}, "--default-ttl"),
        (["--listen", "nohost"], {}, "--listen"),
        (["--trust-domain", "Bad Domain"], {}, "--trust-domain"),
        (["--authenticator", "local"], {}, "--token-file"),
        (["--default-ttl", "48h"], {}, "--default-ttl"),
        (["--rate-limit", "-1"], {}, "--rate-limit: need --rate-limit >= 0"),  # (it named the option twice)
        (
            ["--min-ttl", "2h", "--max-ttl", "1h"],
            {},
            "--min-ttl: need 0 < --min-ttl <= --default-ttl <= --max-ttl (here 2h, 1h, 1h)",
        ),
        ([], {"SIDEMESH_CA_RATE_BURST": "many"}, "--rate-burst"),
        ([], {"SIDEMESH_CA_AUTHENTICATOR": "ldap"}, "--authenticator"),
    ],
)
def test_bad_values_name_the_option(argv: list[str], env: dict[str, str], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(CAConfig, _parse(argv), env)
    assert str(info.value).startswith(option), str(info.value)


def test_help_lists_every_option_with_default_and_env() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, CAConfig)
    text = parser.format_help()
    for flag in ("--listen", "--ca-dir", "--token-file", "--default-ttl", "--rate-limit", "--dns-names"):
        assert flag in text
    assert "SIDEMESH_CA_DEFAULT_TTL" in text and "(default: 1h)" in text


def test_the_controller_permits_the_sidecars_keepalive_pings() -> None:
    """gRPC servers answer pings more frequent than their minimum (5 minutes by default) with
    GOAWAY too_many_pings: every idle config stream was cut and the whole configuration sent again."""
    from controller.server import SERVER_OPTIONS
    from proxy.config_client import KEEPALIVE

    options = dict(SERVER_OPTIONS)
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= KEEPALIVE * 1000
    assert options["grpc.keepalive_permit_without_calls"] == 1


def test_a_workload_without_a_namespace_is_named_as_such() -> None:
    from proxy.config import ProxyConfig
    from sidemesh.config import ConfigError

    with pytest.raises(ConfigError, match=r"--workload: 'cart' is not NAMESPACE/NAME \(e.g. shop/cart\)"):
        ProxyConfig(workload="cart", capture="none")


@pytest.mark.parametrize("target", ["cart.shop:http", ":80", "cart.shop:0", "cart.shop:70000", "cart.shop:"])
def test_a_local_mode_target_needs_a_service_and_a_port(target: str) -> None:
    """The target was checked for a colon only: `cart.shop:http` started, and every connection to
    the listener was then refused as "not a service in the mesh"."""
    from proxy.config import ProxyConfig

    def config(entry: str) -> ProxyConfig:
        argv = ["--workload", "shop/cart", "--capture", "none", "--config-dir", "/tmp", "--outbound", entry]
        parser = argparse.ArgumentParser()
        add_arguments(parser, ProxyConfig)
        return load(ProxyConfig, parser.parse_args(argv), {})

    with pytest.raises(ConfigError, match=r"--outbound: .* is not SERVICE:PORT \(e.g. cart.shop:80"):
        config(f"127.0.0.1:18080={target}")
    assert config("127.0.0.1:18080=cart.shop:80").outbound_maps() == [(("127.0.0.1", 18080), "cart.shop:80")]


def test_a_huge_duration_is_an_error_not_a_traceback() -> None:
    with pytest.raises(ValueError, match="too long a duration"):
        parse_duration("9999999999d")


def _load(config_class: type, argv: list[str]) -> object:
    parser = argparse.ArgumentParser()
    add_arguments(parser, config_class)
    return load(config_class, parser.parse_args(argv), {})


_PROXY = ["--workload", "shop/cart", "--capture", "none", "--config-dir", "/tmp"]
_CONTROLLER = ["--source", "directory", "--config-dir", "/tmp"]


@pytest.mark.parametrize(
    ("component", "argv", "message"),
    [
        # A trust domain given as a SPIFFE ID: a traceback (controller, injector), or the error
        # blamed --workload and --service-account (proxy).
        ("proxy", [*_PROXY, "--trust-domain", "spiffe://x"], "--trust-domain: trust domain 'spiffe://x'"),
        (
            "controller",
            [*_CONTROLLER, "--trust-domain", "spiffe://x"],
            "--trust-domain: trust domain 'spiffe://x'",
        ),
        ("injector", ["--trust-domain", "Cluster.Local"], "--trust-domain: trust domain 'Cluster.Local'"),
        # Port 0 to connect to: started, then retried for good.
        ("proxy", [*_PROXY, "--ca-address", "127.0.0.1:0"], "--ca-address: '127.0.0.1:0': port 0 cannot be"),
        ("controller", [*_CONTROLLER, "--ca-address", "127.0.0.1:0"], "--ca-address: '127.0.0.1:0': port 0"),
        (
            "proxy",
            [*_PROXY[:4], "--controller", "c:0", "--service-account", "cart"],
            "--controller: 'c:0': port 0",
        ),
        # Values the servers took and then failed on, every time.
        ("proxy", [*_PROXY, "--connect-timeout", "0"], "--connect-timeout: must be more than 0"),
        ("controller", [*_CONTROLLER, "--server-name", " "], "--server-name: must not be empty"),
        # A command's own listen addresses overlapping: blamed on "another process".
        (
            "proxy",
            [*_PROXY, "--admin-listen", "0.0.0.0:15006"],
            "--admin-listen: '0.0.0.0:15006' overlaps --inbound-listen",
        ),
        (
            "proxy",
            [*_PROXY, "--outbound", "127.0.0.1:15000=cart.shop:80"],
            "--outbound: '127.0.0.1:15000' overlaps --admin-listen",
        ),
        (
            "ca",
            ["--listen", "127.0.0.1:25077", "--metrics-listen", "127.0.0.1:25077"],
            "--metrics-listen: '127.0.0.1:25077' overlaps --listen",
        ),
        (
            "injector",
            ["--listen", "0.0.0.0:9443", "--metrics-listen", "127.0.0.1:9443"],
            "--metrics-listen: '127.0.0.1:9443' overlaps --listen (0.0.0.0:9443)",
        ),
    ],
)
def test_values_a_server_cannot_run_with_are_refused_at_start(
    component: str, argv: list[str], message: str
) -> None:
    from controller.config import ControllerConfig
    from injector.config import InjectorConfig
    from proxy.config import ProxyConfig

    classes = {
        "proxy": ProxyConfig,
        "controller": ControllerConfig,
        "injector": InjectorConfig,
        "ca": CAConfig,
    }
    with pytest.raises(ConfigError) as info:
        _load(classes[component], argv)
    assert str(info.value).startswith(message), str(info.value)


def test_the_default_listen_addresses_do_not_overlap() -> None:
    from controller.config import ControllerConfig
    from injector.config import InjectorConfig
    from proxy.config import ProxyConfig

    _load(ProxyConfig, _PROXY)
    _load(ControllerConfig, _CONTROLLER)
    _load(InjectorConfig, [])
    _load(CAConfig, [])
    _load(
        ProxyConfig, [*_PROXY, "--admin-listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"]
    )  # (0: any)


def test_local_mode_may_listen_where_the_capture_would() -> None:
    """--outbound-listen (127.0.0.1:15001) is bound with the iptables capture only: in local mode
    an --outbound map on 15001 was refused as overlapping it (it had always worked)."""
    from proxy.config import ProxyConfig

    _load(ProxyConfig, [*_PROXY, "--outbound", "127.0.0.1:15001=cart.shop:80"])
    iptables = ["--workload", "shop/cart", "--capture", "iptables", "--config-dir", "/tmp"]
    with pytest.raises(ConfigError, match=r"--health-listen: '127.0.0.1:15001' overlaps --outbound-listen"):
        _load(ProxyConfig, [*iptables, "--health-listen", "127.0.0.1:15001"])
    with pytest.raises(ConfigError, match=r"overlaps --inbound-listen \(\[::\]:15006\)"):
        _load(ProxyConfig, [*_PROXY, "--inbound-listen", "[::]:15006", "--admin-listen", "127.0.0.1:15006"])


def test_a_zero_duration_shows_as_0s() -> None:
    assert format_duration(dt.timedelta(0)) == "0s"  # (--drain-grace's help said "default: 0.0s")
