"""The admin app in Stripe mode, end to end: the real stripe library against the Stripe
double (tests/admin/stripe_double.py), its signed webhooks, and a real gateway."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestServer

from admin import keys
from admin.appkeys import BILLING, PLANS
from admin.audit import AuditLog
from admin.billing_lock import account_lock
from admin.plans import change_from_state
from admin.stripe_settings import StripeSettings
from admin.usage_reporter import UsageReporter
from admin.webhook_consumer import MAX_DELIVERIES
from config import Config
from gateway.redis_quota import RedisQuotaStore
from tests.admin import support
from tests.admin.stripe_double import StripeDouble
from tests.admin.support import StartAdmin, consumer
from tests.conftest import Clock, auth, echo, load_test_config

start_admin = support.start_admin


def stripe_env(settings: StripeSettings) -> dict[str, str]:
    """The environment an operator would set, pointing at the double."""
    env = {
        "STRIPE_SECRET_KEY": settings.secret_key,
        "STRIPE_API_BASE": settings.api_base,
        "STRIPE_WEBHOOK_SECRET": settings.webhook_secret or "",
        "STRIPE_METER_EVENT_NAME": settings.meter_event_name,
        "STRIPE_MAX_NETWORK_RETRIES": str(settings.max_network_retries),
        "STRIPE_TIMEOUT_SECONDS": str(settings.timeout_seconds),
        "STRIPE_CIRCUIT_FAILURES": str(settings.circuit_failure_threshold),
        "STRIPE_CIRCUIT_COOLDOWN_SECONDS": "30",
    }
    for tier, price in settings.price_ids.items():
        env[f"STRIPE_{tier.upper()}_PRICE_ID"] = price
    for tier, price in settings.overage_price_ids.items():
        env[f"STRIPE_{tier.upper()}_OVERAGE_PRICE_ID"] = price
    return env


async def start_stripe_admin(
    start_admin: StartAdmin, double: StripeDouble, clock: Clock
) -> TestServer:
    double.clock = clock
    server = await start_admin(env=stripe_env(double.settings))
    double.webhook_url = str(server.make_url("/webhooks/stripe"))
    return server


@pytest.fixture
async def admin(start_admin: StartAdmin, stripe_double: StripeDouble, clock: Clock) -> TestServer:
    """The admin app in Stripe mode, talking to the double and receiving its webhooks."""
    return await start_stripe_admin(start_admin, stripe_double, clock)


async def call(
    server: TestServer, method: str, path: str, sub: str = "acct-1", **kw: Any
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.make_url(path), headers=auth(sub), **kw) as resp,
    ):
        return resp.status, await resp.json()


async def plan(client: redis.Redis, account: str = "acct-1") -> dict[str, str]:
    raw = await client.hgetall(keys.plan_key(account))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def deliver_and_apply(server: TestServer, double: StripeDouble) -> None:
    statuses = await double.deliver()
    assert all(s == 200 for s in statuses), statuses
    await consumer(server).drain()


VISA = "pm_card_visa"
NEEDS_3DS = "pm_card_authenticationRequired"


async def subscribe(server: TestServer, card: str = VISA, sub: str = "acct-1") -> tuple[int, Any]:
    """POST /billing/subscribe to pro for `sub`, paying with one of Stripe's test cards."""
    payload = {"tier": "pro", "payment_method_id": card}
    return await call(server, "POST", "/billing/subscribe", json=payload, sub=sub)


async def cancel(server: TestServer, *, at_period_end: bool) -> tuple[int, Any]:
    return await call(server, "POST", "/billing/cancel", json={"at_period_end": at_period_end})


async def subscribe_and_apply(server: TestServer, double: StripeDouble) -> dict[str, Any]:
    """Subscribe acct-1 to pro with a good card and apply Stripe's webhooks for it."""
    _, body = await subscribe(server)
    await deliver_and_apply(server, double)
    return body


async def delete_customer_at_stripe(server: TestServer, customer_id: str) -> None:
    await server.app[BILLING].client.v1.customers.delete_async(customer_id)


async def tier_and_status(client: redis.Redis, account: str = "acct-1") -> tuple[str, str]:
    stored = await plan(client, account)
    return stored["tier"], stored["status"]


async def start_gateway_in_front(
    admin: TestServer, start_gateway: Any, start_upstream: Any
) -> TestServer:
    """A real gateway that asks this admin app for plans, in front of an echo upstream."""
    upstream = await start_upstream({"/{tail:.*}": echo})
    config = load_test_config(
        str(upstream.make_url("")).rstrip("/"), str(admin.make_url("")).rstrip("/")
    )
    return await start_gateway(config)


