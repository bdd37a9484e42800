"""The `sidemesh` command line: every command is there for help, but a command loads only its own
group (a sidecar, ``sidemesh proxy run``, does not carry the CA's or the injector's code)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidemesh.cli import _command, _subcommand, build_parser, main

COMMANDS = ["authz", "ca", "controller", "demo", "inject", "injector", "proxy", "top"]


def choices(command: str | None) -> list[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "==SUPPRESS==" and a.choices)
    return sorted(sub.choices)


def test_help_and_unknown_commands_see_every_command() -> None:
    assert choices(None) == COMMANDS
    assert choices("proxyy") == COMMANDS  # a typo: argparse lists them all


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_loads_its_own_group_only(command: str) -> None:
    assert choices(command) == [command]


def test_the_sidecar_command_is_the_declared_entry_point_and_reads_no_distribution_metadata() -> None:
    """``proxy`` is loaded without importlib.metadata (1.5 MB of a sidecar's RSS): from the module the
    distribution declares for it."""
    from importlib.metadata import entry_points

    from sidemesh.cli import _SIDECAR

    (declared,) = [ep for ep in entry_points(group="sidemesh.commands") if ep.name == _SIDECAR[0]]
    assert declared.value == f"{_SIDECAR[1]}:register"
    code = (
        "import sys; from sidemesh.cli import build_parser; build_parser('proxy').parse_args(['proxy', 'run']); "
        "print(sorted(m for m in ('importlib.metadata', 'zipfile', 'ca', 'controller', 'injector') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out


def test_the_command_is_the_first_argument_that_is_not_an_option() -> None:
    assert _command(["proxy", "run", "--workload", "a/b"]) == "proxy"
    assert _command(["--version"]) is None
    assert _command(["-h"]) is None
    assert _command([]) is None


def test_the_subcommand_is_the_word_right_after_the_command() -> None:
    assert _subcommand(["proxy", "run", "--workload", "a/b"]) == "run"
    assert _subcommand(["proxy", "--help", "run"]) is None  # (an option between: all of them)
    assert _subcommand(["proxy"]) is None
    assert _subcommand([]) is None


def proxy_commands(subcommand: str | None) -> list[str]:
    parser = build_parser("proxy", subcommand)
    (proxy,) = next(a for a in parser._actions if a.dest == "==SUPPRESS==" and a.choices).choices.values()
    return sorted(next(a for a in proxy._actions if a.dest == "==SUPPRESS==" and a.choices).choices)


def test_the_sidecar_command_leaves_out_the_init_parser_and_help_lists_every_proxy_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert proxy_commands("run") == ["run", "wait"]
    assert proxy_commands("wait") == ["run", "wait"]
    assert (
        proxy_commands("init") == proxy_commands(None) == proxy_commands("bogus") == ["init", "run", "wait"]
    )
    with pytest.raises(SystemExit):
        main(["proxy", "--help"])
    assert "init " in capsys.readouterr().out
    assert main(["proxy", "init", "--dry-run"]) == 0  # (named: its parser is there)
    assert "*nat" in capsys.readouterr().out


def test_a_typo_gets_argparse_error_listing_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["proxyy"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'proxyy'" in err and "'proxy'" in err and "'ca'" in err


def test_the_sidecar_process_does_not_import_the_other_components() -> None:
    code = (
        "import json, sys\n"
        "from sidemesh.cli import main\n"
        "try:\n"
        "    main(['proxy', 'run', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('ca', 'controller', 'injector', 'proxy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "proxy.cli" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("controller", "injector")], loaded
    assert "ca.cli" not in loaded, loaded


def test_proxy_run_with_a_config_dir_that_is_not_there_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("")
    code = main(
        [
            "proxy", "run", "--capture", "none", "--workload", "shop/cart-1", "--bundle-file", str(bundle),
            "--config-dir", str(tmp_path / "nothing"), "--token-file", str(tmp_path / "token"),
        ]
    )  # fmt: skip
    assert code == 2
    assert f"--config-dir {tmp_path / 'nothing'} is not a directory" in capsys.readouterr().err
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "bad.yaml").write_text("kind: [unclosed\n")
    code = main(
        [
            "proxy", "run", "--capture", "none", "--workload", "shop/cart-1", "--bundle-file", str(bundle),
            "--config-dir", str(tmp_path / "mesh"), "--token-file", str(tmp_path / "token"),
        ]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "no workload shop/cart-1" in err and "files that could not be read: bad.yaml: cannot read" in err


@pytest.mark.parametrize(
    "url",
    [
        "localhost:1",
        "ftp://x/",
        "http:///healthz",
        "https://127.0.0.1:15020/x",
        "http://127.0.0.1:99999/x",
        "http://h:x/",
    ],
)
def test_proxy_wait_refuses_what_is_not_an_http_url(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", "wait", "--url", url, "--timeout", "1s"])
    assert info.value.code == 2
    assert (
        f"argument --url: {url!r} is not an http:// URL with a port of 1-65535 if it has one"
        in capsys.readouterr().err
    )


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one-line error says): each was a traceback (exit 1) before."""
    (tmp / "kubeconfig.yaml").write_text("apiVersion: v1\nclusters: []\n")
    (tmp / "not-utf8").write_bytes(b"\xff\xfe token")
    (tmp / "broken.yaml").write_text("a: [")
    (tmp / "tokens-not-a-list.yaml").write_text("tokens: x\n")
    mesh = tmp / "mesh"
    mesh.mkdir(exist_ok=True)
    authz = ["authz", "check", "--dir", str(mesh), "--from", "shop/a", "--to", "shop/b", "--port", "80"]
    issue = [
        "ca",
        "issue",
        "--bundle",
        str(tmp / "nope.pem"),
        "--identity",
        "shop/cart",
        "--out-dir",
        str(tmp / "o"),
    ]
    return [
        (["ca", "bootstrap", "--dir", str(tmp / "kubeconfig.yaml")], "cannot write --dir"),
        (
            ["ca", "bootstrap", "--dir", str(tmp / "far"), "--root-lifetime", "99999999d"],
            "--root-lifetime 99999999d goes past the year 9999",  # (not a timedelta's "99999999 days, 0:00:00")
        ),
        (["ca", "local-token", "--file", str(tmp), "--identity", "a/b"], "cannot read --file"),
        (  # (a PEM bundle has neither field: both were dropped without a word, exit 0)
            ["ca", "bundle", "--bundle-file", str(tmp / "x.pem"), "--refresh-hint", "5m", "--sequence", "3"],
            "--refresh-hint and --sequence are fields of the SPIFFE bundle: add --format spiffe",
        ),
        (
            ["ca", "local-token", "--file", str(tmp / "kubeconfig.yaml"), "--identity", "a/b"],
            "is not a local token file",
        ),
        (["ca", "local-token", "--file", str(tmp / "not-utf8"), "--identity", "a/b"], "is not YAML text"),
        (["ca", "local-token", "--file", str(tmp / "broken.yaml"), "--identity", "a/b"], "is not YAML text"),
        (
            ["ca", "local-token", "--file", str(tmp / "tokens-not-a-list.yaml"), "--identity", "a/b"],
            "is not a list",
        ),
        (
            [
                "ca",
                "local-token",
                "--file",
                str(tmp / "t.yaml"),
                "--identity",
                "a/b",
                "--expires-in",
                "999999999d",
            ],
            "year 9999",
        ),
        (
            [*issue, "--ca", "127.0.0.1:99999", "--token", "x"],
            "--ca '127.0.0.1:99999' is not HOST:PORT with a port of 1-65535",
        ),
        (
            [*issue, "--ca", "127.0.0.1:1", "--token-file", str(tmp / "not-utf8")],
            "--token-file must be one token",
        ),
        ([*issue, "--ca", "127.0.0.1:1", "--token", "x"], "cannot read --bundle"),
        ([*authz, "--trust-domain", "BAD DOMAIN"], "trust domain 'BAD DOMAIN' may contain only"),
        ([*authz, "--method", "G T"], "--method 'G T' is not an HTTP method"),
        (  # (it started, and every renewal failed on it: "trust bundle is not PEM", for good)
            [
                "controller",
                "serve",
                "--source",
                "directory",
                "--config-dir",
                str(tmp),
                "--bundle-file",
                str(tmp / "kubeconfig.yaml"),
            ],
            "trust bundle is not PEM certificates",
        ),
    ]


def test_bad_input_gets_one_line_and_exit_2_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, says in _bad_inputs(tmp_path):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and err.startswith("sidemesh: error: ") and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "far").exists()  # the lifetime is checked before anything is written
    assert (tmp_path / "kubeconfig.yaml").read_text() == "apiVersion: v1\nclusters: []\n"  # not rewritten


