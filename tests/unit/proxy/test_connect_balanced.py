"""Opaque TCP's endpoint choice when a connect fails (proxy/outbound.py _connect_balanced)."""

from __future__ import annotations

import types

import pytest

from proxy import outbound
from proxy.balance import Balancer
from proxy.relay import Relay
from proxy.retry import RoutePolicy
from sidemesh.mesh.compile import Destination, Endpoint

A = Endpoint("10.0.0.1", 80, None, "shop/a")
B = Endpoint("10.0.0.2", 80, None, "shop/b")


async def test_an_unreachable_endpoint_is_not_dialled_again_when_the_others_are_ejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With A ejected, the balancer handed B (black-holed) to every retry: three connect timeouts
    for one connection. Now B is tried once, and its lease for the retry is given back unreported."""
    balancer = Balancer()
    for _ in range(10):  # A refused enough connections to be ejected
        balancer.acquire(Destination("a", (A,))).release(False)
    dials: list[tuple[str, int]] = []

    async def plain(sc: object, relay: object, dial: tuple[str, int]) -> None:
        dials.append(dial)
        raise outbound.Refused(f"cannot connect to {dial[0]}:{dial[1]}: timed out")

    monkeypatch.setattr(outbound, "_connect_plain", plain)
    sidecar = types.SimpleNamespace(balancer=balancer)
    with pytest.raises(outbound.Refused, match="timed out"):
        await outbound._connect_balanced(sidecar, Relay(on_close=None), Destination("x.shop:80", (A, B)))  # type: ignore[arg-type]
    assert dials == [("10.0.0.2", 80)]
    state = balancer._state_of(B, Destination("x.shop:80", (A, B)), balancer.clock())
    assert state.outstanding == 0


async def test_an_endpoint_avoided_for_its_answer_is_tried_again_when_the_other_cannot_be_reached() -> None:
    """An HTTP retry avoids A (it answered 503, slowly); B cannot be reached. With both avoided the
    balancer picks the lighter, B (A's slow failure weighs more): it was given up as "no other
    endpoint" with B's 502. Avoided is not unreachable: A is dialled."""
    from proxy import http1
    from proxy.routers import OutboundRouter

    now = [0.0]
    balancer = Balancer(clock=lambda: now[0])
    dest = Destination("cart.shop:80", (A, B))
    for ep in (A, B):  # both known fast
        balancer.acquire(Destination("cart.shop:80", (ep,))).release(True, latency=0.001)
    slow = balancer.acquire(Destination("cart.shop:80", (A,)))
    now[0] += 1.0
    slow.release(False)  # A's 503, after a second
    router = OutboundRouter.__new__(OutboundRouter)
    router.sc = types.SimpleNamespace(  # type: ignore[assignment]
        balancer=balancer, mesh_config=lambda: types.SimpleNamespace(lookup_name=lambda name: dest)
    )
    router.name, router._leases = dest.name, {}
    router._policy = RoutePolicy()
    router.budget = types.SimpleNamespace(try_withdraw=lambda: True)  # type: ignore[assignment]
    dials: list[Endpoint] = []

    async def connect(endpoint: Endpoint, fresh: bool = False) -> http1.Local | http1.Upstream:
        dials.append(endpoint)
        if endpoint is B:
            return http1.Local(502, "upstream connection failed", "allow")
        return http1.Upstream(None, None, False, endpoint="10.0.0.1:80")  # type: ignore[arg-type]

    router._connect = connect  # type: ignore[method-assign]
    up = await router.route(None, None, avoid=["10.0.0.1:80"])  # type: ignore[arg-type]
    assert isinstance(up, http1.Upstream) and up.endpoint == "10.0.0.1:80" and dials == [B, A], dials


async def test_http11_tries_as_many_endpoints_as_the_service_allows_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sidemesh.io/retries 5, five endpoints refusing connections and one healthy: HTTP/1.1 gave up
    after three dials (CONNECT_RETRIES) with a 502 where HTTP/2 went on, as the retry table says
    (connection failures: max(retries, 2)); nothing had been sent, so it is safe for any method."""
    from proxy import http1, pool
    from proxy.routers import OutboundRouter

    eps = tuple(Endpoint(f"10.0.0.{i}", 8080, None) for i in range(1, 7))
    dest = Destination("cart.shop:80", eps, retries=5)

    class _Sidecar:  # (the pools and budgets are kept per sidecar, by weak reference)
        balancer = Balancer()
        config = types.SimpleNamespace(capture="iptables")

        def mesh_config(self) -> object:
            return types.SimpleNamespace(lookup_name=lambda name: dest)

    sc = _Sidecar()
    dials: list[str] = []

    async def plain(sc: object, host: str, port: int) -> object:
        dials.append(host)
        if host != "10.0.0.6":
            raise pool.ConnectError(f"cannot connect to {host}:{port}: refused")
        return types.SimpleNamespace()

    monkeypatch.setattr(pool, "connect_plain", plain)
    for _ in range(20):  # whatever order the balancer picks them in
        dials.clear()
        router = OutboundRouter(sc, dest.name, {})  # type: ignore[arg-type]
        router.begin(None)  # type: ignore[arg-type]
        up = await router.route(None, None)  # type: ignore[arg-type]
        assert isinstance(up, http1.Upstream) and dials[-1] == "10.0.0.6", (up, dials)


def test_grpc_too_tries_an_endpoint_avoided_for_its_answer_when_the_other_cannot_be_reached() -> None:
    """The same for a gRPC call (h2route): A answered UNAVAILABLE slowly, B refused the connection;
    the balancer's pick among both avoided was B, and the call got UNAVAILABLE with A untried."""
    from proxy import h2route
    from proxy.http2 import Denial, Target

    now = [0.0]
    balancer = Balancer(clock=lambda: now[0])
    dest = Destination("cart.shop:80", (A, B))
    for ep in (A, B):
        balancer.acquire(Destination("cart.shop:80", (ep,))).release(True, latency=0.001)
    slow_a = balancer.acquire(Destination("cart.shop:80", (A,)))
    now[0] += 1.0
    slow_a.release(False)
    refused_b = balancer.acquire(Destination("cart.shop:80", (B,)))
    refused_b.release(False)
    router = h2route.OutboundStreams.__new__(h2route.OutboundStreams)
    router.sc = types.SimpleNamespace(  # type: ignore[assignment]
        balancer=balancer,
        mesh_config=lambda: types.SimpleNamespace(lookup_name=lambda name: dest),
        config=types.SimpleNamespace(capture="none"),
        inbound_port=15006,
    )
    router.name = dest.name
    tried = [Target("a", None, ticket=slow_a), Target("b", None, ticket=refused_b, refused=True)]  # type: ignore[arg-type]
    target = router.route(None, tried)  # type: ignore[arg-type]
    assert not isinstance(target, Denial) and target.endpoint == "10.0.0.1:80", target


def test_a_services_timeout_and_retries_follow_the_configuration_request_by_request() -> None:
    """``OutboundRouter.begin`` reads the route's policy (sidemesh.io/timeout, retries) once per
    destination it sees, not once per request: a keep-alive connection's next request after a
    configuration change has the new annotations, and the one before it kept the old."""
    from proxy.routers import OutboundRouter

    current: list[Destination | None] = [Destination("cart.shop:80", (A,), timeout_s=0.5, retries=1)]

    class _Sidecar:
        balancer = Balancer()
        config = types.SimpleNamespace(capture="iptables")

        def mesh_config(self) -> object:
            return types.SimpleNamespace(lookup_name=lambda name: current[0])

    router = OutboundRouter(_Sidecar(), "cart.shop:80", {})  # type: ignore[arg-type]
    assert router.begin(None) == 0.5 and router.may_retry("GET", 503, False, 0)  # type: ignore[arg-type]
    first = router._policy
    assert router.begin(None) == 0.5 and router._policy is first  # type: ignore[arg-type]  # (kept)
    current[0] = Destination("cart.shop:80", (A,), timeout_s=2.0, retries=0)  # a new configuration
    assert router.begin(None) == 2.0 and not router.may_retry("GET", 503, False, 0)  # type: ignore[arg-type]
    current[0] = None  # (the Service is gone: no timeout, no retries)
    assert router.begin(None) is None and not router.may_retry("GET", 503, False, 0)  # type: ignore[arg-type]


async def test_an_endpoints_pool_key_follows_the_trust_generation_on_a_kept_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``OutboundRouter._connect``'s pool key carries the trust generation: after the bundle
    changed, the same connection's next request takes a new key, so a connection made under the old
    trust is not taken. The key, the address dialled and the names are those of the endpoint asked
    for."""
    from proxy import http1, pool
    from proxy.routers import OutboundRouter
    from sidemesh.spiffe import SpiffeId

    cart = Endpoint("10.0.0.7", 8080, SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart"))
    plain = Endpoint("10.0.0.8", 80, None)

    class _Sidecar:
        balancer = Balancer()
        config = types.SimpleNamespace(capture="iptables")
        identity = types.SimpleNamespace(generation=1)

    sc = _Sidecar()
    dialled: list[tuple[str, int]] = []

    async def sidecar(sc: object, ep: Endpoint, dial: tuple[str, int]) -> object:
        dialled.append(dial)
        return types.SimpleNamespace()

    async def plain_connect(sc: object, host: str, port: int) -> object:
        dialled.append((host, port))
        return types.SimpleNamespace()

    monkeypatch.setattr(pool, "connect_sidecar", sidecar)
    monkeypatch.setattr(pool, "connect_plain", plain_connect)
    router = OutboundRouter(sc, "cart.shop:8080", {})  # type: ignore[arg-type]
    first = await router._connect(cart)
    again = await router._connect(cart)
    other = await router._connect(plain)
    sc.identity.generation = 2
    renewed = await router._connect(cart)
    assert all(isinstance(up, http1.Upstream) for up in (first, again, other, renewed))
    assert isinstance(first, http1.Upstream) and isinstance(again, http1.Upstream)
    assert isinstance(other, http1.Upstream) and isinstance(renewed, http1.Upstream)
    assert first.key == again.key == ("mesh", ("10.0.0.7", 8080), str(cart.identity), 8080, 1)
    assert renewed.key == ("mesh", ("10.0.0.7", 8080), str(cart.identity), 8080, 2)
    assert other.key == ("plain", "10.0.0.8", 80) and other.destination is None
    assert (first.endpoint, first.destination) == ("10.0.0.7:8080", str(cart.identity))
    assert dialled == [("10.0.0.7", 8080)] * 2 + [("10.0.0.8", 80)] + [("10.0.0.7", 8080)]


async def test_the_lanes_choice_of_endpoint_is_the_one_connected_to() -> None:
    """``route_now`` (the HTTP/1.1 lane's) finds no idle connection to the balancer's choice: it
    gives the choice back for ``route``, which connects to that endpoint (drawn again, an endpoint
    with no pooled connection yet got about p squared of the requests, not p). A choice the
    configuration dropped meanwhile is given up (its lease cancelled) and drawn again."""
    from proxy import http1
    from proxy.balance import Lease
    from proxy.routers import OutboundRouter

    balancer = Balancer()
    dest = Destination("cart.shop:80", (A, B))
    config = types.SimpleNamespace(lookup_name=lambda name: dest)
    router = OutboundRouter.__new__(OutboundRouter)
    router.sc = types.SimpleNamespace(  # type: ignore[assignment]
        balancer=balancer, mesh_config=lambda: config, identity=types.SimpleNamespace(generation=0)
    )
    router.name, router._leases, router._named, router._dest_now = dest.name, {}, {}, None
    router._policy = RoutePolicy()
    router.pool = types.SimpleNamespace(take=lambda key: None)  # type: ignore[assignment]
    dials: list[Endpoint] = []

    async def connect(endpoint: Endpoint, fresh: bool = False) -> http1.Local | http1.Upstream:
        dials.append(endpoint)
        pipe = types.SimpleNamespace(close=lambda: None)
        conn = types.SimpleNamespace(release=lambda: None)
        return http1.Upstream(pipe, conn, False, endpoint=f"{endpoint.address}:80")  # type: ignore[arg-type]

    router._connect = connect  # type: ignore[method-assign]
    for _ in range(40):
        chosen = router.route_now(None, "GET", "/")  # type: ignore[arg-type]
        assert isinstance(chosen, Lease)
        up = await router.route(None, None, chosen=chosen)  # type: ignore[arg-type]
        assert isinstance(up, http1.Upstream) and dials[-1] is chosen.endpoint
        router.release(up, False, True)
    assert len(dials) == 40 and balancer._acquired == 40
    chosen = router.route_now(None, "GET", "/")  # type: ignore[arg-type]
    assert isinstance(chosen, Lease)
    other = B if chosen.endpoint is A else A
    dest = Destination("cart.shop:80", (other,))  # (the chosen endpoint is gone)
    up = await router.route(None, None, chosen=chosen)  # type: ignore[arg-type]
    assert isinstance(up, http1.Upstream) and dials[-1] is other and chosen.released
    for ep in (A, B):
        assert balancer._state_of(ep, dest, balancer.clock()).outstanding == (ep is other)


def test_the_lanes_pool_key_follows_the_trust_generation() -> None:
    """``route_now`` keeps an endpoint's pool key and names per connection; a new trust bundle
    (its generation) makes a new key, so a connection made under the older trust is not taken."""
    from proxy.balance import Lease
    from proxy.routers import OutboundRouter
    from sidemesh.spiffe import SpiffeId

    cart = Endpoint("10.0.0.7", 8080, SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart"))
    dest = Destination("cart.shop:80", (cart,))
    identity = types.SimpleNamespace(generation=0)
    router = OutboundRouter.__new__(OutboundRouter)
    router.sc = types.SimpleNamespace(  # type: ignore[assignment]
        balancer=Balancer(),
        mesh_config=lambda: types.SimpleNamespace(lookup_name=lambda name: dest),
        identity=identity,
        config=types.SimpleNamespace(capture="none"),
        inbound_port=15006,
    )
    router.name, router._leases, router._named, router._dest_now = dest.name, {}, {}, None
    keys: list[object] = []
    router.pool = types.SimpleNamespace(take=lambda key: keys.append(key))  # type: ignore[assignment]
    for generation in (0, 0, 1):
        identity.generation = generation
        chosen = router.route_now(None, "GET", "/")  # type: ignore[arg-type]
        assert isinstance(chosen, Lease)
        chosen.cancel()
    spiffe = "spiffe://cluster.local/ns/shop/sa/cart"
    assert keys == [("mesh", ("10.0.0.7", 15006), spiffe, 8080, g) for g in (0, 0, 1)]


def test_begin_takes_the_destination_route_now_looked_up_once() -> None:
    """The lane's ``route_now`` looks the destination up and ``begin`` reads the route's policy
    from it (one lookup per request); a request that comes without ``route_now`` looks it up."""
    from proxy.routers import OutboundRouter

    first = Destination("cart.shop:80", (A,))
    second = Destination("cart.shop:80", (A,), timeout_s=2.0)
    current = [first]
    router = OutboundRouter.__new__(OutboundRouter)
    router.sc = types.SimpleNamespace(  # type: ignore[assignment]
        balancer=Balancer(),
        mesh_config=lambda: types.SimpleNamespace(lookup_name=lambda name: current[0]),
        identity=types.SimpleNamespace(generation=0),
    )
    router.name, router._leases, router._named, router._dest_now = first.name, {}, {}, None
    router._policy, router._policy_of = RoutePolicy(), None
    router.budget = types.SimpleNamespace(deposit=lambda: None)  # type: ignore[assignment]
    router.pool = types.SimpleNamespace(take=lambda key: None)  # type: ignore[assignment]
    router.route_now(None, "GET", "/").cancel()  # type: ignore[arg-type,union-attr]
    current[0] = second  # (a new configuration between the two)
    assert router.begin(None) is None and router._policy_of is first  # type: ignore[arg-type]
    assert router.begin(None) == 2.0 and router._policy_of is second  # type: ignore[arg-type]
