"""The request's way: canonical path, price, authenticate, charge, forward, refund.

A request is charged before it is forwarded, and refunded when the backend could not
answer (connection error, timeout, a configured 5xx, a body cut short), so customers never
pay for our failures and nobody reaches a route without paying for it first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, final
from urllib.parse import urlsplit

from config.model import Config
from gateway import headers as hdr
from gateway import metrics
from gateway.auth import TokenVerifier
from gateway.claims import Claims
from gateway.errors import AuthError, BadPath, ClientGone, QuotaStoreUnavailable, bearer_challenge
from gateway.failopen import FailOpenLedger
from gateway.front import Request
from gateway.headers import UnsafeHeader
from gateway.quota import Decision, Reason
from gateway.redis_quota import RedisQuotaStore
from gateway.routing import MethodNotAllowed, PricedRoute, RouteTable, canonicalize
from gateway.upstream import (
    BodyCut,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

# Bodies up to this size are read whole: the request leaves with its head in one write,
# and the answer goes to the client in one write.
_SMALL = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
_CANONICAL_CACHE = 4096
_CANONICAL_TARGET_MAX = 256
_ACCOUNT = hdr.ACCOUNT.encode()
_ROLE_ADMIN = hdr.header_line(hdr.ROLE.encode(), "admin")
_TIER = hdr.TIER.encode()
_UNITS = hdr.UNITS.encode()
_HEADER_LINE_CACHE = 10_000
_DENIAL = {
    Reason.QUOTA_EXHAUSTED: (429, "quota_exceeded"),
    Reason.OVERAGE_CAP: (429, "overage_cap_reached"),
    Reason.RATE_LIMITED: (429, "rate_limited"),
    Reason.TIER_NOT_ALLOWED: (403, "tier_not_allowed"),
}


class _BodyTooLarge(Exception):
    pass


class _ClientStalled(Exception):
    """The client's request body made no progress within the client timeout."""


class _Body:
    """The request body as it arrives, held to the route's limit.

    An async iterator class, not an async generator: mypyc compiles this module
    (gateway/compiled.py) and does not compile async generators.
    """

    __slots__ = ("_limit", "_request", "_seen", "_timeout")

    def __init__(self, request: Request, limit: int, timeout: float) -> None:
        self._request = request
        self._limit = limit
        self._timeout = timeout
        self._seen = 0

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        # An idle deadline per read, not one for the whole body: a large upload that keeps
        # moving may take as long as it needs.
        try:
            async with asyncio.timeout(self._timeout):
                chunk = await self._request.readany()
        except TimeoutError:
            raise _ClientStalled from None
        if not chunk:
            raise StopAsyncIteration
        self._seen += len(chunk)
        if self._seen > self._limit:
            raise _BodyTooLarge
        return chunk


