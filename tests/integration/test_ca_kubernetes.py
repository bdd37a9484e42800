"""The CA authenticating callers with TokenReview against an API server that speaks the real wire
format (the real `kubernetes` client code runs)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator

import pytest

from ca import authn as authn_module
from ca.authn import KubernetesTokenAuthenticator, token_expiry
from sidemesh.grpc_client import Status
from sidemesh.identity.client import CAClientError
from sidemesh.spiffe import WorkloadId
from tests.integration.conftest import StartCA
from tests.support.clock import FakeClock
from tests.support.kube_api import FakeKubeAPI, Token, api_client

FRONTEND = WorkloadId("shop", "frontend")


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI(
        tokens={
            "projected": Token("system:serviceaccount:shop:frontend", ["sidemesh-ca"]),
            "default-audience": Token(
                "system:serviceaccount:shop:frontend", ["https://kubernetes.default.svc.cluster.local"]
            ),
            "a-person": Token("kubernetes-admin", ["sidemesh-ca"]),
            "bad-username": Token("system:serviceaccount:Shop_X:", ["sidemesh-ca"]),
        }
    )
    yield api
    api.close()


async def test_tokenreview_with_the_sidemesh_ca_audience(start_ca: StartCA, kube: FakeKubeAPI) -> None:
    ca = await start_ca(authenticator=KubernetesTokenAuthenticator(api_client(kube.url)))
    svid = await ca.issue("projected", FRONTEND)
    assert str(svid.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/frontend"
    review = kube.requests[-1]
    assert review["spec"] == {"token": "projected", "audiences": ["sidemesh-ca"]}


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("unknown", "token not valid"),
        ("default-audience", "token not valid"),
        ("a-person", "not a service account token"),
        ("bad-username", "not a service account token"),
    ],
)
async def test_tokenreview_refusals(start_ca: StartCA, kube: FakeKubeAPI, token: str, message: str) -> None:
    ca = await start_ca(authenticator=KubernetesTokenAuthenticator(api_client(kube.url)))
    with pytest.raises(CAClientError) as info:
        await ca.issue(token, FRONTEND)
    assert info.value.code == Status.UNAUTHENTICATED
    assert message in info.value.message


async def test_api_server_that_does_not_confirm_the_audience_is_not_trusted(
    start_ca: StartCA, kube: FakeKubeAPI
) -> None:
    kube.omit_audiences = True
    ca = await start_ca(authenticator=KubernetesTokenAuthenticator(api_client(kube.url)))
    with pytest.raises(CAClientError) as info:
        await ca.issue("projected", FRONTEND)
    assert info.value.code == Status.UNAUTHENTICATED and "audience" in info.value.message


async def test_api_server_down_is_unavailable_and_retryable(start_ca: StartCA, kube: FakeKubeAPI) -> None:
    url = kube.url
    kube.close()
    ca = await start_ca(authenticator=KubernetesTokenAuthenticator(api_client(url)))
    with pytest.raises(CAClientError) as info:
        await ca.issue("projected", FRONTEND)
    assert info.value.code == Status.UNAVAILABLE and info.value.retryable
    assert "retry later" in info.value.message


async def test_an_accepted_token_is_reviewed_once_per_cache_period(
    start_ca: StartCA, kube: FakeKubeAPI
) -> None:
    clock = FakeClock()
    authn = KubernetesTokenAuthenticator(
        api_client(kube.url), clock=clock, cache_for=dt.timedelta(seconds=60)
    )
    ca = await start_ca(authenticator=authn)
    await ca.issue("projected", FRONTEND)
    await ca.issue("projected", FRONTEND)
    assert authn.reviews == len(kube.requests) == 1
    clock.offset += dt.timedelta(seconds=61)  # the cached answer has expired: ask again
    await ca.issue("projected", FRONTEND)
    assert authn.reviews == len(kube.requests) == 2
    # A refusal is remembered for 2 s: a workload retrying a dead token costs one review per 2 s.
    for _ in range(3):
        with pytest.raises(CAClientError):
            await ca.issue("unknown", FRONTEND)
    assert len(kube.requests) == 3
    clock.offset += dt.timedelta(seconds=3)
    with pytest.raises(CAClientError):
        await ca.issue("unknown", FRONTEND)
    assert len(kube.requests) == 4
    # A token the API server stops accepting is refused once its cached answer has expired.
    del kube.tokens["projected"]
    await ca.issue("projected", FRONTEND)
    clock.offset += dt.timedelta(seconds=61)
    with pytest.raises(CAClientError) as info:
        await ca.issue("projected", FRONTEND)
    assert info.value.code == Status.UNAUTHENTICATED


async def test_no_cache_when_disabled(start_ca: StartCA, kube: FakeKubeAPI) -> None:
    authn = KubernetesTokenAuthenticator(api_client(kube.url), cache_for=dt.timedelta(0))
    ca = await start_ca(authenticator=authn)
    await ca.issue("projected", FRONTEND)
    await ca.issue("projected", FRONTEND)
    assert len(kube.requests) == 2


def _jwt(claims: object) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.c2ln"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (
            _jwt({"exp": 1_800_000_000, "aud": ["sidemesh-ca"]}),
            dt.datetime.fromtimestamp(1_800_000_000, dt.UTC),
        ),
        (_jwt({"aud": ["sidemesh-ca"]}), None),
        (_jwt({"exp": "soon"}), None),
        (_jwt({"exp": True}), None),
        (_jwt({"exp": 10**30}), None),
        (_jwt([1, 2]), None),
        ("a.!!!.c", None),
        ("not-a-jwt", None),
    ],
)
def test_token_expiry_bounds_the_cache_only_when_readable(token: str, expected: dt.datetime | None) -> None:
    assert token_expiry(token) == expected


async def test_a_hung_api_server_fails_reviews_in_time_and_never_wedges_the_ca(
    start_ca: StartCA, kube: FakeKubeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server takes TokenReviews and never answers: each call fails UNAVAILABLE (retry)
    after the review timeout (here 0.5 s), more of them than the CA has review threads; once the
    API server answers again, so does the CA (before, the hung reviews held the threads for good)."""
    monkeypatch.setattr(authn_module, "REVIEW_TIMEOUT_S", 0.5)
    kube.hang = threading.Event()
    authn = KubernetesTokenAuthenticator(api_client(kube.url), cache_for=dt.timedelta(0))
    ca = await start_ca(authenticator=authn)
    began = time.monotonic()
    results = await asyncio.gather(
        *(ca.issue("projected", FRONTEND) for _ in range(5 * authn_module.REVIEW_THREADS)),
        return_exceptions=True,
    )
    assert all(isinstance(r, CAClientError) and r.code == Status.UNAVAILABLE for r in results), results
    # Five times as many calls as review threads: none waited behind another's hung review.
    assert time.monotonic() - began < 3
    kube.hang.set()
    kube.hang = None
    svid = await asyncio.wait_for(ca.issue("projected", FRONTEND), 5)
    assert str(svid.spiffe_id).endswith("/sa/frontend")
    for _ in range(50):  # every review is accounted for once done: none is held for good
        if authn._busy == 0:
            break
        await asyncio.sleep(0.05)
    assert authn._busy == 0


