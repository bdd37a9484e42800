"""The injector's errors, each with its wire mapping (translated in `review.py` and `cli.py` only).

- :class:`BadReview`: the HTTP body is not an AdmissionReview v1 we can answer (nothing to echo a
  uid to): HTTP 400 with a JSON error; the API server then applies the webhook's failurePolicy.
- :class:`PodError`: a well-formed review whose pod cannot be injected as it is (a malformed spec or
  annotation): an AdmissionReview response with ``allowed: false``, status code 400 and a message
  that says what to fix; `kubectl` shows that message to whoever created the pod.
- :class:`SettingsError`: the injection settings file is invalid; at start the process exits with
  the key's name, later the last good settings stay in force.
"""

from __future__ import annotations


class InjectorError(Exception):
    """Base of every error the injector reports to a caller."""

    http_status = 400


class BadReview(InjectorError):
    """The request body is not a usable AdmissionReview admission.k8s.io/v1."""


class PodError(InjectorError):
    """The pod (or pod template) cannot be injected; the message says what to change."""

    review_code = 400


class SettingsError(InjectorError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
