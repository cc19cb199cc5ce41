"""POST /webhooks/stripe and the consumer group: signatures, ordering, duplicates, crashes."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import redis.asyncio as redis
from aiohttp.test_utils import TestServer

from admin import keys
from admin.audit import AuditLog
from tests.admin import support
from tests.admin.support import (
    OLD_SECRET,
    WEBHOOK_SECRET,
    StartAdmin,
    consumer,
    encode,
    event,
    invoice_object,
    official,
    stripe_headers,
    subscription_object,
)
from tests.conftest import Clock, auth, echo, load_test_config

start_admin = support.start_admin

T0 = 1_790_000_000


def sub_created(created: int = T0, event_id: str = "evt_created", **kw: Any) -> dict[str, Any]:
    kw.setdefault("account", "acct-1")
    return event(
        "customer.subscription.created",
        subscription_object(**kw),
        created=created,
        event_id=event_id,
    )


async def post(
    server: TestServer,
    body: bytes,
    headers: dict[str, str] | None,
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/webhooks/stripe"), data=body, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.json()


async def deliver(server: TestServer, evt: dict[str, Any], clock: Clock) -> tuple[int, Any]:
    body = encode(evt)
    return await post(server, body, stripe_headers(body, int(clock.now)))


async def plan(client: redis.Redis, account: str = "acct-1") -> dict[str, str]:
    raw = await client.hgetall(keys.plan_key(account))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_a_signed_event_is_stored_then_applied(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    status, body = await deliver(server, sub_created(), clock)
    assert (status, body) == (200, {"received": True, "id": "evt_created"})
    assert await redis_client.xlen(keys.WEBHOOK_STREAM) == 1
    assert await plan(redis_client) == {}  # acknowledged, not applied yet
    assert await consumer(server).drain() == 1
    stored = await plan(redis_client)
    assert stored["tier"] == "pro" and stored["status"] == "active"
    assert (stored["period_start"], stored["period_end"]) == (str(T0), "1792592000")
    assert stored["subscription_id"] == "sub_1" and stored["customer_id"] == "cus_1"
    assert stored["event_created"] == str(T0) and stored["event_id"] == "evt_created"
    assert await redis_client.sismember(keys.PAID_ACCOUNTS, "acct-1")
    assert await redis_client.hget(keys.CUSTOMERS, "cus_1") == b"acct-1"
    assert await redis_client.exists(keys.webhook_seen_key("evt_created"))
    pending = await redis_client.xpending(keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP)
    assert pending["pending"] == 0
    audit = await AuditLog(redis_client).recent()
    assert [(e.who, e.what, e.source) for e in audit] == [("stripe", "plan.updated", "evt_created")]


async def test_rejected_deliveries_change_nothing(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    body = encode(sub_created())
    now = int(clock.now)
    good = stripe_headers(body, now)["Stripe-Signature"]
    cases: list[tuple[str, bytes, dict[str, str] | None, str]] = [
        ("unsigned", body, None, "invalid_signature"),
        ("empty header", body, {"Stripe-Signature": ""}, "invalid_signature"),
        ("no v1", body, {"Stripe-Signature": f"t={now}"}, "invalid_signature"),
        ("no timestamp", body, {"Stripe-Signature": good.split(",", 1)[1]}, "invalid_signature"),
        ("wrong secret", body, stripe_headers(body, now, ("whsec_other",)), "invalid_signature"),
        ("body changed", body + b" ", {"Stripe-Signature": good}, "invalid_signature"),
        ("stale", body, stripe_headers(body, now - 301), "invalid_signature"),
        ("future", body, stripe_headers(body, now + 301), "invalid_signature"),
        ("v0 only", body, {"Stripe-Signature": good.replace("v1=", "v0=")}, "invalid_signature"),
    ]
    for name, payload, headers, code in cases:
        status, reply = await post(server, payload, headers)
        assert (status, reply["error"]["code"]) == (400, code), name
    for malformed in (b"{not json", b"[]", b'{"id": "evt_x"}', b'{"id": "e", "type": "t"}'):
        status, reply = await post(server, malformed, stripe_headers(malformed, now))
        assert (status, reply["error"]["code"]) == (400, "malformed_event"), malformed
    assert not await redis_client.exists(keys.WEBHOOK_STREAM)
    # Within the tolerance is fine.
    assert (await post(server, body, stripe_headers(body, now - 299)))[0] == 200


async def test_secret_rotation(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    body = encode(sub_created())
    now = int(clock.now)
    # Stripe rolling the endpoint secret signs with both, old first.
    server = await start_admin()
    status, _ = await post(server, body, stripe_headers(body, now, (OLD_SECRET, WEBHOOK_SECRET)))
    assert status == 200
    # We rolling ours: both secrets configured, a delivery signed with the old one only.
    rolling = await start_admin(env={"STRIPE_WEBHOOK_SECRET": f"{WEBHOOK_SECRET},{OLD_SECRET}"})
    assert (await post(rolling, body, stripe_headers(body, now, (OLD_SECRET,))))[0] == 200
    assert (await post(server, body, stripe_headers(body, now, (OLD_SECRET,))))[0] == 400


async def test_without_a_webhook_secret_webhooks_are_refused(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin(env={})
    status, body = await deliver(server, sub_created(), clock)
    assert (status, body["error"]["code"]) == (503, "webhooks_disabled")
    assert not await redis_client.exists(keys.WEBHOOK_STREAM)


async def test_duplicate_delivery_is_applied_once(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    evt = sub_created()
    assert (await deliver(server, evt, clock))[0] == 200
    assert (await deliver(server, evt, clock))[0] == 200
    c = consumer(server)
    await c.ensure_group()
    entries = await redis_client.xreadgroup(
        keys.WEBHOOK_GROUP, c.name, {keys.WEBHOOK_STREAM: ">"}, count=10
    )
    outcomes = [await c.handle(entry_id, fields) for entry_id, fields in entries[0][1]]
    assert outcomes == ["applied", "duplicate"]
    audit = await AuditLog(redis_client).recent()
    assert len([e for e in audit if e.what == "plan.updated"]) == 1


async def test_a_replay_after_the_seen_marker_expired_is_stale(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    await deliver(server, sub_created(), clock)
    await consumer(server).drain()
    await redis_client.delete(keys.webhook_seen_key("evt_created"))
    clock.advance(3600)
    replay = sub_created(status="canceled")  # same id, even with other content
    await deliver(server, replay, clock)
    await consumer(server).drain()
    assert (await plan(redis_client))["status"] == "active"


async def test_an_older_event_never_overwrites_a_newer_one(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    newer = event(
        "customer.subscription.updated",
        subscription_object(tier="enterprise", account="acct-1"),
        created=T0 + 60,
        event_id="evt_b",
    )
    older = event(
        "customer.subscription.updated",
        subscription_object(tier="starter", account="acct-1"),
        created=T0 + 30,
        event_id="evt_z",
    )
    same_second_lower_id = event(
        "customer.subscription.updated",
        subscription_object(tier="starter", account="acct-1"),
        created=T0 + 60,
        event_id="evt_a",
    )
    for evt in (newer, older, same_second_lower_id):
        assert (await deliver(server, evt, clock))[0] == 200
    await consumer(server).drain()
    stored = await plan(redis_client)
    assert stored["tier"] == "enterprise"
    assert (stored["event_created"], stored["event_id"]) == (str(T0 + 60), "evt_b")
    outcomes = await redis_client.xlen(keys.WEBHOOK_STREAM)
    assert outcomes == 3


async def test_a_subscription_that_ended_never_comes_back(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    deleted = event(
        "customer.subscription.deleted",
        subscription_object(status="canceled", account="acct-1"),
        created=T0 + 100,
        event_id="evt_1aaa",
    )
    # The same second, a higher (random) id: by time and id it would be the newer one.
    updated = event(
        "customer.subscription.updated",
        subscription_object(cancel_at_period_end=True, account="acct-1"),
        created=T0 + 100,
        event_id="evt_1zzz",
    )
    final_invoice_paid = event(
        "invoice.paid", invoice_object(billing_reason="subscription_cycle"), created=T0 + 3700
    )
    for evt in (sub_created(), deleted, updated, final_invoice_paid):
        assert (await deliver(server, evt, clock))[0] == 200
    await consumer(server).drain()
    stored = await plan(redis_client)
    assert stored["status"] == "canceled"  # the gateway applies free rules
    assert stored["event_id"] == "evt_1aaa"  # nothing after the deletion applied


async def test_payment_failed_then_paid(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    await deliver(server, sub_created(), clock)
    failed = event("invoice.payment_failed", invoice_object(), created=T0 + 100, event_id="evt_f1")
    failed_again = event(
        "invoice.payment_failed", invoice_object(), created=T0 + 200, event_id="evt_f2"
    )
    for evt in (failed, failed_again):
        await deliver(server, evt, clock)
    await consumer(server).drain()
    stored = await plan(redis_client)
    assert stored["status"] == "past_due" and stored["tier"] == "pro"
    # The grace counts from the first failure.
    assert stored["past_due_since"] == str(T0 + 100)
    paid = event(
        "invoice.paid",
        invoice_object(start=1_792_592_000, end=1_795_184_000),
        created=T0 + 300,
        event_id="evt_p",
    )
    await deliver(server, paid, clock)
    await consumer(server).drain()
    stored = await plan(redis_client)
    assert stored["status"] == "active" and "past_due_since" not in stored
    assert (stored["period_start"], stored["period_end"]) == ("1792592000", "1795184000")


async def test_a_failed_first_payment_is_not_past_due(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    await redis_client.hset(keys.CUSTOMERS, "cus_1", "acct-1")
    failed = event(
        "invoice.payment_failed",
        invoice_object(billing_reason="subscription_create"),
        created=T0,
        event_id="evt_f",
    )
    await deliver(server, failed, clock)
    await consumer(server).drain()
    assert await plan(redis_client) == {}


async def test_subscription_lifecycle_events(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    steps: list[tuple[str, dict[str, Any], str]] = [
        ("customer.subscription.created", {}, "active"),
        ("customer.subscription.paused", {"status": "paused"}, "paused"),
        ("customer.subscription.resumed", {"status": "active"}, "active"),
        ("customer.subscription.trial_will_end", {"status": "canceled"}, "active"),
        ("customer.subscription.deleted", {"status": "active"}, "canceled"),
    ]
    for n, (kind, fields, want) in enumerate(steps):
        obj = subscription_object(account="acct-1", **fields)
        await deliver(server, event(kind, obj, created=T0 + n, event_id=f"evt_{n}"), clock)
        await consumer(server).drain()
        assert (await plan(redis_client))["status"] == want, kind
    assert not await redis_client.sismember(keys.PAID_ACCOUNTS, "acct-1")
    assert await redis_client.zrange(keys.CHURN, 0, -1) == [b"acct-1:sub_1"]
    audit = await AuditLog(redis_client).recent()
    assert any(e.what == "webhook.customer.subscription.trial_will_end" for e in audit)


async def test_an_old_subscription_ending_leaves_the_new_one(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    await deliver(server, sub_created(sub_id="sub_new", event_id="evt_new"), clock)
    ended = event(
        "customer.subscription.deleted",
        subscription_object("sub_old", status="canceled", account="acct-1"),
        created=T0 + 10,
        event_id="evt_old",
    )
    await deliver(server, ended, clock)
    await consumer(server).drain()
    stored = await plan(redis_client)
    assert (stored["subscription_id"], stored["status"]) == ("sub_new", "active")


async def test_customer_deleted_returns_the_account_to_free(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    await deliver(server, sub_created(), clock)
    customer = support.official("customer")
    customer.update(id="cus_1", metadata={})
    await deliver(
        server, event("customer.deleted", customer, created=T0 + 5, event_id="evt_d"), clock
    )
    await consumer(server).drain()
    stored = await plan(redis_client)
    assert stored["tier"] == "free" and "period_end" not in stored
    assert not await redis_client.sismember(keys.PAID_ACCOUNTS, "acct-1")


async def test_an_event_for_an_unknown_customer_is_acknowledged_and_audited(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    obj = subscription_object(customer="cus_unknown")
    await deliver(server, event("customer.subscription.created", obj, created=T0), clock)
    assert await consumer(server).drain() == 1
    pending = await redis_client.xpending(keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP)
    assert pending["pending"] == 0
    audit = await AuditLog(redis_client).recent()
    assert audit[0].what == "webhook.unmatched.customer.subscription.created"


async def wait_for_plan(client: redis.Redis, field: str, value: str) -> None:
    async with asyncio.timeout(10):
        while (await plan(client)).get(field) != value:
            await asyncio.sleep(0.02)


async def test_an_event_acknowledged_but_never_applied_is_applied_after_restart(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    first = await start_admin(consume_webhooks=False)
    assert (await deliver(first, sub_created(), clock))[0] == 200
    await first.close()  # the process dies before any consumer ran
    assert await plan(redis_client) == {}
    await start_admin(consume_webhooks=True)
    await wait_for_plan(redis_client, "tier", "pro")


async def test_an_event_taken_by_a_dead_consumer_is_reclaimed_on_start(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    first = await start_admin(consume_webhooks=False)
    await deliver(first, sub_created(), clock)
    dead = consumer(first)
    await dead.ensure_group()
    # Delivered to a consumer that died before applying and acknowledging it.
    taken = await redis_client.xreadgroup(
        keys.WEBHOOK_GROUP, "dead-consumer", {keys.WEBHOOK_STREAM: ">"}, count=10
    )
    assert len(taken[0][1]) == 1
    await first.close()
    await start_admin(consume_webhooks=True)
    await wait_for_plan(redis_client, "tier", "pro")
    async with asyncio.timeout(5):
        while (await redis_client.xpending(keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP))["pending"]:
            await asyncio.sleep(0.02)


async def test_the_gateway_enforces_the_plan_on_the_next_request(
    start_admin: StartAdmin,
    start_gateway: Any,
    start_upstream: Any,
    redis_client: redis.Redis,
    clock: Clock,
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    admin = await start_admin(consume_webhooks=True)
    config = load_test_config(
        str(upstream.make_url("")).rstrip("/"), str(admin.make_url("")).rstrip("/")
    )
    gateway = await start_gateway(config)
    headers = auth("acct-1")
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=headers) as resp:
            assert dict((await resp.json())["headers"])["X-Metergate-Tier"] == "free"
        body = encode(sub_created(tier="enterprise"))
        # Stripe reaches the webhook through the gateway (a public route at cost 0).
        async with session.post(
            gateway.make_url("/webhooks/stripe"),
            data=body,
            headers=stripe_headers(body, int(clock.now)),
        ) as resp:
            assert resp.status == 200
        await wait_for_plan(redis_client, "tier", "enterprise")
        async with session.get(gateway.make_url("/signals"), headers=headers) as resp:
            assert dict((await resp.json())["headers"])["X-Metergate-Tier"] == "enterprise"
            assert "q=100000" in resp.headers["RateLimit-Policy"]


async def test_backlog_in_health_and_metrics(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/health/billing")) as resp:
            body = await resp.json()
            assert body["webhooks"]["backlog"] == 0
        for n in range(3):
            await deliver(server, sub_created(event_id=f"evt_{n}", created=T0 + n), clock)
        async with session.get(server.make_url("/health/billing")) as resp:
            body = await resp.json()
            assert body["webhooks"]["lag"] == 3 and body["webhooks"]["pending"] == 0
            assert body["webhooks"]["backlog"] == 3
        async with session.get(server.make_url("/metrics")) as resp:
            text = await resp.text()
            assert "metergate_webhook_lag 3.0" in text
        await consumer(server).drain()
        async with session.get(server.make_url("/health/billing")) as resp:
            body = await resp.json()
            assert body["webhooks"] == {
                "pending": 0,
                "lag": 0,
                "backlog": 0,
                "oldest_unapplied_age_seconds": 0.0,
            }


async def test_unhandled_event_types_are_acknowledged_without_audit(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    await deliver(server, event("customer.created", official("customer"), created=T0), clock)
    assert await consumer(server).drain() == 1
    pending = await redis_client.xpending(keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP)
    assert pending["pending"] == 0
    assert await AuditLog(redis_client).recent() == []


async def test_the_account_comes_from_either_metadata_key(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    obj = subscription_object(customer="cus_unknown")
    obj["metadata"] = {"metergate_account": "acct-9"}  # what StripeBilling writes
    await deliver(server, event("customer.subscription.created", obj, created=T0), clock)
    await consumer(server).drain()
    assert (await plan(redis_client, "acct-9"))["tier"] == "pro"
