"""The `sidemesh` command line: every command is there for help, but a command loads only its own
group (a sidecar, ``sidemesh proxy run``, does not carry the CA's or the injector's code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidemesh.cli import _command, build_parser, main

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


def test_the_command_is_the_first_argument_that_is_not_an_option() -> None:
    assert _command(["proxy", "run", "--workload", "a/b"]) == "proxy"
    assert _command(["--version"]) is None
    assert _command(["-h"]) is None
    assert _command([]) is None


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


@pytest.mark.parametrize("url", ["localhost:1", "ftp://x/", "http:///healthz"])
def test_proxy_wait_refuses_what_is_not_an_http_url(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", "wait", "--url", url, "--timeout", "1s"])
    assert info.value.code == 2
    assert f"argument --url: {url!r} is not an http:// URL" in capsys.readouterr().err