async def test_callers_without_a_valid_token_cannot_take_every_review_thread(kube: FakeKubeAPI) -> None:
    """Each token costs a TokenReview before anything else is known about it, and random tokens miss
    the refusal cache: one address sending them kept all 8 review threads busy (a slow API server),
    and every other workload's Sign failed UNAVAILABLE. An address has at most 2 reviews in flight."""
    from ca.errors import AuthenticatorUnavailable

    kube.hang = threading.Event()  # an API server that takes its time
    authn = KubernetesTokenAuthenticator(api_client(kube.url), cache_for=dt.timedelta(0))
    try:
        attacker = [
            asyncio.create_task(authn.authenticate(f"junk-{i}", "ipv4:10.0.0.66:5000"))
            for i in range(authn_module.REVIEW_THREADS)
        ]
        await asyncio.sleep(0.3)
        refused = [t for t in attacker if t.done()]
        assert len(refused) == len(attacker) - authn_module.REVIEWS_PER_PEER
        assert all(isinstance(t.exception(), AuthenticatorUnavailable) for t in refused)
        victim = asyncio.create_task(authn.authenticate("projected", "ipv6:[fd00::7]:4000"))
        await asyncio.sleep(0.3)
        assert not victim.done() and authn._busy == authn_module.REVIEWS_PER_PEER + 1  # being reviewed
    finally:
        kube.hang.set()
        await asyncio.gather(*attacker, victim, return_exceptions=True)
        kube.hang = None
        authn.close()


