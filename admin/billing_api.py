"""The billing API: JSON in and out, bearer JWT, per-account rate limit, stable error codes.

Handlers speak only to the ``BillingBackend`` contract and ``Plans``; which backend runs
(Stripe or local) is the app factory's business.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from admin import keys
from admin.appkeys import AUDIT, BILLING, CLAIMS, CLOCK, PLANS, REDIS, SETTINGS
from admin.billing_backend import BillingError, BillingUnavailable, SubscriptionState
from admin.billing_lock import BillingBusy, account_lock
from admin.plans import ENDED, PAYING, change_from_state
from admin.status import billing_status, iso
from admin.usage_reporter import UsageReporter
from gateway.periods import utc_day

_T = TypeVar("_T")
log = logging.getLogger(__name__)
MAX_USAGE_DAYS = 90


class SubscribeBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tier: str
    payment_method_id: str


class TierBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tier: str


class CancelBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    at_period_end: bool = True


class RequestError(Exception):
    """A client mistake: answered with ``status`` and ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


async def _body(request: web.Request, kind: type[_T]) -> _T:
    raw = await request.read()
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise RequestError(400, "invalid_request", str(exc)) from None
    except msgspec.DecodeError:
        raise RequestError(400, "invalid_json", "the body is not valid JSON") from None


def _request_id(request: web.Request) -> str:
    return request.headers.get("X-Request-Id") or f"req_{uuid.uuid4().hex[:16]}"


def _paid_tier(request: web.Request, tier: str) -> None:
    tiers = request.app[SETTINGS].config.tiers
    if tier not in tiers or tier == "free":
        paid = ", ".join(t for t in tiers if t != "free")
        raise RequestError(400, "unknown_tier", f"tier must be one of: {paid}")


def _idempotency_key(request: web.Request, *parts: object) -> str:
    """The client's Idempotency-Key, else one derived from what the request asks for."""
    given = request.headers.get("Idempotency-Key")
    if given:
        return f"{request[CLAIMS].sub}:{given}"[:255]
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()


@contextlib.asynccontextmanager
async def _account_lock(request: web.Request, account: str) -> AsyncIterator[None]:
    """One subscribe/upgrade/cancel at a time per account (one customer, one subscription),
    and none while a Stripe event of the account is being applied (admin.billing_lock)."""
    try:
        async with account_lock(request.app[REDIS], account):
            yield
    except BillingBusy:
        raise RequestError(409, "billing_busy", "another billing change is in progress") from None


def _subscription_json(state: SubscriptionState) -> dict[str, object]:
    return {
        "subscription": {
            "id": state.id,
            "customer_id": state.customer_id,
            "tier": state.tier,
            "status": state.status,
            "current_period_start": iso(state.period_start),
            "current_period_end": iso(state.period_end),
            "cancel_at_period_end": state.cancel_at_period_end,
        },
        "requires_action": state.client_secret is not None,
        "client_secret": state.client_secret,
    }


async def _apply(request: web.Request, account: str, state: SubscriptionState, what: str) -> None:
    rid = _request_id(request)
    now = int(request.app[CLOCK]())
    # The backend answered just now: its state is newer than anything the plan holds.
    await request.app[PLANS].apply(
        change_from_state(account, state, fresh=True),
        created=now,
        event_id=f"api:{rid}",
        who=f"account:{account}",
        source=rid,
    )
    await request.app[AUDIT].record(
        who=f"account:{account}",
        what=f"billing.{what}",
        account=account,
        source=rid,
        details={"subscription_id": state.id, "tier": state.tier, "status": state.status},
    )


async def _current_subscription(request: web.Request, account: str) -> tuple[str, dict[str, str]]:
    plan = await request.app[PLANS].read(account)
    sub_id = plan.get("subscription_id")
    if not sub_id or plan.get("status") not in PAYING | {"paused"}:
        raise RequestError(409, "no_subscription", "the account has no active subscription")
    return sub_id, plan


async def _customer(request: web.Request, account: str) -> str | None:
    raw: Any = await request.app[REDIS].get(keys.customer_key(account))
    return raw.decode() if raw else None


async def _not_ended(request: web.Request, state: SubscriptionState) -> SubscriptionState:
    """The subscription as it is now; a replayed answer about an ended one is refused."""
    current = await request.app[BILLING].get_subscription(state.id)
    if current is None or current.status in ENDED:
        raise RequestError(
            409,
            "billing_conflict",
            "this Idempotency-Key already made a subscription that has ended; use a new key",
        )
    return current


async def _incomplete(
    request: web.Request, raw: dict[str, str]
) -> tuple[SubscriptionState, str, str] | None:
    """The account's last subscription (``raw``: its subscribe request as noted) if it still
    waits for its first payment, with the tier and payment method it was asked for."""
    sub_id = raw.get("subscription_id")
    if not sub_id:
        return None
    state = await request.app[BILLING].get_subscription(sub_id)
    if state is None or state.status != "incomplete":
        return None
    return state, raw.get("tier", ""), raw.get("payment_method_id", "")