async def tier_the_gateway_forwards(
    session: aiohttp.ClientSession, gateway: TestServer
) -> tuple[int, str]:
    """GET /signals as acct-1 through the gateway: the status and the tier header it set."""
    async with session.get(gateway.make_url("/signals"), headers=auth("acct-1")) as resp:
        return resp.status, dict((await resp.json())["headers"])["X-Metergate-Tier"]


async def test_stripe_mode_is_stated(admin: TestServer) -> None:
    assert admin.app[BILLING].mode == "stripe"
    _, pricing = await call(admin, "GET", "/pricing")
    assert pricing["mode"] == "stripe"
    _, health = await call(admin, "GET", "/health/billing")
    assert health["mode"] == "stripe" and health["stripe_reachable"] is True


async def test_subscribe_through_stripe_then_the_gateway_gives_pro(
    admin: TestServer,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    start_gateway: Any,
    start_upstream: Any,
) -> None:
    gateway = await start_gateway_in_front(admin, start_gateway, start_upstream)
    payload = {"tier": "pro", "payment_method_id": VISA}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gateway.make_url("/billing/subscribe"), json=payload, headers=auth("acct-1")
        ) as resp:
            body = await resp.json()
            assert resp.status == 201, body
        assert body["subscription"]["status"] == "active"
        assert body["subscription"]["tier"] == "pro"
        _, tier = await tier_the_gateway_forwards(session, gateway)
        assert tier == "pro"
    sub_id = body["subscription"]["id"]
    assert sub_id in stripe_double.subscriptions
    stored = await plan(redis_client)
    assert stored["subscription_id"] == sub_id and stored["tier"] == "pro"
    # Stripe's own events arrive afterwards, in any order: the plan stays right.
    events = stripe_double.take_outbox()
    for evt in reversed(events):
        assert await stripe_double.send_event(evt) == 200
    await consumer(admin).drain()
    assert await tier_and_status(redis_client) == ("pro", "active")
    _, status = await call(admin, "GET", "/billing/status")
    assert status["has_subscription"] is True and status["usage"]["current"] == 1


async def test_three_d_secure(
    admin: TestServer,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
) -> None:
    status, body = await subscribe(admin, NEEDS_3DS)
    assert status == 201, body
    assert body["subscription"]["status"] == "incomplete"
    assert body["requires_action"] is True and body["client_secret"]
    await deliver_and_apply(admin, stripe_double)
    assert (await plan(redis_client)).get("status") != "active"
    _, st = await call(admin, "GET", "/billing/status")
    assert st["usage"]["included"] == 100  # nothing paid yet: the free tier's rules
    stripe_double.confirm_payment(body["subscription"]["id"])
    await deliver_and_apply(admin, stripe_double)
    assert await tier_and_status(redis_client) == ("pro", "active")


async def test_declined_card_is_402(admin: TestServer, stripe_double: StripeDouble) -> None:
    status, body = await subscribe(admin, "pm_card_chargeDeclined")
    assert (status, body["error"]["code"]) == (402, "card_declined")
    assert not stripe_double.subscriptions


async def test_upgrade_downgrade_and_cancel(
    admin: TestServer,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
) -> None:
    _, body = await subscribe(admin)
    sub_id = body["subscription"]["id"]
    for tier in ("enterprise", "starter"):
        status, body = await call(admin, "POST", "/billing/upgrade", json={"tier": tier})
        assert status == 200, body
        assert body["subscription"]["tier"] == tier
        await deliver_and_apply(admin, stripe_double)
        assert (await plan(redis_client))["tier"] == tier
    status, body = await cancel(admin, at_period_end=True)
    assert status == 200 and body["subscription"]["cancel_at_period_end"] is True
    await deliver_and_apply(admin, stripe_double)
    assert (await plan(redis_client))["status"] == "active"
    stripe_double.advance_period(sub_id)  # the period ends: Stripe deletes the subscription
    await deliver_and_apply(admin, stripe_double)
    assert (await plan(redis_client))["status"] == "canceled"
    assert not await redis_client.sismember(keys.PAID_ACCOUNTS, "acct-1")


async def test_cancel_at_once(
    admin: TestServer,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
) -> None:
    await subscribe(admin)
    status, body = await cancel(admin, at_period_end=False)
    assert status == 200 and body["subscription"]["status"] == "canceled"
    await deliver_and_apply(admin, stripe_double)
    assert (await plan(redis_client))["status"] == "canceled"
    _, st = await call(admin, "GET", "/billing/status")
    assert st["has_subscription"] is False


