"""AdmissionReview in, AdmissionReview out (no I/O): the webhook route only moves bytes.

Every outcome, and why (see docs/injection.md):
- The body is not JSON, not an AdmissionReview `admission.k8s.io/v1`, or has no `request.uid`:
  HTTP 400 and `{"error": ...}`. There is no uid to echo, so no AdmissionReview response is possible;
  the API server counts a failed call and applies the webhook's failurePolicy.
- Not a pod CREATE (the webhook configuration only sends those; a misconfigured one may send more):
  allowed, no patch, a status message saying it was ignored. Blocking unrelated objects because of
  our configuration would be worse.
- `request.object` missing, or a pod the patcher cannot handle (malformed spec, a bad sidemesh.io
  annotation): `allowed: false`, status code 400 and a message that says what to fix. The API server
  shows it to the creator (`kubectl apply` prints it). Injection is not silently skipped: that would
  start a pod outside the mesh that its owner asked to be in it.
- A bug in the injector (any other exception): `allowed: false`, status code 500, "internal error";
  the details go to the log only. The HTTP status stays 200: the review itself was answered.
- Otherwise allowed, with `patchType: JSONPatch` and the base64 patch, or no patch when the pod is
  skipped (opted out, hostNetwork, already injected).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from injector import patch
from injector.errors import BadReview, PodError
from injector.settings import InjectionSettings

log = logging.getLogger("sidemesh.injector")

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"


class Status(TypedDict, total=False):
    code: int
    message: str


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[str]
    patch: NotRequired[str]
    status: NotRequired[Status]
    warnings: NotRequired[list[str]]


class AdmissionReviewResponse(TypedDict):
    apiVersion: str
    kind: str
    response: AdmissionResponse


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the route sends (HTTP status and JSON body) and what it logs."""

    http_status: int
    body: dict[str, Any]
    log: dict[str, Any] = field(default_factory=dict)

    @property
    def log_level(self) -> int:
        if self.http_status != 200:
            return logging.WARNING
        response = self.body.get("response", {})
        if not response.get("allowed", False):
            return logging.ERROR if response.get("status", {}).get("code") == 500 else logging.WARNING
        return logging.INFO


def parse_review(body: bytes) -> dict[str, Any]:
    """The `request` of an AdmissionReview v1, with a uid; BadReview otherwise."""
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadReview(f"the body is not JSON ({exc}); expected an AdmissionReview {API_VERSION}") from None
    if not isinstance(review, dict):
        raise BadReview(f"the body is not a JSON object; expected an AdmissionReview {API_VERSION}")
    if review.get("kind") != KIND or review.get("apiVersion") != API_VERSION:
        raise BadReview(
            f"expected kind {KIND} apiVersion {API_VERSION}, got kind {review.get('kind')!r} "
            f"apiVersion {review.get('apiVersion')!r}; set admissionReviewVersions: [v1] in the webhook"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("the AdmissionReview request has no uid")
    for name in _OBJECT_FIELDS:
        if request.get(name) is not None and not isinstance(request[name], dict):
            raise BadReview(f"request.{name} is a {type(request[name]).__name__}, not an object")
    for name in _STRING_FIELDS:
        if request.get(name) is not None and not isinstance(request[name], str):
            raise BadReview(f"request.{name} is a {type(request[name]).__name__}, not a string")
    return request


# AdmissionRequest fields the webhook reads or logs, and the JSON type the API server sends.
# (`object` is checked later: a pod that is not an object gets a refusal answering its uid.)
_OBJECT_FIELDS = ("kind", "resource", "requestKind", "requestResource", "userInfo", "oldObject", "options")
_STRING_FIELDS = ("operation", "namespace", "name", "subResource")


def _response(uid: str, allowed: bool, **extra: Any) -> AdmissionReviewResponse:
    response: AdmissionResponse = {"uid": uid, "allowed": allowed, **extra}  # type: ignore[typeddict-item]
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _is_pod_create(request: dict[str, Any]) -> bool:
    resource = request.get("resource") or {}
    kind = request.get("kind") or {}
    is_pod = resource.get("resource") == "pods" or kind.get("kind") == "Pod"
    return is_pod and request.get("operation") == "CREATE" and not request.get("subResource")


def admit(body: bytes, settings: InjectionSettings) -> Outcome:
    """The whole webhook, minus the HTTP and the clock."""
    try:
        request = parse_review(body)
    except BadReview as exc:
        return Outcome(400, {"error": str(exc)}, {"outcome": "bad request", "error": str(exc)})
    uid = request["uid"]
    pod = request.get("object")
    fields: dict[str, Any] = {
        "uid": uid,
        "namespace": request.get("namespace") or "",
        "pod": patch.pod_name(pod),
        "operation": request.get("operation"),
    }
    if not _is_pod_create(request):
        what = f"{request.get('operation')} {(request.get('resource') or {}).get('resource')}"
        message = f"sidemesh injects pods on CREATE only; ignored {what}"
        fields.update(outcome="ignored", reason=message)
        return Outcome(200, dict(_response(uid, True, status={"message": message})), fields)
    try:
        if pod is None:
            raise PodError("the AdmissionReview request has no object (the pod)")
        result = patch.inject(pod, settings)
    except PodError as exc:
        message = f"sidemesh injector: {exc}"
        fields.update(outcome="denied", reason=str(exc))
        return Outcome(200, dict(_response(uid, False, status={"code": 400, "message": message})), fields)
    except Exception as exc:  # a bug must not take the webhook down: deny this pod, log, go on
        log.exception("injection failed", extra={"uid": uid})
        fields.update(outcome="error", reason=f"{type(exc).__name__}: {exc}")
        status: Status = {
            "code": 500,
            "message": "sidemesh injector: internal error (see the injector's log)",
        }
        return Outcome(200, dict(_response(uid, False, status=status)), fields)
    fields.update(outcome="injected" if result.injected else "skipped", reason=result.reason)
    if not result.patch:
        if result.warnings:
            fields["warnings"] = result.warnings
            return Outcome(200, dict(_response(uid, True, warnings=result.warnings)), fields)
        return Outcome(200, dict(_response(uid, True)), fields)
    encoded = base64.b64encode(json.dumps(result.patch, separators=(",", ":")).encode()).decode()
    fields["patch_ops"] = len(result.patch)
    extra: dict[str, Any] = {"warnings": result.warnings} if result.warnings else {}
    if result.warnings:  # (a controller-made pod's creator is not a person: the log says them too)
        fields["warnings"] = result.warnings
    return Outcome(200, dict(_response(uid, True, patchType="JSONPatch", patch=encoded, **extra)), fields)
