"""Who is calling: a bearer token turned into a workload identity.

Two authenticators behind one interface: Kubernetes TokenReview (in a cluster) and a local token
file (local mode, VMs, tests).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from ca.errors import AuthenticatorUnavailable, RateLimited, Unauthenticated
from sidemesh.clock import SYSTEM_CLOCK, Clock
from sidemesh.spiffe import SpiffeIdError, WorkloadId

log = logging.getLogger("sidemesh.ca.authn")

AUDIENCE = "sidemesh-ca"
MAX_TOKEN_BYTES = 8192
SA_PREFIX = "system:serviceaccount:"
RELOAD_CHECK_SECONDS = 1.0
TOKEN_CACHE_TTL = dt.timedelta(seconds=60)
MAX_CACHED_TOKENS = 10_000
# A refused token is refused again for this long without asking the API server: a workload retrying
# with a dead token (its ServiceAccount deleted) in a loop costs one TokenReview per 2 s, not one
# per call. Short, because a refusal can turn into an acceptance (a ServiceAccount created just
# after its token was first tried, an API server whose caches were behind).
REFUSAL_CACHE_TTL = dt.timedelta(seconds=2)
# A call waits at most this long for its TokenReview, then fails UNAVAILABLE (retry). Reviews run
# on threads of their own; with all of them busy (a hung API server), a call fails at once rather
# than queueing behind them.
REVIEW_TIMEOUT_S = 5.0
REVIEW_CONNECT_TIMEOUT_S = 2.0
REVIEW_THREADS = 8
# Per caller address (the gRPC peer's IP), so that callers without a valid token cannot take every
# review thread: a token costs a TokenReview before anything else is known about it, and random
# tokens from one address each missed the refusal cache, kept all 8 threads busy and failed the
# signings of every other workload. An address may have this many reviews in flight ...
REVIEWS_PER_PEER = 2
# ... and have this many tokens refused in a burst, then one more every REFUSAL_REFILL_S: past
# that, its calls are refused without a review (RESOURCE_EXHAUSTED, retried later) until it has
# waited. An accepted token costs nothing (a workload's renewals), nor does a cached answer.
REFUSALS_PER_PEER = 10
REFUSAL_REFILL_S = 1.0
MAX_PEERS = 10_000  # addresses remembered (the oldest forgotten first)
# Addresses none of whose tokens was accepted lately (``known_for``: the CA's --max-ttl, at least
# an hour, so that every renewal comes within it) share this many of the threads: several
# addresses sending junk (2 each) could otherwise still take all 8 while the API server is slow,
# and the renewals of every running workload failed with them. A new pod's first Sign competes
# with them; the renewals of workloads already known do not (after a CA restart, from each one's
# first renewal on: the table is in memory).
UNKNOWN_REVIEWS = REVIEW_THREADS // 2
KNOWN_FOR = dt.timedelta(hours=1)


class Authenticator(Protocol):
    async def authenticate(self, token: str, peer: str = "") -> WorkloadId: ...


def peer_address(peer: str) -> str:
    """The IP address of a gRPC peer (``ipv4:10.0.0.5:41234``, ``ipv6:[fd00::5]:41234``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):  # (grpcio writes an IPv6 address percent-encoded: %5B::1%5D)
        return urllib.parse.unquote(rest.rpartition(":")[0]).strip("[]")
    return peer


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """The token of an ``authorization: Bearer <token>`` metadata entry."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            token = token.strip()
            if len(token) > MAX_TOKEN_BYTES:
                raise Unauthenticated("token too large")
            return token
    raise Unauthenticated("no bearer token in the call metadata")


def identity_from_username(username: str) -> WorkloadId:
    """``system:serviceaccount:<ns>:<sa>`` -> WorkloadId."""
    if not username.startswith(SA_PREFIX):
        raise Unauthenticated("token is not a service account token", f"username {username!r}")
    ns, sep, sa = username[len(SA_PREFIX) :].partition(":")
    try:
        if not sep:
            raise SpiffeIdError("no service account name")
        return WorkloadId(ns, sa)
    except SpiffeIdError as exc:
        raise Unauthenticated(
            "token is not a service account token", f"username {username!r}: {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Local token file


@dataclass(frozen=True, slots=True)
class _LocalEntry:
    identity: WorkloadId
    expires_at: dt.datetime | None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_token_file(text: str) -> dict[bytes, _LocalEntry]:
    """Parse the local token file (YAML)::

    tokens:
    - token: "<secret>"
      namespace: shop
      serviceAccount: frontend
      expiresAt: "2026-12-01T00:00:00Z"   # optional
    """
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:  # one line: what and where, not the YAML library's drawing
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"not valid YAML{where}: {problem}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens", []), list):
        raise ValueError("token file must be a mapping with a 'tokens' list")
    entries: dict[bytes, _LocalEntry] = {}
    for i, item in enumerate(doc.get("tokens", [])):
        if not isinstance(item, dict):
            raise ValueError(f"tokens[{i}] must be a mapping")
        token, ns, sa = item.get("token"), item.get("namespace"), item.get("serviceAccount")
        if not all(isinstance(v, str) and v for v in (token, ns, sa)):
            raise ValueError(f"tokens[{i}] needs non-empty 'token', 'namespace' and 'serviceAccount'")
        expires = item.get("expiresAt")
        if isinstance(expires, str):
            expires = dt.datetime.fromisoformat(expires.replace("Z", "+00:00"))
        if expires is not None and not isinstance(expires, dt.datetime):
            raise ValueError(f"tokens[{i}].expiresAt must be an RFC 3339 time")
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=dt.UTC)
        entries[_digest(str(token))] = _LocalEntry(WorkloadId(str(ns), str(sa)), expires)
    return entries


class LocalTokenAuthenticator:
    """Tokens from a file, re-read when the file changes. Tokens are kept only as SHA-256 digests."""

    def __init__(self, path: Path, clock: Clock = SYSTEM_CLOCK) -> None:
        self.path = path
        self.clock = clock
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[bytes, _LocalEntry] = {}
        self._checked = 0.0
        self._reload()

    def _reload(self) -> None:
        now = time.monotonic()
        if self._stamp is not None and now - self._checked < RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            self._entries = parse_token_file(self.path.read_text())
        except (ValueError, SpiffeIdError, yaml.YAMLError) as exc:
            if self._stamp is None:
                raise ValueError(f"token file {self.path}: {exc}") from exc
            log.error(
                "token file invalid; keeping the previous tokens",
                extra={"path": str(self.path), "error": str(exc)},
            )
        self._stamp = stamp

    async def authenticate(self, token: str, peer: str = "") -> WorkloadId:
        try:
            self._reload()
        except OSError as exc:
            log.error("token file unreadable; keeping the previous tokens", extra={"error": str(exc)})
        # Looked up by SHA-256 digest: the caller controls the token, not its digest, so the dict
        # lookup leaks nothing usable about stored tokens.
        entry = self._entries.get(_digest(token))
        if entry is None:
            raise Unauthenticated("token not recognized")
        if entry.expires_at is not None and entry.expires_at <= self.clock.now():
            raise Unauthenticated("token expired", f"token of {entry.identity} expired at {entry.expires_at}")
        return entry.identity


# ---------------------------------------------------------------------------------------------
# Kubernetes TokenReview


def token_expiry(token: str) -> dt.datetime | None:
    """The ``exp`` claim of a JWT, read without verifying it: only ever used to cache a token that
    TokenReview accepted for less long, never to accept one. ``None`` for anything else."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > MAX_TOKEN_BYTES:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return dt.datetime.fromtimestamp(exp, dt.UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return None


