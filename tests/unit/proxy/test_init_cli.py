"""`sidemesh proxy init` as a user meets it: flags, environment, errors, --dry-run, --help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.iptables.rules import CaptureConfig
from sidemesh.cli import CLIError, main
from tests.unit.proxy.test_rules import config_for


@pytest.mark.parametrize(
    ("mode", "detected", "families"),
    [
        ("auto", False, ("ipv4",)),
        ("auto", True, ("ipv4", "ipv6")),
        ("on", False, ("ipv4", "ipv6")),
        ("off", True, ("ipv4",)),
    ],
)
def test_ipv6_mode(mode: str, detected: bool, families: tuple[str, ...]) -> None:
    assert config_for(["--ipv6", mode], has_ipv6=detected).families == families


def test_flag_over_environment_over_default() -> None:
    env = {
        "SIDEMESH_EXCLUDE_INBOUND_PORTS": "9090",
        "SIDEMESH_EXCLUDE_OUTBOUND_PORTS": "5432",
        "SIDEMESH_EXCLUDE_OUTBOUND_CIDRS": "169.254.169.254/32",
        "SIDEMESH_PROXY_UID": "2000",
        "SIDEMESH_IPV6": "on",
    }
    config = config_for(["--exclude-outbound-ports", "6379", "--proxy-uid", "3000"], env)
    assert config.exclude_inbound_ports == (9090,)
    assert config.exclude_outbound_ports == (6379,)
    assert config.exclude_outbound_cidrs == ("169.254.169.254/32",)
    assert config.proxy_uid == 3000
    assert config.proxy_gid == 1337
    assert config.ipv6
    assert config_for([]) == CaptureConfig()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--exclude-inbound-ports", "80,x"], {}, "--exclude-inbound-ports: 'x' is not a port number"),
        ([], {"SIDEMESH_EXCLUDE_OUTBOUND_PORTS": "0"}, "SIDEMESH_EXCLUDE_OUTBOUND_PORTS (environment): '0'"),
        (
            ["--exclude-outbound-cidrs", "10.0.0.0/33"],
            {},
            "--exclude-outbound-cidrs: '10.0.0.0/33' is not a CIDR",
        ),
        (["--proxy-uid", "root"], {}, "--proxy-uid: 'root' is not a user id"),
        (["--inbound-port", "15001"], {}, "both 15001; they must differ"),
        (["--ipv6", "maybe"], {}, "--ipv6: 'maybe' is not one of auto, on, off"),
        ([], {"SIDEMESH_IPV6": "yes"}, "SIDEMESH_IPV6 (environment): 'yes'"),
    ],
)
def test_config_errors_name_the_option(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(CLIError, match=re.escape(message)):
        config_for(argv, env)


def test_dry_run_cleanup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proxy", "init", "--dry-run", "--cleanup", "--ipv6", "on"]) == 0
    out = capsys.readouterr().out
    assert out.count("-X SIDEMESH_OUTPUT") == 2
    assert "# ipv6: ip6tables-restore --noflush" in out


@pytest.mark.parametrize(
    ("mode", "v4", "v6"),
    [
        ("legacy", "iptables-legacy-restore", "ip6tables-legacy-restore"),
        ("nft", "iptables-nft-restore", "ip6tables-nft-restore"),
        ("auto", "iptables-restore", "ip6tables-restore"),  # decided when applied
    ],
)
@pytest.mark.parametrize("cleanup", [[], ["--cleanup"]])
def test_dry_run_names_the_backends_restore_command(
    capsys: pytest.CaptureFixture[str], mode: str, v4: str, v6: str, cleanup: list[str]
) -> None:
    """The printed rules go to the command of the backend chosen with --iptables-mode (it said
    iptables-restore whatever the mode: restored with another backend, they miss the pod's)."""
    assert main(["proxy", "init", "--dry-run", "--ipv6", "on", "--iptables-mode", mode, *cleanup]) == 0
    out = capsys.readouterr().out
    assert f"# ipv4: {v4} --noflush\n" in out
    assert f"# ipv6: {v6} --noflush\n" in out


def test_bad_flag_exits_2_with_advice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proxy", "init", "--dry-run", "--exclude-outbound-ports", "http"]) == 2
    assert "sidemesh: error: --exclude-outbound-ports: 'http' is not a port number" in capsys.readouterr().err


def test_missing_iptables_says_install_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["proxy", "init", "--ipv6", "off"]) == 2
    err = capsys.readouterr().err
    assert "iptables-save not found" in err
    assert "install iptables; the sidecar image must contain it" in err


def test_help_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", "init", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "--proxy-uid",
        "--proxy-gid",
        "--inbound-port",
        "--outbound-port",
        "--exclude-inbound-ports",
        "--exclude-outbound-ports",
        "--exclude-outbound-cidrs",
        "--ipv6",
        "--dry-run",
        "--cleanup",
        "SIDEMESH_EXCLUDE_INBOUND_PORTS",
        "sidemesh.io/exclude-outbound-cidrs",
        "NET_ADMIN",
    ):
        assert word in out
