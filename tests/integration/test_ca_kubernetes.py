"""The CA authenticating callers with TokenReview against an API server that speaks the real wire
format (the real `kubernetes` client code runs)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from ca.authn import KubernetesTokenAuthenticator
from sidemesh.identity.client import CAClientError
from sidemesh.spiffe import WorkloadId
from tests.integration.conftest import StartCA
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
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert message in info.value.message


async def test_api_server_that_does_not_confirm_the_audience_is_not_trusted(
    start_ca: StartCA, kube: FakeKubeAPI
) -> None:
    kube.omit_audiences = True
    ca = await start_ca(authenticator=KubernetesTokenAuthenticator(api_client(kube.url)))
    with pytest.raises(CAClientError) as info:
        await ca.issue("projected", FRONTEND)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "audience" in info.value.message


async def test_api_server_down_is_unavailable_and_retryable(start_ca: StartCA, kube: FakeKubeAPI) -> None:
    url = kube.url
    kube.close()
    ca = await start_ca(authenticator=KubernetesTokenAuthenticator(api_client(url)))
    with pytest.raises(CAClientError) as info:
        await ca.issue("projected", FRONTEND)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.retryable
    assert "retry later" in info.value.message
