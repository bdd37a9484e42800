"""review.admit: AdmissionReview bytes in, (HTTP status, body, log fields) out, for every input."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import pytest

from injector import review
from injector.settings import InjectionSettings

SETTINGS = InjectionSettings()
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"generateName": "web-", "namespace": "shop"},
    "spec": {"containers": [{"name": "web", "image": "web:1"}]},
}


def a_review(**request: Any) -> dict[str, Any]:
    base = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop",
        "operation": "CREATE",
        "object": POD,
    }
    base.update(request)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": base}


def admit(body: Any) -> review.Outcome:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return review.admit(data, SETTINGS)


def test_good_review_gets_a_patch_that_injects() -> None:
    outcome = admit(a_review())
    assert outcome.http_status == 200
    assert outcome.body["apiVersion"] == "admission.k8s.io/v1" and outcome.body["kind"] == "AdmissionReview"
    response = outcome.body["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(POD, json.loads(base64.b64decode(response["patch"])))
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["sidemesh-init", "sidemesh-proxy"]
    assert (
        outcome.log["outcome"] == "injected"
        and outcome.log["pod"] == "web-"
        and outcome.log["namespace"] == "shop"
    )


def test_warnings_go_to_the_caller_and_to_the_log() -> None:
    """A controller-made pod's creator (kube-controller-manager) only logs warnings: the injector's
    own log line says them too."""
    pod = {**POD, "metadata": {**POD["metadata"], "annotations": {"sidemesh.io/exclude-port": "1"}}}
    outcome = admit(a_review(object=pod))
    (warning,) = outcome.body["response"]["warnings"]
    assert "sidemesh.io/exclude-port" in warning and outcome.log["warnings"] == [warning]


def test_skipped_pod_is_allowed_without_patch() -> None:
    pod = {**POD, "metadata": {"name": "x", "annotations": {"sidemesh.io/inject": "false"}}}
    outcome = admit(a_review(object=pod))
    assert outcome.body["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}
    assert outcome.log["outcome"] == "skipped" and "opted out" in outcome.log["reason"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not JSON"),
        (b"\xff\xfe", "the body is not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (
            {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}},
            "admission.k8s.io/v1beta1",
        ),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}, "expected kind AdmissionReview"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "has no request"),
        (
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"object": {}}},
            "has no uid",
        ),
    ],
)
def test_unusable_reviews_are_http_400(body: Any, message: str) -> None:
    outcome = admit(body)
    assert outcome.http_status == 400
    assert message in outcome.body["error"]
    assert outcome.log["outcome"] == "bad request"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("resource", [None, None], "request.resource is a list, not an object"),
        ("kind", 1.5, "request.kind is a float, not an object"),
        ("userInfo", "admin", "request.userInfo is a str, not an object"),
        ("operation", ["CREATE"], "request.operation is a list, not a string"),
        ("namespace", 7, "request.namespace is a int, not a string"),
    ],
)
def test_fields_of_the_wrong_json_type_are_a_bad_request(field: str, value: Any, message: str) -> None:
    # Found by schemathesis (tests/integration/test_injector_fuzz.py): a list in request.resource
    # was a 500 from the webhook.
    outcome = admit(a_review(**{field: value}))
    assert outcome.http_status == 400 and outcome.body == {"error": message}


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"object": None}, "has no object"),
        ({"object": "pod"}, "not a JSON object"),
        ({"object": {"metadata": {}, "spec": {}}}, "spec.containers is missing"),
        (
            {"object": {**POD, "metadata": {"annotations": {"sidemesh.io/exclude-outbound-ports": "x"}}}},
            "sidemesh.io/exclude-outbound-ports: 'x' is not a port number",
        ),
    ],
)
def test_pods_that_cannot_be_injected_are_denied_with_a_message(
    request_fields: dict[str, Any], message: str
) -> None:
    outcome = admit(a_review(**request_fields))
    assert outcome.http_status == 200
    response = outcome.body["response"]
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert message in response["status"]["message"]
    assert outcome.log["outcome"] == "denied"


@pytest.mark.parametrize(
    "request_fields",
    [
        {"operation": "UPDATE"},
        {"resource": {"group": "", "version": "v1", "resource": "services"}, "kind": {"kind": "Service"}},
        {"subResource": "ephemeralcontainers", "operation": "CREATE"},
    ],
)
def test_other_requests_are_allowed_and_ignored(request_fields: dict[str, Any]) -> None:
    outcome = admit(a_review(**request_fields))
    response = outcome.body["response"]
    assert response["allowed"] is True and "patch" not in response
    assert "injects pods on CREATE only" in response["status"]["message"]


def test_a_bug_is_denied_as_internal_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(pod: Any, settings: Any) -> Any:
        raise KeyError("boom")

    monkeypatch.setattr(review.patch, "inject", broken)
    outcome = admit(a_review())
    assert outcome.http_status == 200
    assert outcome.body["response"]["status"] == {
        "code": 500,
        "message": "sidemesh injector: internal error (see the injector's log)",
    }
    assert "boom" not in json.dumps(outcome.body)  # details only in the log
    assert "KeyError" in outcome.log["reason"]
