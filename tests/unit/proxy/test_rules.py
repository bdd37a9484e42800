"""iptables rule generation: parsing tables, validation, golden files, and `proxy init --dry-run`.

Golden files live in tests/golden/iptables/<case>.rules; each starts with the case's `# args:` (the
`sidemesh proxy init` flags) and, for a re-run, the `# existing:` nat table it starts from, so the
e2e test replays exactly these cases on real iptables. Refresh them after an intended change with
`SIDEMESH_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/proxy` and review the diff.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from pathlib import Path

import pytest

from proxy.iptables import apply, rules
from proxy.iptables.cli import capture_config
from proxy.iptables.rules import CaptureConfig
from sidemesh.cli import build_parser, main

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "golden" / "iptables"
UPDATE_GOLDEN = os.environ.get("SIDEMESH_UPDATE_GOLDEN") == "1"
REFRESH = "refresh with `SIDEMESH_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/proxy` and review the diff"

# case -> (sidemesh proxy init flags, existing nat table file or None)
CASES: dict[str, tuple[list[str], str | None]] = {
    "default": ([], None),
    "exclude-inbound": (["--exclude-inbound-ports", "9090, 8081,15020"], None),
    "exclude-outbound": (
        [
            "--exclude-outbound-ports",
            "6379,5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254,10.96.0.0/12,fd00::/8",
        ],
        None,
    ),
    "no-inbound": (["--exclude-inbound-ports", "*"], None),
    "ipv6": (
        [
            "--ipv6",
            "on",
            "--exclude-inbound-ports",
            "9090",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,fd00:10:96::/112",
        ],
        None,
    ),
    "custom-ids-and-ports": (
        ["--proxy-uid", "2000", "--proxy-gid", "2001", "--inbound-port", "16006", "--outbound-port", "16001"],
        None,
    ),
    "rerun": ([], "after-default-init.nat"),
}


def config_for(
    argv: list[str], environ: dict[str, str] | None = None, has_ipv6: bool = False
) -> CaptureConfig:
    args = build_parser().parse_args(["proxy", "init", *argv])
    return capture_config(args, environ or {}, lambda: has_ipv6)


def golden_text(case: str) -> str:
    argv, existing_file = CASES[case]
    existing = (GOLDEN_DIR / existing_file).read_text() if existing_file else ""
    config = config_for(argv)
    header = f"# args:{' ' if argv else ''}{shlex.join(argv)}\n"
    header += f"# existing: {existing_file}\n" if existing_file else ""
    return header + rules.render_families(config, {"ipv4": existing, "ipv6": ""})


def check_golden(path: Path, actual: str) -> None:
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: {REFRESH}")
    expected = path.read_text()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), str(path), "actual")
        )
        pytest.fail(f"golden file {path} is stale: {REFRESH}\n{diff}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    check_golden(GOLDEN_DIR / f"{case}.rules", golden_text(case))


def test_no_orphan_golden_files() -> None:
    orphans = sorted(p.stem for p in GOLDEN_DIR.glob("*.rules") if p.stem not in CASES)
    assert not orphans, f"golden files without a case in test_rules.py: {orphans}; delete them"


def test_rerun_adds_no_second_jump() -> None:
    existing = (GOLDEN_DIR / "after-default-init.nat").read_text()
    text = rules.render(CaptureConfig(), "ipv4", existing)
    assert "-A PREROUTING" not in text
    assert "-A OUTPUT" not in text
    assert ":SIDEMESH_INBOUND - [0:0]" in text  # flushes and rebuilds our chains
    assert rules.render(CaptureConfig(), "ipv4", "") == rules.render(CaptureConfig(), "ipv4", "")


def test_jumps_found_with_counters() -> None:
    existing = "*nat\n:PREROUTING ACCEPT [3:180]\n[3:180] -A PREROUTING -p tcp -j SIDEMESH_INBOUND\nCOMMIT\n"
    text = rules.render(CaptureConfig(), "ipv4", existing)
    assert "-A PREROUTING" not in text
    assert "-A OUTPUT -p tcp -j SIDEMESH_OUTPUT" in text


def test_jumps_in_other_tables_do_not_count() -> None:
    existing = "*filter\n-A OUTPUT -p tcp -j SIDEMESH_OUTPUT\nCOMMIT\n"
    assert "-A OUTPUT -p tcp -j SIDEMESH_OUTPUT" in rules.render(CaptureConfig(), "ipv4", existing)


def test_cleanup_removes_everything_we_added() -> None:
    existing = (GOLDEN_DIR / "after-default-init.nat").read_text()
    existing = existing.replace(
        "COMMIT", "-A PREROUTING -p tcp -j SIDEMESH_INBOUND\n-A POSTROUTING -j MASQUERADE\nCOMMIT"
    )
    assert rules.cleanup(existing).splitlines() == [
        "*nat",
        "-D PREROUTING -p tcp -j SIDEMESH_INBOUND",
        "-D OUTPUT -p tcp -j SIDEMESH_OUTPUT",
        "-D PREROUTING -p tcp -j SIDEMESH_INBOUND",
        ":SIDEMESH_INBOUND - [0:0]",
        ":SIDEMESH_IN_REDIRECT - [0:0]",
        ":SIDEMESH_OUTPUT - [0:0]",
        ":SIDEMESH_OUT_REDIRECT - [0:0]",
        "-X SIDEMESH_INBOUND",
        "-X SIDEMESH_IN_REDIRECT",
        "-X SIDEMESH_OUTPUT",
        "-X SIDEMESH_OUT_REDIRECT",
        "COMMIT",
    ]


def test_cleanup_of_a_clean_table_is_empty() -> None:
    assert rules.cleanup("") == "*nat\nCOMMIT\n"


@pytest.mark.parametrize(
    ("text", "ports"),
    [
        ("", ()),
        ("  ", ()),
        ("8080", (8080,)),
        ("9090, 8080,8080", (8080, 9090)),
        ("1,65535,", (1, 65535)),
    ],
)
def test_parse_ports(text: str, ports: tuple[int, ...]) -> None:
    assert rules.parse_ports(text) == ports


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "'0' is not a port number"),
        ("65536", "'65536' is not a port number"),
        ("80;443", "'80;443' is not a port number"),
        ("8000-8010", "'8000-8010' is not a port number"),
        ("-1", "'-1' is not a port number"),
        ("http", "'http' is not a port number"),
        ("*", "only accepted for exclude-inbound-ports"),
    ],
)
def test_parse_ports_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rules.parse_ports(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (True, ())),
        ("*", (False, ())),
        (" * ", (False, ())),
        ("9090,8080", (True, (8080, 9090))),
    ],
)
def test_parse_inbound_ports(text: str, expected: tuple[bool, tuple[int, ...]]) -> None:
    assert rules.parse_inbound_ports(text) == expected


def test_parse_inbound_star_with_ports() -> None:
    with pytest.raises(ValueError, match="cannot be combined"):
        rules.parse_inbound_ports("*,8080")


@pytest.mark.parametrize(
    ("text", "cidrs"),
    [
        ("", ()),
        ("10.0.0.0/8", ("10.0.0.0/8",)),
        ("192.168.1.7", ("192.168.1.7/32",)),
        ("10.1.2.3/8", ("10.0.0.0/8",)),
        ("fd00::/8, 10.0.0.0/8,172.16.0.0/12,10.0.0.0/8", ("10.0.0.0/8", "172.16.0.0/12", "fd00::/8")),
        ("::1", ("::1/128",)),
    ],
)
def test_parse_cidrs(text: str, cidrs: tuple[str, ...]) -> None:
    assert rules.parse_cidrs(text) == cidrs


@pytest.mark.parametrize("text", ["10.0.0.0/33", "10.0.0", "example.com", "*", "fd00::/129", "10.0.0.0/8;"])
def test_parse_cidrs_errors(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{text!r} is not a CIDR")):
        rules.parse_cidrs(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inbound_port": 0}, "inbound-port: 0 is not a port number"),
        ({"outbound_port": 70000}, "outbound-port: 70000 is not a port number"),
        ({"inbound_port": 15001}, "--inbound-port and --outbound-port are both 15001"),
        ({"proxy_uid": -1}, "proxy-uid: -1 is not a user or group id"),
        ({"proxy_gid": 2**32}, "proxy-gid: 4294967296 is not a user or group id"),
        ({"proxy_ports": (15000, 0)}, "proxy-ports: 0 is not a port number"),
        ({"exclude_inbound_ports": (99999,)}, "exclude-inbound-ports: 99999 is not a port number"),
        ({"exclude_outbound_ports": (0,)}, "exclude-outbound-ports: 0 is not a port number"),
        ({"exclude_outbound_cidrs": ("10.0.0.0/40",)}, "exclude-outbound-cidrs: '10.0.0.0/40' is not a CIDR"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CaptureConfig(**kwargs)  # type: ignore[arg-type]


def test_ipv4_cidrs_skipped_in_ipv6_rules_and_back() -> None:
    config = CaptureConfig(exclude_outbound_cidrs=("10.0.0.0/8", "fd00::/8"), ipv6=True)
    v4, v6 = rules.render(config, "ipv4", ""), rules.render(config, "ipv6", "")
    assert "-d 10.0.0.0/8 -j RETURN" in v4
    assert "fd00::/8" not in v4
    assert "-d fd00::/8 -j RETURN" in v6
    assert "10.0.0.0/8" not in v6
    assert "! -d ::1/128 -o lo" in v6


def test_render_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="'ipv5' is not one of ipv4, ipv6"):
        rules.render(CaptureConfig(), "ipv5", "")  # type: ignore[arg-type]


def _golden_body(case: str) -> str:
    return "".join(
        line
        for line in (GOLDEN_DIR / f"{case}.rules").read_text().splitlines(True)
        if not line.startswith("# args:")
    )


def test_dry_run_prints_the_rules(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no iptables needed
    monkeypatch.setattr(apply, "has_ipv6", lambda: False)  # (else IPv6 off adds the refusal below)
    assert main(["proxy", "init", "--dry-run", "--ipv6", "off"]) == 0
    out = capsys.readouterr().out
    assert out == _golden_body("default")
    assert "-A SIDEMESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in out


GUARD_RULES = [
    "*filter",
    ":SIDEMESH_IN_GUARD - [0:0]",
    "-A INPUT -p tcp -j SIDEMESH_IN_GUARD",
    "-A SIDEMESH_IN_GUARD -i lo -j RETURN",
    *(
        f"-A SIDEMESH_IN_GUARD -p tcp -m tcp --dport {p} -j RETURN"
        for p in (15000, 15001, 15006, 15020, 9090)
    ),
    "-A SIDEMESH_IN_GUARD -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset",
    "COMMIT",
]


def test_guard_refuses_new_inbound_tcp_but_the_ports_the_capture_lets_through() -> None:
    config = CaptureConfig(exclude_inbound_ports=(9090, 15006))
    assert rules.guard(config, "").splitlines() == GUARD_RULES
    rerun = rules.guard(config, "*filter\n" + "\n".join(GUARD_RULES[2:]) + "\n")
    assert rerun.splitlines() == [line for line in GUARD_RULES if not line.startswith("-A INPUT")]
    assert rules.guard(CaptureConfig(capture_inbound=False), "") == ""  # nothing captured: nothing refused
    assert rules.cleanup("\n".join(GUARD_RULES), "filter").splitlines() == [
        "*filter",
        "-D INPUT -p tcp -j SIDEMESH_IN_GUARD",
        ":SIDEMESH_IN_GUARD - [0:0]",
        "-X SIDEMESH_IN_GUARD",
        "COMMIT",
    ]
    assert "GUARD" not in rules.cleanup("\n".join(GUARD_RULES), "nat")  # (another table's rules)


@pytest.mark.parametrize(
    ("argv", "has_ipv6", "guarded"),
    [
        (["--ipv6", "off"], True, True),  # a pod with IPv6 that is not captured
        ([], True, False),  # auto: captured
        (["--ipv6", "off"], False, False),  # no IPv6 in the pod
        (["--ipv6", "off", "--exclude-inbound-ports", "*"], True, False),  # no inbound capture at all
    ],
)
def test_dry_run_shows_the_ipv6_refusal_when_ipv6_is_not_captured(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    has_ipv6: bool,
    guarded: bool,
) -> None:
    monkeypatch.setattr(apply, "has_ipv6", lambda: has_ipv6)
    assert main(["proxy", "init", "--dry-run", *argv]) == 0
    out = capsys.readouterr().out
    assert ("*filter" in out) is guarded
    assert ("-A INPUT -p tcp -j SIDEMESH_IN_GUARD" in out) is guarded
    assert main(["proxy", "init", "--dry-run", "--cleanup", *argv]) == 0
    assert ("-D INPUT -p tcp -j SIDEMESH_IN_GUARD" in capsys.readouterr().out) is guarded


def test_dry_run_reads_annotation_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEMESH_EXCLUDE_INBOUND_PORTS", "*")
    monkeypatch.setenv("SIDEMESH_IPV6", "off")
    assert main(["proxy", "init", "--dry-run"]) == 0
    assert capsys.readouterr().out == _golden_body("no-inbound")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        # It became an ip6tables rule that never matches (the traffic leaves as IPv4), or none at all.
        ("::ffff:10.97.1.0/120", "IPv4-mapped IPv6 network, which leaves as IPv4: write 10.97.1.0/24"),
        ("::ffff:10.97.1.2", "write 10.97.1.2/32"),
        # ipaddress accepts a zone; ip6tables-restore cannot ("host/network ... not found").
        ("fe80::1%eth0", "an address with a zone"),
        ("fe80::%eth0/64", "an address with a zone"),
    ],
)
def test_cidrs_no_rule_could_match_are_refused_with_the_fix(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        rules.parse_cidrs(f"10.0.0.0/8, {text}")