class KubernetesTokenAuthenticator:
    """Asks the API server (TokenReview, authentication.k8s.io/v1) who a projected token belongs to.

    The token must be valid for the audience ``sidemesh-ca``; a token minted for any other audience
    (the default API-server audience included) is refused.

    An accepted token is remembered (by its SHA-256 digest) for ``cache_for``, and never past its own
    ``exp``: a workload that retries, or renews with the same token, costs the API server one review
    rather than one per call. The API server caches its own webhook token reviews the same way
    (``--authentication-token-webhook-cache-ttl``, 2 minutes). A refusal is remembered for
    ``REFUSAL_CACHE_TTL`` (2 s). A call waits at most ``REVIEW_TIMEOUT_S`` for its review, which
    runs on one of ``REVIEW_THREADS`` threads of its own (none free: UNAVAILABLE at once).
    """

    def __init__(
        self,
        api_client: Any,
        audience: str = AUDIENCE,
        clock: Clock = SYSTEM_CLOCK,
        cache_for: dt.timedelta = TOKEN_CACHE_TTL,
        max_cached: int = MAX_CACHED_TOKENS,
        known_for: dt.timedelta = KNOWN_FOR,
    ) -> None:
        self.api_client = api_client
        self.known_for = max(known_for, KNOWN_FOR).total_seconds()
        self.audience = audience
        self.clock = clock
        self.cache_for = cache_for
        self.max_cached = max_cached
        self._cache: OrderedDict[bytes, tuple[WorkloadId, dt.datetime]] = OrderedDict()
        self._refused: OrderedDict[bytes, tuple[str, str, dt.datetime]] = OrderedDict()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            REVIEW_THREADS, thread_name_prefix="tokenreview"
        )
        self._busy = 0  # reviews submitted and not yet done (run, failed, or cancelled while queued)
        self._busy_lock = threading.Lock()
        self._peer_busy: dict[str, int] = {}  # the same, per caller address (under _busy_lock)
        self._unknown_busy = 0  # the same, for addresses not known (under _busy_lock)
        self._known: OrderedDict[str, float] = OrderedDict()  # address -> last acceptance (monotonic)
        # caller address -> (refusals it may still have, when that was counted: time.monotonic())
        self._peer_refusals: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.reviews = 0  # TokenReviews sent (for tests and the curious)

    def _review(self, token: str) -> Any:
        from kubernetes import client

        body = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience]),
        )
        return client.AuthenticationV1Api(self.api_client).create_token_review(
            body, _request_timeout=(REVIEW_CONNECT_TIMEOUT_S, REVIEW_TIMEOUT_S)
        )

    def _done(self, peer: str, unknown: bool, _future: concurrent.futures.Future[Any]) -> None:
        with self._busy_lock:
            self._busy -= 1
            self._unknown_busy -= unknown
            if peer:
                left = self._peer_busy.pop(peer, 1) - 1
                if left > 0:
                    self._peer_busy[peer] = left

    def _refusals_left(self, peer: str, charge: float = 0.0) -> float:
        """The refusals ``peer`` may still have (a token bucket), after ``charge`` more."""
        now = time.monotonic()
        left, at = self._peer_refusals.pop(peer, (float(REFUSALS_PER_PEER), now))
        left = min(float(REFUSALS_PER_PEER), left + (now - at) / REFUSAL_REFILL_S) - charge
        self._peer_refusals[peer] = (left, now)  # (the most recent last: the oldest go first)
        while len(self._peer_refusals) > MAX_PEERS:
            self._peer_refusals.popitem(last=False)
        return left

    def close(self) -> None:
        """Let the review threads go (a review still hung is abandoned, not waited for)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def authenticate(self, token: str, peer: str = "") -> WorkloadId:
        peer = peer_address(peer) if peer else ""
        key = _digest(token)
        now = self.clock.now()
        cached = self._cache.get(key)
        if cached is not None:
            if now < cached[1]:
                return cached[0]
            del self._cache[key]
        refused = self._refused.get(key)
        if refused is not None:
            if now < refused[2]:
                raise Unauthenticated(refused[0], refused[1])  # a new one: no traceback grows
            del self._refused[key]
        if peer and self._refusals_left(peer) < 1.0:
            raise RateLimited(
                "too many refused tokens from this address; retry later",
                f"{peer}: over {REFUSALS_PER_PEER} tokens refused, then 1 per {REFUSAL_REFILL_S:g}s",
            )
        try:
            identity = await self._authenticate(token, peer)
        except Unauthenticated as exc:
            self._refused[key] = (exc.public, exc.detail, now + REFUSAL_CACHE_TTL)
            while len(self._refused) > self.max_cached:
                self._refused.popitem(last=False)
            if peer:
                self._refusals_left(peer, charge=1.0)
            raise
        if peer:
            self._known.pop(peer, None)
            self._known[peer] = time.monotonic()
            while len(self._known) > MAX_PEERS:
                self._known.popitem(last=False)
        if self.cache_for > dt.timedelta(0):
            until = now + self.cache_for
            expiry = token_expiry(token)
            if expiry is not None:
                until = min(until, expiry)
            self._cache[key] = (identity, until)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return identity

    async def _authenticate(self, token: str, peer: str = "") -> WorkloadId:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            with self._busy_lock:
                if self._busy >= REVIEW_THREADS:
                    raise AuthenticatorUnavailable(
                        "cannot verify the token now; retry later",
                        f"all {REVIEW_THREADS} TokenReview threads are waiting on the API server",
                    )
                if peer and self._peer_busy.get(peer, 0) >= REVIEWS_PER_PEER:
                    raise AuthenticatorUnavailable(
                        "cannot verify the token now; retry later",
                        f"{peer} has {REVIEWS_PER_PEER} TokenReviews waiting on the API server already",
                    )
                known = self._known.get(peer)
                unknown = bool(peer) and (known is None or time.monotonic() - known > self.known_for)
                if unknown and self._unknown_busy >= UNKNOWN_REVIEWS:
                    raise AuthenticatorUnavailable(
                        "cannot verify the token now; retry later",
                        f"{UNKNOWN_REVIEWS} TokenReviews for addresses with no token accepted lately are "
                        "waiting on the API server already",
                    )
                self._busy += 1
                self._unknown_busy += unknown
                if peer:
                    self._peer_busy[peer] = self._peer_busy.get(peer, 0) + 1
            self.reviews += 1
            submitted = self._executor.submit(self._review, token)
            # when done, failed, or cancelled while queued
            submitted.add_done_callback(functools.partial(self._done, peer, unknown))
            review = await asyncio.wait_for(asyncio.wrap_future(submitted), REVIEW_TIMEOUT_S + 1.0)
        except TimeoutError as exc:
            raise AuthenticatorUnavailable(
                "cannot verify the token now; retry later", f"TokenReview took over {REVIEW_TIMEOUT_S:g}s"
            ) from exc
        except (ApiException, HTTPError, OSError) as exc:
            raise AuthenticatorUnavailable(
                "cannot verify the token now; retry later", f"TokenReview failed: {exc}"
            ) from exc
        status = review.status
        if status is None or not status.authenticated:
            error = getattr(status, "error", None)
            raise Unauthenticated("token not valid", f"TokenReview refused the token: {error}")
        if self.audience not in (status.audiences or []):
            raise Unauthenticated("token not valid for this audience", f"audiences {status.audiences}")
        username = status.user.username if status.user else ""
        return identity_from_username(username or "")
