"""`sidemesh proxy init`: install (or remove) the iptables traffic capture of a pod.

Every option is a flag or an environment variable (flag over environment over default), so the
injector can pass the pod annotations `sidemesh.io/exclude-inbound-ports` etc. either way.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.iptables import apply, rules
from proxy.iptables.rules import CaptureConfig
from sidemesh import logging as smlog
from sidemesh.cli import CLIError

log = logging.getLogger("sidemesh.proxy.init")

DESCRIPTION = """\
Redirect the pod's TCP traffic to the sidecar with iptables (nat table), as the init container
does before the app starts: connections from other pods go to the inbound port (15006), connections
the app makes go to the outbound port (15001). Traffic of the proxy's own UID/GID, loopback traffic
(127.0.0.0/8, ::1), the proxy's ports and the excluded ports and CIDRs are left alone.

The rules are applied atomically with `iptables-restore --noflush`. Running init again rebuilds
the SIDEMESH_* chains and leaves the same ruleset; --cleanup removes everything init added.
Needs root with NET_ADMIN and NET_RAW, and the iptables binaries in the image, except --dry-run.
"""

EPILOG = """\
Lists are comma separated, as the pod annotations sidemesh.io/exclude-inbound-ports,
sidemesh.io/exclude-outbound-ports and sidemesh.io/exclude-outbound-cidrs.

examples:
  sidemesh proxy init --dry-run
  sidemesh proxy init --exclude-inbound-ports 9090 --exclude-outbound-cidrs 169.254.169.254/32
  SIDEMESH_EXCLUDE_OUTBOUND_PORTS=5432,6379 sidemesh proxy init
  sidemesh proxy init --cleanup
"""


@dataclass(frozen=True, slots=True)
class _Option:
    flag: str
    env: str
    metavar: str
    default: str
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_OPTIONS = (
    _Option(
        "--proxy-uid",
        "SIDEMESH_PROXY_UID",
        "UID",
        "1337",
        "user id the sidecar runs as; its traffic is never captured",
    ),
    _Option(
        "--proxy-gid",
        "SIDEMESH_PROXY_GID",
        "GID",
        "1337",
        "group id the sidecar runs as; its traffic is never captured",
    ),
    _Option(
        "--inbound-port",
        "SIDEMESH_INBOUND_PORT",
        "PORT",
        "15006",
        "port the sidecar accepts redirected inbound connections on",
    ),
    _Option(
        "--outbound-port",
        "SIDEMESH_OUTBOUND_PORT",
        "PORT",
        "15001",
        "port the sidecar accepts redirected outbound connections on",
    ),
    _Option(
        "--exclude-inbound-ports",
        "SIDEMESH_EXCLUDE_INBOUND_PORTS",
        "PORTS",
        "",
        "inbound ports that reach the app directly, e.g. 9090,9091; '*' captures no inbound traffic "
        "(the proxy's own ports 15000,15001,15006,15020 are always excluded)",
    ),
    _Option(
        "--exclude-outbound-ports",
        "SIDEMESH_EXCLUDE_OUTBOUND_PORTS",
        "PORTS",
        "",
        "destination ports the app reaches directly, e.g. 5432,6379",
    ),
    _Option(
        "--exclude-outbound-cidrs",
        "SIDEMESH_EXCLUDE_OUTBOUND_CIDRS",
        "CIDRS",
        "",
        "destination networks the app reaches directly, e.g. 169.254.169.254/32,10.96.0.0/12,fd00::/8",
    ),
    _Option(
        "--ipv6",
        "SIDEMESH_IPV6",
        "{auto,on,off}",
        "auto",
        "also capture IPv6 with ip6tables; auto: when the pod has any IPv6 address (link-local too). "
        "IPv6 not captured in a pod that has it: new inbound IPv6 TCP connections are refused",
    ),
    _Option(
        "--iptables-mode",
        "SIDEMESH_IPTABLES_MODE",
        "{auto,legacy,nft}",
        "auto",
        "iptables backend; auto: the one whose tables already hold rules in the pod (legacy when it "
        "holds more; neither: the iptables of the PATH), and legacy when nf_tables is not usable "
        "(a kernel without it)",
    ),
)


def register_init(sub: Any) -> None:
    p = sub.add_parser(
        "init",
        help="install the iptables traffic capture (run by the init container)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for opt in _OPTIONS:
        p.add_argument(
            opt.flag,
            dest=opt.dest,
            default=None,
            metavar=opt.metavar,
            help=f"{opt.help} (default: {opt.default or 'none'}) [env {opt.env}]".replace("%", "%%"),
        )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the iptables-restore input and change nothing (needs neither root nor iptables; "
        "assumes an empty nat table)",
    )
    p.add_argument("--cleanup", action="store_true", help="remove the rules and chains init added")
    p.set_defaults(handler=_init)


def _raw(args: argparse.Namespace, environ: Mapping[str, str], opt: _Option) -> tuple[str, str]:
    """The option's text and where it came from (for error messages)."""
    value: str | None = getattr(args, opt.dest, None)
    if value is not None:
        return value, opt.flag
    if opt.env in environ:
        return environ[opt.env], f"{opt.env} (environment)"
    return opt.default, opt.flag


def _number(text: str, what: str, low: int, high: int) -> int:
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or not low <= int(text) <= high:
        raise ValueError(f"{text!r} is not {what} ({low}-{high})")
    return int(text)


