"""Where each HTTP request goes, per direction (the :class:`proxy.http1.Router` of each side).

Inbound: authorize the request (source identity, port, method, path); denied -> a local 403 with
the reason; allowed -> a pooled keep-alive connection to the app.
Outbound: the destination is looked up again for every request (endpoint changes apply at once),
the balancer picks an endpoint, and the request goes over a pooled mTLS connection to that
endpoint's sidecar (or a pooled plain connection for an endpoint outside the mesh).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Literal

from proxy import h1, http1, pool
from proxy.balance import Lease, NoEndpoint
from proxy.headers import xfcc
from proxy.http1 import Context, Local, Router, Upstream
from proxy.observe import RequestInfo
from proxy.pipe import Pipe
from proxy.relay import Relay
from proxy.retry import Failure, RetryBudget, RoutePolicy, retryable
from sidemesh.mesh.compile import Destination, Endpoint
from sidemesh.policy.evaluate import evaluate
from sidemesh.policy.model import Decision, Peer, Request

if TYPE_CHECKING:
    from proxy.http2 import Denial
    from proxy.sidecar import Sidecar

log = logging.getLogger("sidemesh.proxy.http")
DECISIONS_KEPT = 64  # per inbound connection
MAX_NAMED = 64  # endpoints whose pool key and names an outbound connection keeps
_budgets: weakref.WeakKeyDictionary[Sidecar, dict[str, RetryBudget]] = weakref.WeakKeyDictionary()


def budget_of(sc: Sidecar, destination: str) -> RetryBudget:
    """One retry budget per destination service of a sidecar (as Linkerd's, per route)."""
    budgets = _budgets.setdefault(sc, {})
    budget = budgets.get(destination)
    if budget is None:
        budget = budgets[destination] = RetryBudget()
    return budget


NOT_TOLD = "denied by the workload's policy (callers outside the mesh are told no more; its sidecar logs why)"


def told(peer: Peer, trust_domain: str) -> str | None:
    """What a denied ``peer`` is told instead of the reason, None for the reason itself. The reason
    names policies and defaults: callers of the mesh (its trust domain) only get it; others
    (plaintext callers in permissive mode, another trust domain) do not, as Envoy's RBAC answers
    "access denied"; the log and the span keep the reason."""
    return None if peer.trust_domain == trust_domain else NOT_TOLD


class InboundRouter:
    def __init__(
        self,
        sc: Sidecar,
        peer: Peer,
        port: int,
        log_extra: dict[str, object],
        app: tuple[str, tuple[str, int] | None] | None = None,
        relay: Relay | None = None,
    ) -> None:
        """``app``: the app's address and the local address to connect from (``Sidecar.app_address``);
        ``relay``: the connection's, told how to decide again once a request switched it (101)."""
        self.sc = sc
        self.relay = relay
        self.peer = peer
        self.port = port
        self.app = app if app is not None else (sc.config.app_host, None)
        self.key = ("app", self.app[0], port)
        self.pool = pool.pool_of(sc)
        self.log_extra = log_extra
        self.told = told(peer, sc.config.trust_domain)
        # What the app is told of the caller (x-forwarded-client-cert), when it authenticated.
        source = log_extra.get("source")
        self.xfcc = (
            xfcc(str(sc.identity.spiffe_id), str(source))
            if peer.authenticated and source is not None
            else None
        )
        # Decisions already taken on this connection (same peer, same port), by (method, path),
        # for the configuration they were taken under: a keep-alive client repeats its requests.
        self._decisions: dict[tuple[str, str], Decision] = {}
        self._decided_under: object = None

    def authorize(self, method: str, path: str) -> Decision:
        if self.port in self.sc.proxy_ports:
            return Decision(False, f"port {self.port} is the proxy's own")
        mesh = self.sc.mesh_config()
        if mesh is not self._decided_under:  # a new configuration: decide everything again
            self._decisions.clear()
            self._decided_under = mesh
        key = (method, path)
        decision = self._decisions.get(key)
        if decision is None:
            request = Request(self.peer, self.port, method, path)
            decision = evaluate(mesh.policies, mesh.default_policy, request, self.sc.config.trust_domain)
            if len(self._decisions) >= DECISIONS_KEPT:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def decide(self, method: str, path: str) -> Decision:
        """Authorize one request, with its metric and log lines."""
        decision = self.authorize(method, path)
        if not decision.allowed or decision.audit:
            if not decision.allowed:
                self.sc.metrics.denials.labels(decision.policy or "default").inc()
            log.warning(
                "request denied" if not decision.allowed else "request allowed in audit mode",
                # (the path without its query, which may carry credentials: as the access log)
                extra={
                    **self.log_extra,
                    "method": method,
                    "path": path.split("?", 1)[0],
                    "reason": decision.reason,
                },
            )
        return decision

    def h2_verdict(self, method: str, path: str) -> Denial | tuple[str, str | None, bool]:
        decision = self.decide(method, path)
        if not decision.allowed:
            from proxy.http2 import Denial  # (loaded by serve_h2 by then)

            return Denial(403, decision.reason, decision.policy, told=self.told)
        return decision.reason, decision.policy, decision.audit

    def begin(self, info: RequestInfo) -> float | None:
        return None  # timeouts and retries are the caller's side's (outbound)

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        return False

    def may_reroute(self, attempt: int) -> bool:
        return False

    async def route(
        self, request: h1.Request, info: RequestInfo, avoid: Sequence[str] = ()
    ) -> Local | Upstream:
        decision = self.decide(info.method, info.path)
        if not decision.allowed:
            return Local(403, decision.reason, "deny", decision.policy, told=self.told)
        up = await self._connect()
        if isinstance(up, Local) and self.peer.authenticated:
            up.unprocessed = True  # (another sidecar: it sends the request elsewhere)
        if isinstance(up, Upstream):
            up.reason, up.policy, up.audit = decision.reason, decision.policy, decision.audit
            if self.relay is not None and request.upgrade:  # if switched (a WebSocket): spliced
                # bytes, decided again on a configuration change (no closure for other requests)
                relay, method, path = self.relay, info.method, info.path
                up.on_switch = lambda: setattr(
                    relay, "recheck", functools.partial(self.authorize, method, path)
                )
        elif decision.audit:  # (the app not reachable: still a request an audit policy would refuse)
            up.decision = "audit_deny"
        return up

    def route_now(self, request: h1.Request, method: str, path: str) -> Upstream | None:
        """For ``http1``'s lane: an allowed request (no audit to log) on an idle pooled
        connection, decided without a wait; else None and nothing done (``route`` decides)."""
        decision = self.authorize(method, path)
        if not decision.allowed or decision.audit:
            return None
        idle = self.pool.take(self.key)
        if idle is None:
            return None
        up = Upstream(idle[0], idle[1], True, self.key)
        up.reason, up.policy = decision.reason, decision.policy
        return up

    async def _connect(self, fresh: bool = False) -> Local | Upstream:
        idle = None if fresh else self.pool.take(self.key)
        if idle is not None:
            return Upstream(idle[0], idle[1], reused=True, key=self.key)
        try:
            pipe = await pool.connect_app(self.sc, self.port, *self.app)
        except pool.ConnectError as exc:
            return Local(502, "app not reachable", "allow", error=str(exc))
        self.pool.opened += 1
        return Upstream(pipe, h1.Connection(h1.CLIENT), reused=False, key=self.key)

    async def fresh(self, up: Upstream) -> Local | Upstream:
        new = await self._connect(fresh=True)
        if isinstance(new, Upstream):
            new.reason, new.policy, new.audit = up.reason, up.policy, up.audit
            new.on_switch = up.on_switch
        elif up.audit:
            new.decision = "audit_deny"
        return new

    def release(self, up: Upstream, reusable: bool, ok: bool | None, observe: bool = False) -> None:
        if reusable:
            self.pool.put(up.key, up.pipe, up.conn)
        else:
            up.pipe.close()
            up.conn.release()


class OutboundRouter:
    def __init__(self, sc: Sidecar, name: str, log_extra: dict[str, object]) -> None:
        self.sc = sc
        self.name = name  # the destination's name: looked up again for every request
        self.pool = pool.pool_of(sc)
        self.budget = budget_of(sc, name)
        self.log_extra = log_extra
        self._leases: dict[int, Lease] = {}
        self._policy = RoutePolicy()
        self._policy_of: Destination | None = None  # (the destination ``_policy`` was read from)
        # ``route_now``'s: the destination it looked up (``begin`` takes it, not looking up again),
        # and per endpoint its pool key and names, for the trust generation they were made under.
        self._dest_now: Destination | None = None
        self._named: dict[int, tuple[Endpoint, int, tuple[object, ...], str, str | None]] = {}

    def destination(self) -> Destination | None:
        return self.sc.mesh_config().lookup_name(self.name)

    def begin(self, info: RequestInfo) -> float | None:
        dest = self._dest_now
        if dest is None:
            dest = self.destination()
        else:
            self._dest_now = None
        if dest is not self._policy_of:  # (a new config's destination: its annotations read again)
            self._policy = RoutePolicy.of(dest) if dest is not None else RoutePolicy()
            self._policy_of = dest
        self.budget.deposit()
        return self._policy.timeout

    def may_retry(self, method: str, status: int | None, reset: bool, attempt: int) -> bool:
        error = Failure.RESET if reset else None
        return (
            attempt < self._policy.retries_for(error)
            and retryable(method, status, error, self._policy)
            and self.budget.try_withdraw()
        )

    def may_reroute(self, attempt: int) -> bool:
        return attempt < self._policy.retries_for(Failure.CONNECT) and self.budget.try_withdraw()

    async def route(
        self,
        request: h1.Request,
        info: RequestInfo,
        avoid: Sequence[str] = (),
        chosen: Lease | None = None,
    ) -> Local | Upstream:
        """An endpoint from the balancer and a connection to it; an endpoint that cannot be
        reached is tried elsewhere (nothing was sent), up to max(retries, CONNECT_RETRIES) times,
        as the HTTP/2 path (docs/sidecar.md's retry table); each from the retry budget.
        ``chosen``: the balancer's choice in ``route_now``, taken first (if still an endpoint)."""
        dest = self.destination()
        if chosen is not None and (dest is None or not any(e is chosen.endpoint for e in dest.endpoints)):
            chosen.cancel()  # (a new configuration meanwhile: chosen again)
            chosen = None
        if dest is None:
            return Local(503, f"{self.name} is no longer in the mesh", "allow", error="no endpoints")
        tried = [e for e in dest.endpoints if f"{e.address}:{e.port}" in avoid] if avoid else []
        failed: Local | None = None
        unreachable: list[Endpoint] = []  # (not the avoided: one that answered 503 may be tried again)
        retries = self._policy.retries_for(Failure.CONNECT)
        for attempt in range(retries + 1):
            if chosen is not None:
                lease, chosen = chosen, None
            else:
                try:
                    lease = self.sc.balancer.acquire(dest, avoid=tried)
                except NoEndpoint as exc:
                    return Local(503, str(exc), "allow", error="no endpoints")
            if failed is not None and lease.endpoint in unreachable:
                # With every endpoint avoided the balancer picks among them all: one that only
                # answered (a 503) is dialled again before giving up. None left: the same dial
                # would cost another connect timeout for the answer in hand (as the opaque path).
                lease.cancel()
                if all(e in unreachable for e in dest.endpoints):
                    return failed
                try:
                    lease = self.sc.balancer.acquire(dest, avoid=unreachable)
                except NoEndpoint as exc:
                    return Local(503, str(exc), "allow", error="no endpoints")
                if lease.endpoint in unreachable:
                    lease.cancel()
                    return failed
            try:
                up = await self._connect(lease.endpoint)
            except BaseException:  # the request's deadline passed while connecting
                lease.release(False)
                raise
            if isinstance(up, Upstream):
                self._leases[id(up)] = lease
                up.at_head = lease.mark_head
                return up
            lease.release(False)
            tried.append(lease.endpoint)
            unreachable.append(lease.endpoint)
            failed = up
            if attempt == retries or not self.budget.try_withdraw():
                return up
        raise AssertionError("unreachable")

    def route_now(self, request: h1.Request, method: str, path: str) -> Upstream | Lease | None:
        """For ``http1``'s lane: an endpoint from the balancer with an idle pooled connection to
        it, without a wait. Else the balancer's choice (its lease: ``route`` connects to it, the
        choice is not made again) or None (no endpoint: ``route`` answers)."""
        dest = self.destination()
        if dest is None or not dest.endpoints:
            return None
        lease = self.sc.balancer.acquire(dest)
        self._dest_now = dest  # (for ``begin``, next; on a miss ``route`` looks it up again)
        ep = lease.endpoint
        generation = self.sc.identity.generation
        named = self._named.get(id(ep))
        if named is None or named[0] is not ep or named[1] != generation:
            if len(self._named) >= MAX_NAMED:
                self._named.clear()
            address = f"{ep.address}:{ep.port}"
            named = (ep, generation, self._key(ep)[0], address, str(ep.identity) if ep.identity else None)
            self._named[id(ep)] = named  # (it holds ``ep``: the id is not another's meanwhile)
        idle = self.pool.take(named[2])
        if idle is None:
            return lease
        up = Upstream(idle[0], idle[1], True, named[2], named[3], named[4])
        self._leases[id(up)] = lease
        up.at_head = lease.mark_head
        return up

    def _key(self, ep: Endpoint) -> tuple[tuple[object, ...], tuple[str, int]]:
        """The pool's key for connections to ``ep``, and the address to dial."""
        sc = self.sc
        if ep.identity is None:
            return ("plain", ep.address, ep.port), (ep.address, ep.port)
        dial = (ep.address, ep.port) if sc.config.capture == "iptables" else (ep.address, sc.inbound_port)
        # (the identity's trust generation: a connection made under an older bundle is not taken
        # for a new request: it was made under the trust of its handshake)
        return ("mesh", dial, str(ep.identity), ep.port, sc.identity.generation), dial

    async def _connect(self, ep: Endpoint, fresh: bool = False) -> Local | Upstream:
        sc = self.sc
        key, dial = self._key(ep)
        endpoint, identity = f"{ep.address}:{ep.port}", str(ep.identity) if ep.identity else None
        idle = None if fresh else self.pool.take(key)
        if idle is not None:
            return Upstream(idle[0], idle[1], True, key, endpoint, identity)
        try:
            if ep.identity is None:
                pipe = await pool.connect_plain(sc, ep.address, ep.port)
            else:
                pipe = await pool.connect_sidecar(sc, ep, dial)
        except pool.ConnectError as exc:
            log.warning("upstream connection failed", extra={**self.log_extra, "reason": str(exc)})
            return Local(502, "upstream connection failed", "allow", error=str(exc))
        self.pool.opened += 1
        return Upstream(pipe, h1.Connection(h1.CLIENT), False, key, endpoint, identity)

    async def fresh(self, up: Upstream) -> Local | Upstream:
        lease = self._leases.pop(id(up), None)
        dest = self.destination()
        ep = lease.endpoint if lease is not None else None
        if ep is None and dest is not None:
            ep = next((e for e in dest.endpoints if f"{e.address}:{e.port}" == up.endpoint), None)
        if ep is None:
            if lease is not None:
                lease.release(False)
            return Local(503, f"{self.name}: endpoint {up.endpoint} is gone", "allow", error="no endpoints")
        try:
            new = await self._connect(ep, fresh=True)
        except BaseException:  # the request's deadline passed while connecting
            if lease is not None:
                lease.release(False)
            raise
        if lease is not None:
            if isinstance(new, Upstream):
                self._leases[id(new)] = lease
                new.at_head = lease.mark_head
            else:
                lease.release(False)
        return new

    def release(self, up: Upstream, reusable: bool, ok: bool | None, observe: bool = False) -> None:
        """``ok`` None: the caller gave up (``Lease.abandon``)."""
        lease = self._leases.pop(id(up), None)
        if lease is not None:
            if ok is None:
                lease.abandon(observe)
            else:
                lease.release(ok)
        if reusable:
            self.pool.put(up.key, up.pipe, up.conn)
        else:
            up.pipe.close()
            up.conn.release()


async def tracked(sc: Sidecar, relay: Relay, down: Pipe, what: str, work: Awaitable[None]) -> None:
    """Run ``work`` (serving one downstream connection) under its relay: linked for drain and the
    connection metrics (counted here as an allowed connection, its bytes at its end; each request
    is authorized on its own), reset if the relay fails, and ended with how it went."""
    relay.info["linked"] = True
    relay.pipes.append(down)
    sc.metrics.connections.labels(str(relay.info.get("direction")), "allow").inc()
    relay.on_fail = down.abort
    outcome = "closed"
    try:
        await work
    except Exception:
        log.exception(f"{what} connection failed", extra=relay.info)
        down.abort()
        outcome = "internal error"
    finally:
        relay.end(outcome)


async def serve_connection(sc: Sidecar, relay: Relay, down: Pipe, router: Router, ctx: Context) -> None:
    """Serve one HTTP connection; the relay tracks it for drain and the connection metrics."""
    await tracked(sc, relay, down, "HTTP", http1.serve(down, router, ctx))


def context(
    sc: Sidecar,
    direction: Literal["inbound", "outbound"],
    relay: Relay,
    source: str | None = None,
    service: str | None = None,
) -> Context:
    return Context(
        direction=direction,
        observer=sc.observer,
        idle_timeout=sc.config.idle_timeout.total_seconds(),
        # Inbound keep-alive connections close when idle once the sidecar drains (callers move to
        # other endpoints); the app's outbound ones stay usable while it finishes its work.
        draining=(lambda: sc.draining) if direction == "inbound" else (lambda: False),
        head_timeout=sc.config.request_head_timeout.total_seconds(),
        on_refused=lambda reason: sc.metrics.timed_out.labels(direction, reason).inc(),
        source=source,
        service=service,
        peer_address=str(relay.info.get("client")),
        log_extra=relay.info,
    )


async def serve_h2(sc: Sidecar, relay: Relay, down: Pipe, router: InboundRouter) -> None:
    """Serve one inbound HTTP/2 connection: each stream authorized, allowed ones to the app. (The
    HTTP/2 proxy is imported with the first such connection: see proxy.outbound.)"""
    from proxy.http2 import H2Proxy

    proxy = H2Proxy(
        down,
        router.h2_verdict,
        lambda: pool.connect_app(sc, router.port, *router.app),
        sc.observer.start,
        relay.info,
        reset_guard=not router.peer.authenticated,  # another sidecar's resets are its app's cancels
        xfcc=router.xfcc,
        drain_started=sc.drain_started.wait,
    )
    await tracked(
        sc, relay, down, "HTTP/2", proxy.run(sc.config.idle_timeout.total_seconds(), lambda: sc.draining)
    )
