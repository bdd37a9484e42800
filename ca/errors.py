"""The CA's errors. Each knows its gRPC status; the servicer translates at one boundary.

``public`` is what the caller is told; ``detail`` goes to the log only. An unauthenticated caller is
told little; an authenticated one is told why its request was refused.
"""

from __future__ import annotations

import grpc


class CAError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason = "internal"

    def __init__(self, public: str, detail: str | None = None) -> None:
        super().__init__(public)
        self.public = public
        self.detail = detail or public


class Unauthenticated(CAError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class InvalidRequest(CAError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_request"


class IdentityMismatch(CAError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "identity_mismatch"


class RateLimited(CAError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "rate_limited"


class AuthenticatorUnavailable(CAError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "authenticator_unavailable"


class SigningUnavailable(CAError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "signing_unavailable"


class KeyMaterialError(Exception):
    """The CA's own keys or certificates are missing or unusable (fails at start)."""
