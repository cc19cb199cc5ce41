"""Plans.apply and apply_plan.lua: ordering, subscription guard, past_due, indices."""

from __future__ import annotations

import redis.asyncio as redis

from admin import keys
from admin.audit import AuditLog
from admin.plans import PlanChange, Plans
from tests.conftest import Clock

T0 = 1_790_000_000


def pro(**kw: object) -> PlanChange:
    fields: dict[str, object] = {
        "account": "a",
        "tier": "pro",
        "status": "active",
        "period_start": T0,
        "period_end": T0 + 30 * 86400,
        "subscription_id": "sub_1",
        "customer_id": "cus_1",
        "may_replace": True,
    }
    fields.update(kw)
    return PlanChange(**fields)  # type: ignore[arg-type]


def make(client: redis.Redis, clock: Clock) -> Plans:
    return Plans(client, AuditLog(client, clock=clock), clock=clock)


async def stored(client: redis.Redis) -> dict[str, str]:
    raw = await client.hgetall(keys.plan_key("a"))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_apply_writes_exactly_the_gateway_fields(
    redis_client: redis.Redis, clock: Clock
) -> None:
    plans = make(redis_client, clock)
    result = await plans.apply(pro(), created=T0, event_id="evt_1", who="stripe", source="evt_1")
    assert result.applied and result.reason == "applied"
    assert (result.previous_tier, result.previous_status) == ("free", "")
    assert await stored(redis_client) == {
        "tier": "pro",
        "status": "active",
        "period_start": str(T0),
        "period_end": str(T0 + 30 * 86400),
        "subscription_id": "sub_1",
        "customer_id": "cus_1",
        "event_created": str(T0),
        "event_id": "evt_1",
        "updated_at": str(int(clock.now)),
    }
    assert await redis_client.smembers(keys.PAID_ACCOUNTS) == {b"a"}
    assert await redis_client.zrange(keys.STARTS, 0, -1, withscores=True) == [(b"a:sub_1", T0)]


async def test_order_by_created_then_event_id(redis_client: redis.Redis, clock: Clock) -> None:
    plans = make(redis_client, clock)
    await plans.apply(pro(), created=T0 + 10, event_id="evt_m", who="stripe", source="")
    cases = [
        (T0 + 9, "evt_z", False),  # older
        (T0 + 10, "evt_a", False),  # same second, lower id
        (T0 + 10, "evt_m", False),  # the same event again
        (T0 + 10, "evt_n", True),  # same second, higher id
        (T0 + 11, "evt_0", True),  # newer
    ]
    for created, event_id, applied in cases:
        result = await plans.apply(
            pro(tier="starter" if not applied else "enterprise"),
            created=created,
            event_id=event_id,
            who="stripe",
            source="",
        )
        assert result.applied is applied, (created, event_id)
        if applied:
            assert (await stored(redis_client))["tier"] == "enterprise"
    assert (await stored(redis_client))["event_id"] == "evt_0"


async def test_a_fresh_state_skips_the_order_but_never_moves_it_back(
    redis_client: redis.Redis, clock: Clock
) -> None:
    plans = make(redis_client, clock)
    await plans.apply(pro(), created=T0 + 100, event_id="evt_b", who="stripe", source="")
    result = await plans.apply(
        pro(tier="starter", fresh=True), created=T0, event_id="api:r", who="x", source=""
    )
    assert result.applied
    plan = await stored(redis_client)
    assert plan["tier"] == "starter"
    assert (plan["event_created"], plan["event_id"]) == (str(T0 + 100), "evt_b")


async def test_past_due_since_is_the_first_failure(redis_client: redis.Redis, clock: Clock) -> None:
    plans = make(redis_client, clock)
    await plans.apply(pro(), created=T0, event_id="e1", who="stripe", source="")
    past_due = PlanChange(account="a", status="past_due", subscription_id="sub_1")
    await plans.apply(past_due, created=T0 + 50, event_id="e2", who="stripe", source="")
    await plans.apply(past_due, created=T0 + 90, event_id="e3", who="stripe", source="")
    plan = await stored(redis_client)
    assert plan["past_due_since"] == str(T0 + 50) and plan["tier"] == "pro"
    # Still paying (within the grace) as far as the indices go.
    assert await redis_client.sismember(keys.PAID_ACCOUNTS, "a")
    active = PlanChange(account="a", status="active", subscription_id="sub_1")
    await plans.apply(active, created=T0 + 99, event_id="e4", who="stripe", source="")
    assert "past_due_since" not in await stored(redis_client)


async def test_events_of_another_subscription(redis_client: redis.Redis, clock: Clock) -> None:
    plans = make(redis_client, clock)
    await plans.apply(pro(), created=T0, event_id="e1", who="stripe", source="")
    old_invoice = PlanChange(account="a", status="past_due", subscription_id="sub_0")
    result = await plans.apply(old_invoice, created=T0 + 5, event_id="e2", who="s", source="")
    assert (result.applied, result.reason) == (False, "other_subscription")
    old_end = pro(subscription_id="sub_0", status="canceled", may_replace=False)
    assert not (
        await plans.apply(old_end, created=T0 + 6, event_id="e3", who="s", source="")
    ).applied
    replacement = pro(subscription_id="sub_2", tier="enterprise")
    assert (
        await plans.apply(replacement, created=T0 + 7, event_id="e4", who="s", source="")
    ).applied
    assert (await stored(redis_client))["subscription_id"] == "sub_2"


async def test_to_free_and_churn(redis_client: redis.Redis, clock: Clock) -> None:
    plans = make(redis_client, clock)
    await plans.apply(pro(), created=T0, event_id="e1", who="stripe", source="")
    result = await plans.apply(
        PlanChange(account="a", to_free=True), created=T0 + 5, event_id="e2", who="s", source=""
    )
    assert result.applied and (result.tier, result.status) == ("free", "canceled")
    plan = await stored(redis_client)
    assert not {"period_start", "period_end", "subscription_id"} & plan.keys()
    assert await redis_client.smembers(keys.PAID_ACCOUNTS) == set()
    assert await redis_client.zrange(keys.CHURN, 0, -1, withscores=True) == [(b"a:", T0 + 5)]
    audit = await AuditLog(redis_client).recent()
    assert [e.what for e in audit] == ["plan.free", "plan.updated"]


async def test_stale_changes_still_repair_the_paid_index(
    redis_client: redis.Redis, clock: Clock
) -> None:
    plans = make(redis_client, clock)
    await plans.apply(pro(), created=T0, event_id="e1", who="stripe", source="")
    await redis_client.srem(keys.PAID_ACCOUNTS, "a")  # as if a crash came between the steps
    await plans.apply(pro(), created=T0, event_id="e1", who="stripe", source="")
    assert await redis_client.sismember(keys.PAID_ACCOUNTS, "a")


async def test_customer_to_account(redis_client: redis.Redis, clock: Clock) -> None:
    plans = make(redis_client, clock)
    assert await plans.account_for_customer("cus_1", {"account": "m"}) == "m"
    assert await plans.account_for_customer("cus_1") is None
    await redis_client.hset(keys.CUSTOMERS, "cus_1", "a")
    assert await plans.account_for_customer("cus_1", {}) == "a"
    assert await plans.account_for_customer(None) is None
