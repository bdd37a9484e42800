"""A stand-in for the Kubernetes API server, speaking its real wire format over HTTP.

Only what the tests need: TokenReview (authentication.k8s.io/v1). It checks the request as the API
server would and answers as it does, audiences included: a token bound to other audiences is
reported as not authenticated, with an error.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Token:
    username: str
    audiences: list[str]
    uid: str = "0c8b1f5e-0000-4000-8000-000000000001"


@dataclass
class FakeKubeAPI:
    tokens: dict[str, Token] = field(default_factory=dict)
    # Emulates an API server that does not report audiences back (must be refused by the CA).
    omit_audiences: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Emulates an API server that takes a review and never answers while set (a hung apiserver).
    hang: threading.Event | None = None

    def __post_init__(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                if self.path.split("?")[0] != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self._send(404, _status(404, "NotFound", f"the server could not find {self.path}"))
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                api.requests.append(body)
                hang = api.hang
                if hang is not None:
                    hang.wait(30)  # until the test lets it go
                    return
                if body.get("apiVersion") != "authentication.k8s.io/v1" or body.get("kind") != "TokenReview":
                    self._send(400, _status(400, "BadRequest", "expected a TokenReview"))
                    return
                self._send(201, api.review(body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def review(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = body.get("spec", {})
        wanted = spec.get("audiences") or ["https://kubernetes.default.svc.cluster.local"]
        token = self.tokens.get(spec.get("token", ""))
        status: dict[str, Any]
        if token is None:
            status = {
                "authenticated": False,
                "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
            }
        else:
            common = [a for a in wanted if a in token.audiences]
            if not common:
                status = {
                    "authenticated": False,
                    "error": f"[invalid bearer token, token audiences {token.audiences} is invalid for the target audiences {wanted}]",
                }
            else:
                status = {
                    "authenticated": True,
                    "user": {
                        "username": token.username,
                        "uid": token.uid,
                        "groups": ["system:serviceaccounts", "system:authenticated"],
                    },
                }
                if not self.omit_audiences:
                    status["audiences"] = common
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def api_client(url: str) -> Any:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    configuration.api_key = {"authorization": "Bearer test-ca-serviceaccount-token"}
    return client.ApiClient(configuration)
