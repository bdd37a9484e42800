"""A stand-in for the Kubernetes API server's list and watch, speaking its real wire format.

What the `kubernetes` client sees is what a real API server sends: `PodList`-style lists with
``metadata.resourceVersion`` (items without kind/apiVersion for built-in kinds, as the server does),
and ``?watch=true`` streams as chunked HTTP of newline-delimited JSON events from a given
resourceVersion, with BOOKMARKs (metadata.resourceVersion only) when asked for, and 410 Gone for a
compacted resourceVersion (an ERROR event with a ``Status``, or an HTTP 410). Lists and watches
take an equality ``labelSelector`` (``k=v,k2==v2``; a watch sees an object that starts or stops
matching as ADDED or DELETED, as the real watch cache does). The ServiceAuthorization ``status``
subresource takes merge patches. ConfigMaps can be read, created and replaced one at a time in
their namespace (GET/POST/PUT), with the real answers: a ``Status`` 404 when missing, 409 when a
create finds one or a replace carries a stale resourceVersion, 404/403 when the namespace is
missing/terminating. The store is versioned: tests add, change and delete objects while watches
are open and the events flow; every request is recorded.

Test levers: ``put``/``delete(..., notify=False)`` change the store without an event (an event lost to
compaction), ``compact()``, ``bookmark()``, ``drop_watches()`` (the connection dies mid-stream),
``refuse_watches`` (the next N watches die right after the headers), ``end_watches_at_once``,
``fail_lists``, ``forbid_lists``, ``fail_status_patches``, ``fail_namespaces`` (every ConfigMap request in them
answers 500).
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    resource: str
    path: str  # the all-namespaces collection
    api_version: str
    kind: str
    custom: bool = False
    generation: bool = True  # whether the server keeps metadata.generation (ConfigMaps have none)


KINDS = {
    k.resource: k
    for k in [
        Kind("namespaces", "/api/v1/namespaces", "v1", "Namespace"),
        Kind("serviceaccounts", "/api/v1/serviceaccounts", "v1", "ServiceAccount"),
        Kind("pods", "/api/v1/pods", "v1", "Pod"),
        Kind("services", "/api/v1/services", "v1", "Service"),
        Kind(
            "endpointslices",
            "/apis/discovery.k8s.io/v1/endpointslices",
            "discovery.k8s.io/v1",
            "EndpointSlice",
        ),
        Kind(
            "serviceauthorizations",
            "/apis/sidemesh.io/v1alpha1/serviceauthorizations",
            "sidemesh.io/v1alpha1",
            "ServiceAuthorization",
            custom=True,
        ),
        Kind("configmaps", "/api/v1/configmaps", "v1", "ConfigMap", generation=False),
    ]
}
BY_KIND = {k.kind: k for k in KINDS.values()}
STATUS_PATH = "/apis/sidemesh.io/v1alpha1/namespaces/{ns}/serviceauthorizations/{name}/status"
CONFIGMAPS_PATH = "/api/v1/namespaces/{ns}/configmaps"


@dataclass
class Recorded:
    method: str
    path: str
    resource: str | None
    query: dict[str, str]
    content_type: str = ""
    body: Any = None
    authorization: str = ""
    at: float = field(default_factory=time.monotonic)

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass
class _Entry:
    rv: int
    type: str
    obj: Obj
    prev: Obj | None = None  # a MODIFIED object as it was before (for label selectors)


def status(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    out: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        out["details"] = details
    return out


def parse_selector(text: str) -> dict[str, str]:
    """An equality-based label selector (``k=v``, ``k==v``, comma-separated): what it requires."""
    required: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or "!" in key:
            raise ValueError(f"unsupported label selector term {term!r}")
        required[key.strip()] = value.strip()
    return required


def matches(obj: Obj | None, required: dict[str, str]) -> bool:
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return obj is not None and all(labels.get(k) == v for k, v in required.items())


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeWatchAPI:
    def __init__(self, objects: Iterable[Obj] = (), *, expire_with_http_410: bool = False) -> None:
        self.rv = 1
        self.store: dict[str, dict[str, Obj]] = {r: {} for r in KINDS}
        self.log: dict[str, list[_Entry]] = {r: [] for r in KINDS}
        self.compacted = 0  # watches from a resourceVersion older than this get 410 Gone
        self.expire_with_http_410 = expire_with_http_410
        self.refuse_watches: dict[str, int] = {r: 0 for r in KINDS}  # the next N die after the headers
        self.end_watches_at_once: dict[str, int] = {r: 0 for r in KINDS}  # the next N end, empty
        self.fail_status_patches = False
        self.fail_lists: dict[str, int] = {r: 0 for r in KINDS}  # the next N lists answer 500
        self.forbid_lists: set[str] = set()  # lists of these resources answer 403 (RBAC)
        self.expire_continue_tokens = False  # every list page after the first answers 410 Expired
        self.silent_watches: dict[str, int] = {r: 0 for r in KINDS}  # the next N send nothing, ever
        self.fail_namespaces: set[str] = set()  # ConfigMap requests in these answer 500
        self.requests: list[Recorded] = []
        self._drops: dict[str, int] = {r: 0 for r in KINDS}
        self._closing = False
        self._cond = threading.Condition()
        for obj in objects:
            self.put(obj, notify=False)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- the store ------------------------------------------------------------------------------

    @staticmethod
    def _key(obj: Obj) -> str:
        meta = obj["metadata"]
        return f"{meta.get('namespace', '')}/{meta['name']}"

    def put(self, obj: Obj, *, notify: bool = True) -> Obj:
        """Create or replace; ``notify=False``: no watch event (as if compacted away)."""
        kind = BY_KIND[obj["kind"]]
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", kind.api_version)
        with self._cond:
            old = self.store[kind.resource].get(self._key(obj))
            meta = obj.setdefault("metadata", {})
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            if old is None:
                meta.setdefault("uid", str(uuid.uuid4()))
                if kind.generation:
                    meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
            else:
                meta["uid"] = old["metadata"]["uid"]
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
                if kind.generation:
                    changed = obj.get("spec") != old.get("spec")
                    meta["generation"] = old["metadata"]["generation"] + (1 if changed else 0)
                if kind.custom:  # status is a subresource: writes to the object leave it alone
                    obj.pop("status", None)
                    if "status" in old:
                        obj["status"] = old["status"]
            self.store[kind.resource][self._key(obj)] = obj
            if notify:
                self._event(kind.resource, "ADDED" if old is None else "MODIFIED", obj, old)
            return copy.deepcopy(obj)

    def delete(self, kind: str, namespace: str, name: str, *, notify: bool = True) -> None:
        resource = BY_KIND[kind].resource
        with self._cond:
            obj = self.store[resource].pop(f"{namespace}/{name}")
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if notify:
                self._event(resource, "DELETED", obj)

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        with self._cond:
            return copy.deepcopy(self.store[BY_KIND[kind].resource][f"{namespace}/{name}"])

    def bookmark(self, resource: str) -> str:
        """Tell open watches of ``resource`` that they are current up to now."""
        with self._cond:
            kind = KINDS[resource]
            obj = {
                "kind": kind.kind,
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(self.rv)},
            }
            self.log[resource].append(_Entry(self.rv, "BOOKMARK", obj))
            self._cond.notify_all()
            return str(self.rv)

    def compact(self) -> int:
        """Forget history up to now: watches resuming from an older resourceVersion get 410."""
        with self._cond:
            self.compacted = self.rv
            return self.rv

    def drop_watches(self, resource: str | None = None) -> None:
        """Kill open watch connections mid-stream (no terminating chunk)."""
        with self._cond:
            for r in [resource] if resource else list(KINDS):
                self._drops[r] += 1
            self._cond.notify_all()

    def _event(self, resource: str, type_: str, obj: Obj, prev: Obj | None = None) -> None:
        self.log[resource].append(_Entry(self.rv, type_, copy.deepcopy(obj), copy.deepcopy(prev)))
        self._cond.notify_all()

    # -- what the tests read back ---------------------------------------------------------------

    def lists(self, resource: str) -> list[Recorded]:
        return [
            r for r in list(self.requests) if r.resource == resource and r.method == "GET" and not r.watch
        ]

    def watches(self, resource: str) -> list[Recorded]:
        return [r for r in list(self.requests) if r.resource == resource and r.watch]

    def status_patches(self) -> list[Recorded]:
        return [r for r in list(self.requests) if r.method == "PATCH"]

    def configmap_requests(self, method: str | None = None, namespace: str | None = None) -> list[Recorded]:
        """ConfigMap reads and writes, by method (GET, POST, PUT) and namespace."""
        prefix = CONFIGMAPS_PATH.format(ns=namespace) if namespace else "/api/v1/namespaces/"
        return [
            r
            for r in list(self.requests)
            if r.resource == "configmaps"
            and r.path.startswith(prefix)
            and (method is None or r.method == method)
        ]

    # -- HTTP -----------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's net/http

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Obj) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"null")

            def _configmap(self, method: str, body: Any = None) -> None:
                """GET/PUT .../namespaces/NS/configmaps/NAME and POST .../namespaces/NS/configmaps."""
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                auth = self.headers.get("Authorization", "")
                content_type = self.headers.get("Content-Type", "")
                api.requests.append(Recorded(method, url.path, "configmaps", query, content_type, body, auth))
                parts = url.path.split("/")  # ['', 'api', 'v1', 'namespaces', NS, 'configmaps', NAME?]
                named = method in ("GET", "PUT")  # one object; POST goes to the collection
                if parts[:4] != ["", "api", "v1", "namespaces"] or parts[5:6] != ["configmaps"]:
                    self._send(404, status(404, "NotFound", f"the server could not find {url.path}"))
                elif len(parts) != (7 if named else 6):
                    self._send(405, status(405, "MethodNotAllowed", "the server does not allow this method"))
                elif parts[4] in api.fail_namespaces:
                    self._send(500, status(500, "InternalError", "etcdserver: request timed out"))
                else:
                    self._send(*api._configmap(method, parts[4], parts[6] if named else None, body))

            def do_POST(self) -> None:
                self._configmap("POST", self._body())

            def do_PUT(self) -> None:
                self._configmap("PUT", self._body())

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path.startswith("/api/v1/namespaces/") and "/configmaps" in url.path:
                    self._configmap("GET")
                    return
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                kind = next((k for k in KINDS.values() if k.path == url.path), None)
                api.requests.append(
                    Recorded(
                        "GET",
                        url.path,
                        kind.resource if kind else None,
                        query,
                        authorization=self.headers.get("Authorization", ""),
                    )
                )
                if kind is None:
                    self._send(404, status(404, "NotFound", f"the server could not find {url.path}"))
                elif query.get("watch") in ("true", "1"):
                    api._watch(self, kind, query)
                elif kind.resource in api.forbid_lists:
                    why = f'{kind.resource} is forbidden: User "dev" cannot list resource "{kind.resource}"'
                    self._send(403, status(403, "Forbidden", why))
                elif api._take(api.fail_lists, kind.resource):
                    self._send(500, status(500, "InternalError", "etcdserver: leader changed"))
                elif query.get("continue") and api.expire_continue_tokens:
                    message = (
                        "The provided continue parameter is too old to display a consistent list result."
                    )
                    self._send(410, status(410, "Expired", message))
                else:
                    self._send(200, api._list(kind, query))

            def do_PATCH(self) -> None:
                url = urlsplit(self.path)
                body = self._body()
                content_type = self.headers.get("Content-Type", "")
                failing = api.fail_status_patches  # decided before the test can see the request
                api.requests.append(
                    Recorded("PATCH", url.path, "serviceauthorizations", {}, content_type, body)
                )
                parts = url.path.split("/")
                if len(parts) != 9 or STATUS_PATH.format(ns=parts[5], name=parts[7]) != url.path:
                    self._send(404, status(404, "NotFound", f"the server could not find {url.path}"))
                elif content_type != "application/merge-patch+json":
                    self._send(
                        415,
                        status(
                            415,
                            "UnsupportedMediaType",
                            f"the body of the request was in an unknown format: {content_type}",
                        ),
                    )
                elif failing:
                    self._send(500, status(500, "InternalError", "etcdserver: request timed out"))
                else:
                    code, answer = api._patch_status(parts[5], parts[7], body)
                    self._send(code, answer)

        return Handler

    def _take(self, counters: dict[str, int], resource: str) -> bool:
        with self._cond:
            if counters[resource] > 0:
                counters[resource] -= 1
                return True
            return False

    def _list(self, kind: Kind, query: dict[str, str]) -> Obj:
        required = parse_selector(query.get("labelSelector", ""))
        with self._cond:
            items = [
                copy.deepcopy(o) for _, o in sorted(self.store[kind.resource].items()) if matches(o, required)
            ]
            rv = str(self.rv)
        if not kind.custom:  # a real server leaves kind/apiVersion off built-in list items
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items)
        meta: Obj = {"resourceVersion": rv}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": meta,
            "items": items[start : start + limit],
        }

    def _patch_status(self, namespace: str, name: str, patch: Any) -> tuple[int, Obj]:
        with self._cond:
            obj = self.store["serviceauthorizations"].get(f"{namespace}/{name}")
            if obj is None:
                return 404, status(404, "NotFound", f'serviceauthorizations.sidemesh.io "{name}" not found')
            if isinstance(patch, dict) and "status" in patch:
                obj["status"] = merge_patch(obj.get("status"), patch["status"])
                if obj["status"] is None:
                    obj.pop("status")
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._event("serviceauthorizations", "MODIFIED", obj)
            return 200, copy.deepcopy(obj)

    def _configmap(self, method: str, namespace: str, name: str | None, body: Any) -> tuple[int, Obj]:
        """One ConfigMap request, answered as the API server does."""
        if method != "GET":
            meta = body.get("metadata") if isinstance(body, dict) else None
            if not isinstance(meta, dict) or not meta.get("name"):
                return 422, status(422, "Invalid", "ConfigMap is invalid: metadata.name: Required value")
            if meta.get("namespace", namespace) != namespace:
                return 400, status(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            if name is not None and meta["name"] != name:
                return 400, status(
                    400, "BadRequest", "the name of the object does not match the name on the URL"
                )
            name = str(meta["name"])
        assert name is not None
        details = {"name": name, "kind": "configmaps"}
        with self._cond:
            ns = self.store["namespaces"].get(f"/{namespace}")
            old = self.store["configmaps"].get(f"{namespace}/{name}")
            if method == "GET":
                if old is None:
                    return 404, status(404, "NotFound", f'configmaps "{name}" not found', details)
                return 200, copy.deepcopy(old)
            if method == "POST":
                if ns is None:
                    return 404, status(
                        404,
                        "NotFound",
                        f'namespaces "{namespace}" not found',
                        {"name": namespace, "kind": "namespaces"},
                    )
                if (ns.get("status") or {}).get("phase") == "Terminating":
                    return 403, status(
                        403,
                        "Forbidden",
                        f'configmaps "{name}" is forbidden: unable to create new content in namespace '
                        f"{namespace} because it is being terminated",
                        details,
                    )
                if old is not None:
                    return 409, status(409, "AlreadyExists", f'configmaps "{name}" already exists', details)
            else:
                if old is None:
                    return 404, status(404, "NotFound", f'configmaps "{name}" not found', details)
                sent = str(body["metadata"].get("resourceVersion") or "")
                if sent and sent != old["metadata"]["resourceVersion"]:
                    return 409, status(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on configmaps "{name}": the object has been modified; '
                        "please apply your changes to the latest version and try again",
                        details,
                    )
                if old.get("immutable") is True and (
                    body.get("data") != old.get("data") or body.get("binaryData") != old.get("binaryData")
                ):  # (ValidateConfigMapUpdate)
                    return 422, status(
                        422,
                        "Invalid",
                        f'ConfigMap "{name}" is invalid: data: Forbidden: field is immutable when `immutable` is set',
                        details,
                    )
            obj = copy.deepcopy(body)
            obj["kind"], obj["apiVersion"] = "ConfigMap", "v1"
            obj["metadata"]["namespace"] = namespace
            for server_set in ("uid", "resourceVersion", "creationTimestamp", "generation"):
                obj["metadata"].pop(server_set, None)
            return (201 if method == "POST" else 200), self.put(obj)

    def _watch(self, handler: BaseHTTPRequestHandler, kind: Kind, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or 0)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        required = parse_selector(query.get("labelSelector", ""))
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        with self._cond:
            expired = 0 < since < self.compacted
            refused = self._take(self.refuse_watches, kind.resource)
            silent = self._take(self.silent_watches, kind.resource)
            empty = self._take(self.end_watches_at_once, kind.resource)
            drops = self._drops[kind.resource]
            position = next((i for i, e in enumerate(self.log[kind.resource]) if e.rv > since), None)
            position = len(self.log[kind.resource]) if position is None else position
            if since == 0:  # "any": the current state first, as ADDED events
                initial = [
                    _Entry(self.rv, "ADDED", copy.deepcopy(o))
                    for o in self.store[kind.resource].values()
                    if matches(o, required)
                ]
                position = len(self.log[kind.resource])
            else:
                initial = []
        gone = status(410, "Expired", f"too old resource version: {since} ({self.compacted})")
        if expired and self.expire_with_http_410:
            handler._send(410, gone)  # type: ignore[attr-defined]
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            if refused:
                self._abort(handler)
                return
            if silent:  # a half-open connection: nothing comes, not even the end
                handler.wfile.flush()
                with self._cond:
                    while not self._closing:
                        self._cond.wait(0.05)
                return
            if expired:
                self._chunk(handler, {"type": "ERROR", "object": gone})
            if expired or empty:
                self._end(handler)
                return
            for entry in initial:
                self._chunk(handler, {"type": entry.type, "object": entry.obj})
            while True:
                with self._cond:
                    pending = self.log[kind.resource][position:]
                    position += len(pending)
                    dropped = self._drops[kind.resource] != drops
                    if not pending and not dropped and not self._closing and time.monotonic() < deadline:
                        self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                        continue
                for entry in pending:
                    type_ = _as_selected(entry, required)
                    if type_ and (type_ != "BOOKMARK" or bookmarks):
                        self._chunk(handler, {"type": type_, "object": entry.obj})
                if dropped:
                    self._abort(handler)
                    return
                if self._closing or time.monotonic() >= deadline:
                    self._end(handler)
                    return
        except OSError:
            handler.close_connection = True  # the client went away

    @staticmethod
    def _chunk(handler: BaseHTTPRequestHandler, event: Obj) -> None:
        data = json.dumps(event).encode() + b"\n"
        handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    @staticmethod
    def _end(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _abort(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)


def _as_selected(entry: _Entry, required: dict[str, str]) -> str | None:
    """The event a watch with this label selector sees, if any: an object that starts matching is
    ADDED, one that stops is DELETED (with its new state)."""
    if entry.type == "BOOKMARK" or not required:
        return entry.type
    now = matches(entry.obj, required)
    if entry.type != "MODIFIED":
        return entry.type if now else None
    before = matches(entry.prev, required)
    return {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}.get((before, now))


# -- objects as the API server holds them ---------------------------------------------------------


def namespace(
    name: str, annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None
) -> Obj:
    meta: Obj = {"name": name, "annotations": annotations or {}}
    if labels is not None:
        meta["labels"] = labels
    return {"kind": "Namespace", "metadata": meta}


def config_map(
    name: str, ns: str, data: dict[str, str], labels: dict[str, str] | None = None, immutable: bool = False
) -> Obj:
    meta: Obj = {"name": name, "namespace": ns}
    if labels is not None:
        meta["labels"] = labels
    return {"kind": "ConfigMap", "metadata": meta, "data": data, **({"immutable": True} if immutable else {})}


def service_account(name: str, ns: str = "shop") -> Obj:
    return {"kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}


def pod(
    name: str,
    ns: str = "shop",
    *,
    ip: str | None = "10.0.0.1",
    labels: dict[str, str] | None = None,
    sa: str = "default",
    meshed: bool = True,
    ports: tuple[tuple[str, int], ...] = (("http", 8080),),
    phase: str = "Running",
) -> Obj:
    annotations = {"sidemesh.io/status": '{"version":"0.1.0"}'} if meshed else {}
    status: Obj = {"phase": phase}
    if ip:
        status["podIP"] = ip
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}, "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "containers": [
                {
                    "name": "app",
                    "image": "app:1",
                    "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
                }
            ],
        },
        "status": status,
    }


def service(
    name: str,
    ns: str = "shop",
    *,
    selector: dict[str, str] | None = None,
    port: int = 80,
    target: int | str = "http",
    cluster_ip: str = "10.96.0.10",
) -> Obj:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": selector if selector is not None else {"app": name},
            "clusterIP": cluster_ip,
            "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}],
        },
    }


def endpoint_slice(
    name: str,
    service_name: str,
    ns: str = "shop",
    *,
    pods: tuple[tuple[str, str, bool | None], ...] = (),
    port: int = 8080,
) -> Obj:
    """``pods``: (pod name, IP, ready) for each endpoint; ready None leaves the condition out."""
    endpoints = []
    for pod_name, ip, ready in pods:
        ep: Obj = {"addresses": [ip], "targetRef": {"kind": "Pod", "namespace": ns, "name": pod_name}}
        ep["conditions"] = {} if ready is None else {"ready": ready}
        endpoints.append(ep)
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def authorization(name: str, ns: str = "shop", *, app: str = "cart", spec: Obj | None = None) -> Obj:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": "ServiceAuthorization",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec
        if spec is not None
        else {
            "selector": {"matchLabels": {"app": app}},
            "rules": [{"from": [{"serviceAccount": "frontend"}]}],
        },
    }