class Proxy:
    def __init__(
        self,
        config: Config,
        verifier: TokenVerifier,
        # The class, not a protocol: both modules are compiled, so the charge on every
        # metered request is a native call rather than a method looked up by name.
        store: RedisQuotaStore | None,
        pools: dict[str, UpstreamPool],
        *,
        failopen: FailOpenLedger | None = None,
        clock: Callable[[], float] = time.time,
        reserved: Iterable[str] = (),
    ) -> None:
        self._config = config
        # Paths the server answers itself on some methods (/healthz): never on the fast path.
        self._reserved = frozenset(reserved)
        self._table = RouteTable(config)
        self._verifier = verifier
        self._tokens = verifier.tokens
        self._store = store if config.metering.enabled else None
        self._pools = pools
        self._failopen = failopen
        self._clock = clock
        self._refund_statuses = frozenset(config.metering.refund_statuses)
        self._client_timeout = config.limits.client_body_timeout_seconds
        self._route_metrics = {r.name: metrics.RouteMetrics(r.name) for r in self._table.routes}
        self._unmatched = metrics.RouteMetrics("(unmatched)")
        self._upstream_prefixes = {
            n: (urlsplit(u.url).path or "").rstrip("/") for n, u in config.upstreams.items()
        }
        self._upgrade = _upgrade_hints(config)
        # Raw target -> (canonical path, query): clients repeat the same few targets.
        self._canonical: dict[str, tuple[str, str]] = {}
        # The X-Metergate-* lines by account, tier and cost, encoded and checked once.
        self._header_lines: dict[str, bytes] = {}
        self._tier_lines: dict[str, bytes] = {}
        # The RateLimit-Policy line by tier, made again when its quota or window differs
        # (another period length, or the second turning between the charge and the answer).
        self._policy_lines: dict[str, tuple[int, int, bytes]] = {}
        self._units_lines = {
            r.cost: hdr.header_line(_UNITS, str(r.cost)) for r in self._table.routes
        }

    async def handle(self, request: Request) -> None:
        started = time.perf_counter()
        target = request.raw_path
        canonical = self._canonical.get(target)
        cached = canonical is not None
        if canonical is None:
            try:
                canonical = canonicalize(target)
            except BadPath as exc:
                return self._error(request, self._unmatched, started, 400, "bad_path", str(exc))
        path, query = canonical
        match = self._table.match(request.method, path)
        if (
            not cached
            and len(target) <= _CANONICAL_TARGET_MAX
            and isinstance(match, PricedRoute)
            and target.partition("?")[0] not in self._reserved
        ):
            # Only short targets of real routes: a flood of long or unknown ones must not
            # fill memory (4096 x 8 KB) or push the useful ones out. Only these are taken
            # by admit(), so never one the server may answer itself.
            if len(self._canonical) >= _CANONICAL_CACHE:
                self._canonical.clear()
            self._canonical[target] = canonical
        if match is None:
            return self._error(
                request, self._unmatched, started, 404, "route_not_found", f"no route for {path}"
            )
        if isinstance(match, MethodNotAllowed):
            return self._error(
                request,
                self._unmatched,
                started,
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {path}",
                headers={"Allow": ", ".join(match.allowed)},
            )
        route = match
        rm = self._route_metrics[route.name]
        length = request.content_length
        if length is not None and length > route.max_body:
            metrics.DENIALS.labels("body_too_large").inc()
            message = f"request body over {route.max_body} bytes"
            return self._error(request, rm, started, 413, "body_too_large", message)

        claims: Claims | None = None
        authorization = request.authorization
        if len(authorization) > 1:
            # Which one counts would be up to whoever reads it next: the gateway might
            # charge one account while a backend that reads the other serves another.
            return self._unauthorized(
                request, rm, started, AuthError("more than one Authorization header")
            )
        if not route.public:
            header = authorization[0] if authorization else None
            claims = self._tokens.for_header(header)
            if claims is None:
                try:
                    claims = await self._verifier.verify_header(header)
                except AuthError as exc:
                    return self._unauthorized(request, rm, started, exc)

        # A free route restricted to some tiers still asks the store: the plan, and so the
        # tier, lives in Redis.
        if claims is not None and (route.cost or route.tiers) and self._store is not None:
            outcome: Decision | BaseException
            try:
                outcome = await self._store.charge(
                    claims.sub, route.name, route.cost, route.allowed_tiers
                )
            except QuotaStoreUnavailable as exc:
                outcome = exc
            # Awaited after the try: compiled code must not suspend in an except block.
            return await self._charged(request, route, path, query, claims, started, outcome)
        if route.tiers:
            # Never reached with a valid config (tiers need metering, public routes have no
            # tiers), but a route for some tiers is never served without knowing the tier.
            return self._metering_unavailable(request, rm, started)

        await self._forward(request, route, path, query, claims, None, rm, started, None)

    @property
    def admits(self) -> bool:
        """Whether admit() can take requests: they are charged, on the raw pipeline."""
        return self._store is not None and self._store.takes_waiters

    def admit(self, request: Request) -> bool:
        """The fast path of a metered request (gateway.front's ``admit``): when its target,
        route and token are known from earlier requests, it is charged at once, and its
        task is made only as the charge's decision is read (an _Admission), where handle()
        would make a task, await a future and take one more pass of the loop to wake up.
        Anything else (False) goes through handle(), which answers every refusal."""
        store = self._store
        if store is None:
            return False
        canonical = self._canonical.get(request.raw_path)
        if canonical is None:  # only targets of priced routes are kept there
            return False
        path, query = canonical
        route = self._table.match(request.method, path)
        if not isinstance(route, PricedRoute) or route.public or not (route.cost or route.tiers):
            return False
        length = request.content_length
        if length is not None and length > route.max_body:
            return False
        authorization = request.authorization
        if len(authorization) != 1:
            return False
        claims = self._tokens.for_header(authorization[0])
        if claims is None:
            return False
        admission = _Admission(self, request, route, path, query, claims, time.perf_counter())
        return store.charge_to(admission, claims.sub, route.name, route.cost, route.allowed_tiers)

    async def _charged(
        self,
        request: Request,
        route: PricedRoute,
        path: str,
        query: str,
        claims: Claims,
        started: float,
        outcome: Decision | BaseException,
    ) -> None:
        """Go on with a request once its charge is decided: forward it, or refuse it."""
        rm = self._route_metrics[route.name]
        receipt: int | None = None  # a fail-open record's
        decision: Decision | None = None
        if isinstance(outcome, QuotaStoreUnavailable):
            metrics.REDIS_ERRORS.labels("charge").inc()
            # Failing open cannot serve a tier-restricted route: the tier is unknown.
            if self._failopen is None or route.tiers:
                log.debug("refusing %s %s: %s", request.method, path, outcome)
                return self._metering_unavailable(request, rm, started)
            receipt = self._failopen.record(claims.sub, route.name, route.cost)
        elif isinstance(outcome, Decision):
            decision = outcome
            if not decision.allowed:
                return self._denied(request, rm, started, decision)
            if route.cost:
                rm.charged(decision.tier, route.cost)
        else:
            raise outcome  # not the store's error: the front answers 500 and logs it
        await self._forward(request, route, path, query, claims, decision, rm, started, receipt)

    def _identity_lines(
        self, claims: Claims | None, decision: Decision | None, route: PricedRoute
    ) -> bytes:
        """The trusted X-Metergate-* lines for the backend; UnsafeHeader on a line break."""
        if claims is None:
            return b""
        lines = self._header_lines
        account = lines.get(claims.sub)
        if account is None:
            if len(lines) >= _HEADER_LINE_CACHE:
                lines.clear()
            account = lines[claims.sub] = hdr.header_line(_ACCOUNT, claims.sub)
        if claims.is_admin:
            account += _ROLE_ADMIN
        if decision is None:
            return account
        tier = self._tier_lines.get(decision.tier)
        if tier is None:
            tier = self._tier_lines[decision.tier] = hdr.header_line(_TIER, decision.tier)
        return account + tier + self._units_lines[route.cost]

    def _error(
        self,
        request: Request,
        rm: metrics.RouteMetrics,
        started: float,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        request.error(status, code, message, headers=headers, details=details)
        self._observe(rm, status, started)

    @staticmethod
    def _observe(rm: metrics.RouteMetrics, status: int, started: float) -> None:
        rm.answered(status, time.perf_counter() - started)

    def _unauthorized(
        self, request: Request, rm: metrics.RouteMetrics, started: float, exc: AuthError
    ) -> None:
        metrics.DENIALS.labels("unauthorized").inc()
        code, challenge = bearer_challenge(exc)
        headers = {"WWW-Authenticate": challenge}
        self._error(request, rm, started, 401, code, str(exc), headers=headers)

    def _metering_unavailable(
        self, request: Request, rm: metrics.RouteMetrics, started: float
    ) -> None:
        metrics.DENIALS.labels("metering_unavailable").inc()
        message = "usage metering is temporarily unavailable; retry shortly"
        headers = {"Retry-After": "1"}
        self._error(request, rm, started, 503, "metering_unavailable", message, headers=headers)

    def _denied(
        self, request: Request, rm: metrics.RouteMetrics, started: float, decision: Decision
    ) -> None:
        status, code = _DENIAL[decision.reason]
        metrics.DENIALS.labels(code).inc()
        details: dict[str, object] = {
            "tier": decision.tier,
            "limit": decision.included,
            "used": decision.used,
            "reset_seconds": decision.reset_seconds,
        }
        headers = _ratelimit_headers(decision, self._clock())
        if decision.reason is Reason.RATE_LIMITED:
            message = "too many requests per second for this tier"
            retry_after = max(1, -(-decision.retry_after_ms // 1000))
        else:
            message = {
                Reason.QUOTA_EXHAUSTED: "the units included in this tier are used up",
                Reason.OVERAGE_CAP: "the overage spend limit of this tier is reached",
                Reason.TIER_NOT_ALLOWED: "this route is not available on this tier",
            }[decision.reason]
            retry_after = max(1, decision.reset_seconds)
            hint = self._upgrade.get(decision.tier)
            if hint:
                details["upgrade"] = hint
        if status == 429:
            headers["Retry-After"] = str(retry_after)
        self._error(request, rm, started, status, code, message, headers=headers, details=details)

    async def _forward(
        self,
        request: Request,
        route: PricedRoute,
        path: str,
        query: str,
        claims: Claims | None,
        decision: Decision | None,
        rm: metrics.RouteMetrics,
        started: float,
        receipt: int | None,
    ) -> None:
        upstream = route.upstream
        target = (
            self._upstream_prefixes[route.upstream_name] + path + ("?" + query if query else "")
        )
        refunded = False

        async def refund(kind: str) -> None:
            nonlocal refunded
            if refunded or claims is None or not route.cost:
                return
            if decision is not None:
                refunded = True
                # Shielded: a shutdown that cancels the request mid-refund must not stop it.
                await asyncio.shield(self._refund(claims.sub, route, decision, rm, kind))
            elif receipt is not None and self._failopen is not None:
                # Let through unmetered, then not served: out of what is to be reconciled.
                refunded = True
                self._failopen.unrecord(claims.sub, route.name, route.cost, receipt)

        data: bytes | AsyncIterator[bytes] | None = None
        streamed_length: int | None = None
        failed: BaseException | None = None
        try:
            out_head = hdr.upstream_request_head(
                request.raw_headers,
                keep_authorization=upstream.forward_authorization,
                client_ip=request.remote.encode() if request.remote else None,
                scheme=request.scheme,
                host=request.host,
                added=self._identity_lines(claims, decision, route),
            )
            if request.body_exists:
                # Invite the body only now, once the request is authenticated and paid
                # for: a refused request never has its upload sent.
                request.send_continue()
                length = request.content_length
                if (length is not None and length <= _SMALL) or route.max_body <= _SMALL:
                    # Read whole before a backend connection is taken: a slow upload
                    # holds none. A chunked one is held to the route's limit as it comes.
                    parts = []
                    try:
                        async with asyncio.timeout(self._client_timeout):
                            async for chunk in _Body(request, route.max_body, self._client_timeout):
                                parts.append(chunk)
                    except TimeoutError:
                        raise _ClientStalled from None
                    data = b"".join(parts)
                else:
                    data = _Body(request, route.max_body, self._client_timeout)
                    streamed_length = length
            upstream_resp = await self._pools[route.upstream_name].request(
                request.method, target, out_head, data, length=streamed_length
            )
        except (
            asyncio.CancelledError,
            UpstreamError,
            UnsafeHeader,
            _BodyTooLarge,
            _ClientStalled,
            ClientGone,
        ) as caught:
            # Answered below, not in the except block: compiled code must not suspend in one
            # (gateway/compiled.py).
            failed = caught
        if failed is not None:
            exc = failed
            if isinstance(exc, asyncio.CancelledError):
                # Shutdown past its grace period cancels the request unserved: it does not
                # pay (refund shields its Redis call from a second cancel).
                await refund("cancelled")
                raise exc
            if isinstance(exc, (_ClientStalled, ClientGone)):
                # A stalled upload (the pool discarded the backend connection it held, never
                # to be reused mid-request), or one that broke off: the client is not
                # served, so it does not pay, and its connection is dropped, its body
                # being half read.
                request.hang_up()
                if isinstance(exc, ClientGone):
                    await refund("client_gone")
                    message = "the request body broke off"
                    return self._error(request, rm, started, 400, "bad_request", message)
                await refund("client_timeout")
                message = "the request body did not arrive in time"
                return self._error(request, rm, started, 408, "request_timeout", message)
            if isinstance(exc, _BodyTooLarge):
                status, code, message, kind = 413, "body_too_large", "request body too large", ""
            elif isinstance(exc, UpstreamTimeout):
                status, code, kind = 504, "upstream_timeout", "timeout"
                message = "the backend did not answer in time"
            else:
                status, code, kind = 502, "upstream_unavailable", "connect"
                message = "the backend could not be reached"
                log.warning("upstream %s failed: %r", route.upstream_name, exc)
            if kind:
                metrics.UPSTREAM_ERRORS.labels(route.upstream_name, kind).inc()
            await refund(kind or "body_too_large")
            return self._error(request, rm, started, status, code, message)

        cancelled: asyncio.CancelledError | None = None
        try:
            if upstream_resp.status in self._refund_statuses:
                metrics.UPSTREAM_ERRORS.labels(route.upstream_name, str(upstream_resp.status)).inc()
                await refund(str(upstream_resp.status))
            await self._relay(request, upstream_resp, decision, rm, started, refund)
        except asyncio.CancelledError as exc:
            cancelled = exc
        finally:
            upstream_resp.release()
        if cancelled is not None:
            if not request.finished:  # cut off mid-answer, as when the backend breaks off
                await refund("cancelled")
            raise cancelled

    def _ratelimit_lines(self, decision: Decision, now: float) -> bytes:
        """The two fields as header lines, for the backend's answer."""
        quota, window, remaining, reset = _ratelimit_numbers(decision, now)
        known = self._policy_lines.get(decision.tier)
        if known is None or known[0] != quota or known[1] != window:
            line = f"RateLimit-Policy: {_policy(quota, window)}\r\n".encode()
            known = self._policy_lines[decision.tier] = (quota, window, line)
        # One f-string for the line, not _state() within another: this runs per answer.
        return known[2] + f'RateLimit: "monthly";r={remaining};t={reset}\r\n'.encode()

    async def _relay(
        self,
        request: Request,
        upstream_resp: UpstreamResponse,
        decision: Decision | None,
        rm: metrics.RouteMetrics,
        started: float,
        refund: Callable[[str], Awaitable[None]],
    ) -> None:
        status = upstream_resp.status
        if decision is not None:
            # The gateway's quota fields replace any the backend sent under those names.
            headers = hdr.client_response_head(
                upstream_resp.raw_headers,
                self._ratelimit_lines(decision, self._clock()),
                replace=_RATELIMIT_NAMES,
            )
        else:
            headers = hdr.client_response_head(upstream_resp.raw_headers)
        no_body = request.method == "HEAD" or status in _NO_BODY_STATUSES
        length = upstream_resp.content_length
        cut: BodyCut | None = None  # handled after its except block (gateway/compiled.py)
        if not no_body and length is not None and length <= _SMALL:
            try:
                body = await upstream_resp.read_all()
            except BodyCut as exc:
                cut = exc
            if cut is not None:
                # Nothing was sent to the client yet: it gets an honest 502, not a cut body.
                metrics.UPSTREAM_ERRORS.labels("stream", "truncated").inc()
                log.warning("upstream body cut short: %r", cut)
                await refund("truncated")
                message = "the backend's answer broke off"
                return self._error(request, rm, started, 502, "upstream_unavailable", message)
            request.respond(status, headers, body, reason=upstream_resp.reason)
            return self._observe(rm, status, started)

        if status in _NO_BODY_STATUSES:
            length = None
        self._observe(rm, status, started)
        timeout = self._client_timeout
        try:
            async with asyncio.timeout(timeout):
                await request.start(status, headers, length=length, reason=upstream_resp.reason)
            if no_body:
                return
            while chunk := await upstream_resp.read():
                async with asyncio.timeout(timeout):
                    await request.write(chunk)
            async with asyncio.timeout(timeout):
                await request.end()
        except TimeoutError:
            # The client stopped reading: drop it rather than hold the backend connection.
            # The backend answered, so there is nothing to refund.
            request.abort()
        except BodyCut as exc:
            cut = exc
        except ClientGone:
            # The client went away: it was served what it read; nothing to refund.
            pass
        if cut is not None:
            # The backend died mid-answer: the client got a cut body, so it does not pay.
            metrics.UPSTREAM_ERRORS.labels("stream", "truncated").inc()
            log.warning("upstream body cut short: %r", cut)
            await refund("truncated")
            request.abort()

    async def _refund(
        self,
        account: str,
        route: PricedRoute,
        decision: Decision,
        rm: metrics.RouteMetrics,
        kind: str,
    ) -> None:
        assert self._store is not None
        try:
            units = await self._store.refund(account, route.name, route.cost, decision)
        except QuotaStoreUnavailable as exc:
            metrics.REDIS_ERRORS.labels("refund").inc()
            log.error("refund of %s units to %s failed (%s): %s", route.cost, account, kind, exc)
            return
        if units:
            rm.refunds.inc(units)


@final
class _Admission:
    """A request Proxy.admit took, as its charge's waiter (a redis_pipe.Waiter): the decision
    starts the request's task the moment the batch's reply is read. ``done`` once a shutdown
    abandoned the request: the store then gives back what it charged, as for a caller whose
    future was cancelled."""

    __slots__ = ("claims", "path", "proxy", "query", "request", "route", "settled", "started")

    def __init__(
        self,
        proxy: Proxy,
        request: Request,
        route: PricedRoute,
        path: str,
        query: str,
        claims: Claims,
        started: float,
    ) -> None:
        self.proxy, self.request, self.route = proxy, request, route
        self.path, self.query, self.claims, self.started = path, query, claims, started
        self.settled = False

    def done(self) -> bool:
        return self.settled or self.request.abandoned

    def set_result(self, result: Any, /) -> None:
        self._go_on(result)

    def set_exception(self, exception: BaseException, /) -> None:
        self._go_on(exception)

    def _go_on(self, outcome: Decision | BaseException) -> None:
        self.settled = True
        request = self.request
        work = self.proxy._charged(
            request, self.route, self.path, self.query, self.claims, self.started, outcome
        )
        try:
            request.proceed(work)
        except Exception:  # the batch's other charges are settled all the same
            log.exception("starting %s %s failed", request.method, request.raw_path)


_RATELIMIT_NAMES = frozenset({b"ratelimit", b"ratelimit-policy"})


def _ratelimit_numbers(decision: Decision, now: float) -> tuple[int, int, int, int]:
    """Quota, window, remaining and seconds to reset, as the two fields carry them."""
    # On every metered answer: plain comparisons, not max() calls.
    included, reset = decision.included, decision.reset_seconds
    window = int(now) + reset - decision.period_start
    remaining = included - decision.used
    return (
        included,
        window if window > 0 else 0,
        remaining if remaining > 0 else 0,
        reset if reset > 0 else 0,
    )


# draft-ietf-httpapi-ratelimit-headers (RateLimit / RateLimit-Policy structured fields),
# as f-strings: the compiled module builds them directly, where a profile showed bytes
# %-formatting among the largest parts of a metered request.
def _policy(quota: int, window: int) -> str:
    return f'"monthly";q={quota};w={window};qu="units"'


def _state(remaining: int, reset: int) -> str:
    return f'"monthly";r={remaining};t={reset}'


def _ratelimit_headers(decision: Decision, now: float) -> dict[str, str]:
    """The same fields for an answer of the gateway's own (a denial)."""
    quota, window, remaining, reset = _ratelimit_numbers(decision, now)
    return {"RateLimit-Policy": _policy(quota, window), "RateLimit": _state(remaining, reset)}


def _upgrade_hints(config: Config) -> dict[str, str]:
    """For each tier, where to go next: the next tier up by included units."""
    ordered = sorted(config.tiers.items(), key=lambda kv: kv[1].included_units)
    hints = {}
    for (name, _), (nxt, tier) in itertools.pairwise(ordered):
        hints[name] = (
            f"upgrade to {nxt} (${tier.monthly_price_usd}/month, "
            f"{tier.included_units:,} units) with POST /billing/upgrade"
        )
    return hints