async def test_an_address_whose_tokens_keep_being_refused_is_not_reviewed_for_a_while(
    start_ca: StartCA, kube: FakeKubeAPI
) -> None:
    """Past 10 refused tokens in a burst (then one a second), an address's calls are refused with
    RESOURCE_EXHAUSTED (retried later) without a TokenReview: junk tokens cost the API server a
    bounded rate per address. A cached acceptance is not held up."""
    authn = KubernetesTokenAuthenticator(api_client(kube.url))
    ca = await start_ca(authenticator=authn)
    await ca.issue("projected", FRONTEND)  # accepted, cached
    codes = []
    for i in range(authn_module.REFUSALS_PER_PEER + 3):
        with pytest.raises(CAClientError) as info:
            await ca.issue(f"junk-{i}", FRONTEND)
        codes.append(info.value.code)
    assert (
        codes == [Status.UNAUTHENTICATED] * authn_module.REFUSALS_PER_PEER + [Status.RESOURCE_EXHAUSTED] * 3
    )
    assert len(kube.requests) == 1 + authn_module.REFUSALS_PER_PEER  # the last three cost no review
    await ca.issue("projected", FRONTEND)  # (a cached answer needs no review)
    await asyncio.sleep(authn_module.REFUSAL_REFILL_S * 1.1)  # one more refusal allowed
    with pytest.raises(CAClientError) as info:
        await ca.issue("junk-again", FRONTEND)
    assert info.value.code == Status.UNAUTHENTICATED


async def test_addresses_without_an_accepted_token_share_half_the_review_threads(kube: FakeKubeAPI) -> None:
    """Four addresses sending junk, two reviews in flight each, took all 8 threads while the API
    server was slow: every running workload's renewal failed. Addresses none of whose tokens was
    accepted lately share 4; a workload known by an accepted token still gets a review."""
    from ca.errors import AuthenticatorUnavailable

    authn = KubernetesTokenAuthenticator(api_client(kube.url), cache_for=dt.timedelta(0))
    known = "ipv4:10.0.0.9:4000"
    assert await authn.authenticate("projected", known) == FRONTEND  # (answered at once)
    kube.hang = threading.Event()
    tasks: list[asyncio.Task[WorkloadId]] = []
    try:
        tasks = [
            asyncio.create_task(authn.authenticate(f"junk-{a}-{i}", f"ipv4:10.0.1.{a}:5000"))
            for a in range(4)
            for i in range(3)
        ]
        await asyncio.sleep(0.3)
        assert authn._busy == authn_module.UNKNOWN_REVIEWS
        assert all(isinstance(t.exception(), AuthenticatorUnavailable) for t in tasks if t.done())
        renewal = asyncio.create_task(authn.authenticate("projected", known))
        newcomer = asyncio.create_task(authn.authenticate("projected", "ipv4:10.0.2.1:4000"))
        tasks += [renewal, newcomer]
        await asyncio.sleep(0.3)
        assert not renewal.done() and authn._busy == authn_module.UNKNOWN_REVIEWS + 1  # being reviewed
        assert isinstance(newcomer.exception(), AuthenticatorUnavailable)  # (retried later)
    finally:
        kube.hang.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        kube.hang = None
        authn.close()


def test_an_address_stays_known_for_the_longest_certificate_lifetime() -> None:
    """Renewals come at 40-50% of a certificate's life: with `--max-ttl 24h` (or a 4 h default TTL)
    a renewal came more than an hour after the last acceptance and counted as a stranger's, so junk
    senders could make it fail. An address is known for --max-ttl (at least an hour)."""
    long = KubernetesTokenAuthenticator(api_client("http://127.0.0.1:9"), known_for=dt.timedelta(hours=24))
    short = KubernetesTokenAuthenticator(api_client("http://127.0.0.1:9"), known_for=dt.timedelta(minutes=10))
    try:
        assert (long.known_for, short.known_for) == (24 * 3600, 3600)
    finally:
        long.close()
        short.close()