def test_a_command_group_alone_prints_its_help_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    for group in ("ca", "proxy", "controller", "injector", "authz"):
        assert main([group]) == 2
        told = capsys.readouterr()
        assert told.out == "" and told.err.startswith(f"usage: sidemesh {group} "), told


def test_an_error_nobody_expected_is_one_line_and_exit_70(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 is a command's own answer (authz check: deny); a bug must not look like one."""
    import controller.authz
    import sidemesh.cli as cli

    def broken(_args: object) -> object:
        return {}["missing"]

    monkeypatch.setattr(controller.authz, "_load", broken)
    monkeypatch.delenv("SIDEMESH_DEBUG", raising=False)
    import logging

    monkeypatch.setattr(
        logging.getLogger(), "handlers", []
    )  # a CLI command: no log set up (other tests set one)
    argv = ["authz", "check", "--dir", str(tmp_path), "--from", "a/b", "--to", "a/c", "--port", "80"]
    assert main(argv) == cli.INTERNAL_ERROR
    err = capsys.readouterr().err
    assert err.startswith("sidemesh: internal error: KeyError: 'missing'") and err.count("\n") == 1, err
    monkeypatch.setenv("SIDEMESH_DEBUG", "1")
    assert main(argv) == cli.INTERNAL_ERROR
    assert "Traceback" in capsys.readouterr().err


def test_a_listen_address_that_does_not_resolve_says_so() -> None:
    """os.strerror of a resolver error (-2) read "unknown error -2", and the advice was to stop
    the process holding the port."""
    import socket

    from sidemesh.cli import listen_error

    try:
        socket.getaddrinfo("no-such-host.invalid", 1)
    except socket.gaierror as exc:
        said = str(listen_error(exc, {"--metrics-listen": "no-such-host.invalid:9090"}))
    else:
        pytest.skip("this machine resolves no-such-host.invalid")
    assert said.startswith("cannot listen on --metrics-listen no-such-host.invalid:9090: ")
    assert "unknown error" not in said.lower() and "give an address of this machine" in said
    taken = OSError(98, "error while attempting to bind on address ('127.0.0.1', 1): address already in use")
    assert "127.0.0.1:1: address already in use; stop the process" in str(
        listen_error(taken, {"--listen": "127.0.0.1:1"})
    )


def test_a_server_that_crashes_logs_the_traceback_in_its_json_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server's crash in a pod left one plain line and no traceback (SIDEMESH_DEBUG needed a
    redeploy): with its JSON log set up, the traceback goes there."""
    import logging

    import controller.authz
    import sidemesh.cli as cli
    from sidemesh import logging as smlog

    def broken(_args: object) -> object:
        return {}["missing"]

    monkeypatch.setattr(controller.authz, "_load", broken)
    monkeypatch.delenv("SIDEMESH_DEBUG", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # (other tests leave theirs, on streams since closed)
    before: list[logging.Handler] = []
    smlog.setup("info")
    try:
        argv = ["authz", "check", "--dir", str(tmp_path), "--from", "a/b", "--to", "a/c", "--port", "80"]
        assert main(argv) == cli.INTERNAL_ERROR
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
    err = capsys.readouterr().err
    record = next(json.loads(line) for line in err.splitlines() if line.startswith("{"))
    assert record["event"] == "internal error; exiting" and "KeyError" in record["exception"], record
    assert err.rstrip().splitlines()[-1].startswith("sidemesh: internal error: KeyError")


def test_a_reader_that_goes_away_is_no_internal_error(tmp_path: Path) -> None:
    """`sidemesh ca bundle | head -0`: BrokenPipeError was reported as an internal error to report
    (exit 70); a Unix tool whose reader left says nothing (exit 141, as killed by SIGPIPE)."""
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    read, write = os.pipe()
    os.close(read)  # nobody will read
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sidemesh", "ca", "bundle", "--ca-dir", str(tmp_path / "ca")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("nohost.invalid:15006", "name or service not known"),
        ("192.0.2.1:15006", "cannot assign requested address"),
    ],
)
def test_proxy_run_on_an_address_that_is_not_this_machines_says_so(
    tmp_path: Path, address: str, why: str
) -> None:
    """It said to stop the process holding the port ("another sidecar?"): there is none."""
    said = _proxy_run_fails(tmp_path, "--inbound-listen", address).lower()
    assert said.startswith(f"sidemesh: error: cannot listen on --inbound-listen {address}: {why}"), said
    assert "give an address of this machine" in said and "stop the process" not in said


def _proxy_run_fails(tmp_path: Path, *extra: str, bundle: Path | None = None) -> str:
    """`sidemesh proxy run` in local mode (no CA behind --ca-address) with ``extra`` options; the
    last line it says, having exited 2 before it served."""
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    (tmp_path / "token").write_text("t")
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "w.yaml").write_text(
        "apiVersion: sidemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: x, namespace: shop}\n"
        "spec: {serviceAccount: x, address: 127.0.0.1, ports: [8080]}\n"
    )
    argv = ["proxy", "run", "--workload", "shop/x", "--ca-address", "127.0.0.1:1", "--capture", "none"]
    argv += ["--token-file", str(tmp_path / "token"), "--config-dir", str(tmp_path / "mesh")]
    argv += ["--bundle-file", str(bundle or tmp_path / "ca" / "root-cert.pem"), *extra]
    done = subprocess.run(
        [sys.executable, "-m", "sidemesh", *argv], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2, done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("content", [b"", b"garbage\n"])
def test_proxy_run_with_a_bundle_that_is_no_certificates_says_so(tmp_path: Path, content: bytes) -> None:
    """It started, logged "trust bundle unreadable; keeping the current one" (there was none) and
    never became ready; a missing file was an error at once."""
    (tmp_path / "bundle.pem").write_bytes(content)
    said = _proxy_run_fails(tmp_path, bundle=tmp_path / "bundle.pem")
    assert said.startswith(f"sidemesh: error: --bundle-file {tmp_path / 'bundle.pem'}: trust bundle"), said
    assert "sidemesh ca bundle" in said


@pytest.mark.parametrize(
    "command",
    [["proxy", "run"], ["ca", "serve"], ["controller", "serve"], ["injector", "serve"], ["ca", "issue"]],
)
def test_a_servers_help_has_an_example_and_the_tracing_variables(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The servers' help listed their options only: no example of local mode, and nothing said
    that tracing is set by the OTEL_* variables (POD_IP, read by proxy run, was not named either)."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    if command != ["injector", "serve"]:
        assert "example" in text and f"sidemesh {' '.join(command)}" in text.split("example", 1)[1]
    if command != ["ca", "issue"]:
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in text
    if command == ["proxy", "run"]:
        assert "POD_IP" in text


def test_the_top_level_help_lists_every_exit_status_main_returns(capsys: pytest.CaptureFixture[str]) -> None:
    """Scripts tell a deny (1) from a CA that cannot be reached (2) by the status alone: each one
    main() can return is in `sidemesh --help`."""
    import sidemesh.cli as cli

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    statuses = out.split("exit status:", 1)[1]
    for code in (0, 1, 2, cli.INTERNAL_ERROR, 130):
        assert f"\n  {code} " in statuses, (code, statuses)


def _options(
    parser: argparse.ArgumentParser, path: str = "sidemesh"
) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _options(child, f"{path} {name}")
        elif action.option_strings and action.nargs != 0 and not action.choices:
            yield path, action


def test_every_option_shows_what_its_value_looks_like() -> None:
    """The servers' options all read `VALUE` (`--max-connections VALUE`, `--config-dir VALUE`), the
    others' their own name (`--ttl TTL`, `--out-dir OUT_DIR`)."""
    seen = 0
    for where, action in _options(build_parser()):
        seen += 1
        metavar = action.metavar or action.dest.upper()  # (argparse's own: --from SOURCE)
        shown = f"{where} {action.option_strings[-1]} {metavar}"
        assert "VALUE" not in str(metavar), shown
        if action.type is Path or action.dest.endswith(("_file", "_dir")):
            assert metavar in ("FILE", "DIR"), shown
        if getattr(action.type, "__name__", "") == "duration":
            assert metavar == "DURATION", shown
        if action.dest.endswith(("_listen", "_address")):
            assert metavar == "HOST:PORT", shown
        if action.dest.endswith(("_timeout", "_ttl", "_lifetime")):
            assert metavar == "DURATION", shown
    assert seen > 100, seen  # every command's options were walked


def test_the_sidecar_process_builds_no_init_parser_through_main() -> None:
    """main() passes the subcommand on: `sidemesh proxy run` never imports the iptables code."""
    code = (
        "import contextlib, io, sys\nfrom sidemesh.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['proxy', 'run', '--help'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('proxy.iptables')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out


@pytest.mark.parametrize(
    ("command", "text"), [("top", "Reads each sidecar's admin page"), ("demo", "walks through")]
)
def test_help_keeps_its_description_under_OO(command: str, text: str) -> None:
    """A sidecar's container runs with PYTHONOPTIMIZE=2, which drops docstrings: `sidemesh top`,
    run there, took its --help description from its module docstring and lost it."""
    out = subprocess.run(
        [sys.executable, "-OO", "-m", "sidemesh", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert text in out.stdout, out.stdout