async def subscribe(request: web.Request) -> web.Response:
    account = request[CLAIMS].sub
    body = await _body(request, SubscribeBody)
    _paid_tier(request, body.tier)
    if not body.payment_method_id.strip():
        raise RequestError(400, "invalid_request", "payment_method_id is required")
    billing = request.app[BILLING]
    async with _account_lock(request, account):
        plan = await request.app[PLANS].read(account)
        sub_id = plan.get("subscription_id")
        if sub_id and plan.get("status") in PAYING:
            # A retry of a subscribe that went through: the same subscription, if it still
            # pays (the plan may not have heard of its end yet).
            existing = await billing.get_subscription(sub_id)
            if existing is not None and existing.status in PAYING:
                if existing.tier != body.tier:
                    raise RequestError(
                        409, "already_subscribed", "use POST /billing/upgrade to change the tier"
                    )
                return web.json_response(_subscription_json(existing))
        requested = keys.subscribe_request_key(account)
        noted = _decode(await request.app[REDIS].hgetall(requested))
        incomplete = await _incomplete(request, noted)
        # The subscription this attempt abandoned (see the key below). Written down before
        # Stripe is asked, so a retry of this very attempt, which finds it canceled and
        # abandons nothing, still derives the same key.
        abandoned = ""
        if (noted.get("abandoned_tier"), noted.get("abandoned_payment_method_id")) == (
            body.tier,
            body.payment_method_id,
        ):
            abandoned = noted.get("abandoned", "")
        if incomplete is not None:
            pending, tier, payment_method = incomplete
            if (tier, payment_method) == (body.tier, body.payment_method_id):
                # A retry while 3-D Secure waits: the same subscription and secret again.
                return web.json_response(_subscription_json(pending))
            # Another tier or card: one subscription per account, so the waiting one goes.
            abandoned = pending.id
            await request.app[REDIS].hset(
                requested,
                mapping={
                    "abandoned": abandoned,
                    "abandoned_tier": body.tier,
                    "abandoned_payment_method_id": body.payment_method_id,
                },
            )
            abandon = _idempotency_key(request, "abandon", account, pending.id)
            await billing.cancel(pending.id, False, abandon)
            await request.app[AUDIT].record(
                who=f"account:{account}",
                what="billing.subscribe_abandoned",
                account=account,
                source=_request_id(request),
                details={"subscription_id": pending.id, "tier": pending.tier},
            )
        # The plan's last change is part of the key: subscribe, cancel, subscribe again makes
        # two subscriptions, while a retry of one subscribe replays Stripe's first answer. So
        # is a subscription abandoned for this one: an incomplete one never changes the plan,
        # and pro, enterprise, pro again (each abandoning the last) would replay the first.
        key = _idempotency_key(
            request,
            "subscribe",
            account,
            body.tier,
            body.payment_method_id,
            sub_id,
            plan.get("status"),
            plan.get("event_created"),
            abandoned,
        )
        customer = await billing.ensure_customer(account)
        await request.app[REDIS].hset(keys.CUSTOMERS, customer, account)
        state = await billing.subscribe(account, customer, body.tier, body.payment_method_id, key)
        # Stripe may have replayed an earlier answer (a retry, the client's own key): it
        # describes the subscription as it was, and it may have ended since.
        state = await _not_ended(request, state)
        await request.app[REDIS].set(keys.subscription_key(account), state.id)
        await request.app[REDIS].hset(
            requested,
            mapping={
                "subscription_id": state.id,
                "tier": body.tier,
                "payment_method_id": body.payment_method_id,
            },
        )
        if state.status in ("active", "trialing"):
            await _apply(request, account, state, "subscribed")
        else:
            await request.app[AUDIT].record(
                who=f"account:{account}",
                what="billing.subscribe_pending",
                account=account,
                source=_request_id(request),
                details={"subscription_id": state.id, "status": state.status},
            )
    return web.json_response(_subscription_json(state), status=201)


async def upgrade(request: web.Request) -> web.Response:
    account = request[CLAIMS].sub
    body = await _body(request, TierBody)
    _paid_tier(request, body.tier)
    async with _account_lock(request, account):
        sub_id, plan = await _current_subscription(request, account)
        # The plan's last change is part of the key: pro->enterprise->pro->enterprise makes
        # four changes, while a retry of one of them makes none.
        key = _idempotency_key(
            request, "change", account, sub_id, body.tier, plan.get("event_created")
        )
        state = await request.app[BILLING].change_tier(sub_id, body.tier, key)
        await _apply(request, account, state, "tier_changed")
    return web.json_response(_subscription_json(state))


