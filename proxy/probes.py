"""The sidecar's side of the app's probes, and `sidemesh proxy wait`.

The injector points the app's liveness, readiness and startup probes at the sidecar's health port
(`/app-health/<container>/<kind>`, never captured by iptables) and records the originals in
SIDEMESH_APP_PROBES (JSON, path -> probe, as Istio's ISTIO_KUBE_APP_PROBERS). Here each such request
runs the original probe against the app on 127.0.0.1 (the sidecar's own connections are not
captured: UID 1337 and loopback are exempt) with the original timeout, and answers as the kubelet
would judge it: 200 when the probe succeeds, 503 when it does not.

- httpGet: success is a status 200-399, as the kubelet. Redirects are not followed (a 3xx is a
  success). HTTPS is not verified, as the kubelet does not verify either.
- tcpSocket: success is an accepted connection.
- grpc: the standard health check (grpc.health.v1.Health/Check); success is SERVING.

`sidemesh proxy wait` polls the sidecar's readiness: it is the postStart hook of a classic
(non-native) sidecar, which holds the app's containers until the proxy is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import re
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import h11

from sidemesh.httpd import json_response

APP_HEALTH_PREFIX = "/app-health/"
USER_AGENT = "kube-probe/sidemesh"
GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GRPC_SERVING = 1

Response = tuple[int, str, bytes]


@dataclass(frozen=True, slots=True)
class AppProbe:
    kind: str  # httpGet, tcpSocket or grpc
    port: int
    timeout: float = 1.0
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    service: str = ""
    drain_waits: bool = False  # a classic sidecar's preStop hook: the drain waits for it


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# An authority Go's url.Parse takes: userinfo@, a reg-name or [IP literal], :port digits.
_AUTHORITY = re.compile(
    r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:%]*@)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?"
)


def _authority_ok(path: str) -> bool:
    rest = path[2:]
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    return _AUTHORITY.fullmatch(rest[:end]) is not None


# What Go's net/url sends as written (validEncoded): anything else, its decoded path escaped anew.
_RAW_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]/]|%[0-9A-Fa-f]{2})*")


def request_target(path: str) -> str:
    """The request target the kubelet sends for an httpGet ``path`` (Go's url.Parse, then the URL
    as a string, its host the pod's): a leading "/" added (`healthz` is GET /healthz), what a target
    cannot hold percent-encoded (a space, non-ASCII), escapes already there kept, the fragment
    dropped; `//x` is an authority there (GET /); a path Go cannot parse (an invalid `%` escape) is
    taken whole as the path, `%`, `?` and `#` escaped too (the kubelet's fallback)."""
    before_fragment, _, fragment = path.partition("#")
    if (
        _BAD_ESCAPE.search(before_fragment.partition("?")[0])
        or _BAD_ESCAPE.search(fragment)
        or _CONTROL.search(before_fragment)
        or (
            before_fragment.startswith("//")
            and not before_fragment.startswith("///")
            and not _authority_ok(before_fragment)
        )
    ):
        whole = path if path.startswith("/") else "/" + path
        return urllib.parse.quote(whole, safe="/;,:@&=+$-._~")
    path, sep, query = before_fragment.partition("?")
    if path.startswith("//") and not path.startswith("///"):  # an authority (the pod's replaces it)
        rest = path[2:]
        path = rest[rest.index("/") :] if "/" in rest else ""
    if not path.startswith("/"):
        path = "/" + path
    if _RAW_PATH.fullmatch(path) is None:  # not as written: Go escapes the decoded path again
        path = urllib.parse.quote(urllib.parse.unquote_to_bytes(path), safe="/;,:@&=+$-._~")
    return path + sep + urllib.parse.quote(query, safe="/?!$&'()*+,;=:@%[]-._~")


def _port(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{where}: port {value!r} is not a port number")
    return value


def _json_object(text: str, what: str) -> dict[str, Any]:
    """The JSON object an environment variable the injector wrote holds; ValueError otherwise."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"must be a JSON object {what}")
    return raw


def parse_app_probes(text: str) -> dict[str, AppProbe]:
    """SIDEMESH_APP_PROBES -> path -> probe; ValueError saying which entry is wrong."""
    if not text.strip():
        return {}
    raw = _json_object(text, "of path -> probe")
    probes = {}
    for path, entry in raw.items():
        if not path.startswith(APP_HEALTH_PREFIX) or not isinstance(entry, dict):
            raise ValueError(f"{path!r}: expected {APP_HEALTH_PREFIX}<container>/<kind> -> probe object")
        timeout = entry.get("timeoutSeconds", 1)
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"{path}: timeoutSeconds {timeout!r} is not a positive number")
        if isinstance(get := entry.get("httpGet"), dict):
            scheme = str(get.get("scheme", "HTTP")).upper()
            if scheme not in ("HTTP", "HTTPS"):
                raise ValueError(f"{path}: scheme {scheme!r} is not HTTP or HTTPS")
            headers = tuple((str(h["name"]), str(h["value"])) for h in get.get("httpHeaders") or [])
            probes[path] = AppProbe(
                "httpGet",
                _port(get.get("port"), path),
                timeout,
                request_target(str(get.get("path") or "/")),
                scheme,
                headers,
            )
        elif isinstance(tcp := entry.get("tcpSocket"), dict):
            probes[path] = AppProbe("tcpSocket", _port(tcp.get("port"), path), timeout)
        elif isinstance(grpc := entry.get("grpc"), dict):
            service = str(grpc.get("service") or "")
            probes[path] = AppProbe("grpc", _port(grpc.get("port"), path), timeout, service=service)
        else:
            raise ValueError(f"{path}: no httpGet, tcpSocket or grpc")
        # A preStop hook recorded by an injector that did not say (drainWaits): waited for, the
        # classic sidecar's need (a native one then waits out its drain timeout, no worse).
        if entry.get("drainWaits", path.endswith("/prestop")) is True:
            probes[path] = dataclasses.replace(probes[path], drain_waits=True)
    return probes


Local = tuple[str, int] | None


MAX_REDIRECTS = 10  # as the kubelet's HTTP probes and hooks (Go's http.Client)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})  # what Go's http.Client follows


async def _http(probe: AppProbe, host: str, local: Local = None) -> tuple[bool, str]:
    """The kubelet's HTTP probe: 200-399 succeeds, and a redirect to the same host is followed (a
    `/drain` answered 301 to `/drain/`, as Go's ServeMux and Django do, ran nothing of the hook);
    one to another host is not, and counts as success, as the kubelet has it."""
    scheme, port, path = probe.scheme, probe.port, probe.path
    netloc = f"[{host}]" if ":" in host else host  # (an IPv6 pod address)
    for _ in range(MAX_REDIRECTS):  # (Go stops at the 10th redirect: at most 10 requests)
        status, location = await _get(probe, host, scheme, port, path, local)
        if status not in REDIRECT_STATUSES or not location:
            return 200 <= status < 400, f"HTTP {status}"
        target = urllib.parse.urlsplit(
            urllib.parse.urljoin(f"{scheme.lower()}://{netloc}:{port}{path}", location)
        )
        if target.hostname not in (None, host.lower()) or target.scheme not in ("http", "https"):
            return True, f"HTTP {status}, to another host: not followed"
        scheme = target.scheme.upper()
        try:
            port = target.port or (443 if scheme == "HTTPS" else 80)
        except ValueError:
            return False, f"HTTP {status} with an unusable Location {location!r}"
        path = request_target(urllib.parse.urlunsplit(("", "", target.path or "/", target.query, "")))
    return False, f"more than {MAX_REDIRECTS} redirects"


async def _connect_app(
    host: str, port: int, scheme: str, local: Local
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the app, over TLS for HTTPS (the app's own certificate: not the mesh's to
    verify, as the kubelet does not)."""
    context = None
    if scheme == "HTTPS":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return await asyncio.open_connection(host, port, ssl=context, local_addr=local)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


async def _get(
    probe: AppProbe, host: str, scheme: str, port: int, path: str, local: Local
) -> tuple[int, str | None]:
    """One GET: the status and the Location header."""
    reader, writer = await _connect_app(host, port, scheme, local)
    try:
        names = {name.lower() for name, _ in probe.headers}
        headers = [
            (k, v)
            for k, v in (
                ("Host", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"),
                ("User-Agent", USER_AGENT),
                ("Accept", "*/*"),
            )
            if k.lower() not in names
        ]
        # As the kubelet's probe request: the probe's Accept replaces the default, an empty one
        # removes it; an empty User-Agent is not sent (Go's client leaves it out).
        headers += [(k, v) for k, v in probe.headers if v or k.lower() not in ("accept", "user-agent")]
        headers.append(("Connection", "close"))
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="GET", target=path, headers=headers)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                location = dict(event.headers).get(b"location")
                return event.status_code, location.decode("latin-1") if location else None
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("connection closed before a response")
    finally:
        await _close(writer)


MAX_METRICS_BYTES = 4 << 20  # the app's metrics page: at most this much is merged (it is held per scrape)
METRICS_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"  # the text format, which merges


def parse_app_metrics(text: str) -> AppProbe | None:
    """SIDEMESH_APP_METRICS, the app's scrape settings the injector moved off its prometheus.io
    annotations: ``{"port": 9102, "path": "/metrics", "scheme": "HTTP"}``; None when empty;
    ValueError saying what is wrong."""
    if not text.strip():
        return None
    raw = _json_object(text, 'such as {"port": 9102, "path": "/metrics"}')
    scheme = str(raw.get("scheme", "HTTP")).upper()
    if scheme not in ("HTTP", "HTTPS"):
        raise ValueError(f"scheme {scheme!r} is not HTTP or HTTPS")
    headers = (("Accept", METRICS_ACCEPT),)
    path = request_target(str(raw.get("path") or "/metrics"))
    return AppProbe("httpGet", _port(raw.get("port"), "app metrics"), 5.0, path, scheme, headers)


async def fetch_metrics(probe: AppProbe, host: str, local: Local = None) -> tuple[int, str, bytes]:
    """GET the app's metrics page: (status, Content-Type, body), the body at most
    ``MAX_METRICS_BYTES`` (ValueError beyond)."""
    reader, writer = await _connect_app(host, probe.port, probe.scheme, local)
    try:
        authority = f"[{host}]:{probe.port}" if ":" in host else f"{host}:{probe.port}"
        headers = [("Host", authority), ("User-Agent", USER_AGENT), *probe.headers, ("Connection", "close")]
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="GET", target=probe.path, headers=headers)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        status, ctype, body = 0, "", bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status, ctype = (
                    event.status_code,
                    dict(event.headers).get(b"content-type", b"").decode("latin-1"),
                )
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_METRICS_BYTES:
                    raise ValueError(f"more than {MAX_METRICS_BYTES >> 20} MiB of metrics")
            elif isinstance(event, h11.EndOfMessage):
                return status, ctype, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("connection closed before the whole response")
    finally:
        await _close(writer)


async def _tcp(probe: AppProbe, host: str, local: Local = None) -> tuple[bool, str]:
    _, writer = await asyncio.open_connection(host, probe.port, local_addr=local)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, "connected"


def _health_request(service: str) -> bytes:
    data = service.encode()
    return (b"\x0a" + _varint(len(data)) + data) if data else b""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _health_status(data: bytes) -> int:
    """HealthCheckResponse.status (field 1, varint); 0 (UNKNOWN) when absent."""
    if len(data) >= 2 and data[0] == 0x08:
        return data[1] & 0x7F
    return 0


async def _grpc(probe: AppProbe, host: str, local: Local = None) -> tuple[bool, str]:
    from grpclib.client import Channel, UnaryUnaryMethod

    from sidemesh import grpc_client

    if local is not None:  # (grpclib's channels cannot choose their source address)
        raise ConnectionRefusedError("a gRPC probe runs against --app-host only")

    channel = Channel(host, probe.port, codec=grpc_client.RawCodec())
    try:
        check = UnaryUnaryMethod(channel, GRPC_HEALTH_CHECK, bytes, bytes)
        reply = await check(_health_request(probe.service), timeout=probe.timeout)
    except grpc_client.CALL_ERRORS as exc:
        code, message = grpc_client.status_of(exc)
        return False, f"gRPC {code.name}: {message}"
    finally:
        await grpc_client.close(channel)
    status = _health_status(reply)
    return status == GRPC_SERVING, f"gRPC health status {status}"


_RUNNERS = {"httpGet": _http, "tcpSocket": _tcp, "grpc": _grpc}


class AppProber:
    """`/app-health/...` requests of the kubelet, answered by running the original probe."""

    def __init__(
        self, probes: dict[str, AppProbe], host: str = "127.0.0.1", pod: tuple[str, Local] | None = None
    ) -> None:
        """``pod``: the pod's address and the source to probe it from (127.0.0.6 under the capture):
        tried when nothing listens on ``host``, for an app bound to its pod address only (which
        the kubelet's own probe would reach)."""
        self.probes = probes
        self.host = host
        self.pod = pod
        # The app's preStop hooks not answered yet, of a classic sidecar (the injector marks them
        # drainWaits): it gets its SIGTERM as they start, and its drain waits for them
        # (``pre_stop_done``). A native sidecar stops after the app: its hooks ran, or never will.
        self._pre_stop_pending = {path for path, probe in probes.items() if probe.drain_waits}
        self.pre_stop_done = asyncio.Event()
        self.pre_stop_answered_at: float | None = None  # (time.monotonic(): the app's SIGTERM then)
        if not self._pre_stop_pending:
            self.pre_stop_done.set()

    async def metrics(self, probe: AppProbe) -> tuple[bytes | None, str]:
        """The app's metrics (the text format) and "", or None and why not."""
        why = ""
        for host, local in ((self.host, None), *((self.pod,) if self.pod is not None else ())):
            try:
                status, ctype, body = await asyncio.wait_for(fetch_metrics(probe, host, local), probe.timeout)
            except ConnectionRefusedError as exc:
                why = f"{type(exc).__name__}: {exc}"
                continue  # (an app bound to its pod address only: that next)
            except TimeoutError:
                return None, f"no answer within {probe.timeout:g}s"
            except (OSError, ssl.SSLError, h11.ProtocolError, ValueError) as exc:
                return None, f"{type(exc).__name__}: {exc}"
            if status != 200:
                return None, f"HTTP {status}"
            media = ctype.split(";", 1)[0].strip().lower()
            if media not in ("", "text/plain"):  # (OpenMetrics, protobuf, an HTML page at that path)
                return None, f"{ctype}: only Prometheus's text format (text/plain; version=0.0.4) merges"
            return (body if body.endswith(b"\n") or not body else body + b"\n"), ""
        return None, why

    async def check(self, probe: AppProbe) -> tuple[bool, str]:
        ok, detail, refused = await self._run(probe, self.host, None)
        if refused and self.pod is not None:
            ok, detail, _ = await self._run(probe, *self.pod)
        return ok, detail

    async def _run(self, probe: AppProbe, host: str, local: Local) -> tuple[bool, str, bool]:
        try:
            ok, detail = await asyncio.wait_for(_RUNNERS[probe.kind](probe, host, local), probe.timeout)
        except TimeoutError:
            return False, f"no answer within {probe.timeout:g}s", False
        except ConnectionRefusedError as exc:
            return False, f"{type(exc).__name__}: {exc}", True
        except (OSError, ssl.SSLError, h11.ProtocolError) as exc:
            return False, f"{type(exc).__name__}: {exc}", False
        return ok, detail, False

    async def handle(self, path: str) -> Response:
        probe = self.probes.get(path)
        if probe is None:
            return json_response(404, {"error": f"no app probe at {path}", "paths": sorted(self.probes)})
        try:
            ok, detail = await self.check(probe)
        finally:
            if path in self._pre_stop_pending:
                self._pre_stop_pending.discard(path)
                if not self._pre_stop_pending:
                    self.pre_stop_answered_at = time.monotonic()
                    self.pre_stop_done.set()
        return json_response(200 if ok else 503, {"probe": path, "ok": ok, "detail": detail})


# -- sidemesh proxy wait ------------------------------------------------------------------------


def wait_ready(url: str, timeout: float, interval: float = 0.25, last: list[str] | None = None) -> bool:
    """Poll ``url`` (http://HOST:PORT/PATH) until it answers 200 or ``timeout`` seconds pass;
    ``last`` gets what the last try found (a status, or why there was none)."""
    import http.client  # (here: the running sidecar does not load it, nor the email parsing it brings)

    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection(host, port, timeout=max(interval, 1.0))
        try:
            conn.request("GET", path, headers={"User-Agent": "sidemesh-proxy-wait"})
            status = conn.getresponse().status
            if status == 200:
                return True
            found = f"it answered {status}" + (" (not ready yet)" if status == 503 else "")
        except (OSError, http.client.HTTPException) as exc:
            found = f"no answer ({exc.strerror or exc})" if isinstance(exc, OSError) else f"no answer ({exc})"
        finally:
            conn.close()
        if last is not None:
            last[:] = [found]
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _http_url(text: str) -> str:
    """http://HOST[:PORT]/PATH (the sidecar's health port speaks plain HTTP: no https)."""
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port  # a port out of range or not a number raises
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or port == -1 or port == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// URL with a port of 1-65535 if it has one "
            "(e.g. http://127.0.0.1:15020/healthz/ready)"
        )
    return text


def register_wait(sub: Any) -> None:
    """`sidemesh proxy wait`: register under `sidemesh proxy` (proxy/cli.py)."""
    from sidemesh import config as cfg

    p = sub.add_parser(
        "wait",
        help="wait until the sidecar is ready (postStart hook of a classic sidecar)",
        description=(
            "Poll the sidecar's readiness until it answers 200, then exit 0; exit 1 after --timeout. "
            "A classic sidecar runs this as its postStart hook: the kubelet starts the app's containers "
            "only when it returns, so the app never runs before its proxy."
        ),
    )
    p.add_argument(
        "--url",
        type=_http_url,
        default="http://127.0.0.1:15020/healthz/ready",
        help="readiness URL, http://HOST:PORT/PATH (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=cfg.duration_arg(),
        default=cfg.parse_duration("120s"),
        help="give up after (default: 120s)",
    )

    def run(args: argparse.Namespace) -> int:
        last: list[str] = []
        if wait_ready(args.url, args.timeout.total_seconds(), last=last):
            return 0
        print(
            f"sidemesh: the sidecar was not ready at {args.url} within {cfg.format_duration(args.timeout)}"
            f" ({last[0] if last else 'not tried'}); see its log (kubectl logs POD -c sidemesh-proxy)",
            file=sys.stderr,
        )
        return 1

    p.set_defaults(handler=run)