def capture_config(
    args: argparse.Namespace, environ: Mapping[str, str], detect_ipv6: Callable[[], bool]
) -> CaptureConfig:
    """Build the config from flags, then environment, then defaults; a bad value names its option."""
    parsers: dict[str, Callable[[str], Any]] = {
        "proxy_uid": lambda t: _number(t, "a user id", 0, rules.MAX_ID),
        "proxy_gid": lambda t: _number(t, "a group id", 0, rules.MAX_ID),
        "inbound_port": lambda t: _number(t, "a port number", 1, 65535),
        "outbound_port": lambda t: _number(t, "a port number", 1, 65535),
        "exclude_inbound_ports": rules.parse_inbound_ports,
        "exclude_outbound_ports": rules.parse_ports,
        "exclude_outbound_cidrs": rules.parse_cidrs,
        "ipv6": _ipv6_mode,
        "iptables_mode": _iptables_mode,  # (validated here; used by init, not by the rules)
    }
    values: dict[str, Any] = {}
    for opt in _OPTIONS:
        text, source = _raw(args, environ, opt)
        try:
            values[opt.dest] = parsers[opt.dest](text)
        except ValueError as exc:
            raise CLIError(f"{source}: {exc}") from None
    capture_inbound, inbound_ports = values.pop("exclude_inbound_ports")
    mode = values.pop("ipv6")
    values.pop("iptables_mode")
    try:
        return CaptureConfig(
            **values,
            capture_inbound=capture_inbound,
            exclude_inbound_ports=inbound_ports,
            ipv6=detect_ipv6() if mode == "auto" else mode == "on",
        )
    except ValueError as exc:
        raise CLIError(f"{exc}; fix the flags or SIDEMESH_* environment variables") from None


def _guard_ipv6(config: CaptureConfig, captured: bool, guarded: bool) -> str:
    """IPv6 not captured in a pod that has it: refuse new inbound IPv6 TCP instead (`rules.guard`),
    or warn that it is open past the sidecar. Captured, or no inbound capture at all: an earlier
    run's refusal goes. Returns what was applied to ip6tables' filter table."""
    if captured or not guarded:
        try:
            return apply.remove_guard()
        except apply.CaptureError as exc:
            log.warning("could not remove an earlier run's IPv6 refusal", extra={"reason": str(exc)})
            return ""
    try:
        text = apply.install_guard(config)
    except apply.CaptureError as exc:
        log.warning(
            "inbound IPv6 is open past the sidecar: IPv6 is not captured and new inbound IPv6 TCP "
            "connections could not be refused either (ip6tables' filter table); install ip6tables "
            "in the init image, or keep apps off [::]",
            extra={"reason": str(exc)},
        )
        return ""
    log.info("IPv6 not captured: new inbound IPv6 TCP connections are refused (ip6tables filter table)")
    return text


def _ipv6_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{text!r} is not one of auto, on, off")
    return mode


def _iptables_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("auto", *apply.BACKENDS):
        raise ValueError(f"{text!r} is not one of auto, legacy, nft")
    return mode


def _init(args: argparse.Namespace) -> int:
    config = capture_config(args, os.environ, apply.has_ipv6)
    backend = _iptables_mode(
        _raw(args, os.environ, next(o for o in _OPTIONS if o.dest == "iptables_mode"))[0]
    )
    guarded = config.capture_inbound and apply.has_ipv6()  # (if IPv6 is not captured)
    if args.dry_run:
        # (auto is decided from the pod's tables when applied: the generic command is shown)
        named = "" if backend == "auto" else backend
        guard = rules.guard(config, "") if guarded and not config.ipv6 else ""
        if args.cleanup:
            installed = {f: rules.render(config, f, "") for f in config.families}
            text = "".join(rules.section(f, rules.cleanup(installed[f]), named) for f in config.families)
            guard = guard and rules.cleanup(guard, "filter")
        else:
            text = rules.render_families(config, backend=named)
        sys.stdout.write(text + (rules.section("ipv6", guard, named) if guard else ""))
        return 0
    smlog.setup()
    try:
        chosen = "chosen"
        if backend == "auto":
            backend, chosen = apply.detect_backend()
        apply.use_backend(backend)
        log.info("iptables backend", extra={"backend": backend or "PATH", "why": chosen})
        if args.cleanup:
            applied = apply.uninstall(apply.installed_families())
            guard = apply.remove_guard()
        else:
            mode = _ipv6_mode(_raw(args, os.environ, next(o for o in _OPTIONS if o.dest == "ipv6"))[0])
            applied = apply.install(config, ipv6_optional=mode == "auto" and not apply.has_global_ipv6())
            guard = _guard_ipv6(config, "ipv6" in applied, guarded)
    except apply.CaptureError as exc:
        raise CLIError(str(exc)) from exc
    if not args.cleanup and "ipv6" in applied and (why := apply.add_inbound_source()) is not None:
        log.warning(
            "could not add ::6 to lo: the sidecar delivers inbound IPv6 to ::1 (apps listening on the "
            "pod's IPv6 address only are not reached)",
            extra={"reason": why},
        )
    sys.stdout.write("".join(rules.section(f, text, backend) for f, text in applied.items()))
    if guard:
        sys.stdout.write(rules.section("ipv6", guard, backend))
    log.info(
        "capture removed" if args.cleanup else "capture installed",
        extra={
            "families": list(applied),
            "capture_inbound": config.capture_inbound,
            "inbound_port": config.inbound_port,
            "outbound_port": config.outbound_port,
            "proxy_uid": config.proxy_uid,
            "exclude_inbound_ports": list(config.exclude_inbound_ports),
            "exclude_outbound_ports": list(config.exclude_outbound_ports),
            "exclude_outbound_cidrs": list(config.exclude_outbound_cidrs),
        },
    )
    return 0