async def cancel(request: web.Request) -> web.Response:
    account = request[CLAIMS].sub
    body = await _body(request, CancelBody)
    async with _account_lock(request, account):
        sub_id, plan = await _current_subscription(request, account)
        key = _idempotency_key(
            request, "cancel", account, sub_id, body.at_period_end, plan.get("event_created")
        )
        billing = request.app[BILLING]
        if not body.at_period_end and billing.mode == "stripe":
            # The final invoice (invoice_now) bills the metered usage of the period up to
            # now: the overage not yet reported goes to the meter first, stamped before the
            # cancellation. Stripe down: 503, and nothing is canceled.
            reporter = UsageReporter(request.app[REDIS], billing, clock=request.app[CLOCK])
            try:
                await reporter.report_account(account)
            except BillingUnavailable:
                raise
            except BillingError as exc:  # the claim stays for the background reporter
                log.error("overage of %s not reported before its cancel: %s", account, exc)
        state = await billing.cancel(sub_id, body.at_period_end, key)
        await _apply(request, account, state, "canceled")
    return web.json_response(_subscription_json(state))


async def status(request: web.Request) -> web.Response:
    account = request[CLAIMS].sub
    client = request.app[REDIS]
    plan_raw, usage_raw = (
        await client.hgetall(keys.plan_key(account)),
        await client.hgetall(keys.usage_key(account)),
    )
    result = billing_status(
        _decode(plan_raw), _decode(usage_raw), request.app[SETTINGS].config, request.app[CLOCK]()
    )
    return web.json_response(body=msgspec.json.encode(result), content_type="application/json")


def _decode(raw: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (raw or {}).items()}


async def usage(request: web.Request) -> web.Response:
    account = request[CLAIMS].sub
    raw = request.query.get("days", "30")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_USAGE_DAYS:
        raise RequestError(400, "invalid_days", f"days must be 1..{MAX_USAGE_DAYS}")
    days = int(raw)
    now = request.app[CLOCK]()
    dates = [utc_day(now - back * 86400) for back in range(days - 1, -1, -1)]
    async with request.app[REDIS].pipeline(transaction=False) as pipe:
        for day in dates:
            pipe.hgetall(keys.daily_prefix(account) + day)
        rows = await pipe.execute()
    daily = []
    by_route: dict[str, int] = {}
    for day, row in zip(dates, rows, strict=True):
        routes = {k: int(v) for k, v in _decode(row).items()}
        for route, units in routes.items():
            by_route[route] = by_route.get(route, 0) + units
        daily.append({"date": day, "units": sum(routes.values()), "routes": routes})
    return web.json_response(
        {
            "days": days,
            "total_units": sum(by_route.values()),
            "by_route": dict(sorted(by_route.items(), key=lambda kv: -kv[1])),
            "daily": daily,
        }
    )


async def payment_methods(request: web.Request) -> web.Response:
    customer = await _customer(request, request[CLAIMS].sub)
    methods = await request.app[BILLING].payment_methods(customer) if customer else []
    body = msgspec.json.encode({"payment_methods": methods})
    return web.json_response(body=body, content_type="application/json")


async def portal(request: web.Request) -> web.Response:
    customer = await _customer(request, request[CLAIMS].sub)
    if customer is None:
        raise RequestError(409, "no_customer", "subscribe first: the account has no customer")
    return_url = request.query.get("return_url") or f"{request.scheme}://{request.host}/pricing"
    if not return_url.startswith(("http://", "https://")):
        raise RequestError(400, "invalid_return_url", "return_url must be an http(s) URL")
    url = await request.app[BILLING].portal_url(customer, return_url)
    return web.json_response({"url": url})


async def invoices(request: web.Request) -> web.Response:
    customer = await _customer(request, request[CLAIMS].sub)
    found = await request.app[BILLING].invoices(customer) if customer else []
    return web.json_response(
        body=msgspec.json.encode({"invoices": found}), content_type="application/json"
    )


def pricing_body(request: web.Request) -> dict[str, object]:
    config = request.app[SETTINGS].config
    admin_upstreams = {"admin"}
    return {
        "mode": request.app[BILLING].mode,
        "currency": "usd",
        "tiers": [
            {
                "name": name,
                "monthly_price_usd": float(tier.monthly_price_usd),
                "included_units": tier.included_units,
                "overage_unit_price_usd": (
                    float(tier.overage_unit_price_usd)
                    if tier.overage_unit_price_usd is not None and tier.allows_overage
                    else None
                ),
                "max_overage_units": tier.max_overage_units,
            }
            for name, tier in config.tiers.items()
        ],
        "routes": [
            {"path": r.path, "methods": list(r.methods), "cost": r.cost}
            for r in config.routes
            if r.upstream not in admin_upstreams
        ],
    }


async def pricing(request: web.Request) -> web.Response:
    return web.json_response(pricing_body(request))