async def renewed_at_stripe(
    admin: TestServer, stripe_double: StripeDouble, redis_client: redis.Redis
) -> dict[str, str]:
    """acct-1 subscribed to pro, then renewed at Stripe (its events not yet delivered); the
    plan as it was before the renewal."""
    body = await subscribe_and_apply(admin, stripe_double)
    before = await plan(redis_client)
    stripe_double.advance_period(body["subscription"]["id"])
    return before


async def test_an_event_met_by_a_stripe_outage_waits_for_stripe(
    admin: TestServer, stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    before = await renewed_at_stripe(admin, stripe_double, redis_client)
    stripe_double.down = "500"  # the consumer cannot read the subscription as it is now
    assert all(s == 200 for s in await stripe_double.deliver())
    await consumer(admin).drain()
    # Not applied as sent (same-second events are ordered by random ids): they wait.
    assert (await plan(redis_client))["period_end"] == before["period_end"]
    stripe_double.down = None
    await consumer(admin).drain()
    after = await plan(redis_client)
    assert int(after["period_end"]) > int(before["period_end"])
    assert after["status"] == "active"


async def test_an_event_waits_for_a_billing_change_in_progress_then_reads_its_outcome(
    admin: TestServer, stripe_double: StripeDouble, redis_client: redis.Redis, clock: Clock
) -> None:
    """The consumer reads the subscription under the account's billing lock: read before
    an API change and written after it, the state it read would undo that change."""
    body = await subscribe_and_apply(admin, stripe_double)
    status, _ = await call(admin, "POST", "/billing/upgrade", json={"tier": "enterprise"})
    assert status == 200
    assert all(s == 200 for s in await stripe_double.deliver())  # stored, not yet applied
    async with account_lock(redis_client, "acct-1"):  # another change, as the API makes it
        applying = asyncio.create_task(consumer(admin).drain())
        await asyncio.sleep(0.3)
        assert not applying.done()  # waiting, before it read anything from Stripe
        state = await admin.app[BILLING].change_tier(body["subscription"]["id"], "starter", "k1")
        await admin.app[PLANS].apply(
            change_from_state("acct-1", state, fresh=True),
            created=int(clock.now),
            event_id="api:test",
            who="account:acct-1",
            source="test",
        )
    assert await applying >= 1
    assert (await plan(redis_client))["tier"] == "starter"


async def test_an_event_met_by_a_long_billing_change_waits_and_is_not_dead_lettered(
    admin: TestServer, stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    before = await renewed_at_stripe(admin, stripe_double, redis_client)
    assert all(s == 200 for s in await stripe_double.deliver())
    applier = consumer(admin)
    applier.lock_wait_seconds = 0.05
    async with account_lock(redis_client, "acct-1"):
        for _ in range(MAX_DELIVERIES + 1):  # each drain delivers the waiting events again
            await applier.drain()
    assert (await plan(redis_client))["period_end"] == before["period_end"]
    assert await redis_client.xlen(keys.WEBHOOK_DEAD_STREAM) == 0
    await applier.drain()
    assert int((await plan(redis_client))["period_end"]) > int(before["period_end"])


@pytest.fixture
async def pro_with_overage(
    admin: TestServer,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    gateway_config: Config,
    clock: Clock,
) -> None:
    """acct-1 on pro, 40 units past what pro includes, none reported yet."""
    await subscribe_and_apply(admin, stripe_double)
    store = RedisQuotaStore(redis_client, gateway_config, clock=clock)
    included = gateway_config.tiers["pro"].included_units
    assert (await store.charge("acct-1", "/signals", included + 40)).overage == 40


@pytest.mark.usefixtures("pro_with_overage")
async def test_cancel_at_once_reports_the_overage_first_and_invoices_it(
    admin: TestServer, stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    assert (await cancel(admin, at_period_end=False))[0] == 200
    calls = [(method, path) for method, path, _ in stripe_double.requests]
    reported = calls.index(("POST", "/v1/billing/meter_events"))
    (canceled,) = [i for i, (m, p) in enumerate(calls) if m == "DELETE"]
    assert reported < canceled  # on the meter before the final invoice is made
    assert stripe_double.requests[canceled][2]["invoice_now"] in (True, "true")
    customer = (await plan(redis_client))["customer_id"]
    assert stripe_double.metered_total(customer) == 40


@pytest.mark.usefixtures("pro_with_overage")
async def test_cancel_at_once_goes_on_when_stripe_refuses_the_pending_report(
    admin: TestServer, redis_client: redis.Redis, clock: Clock
) -> None:
    reporter = UsageReporter(redis_client, admin.app[BILLING], clock=clock)
    claim = await reporter.claim("acct-1")
    assert claim is not None
    await reporter.send(claim)  # then its resend differs: Stripe refuses it (409)
    await redis_client.hset(keys.usage_key("acct-1"), "report_pending_at", claim.timestamp - 30)
    status, body = await cancel(admin, at_period_end=False)
    assert status == 200, body  # the customer can still leave
    assert body["subscription"]["status"] == "canceled"


async def test_stripe_down_fails_fast_and_the_gateway_keeps_the_plan(
    admin: TestServer,
    stripe_double: StripeDouble,
    start_gateway: Any,
    start_upstream: Any,
) -> None:
    gateway = await start_gateway_in_front(admin, start_gateway, start_upstream)
    assert (await subscribe(admin))[0] == 201
    stripe_double.down = "close"
    for _ in range(3):  # the breaker's threshold in the test settings
        status, body = await call(admin, "POST", "/billing/upgrade", json={"tier": "enterprise"})
        assert (status, body["error"]["code"]) == (503, "billing_unavailable")
    started = time.monotonic()
    status, body = await call(admin, "GET", "/billing/invoices")
    assert (status, body["error"]["code"]) == (503, "billing_unavailable")
    assert time.monotonic() - started < 0.5  # the circuit is open: no call to Stripe
    _, health = await call(admin, "GET", "/health/billing")
    assert health["stripe_reachable"] is False
    assert health["circuit"]["state"] == "open"
    async with aiohttp.ClientSession() as session:
        status, tier = await tier_the_gateway_forwards(session, gateway)
    assert status == 200
    assert tier == "pro"


async def test_concurrent_subscribes_make_one_customer_and_one_subscription(
    admin: TestServer, stripe_double: StripeDouble
) -> None:
    stripe_double.latency = 0.05  # let the requests overlap at Stripe
    results = await asyncio.gather(*(subscribe(admin) for _ in range(5)))
    assert all(status in (200, 201) for status, _ in results), results
    assert len({body["subscription"]["id"] for _, body in results}) == 1
    assert len(stripe_double.customers) == 1
    live = [s for s in stripe_double.subscriptions.values() if s["status"] != "canceled"]
    assert len(live) == 1


async def test_subscribe_after_a_cancel_makes_a_new_subscription(
    admin: TestServer,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
) -> None:
    _, first = await subscribe(admin)
    await cancel(admin, at_period_end=False)
    status, again = await subscribe(admin)
    assert status == 201, again
    assert again["subscription"]["id"] != first["subscription"]["id"]
    assert again["subscription"]["status"] == "active"
    statuses = sorted(s["status"] for s in stripe_double.subscriptions.values())
    assert statuses == ["active", "canceled"]
    await deliver_and_apply(admin, stripe_double)
    stored = await plan(redis_client)
    assert stored["subscription_id"] == again["subscription"]["id"]
    assert (stored["tier"], stored["status"]) == ("pro", "active")


async def test_a_retried_three_d_secure_subscribe_keeps_one_subscription(
    admin: TestServer,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
) -> None:
    _, first = await subscribe(admin, NEEDS_3DS)
    assert first["subscription"]["status"] == "incomplete"
    await deliver_and_apply(admin, stripe_double)  # the plan hears of the incomplete one
    status, again = await subscribe(admin, NEEDS_3DS)
    assert status == 200, again
    assert again["subscription"]["id"] == first["subscription"]["id"]
    assert again["requires_action"] is True and again["client_secret"] == first["client_secret"]
    assert len(stripe_double.subscriptions) == 1
    # Another card: the incomplete subscription is canceled before the new one is made.
    status, other = await subscribe(admin, VISA)
    assert status == 201, other
    assert other["subscription"]["status"] == "active"
    by_status = {s["status"]: s["id"] for s in stripe_double.subscriptions.values()}
    assert by_status == {
        "canceled": first["subscription"]["id"],
        "active": other["subscription"]["id"],
    }
    await deliver_and_apply(admin, stripe_double)
    stored = await plan(redis_client)
    assert (stored["subscription_id"], stored["status"]) == (other["subscription"]["id"], "active")


async def test_changing_one_s_mind_during_3ds_and_back_makes_a_live_subscription(
    admin: TestServer, stripe_double: StripeDouble
) -> None:
    async def subscribe_to(tier: str) -> dict[str, Any]:
        payload = {"tier": tier, "payment_method_id": NEEDS_3DS}
        status, body = await call(admin, "POST", "/billing/subscribe", json=payload)
        assert status == 201, body
        return dict(body["subscription"])

    first = await subscribe_to("pro")
    await subscribe_to("enterprise")  # the first is abandoned (canceled)
    again = await subscribe_to("pro")  # the second is: not a replay of the first
    assert again["id"] != first["id"]
    assert stripe_double.subscriptions[again["id"]]["status"] == "incomplete"
    live = [s for s in stripe_double.subscriptions.values() if s["status"] == "incomplete"]
    assert [s["id"] for s in live] == [again["id"]]


async def test_a_retry_of_a_subscribe_that_abandoned_one_makes_no_second_subscription(
    admin: TestServer, stripe_double: StripeDouble
) -> None:
    assert (await subscribe(admin, NEEDS_3DS))[0] == 201  # waits for 3-D Secure
    # Another tier: the waiting one is abandoned, the new one made at Stripe, and its
    # answer lost (every retry's too): the client gets 503 and tries again.
    stripe_double.lose_answers = ("POST", "/v1/subscriptions", 3)
    payload = {"tier": "enterprise", "payment_method_id": VISA}
    status, body = await call(admin, "POST", "/billing/subscribe", json=payload)
    assert (status, body["error"]["code"]) == (503, "billing_unavailable"), body
    status, body = await call(admin, "POST", "/billing/subscribe", json=payload)
    assert status == 201, body
    live = [s for s in stripe_double.subscriptions.values() if s["status"] == "active"]
    assert [s["id"] for s in live] == [body["subscription"]["id"]]  # billed once


async def test_after_the_customer_is_deleted_the_account_can_subscribe_again(
    admin: TestServer,
    stripe_double: StripeDouble,
    clock: Clock,
    redis_client: redis.Redis,
) -> None:
    first = await subscribe_and_apply(admin, stripe_double)
    old = first["subscription"]["customer_id"]
    clock.advance(60)
    await delete_customer_at_stripe(admin, old)
    await deliver_and_apply(admin, stripe_double)
    assert (await plan(redis_client))["tier"] == "free"
    assert not await redis_client.exists(keys.customer_key("acct-1"))
    assert not await redis_client.hexists(keys.CUSTOMERS, old)
    status, again = await subscribe(admin)
    assert status == 201, again
    assert again["subscription"]["customer_id"] != old
    assert again["subscription"]["status"] == "active"


async def test_a_stored_customer_stripe_no_longer_has_is_replaced(
    admin: TestServer,
    stripe_double: StripeDouble,
    clock: Clock,
    redis_client: redis.Redis,
) -> None:
    first = await subscribe_and_apply(admin, stripe_double)
    old = first["subscription"]["customer_id"]
    clock.advance(60)
    # Deleted at Stripe; the webhook has not been applied yet, so Redis still names it.
    await delete_customer_at_stripe(admin, old)
    status, again = await subscribe(admin)
    assert status == 201, again
    new = again["subscription"]["customer_id"]
    assert new != old and again["subscription"]["status"] == "active"
    assert await redis_client.get(keys.customer_key("acct-1")) == new.encode()
    assert await redis_client.hget(keys.CUSTOMERS, new) == b"acct-1"
    await deliver_and_apply(admin, stripe_double)  # the late customer.deleted changes nothing
    stored = await plan(redis_client)
    assert (stored["subscription_id"], stored["status"]) == (again["subscription"]["id"], "active")
    assert await redis_client.get(keys.customer_key("acct-1")) == new.encode()


async def test_a_poison_event_is_dead_lettered_and_later_events_still_apply(
    admin: TestServer,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
) -> None:
    first = await subscribe_and_apply(admin, stripe_double)
    # A subscription with no items: signed, but re-fetching it makes the applier raise.
    broken = first["subscription"]["id"]
    stripe_double.subscriptions[broken]["items"]["data"] = []
    assert (
        await stripe_double.send_event(
            stripe_double.build_event("customer.subscription.updated", broken)
        )
        == 200
    )
    await subscribe(admin, sub="acct-2")
    await stripe_double.deliver()
    applier = consumer(admin)
    await applier.drain()  # does not raise, and the events after the poison apply
    assert (await plan(redis_client, "acct-2"))["status"] == "active"
    assert await redis_client.xlen(keys.WEBHOOK_DEAD_STREAM) == 0
    for _ in range(4):  # re-claimed until its fifth delivery fails
        await applier.drain()
    dead = await redis_client.xrange(keys.WEBHOOK_DEAD_STREAM)
    assert len(dead) == 1 and b"IndexError" in dead[0][1][b"error"]
    assert (await applier.backlog()).total == 0
    audit = await AuditLog(redis_client).recent(20)
    assert any(e.what == "webhook.dead_letter" for e in audit)
