"""Overage units charged by the gateway reach Stripe's Billing Meter exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as redis

from admin.audit import AuditLog
from admin.keys import LAPSED_ACCOUNTS
from admin.plans import PlanChange, Plans
from admin.stripe_billing import StripeBilling
from admin.usage_reporter import PAID_ACCOUNTS, UsageReporter, run_reporter, usage_key
from config import Config
from gateway.redis_quota import RedisQuotaStore
from tests.admin.stripe_double import StripeDouble
from tests.conftest import Clock

ROUTE = "/export/pdf"
PERIOD = 30 * 86400


async def paid_account(
    account: str, billing: StripeBilling, r: redis.Redis, clock: Clock, tier: str = "pro"
) -> tuple[str, int]:
    """A customer at the double and the plan the app side would write, period from now."""
    customer = await billing.ensure_customer(account)
    start = int(clock.now)
    await write_active_plan(r, account, tier, start)
    await r.sadd(PAID_ACCOUNTS, account)
    return customer, start


async def write_active_plan(r: redis.Redis, account: str, tier: str, start: int) -> None:
    """The plan hash the app side writes for an active subscription, one period from start."""
    await r.hset(
        f"mg:{{{account}}}:plan",
        mapping={
            "tier": tier,
            "status": "active",
            "period_start": start,
            "period_end": start + PERIOD,
        },
    )


PaidAccount = Callable[..., Awaitable[tuple[str, int]]]


@pytest.fixture
def paid(stripe_billing: StripeBilling, redis_client: redis.Redis, clock: Clock) -> PaidAccount:
    """paid(account, tier="pro"): paid_account at the double, on the test clock."""

    async def make(account: str, tier: str = "pro") -> tuple[str, int]:
        return await paid_account(account, stripe_billing, redis_client, clock, tier)

    return make


@pytest.fixture
def store(redis_client: redis.Redis, gateway_config: Config, clock: Clock) -> RedisQuotaStore:
    """The gateway's quota store, charging on the test clock."""
    return RedisQuotaStore(redis_client, gateway_config, clock=clock)


@pytest.fixture
def reporter(
    redis_client: redis.Redis, stripe_billing: StripeBilling, clock: Clock
) -> UsageReporter:
    """A usage reporter sending to the Stripe double, on the test clock."""
    return UsageReporter(redis_client, stripe_billing, clock=clock)


async def charge(store: RedisQuotaStore, account: str, units: int) -> None:
    decision = await store.charge(account, ROUTE, units)
    assert decision.allowed, decision


async def test_overage_is_reported_once_and_then_only_the_increase(
    paid: PaidAccount,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    clock: Clock,
    store: RedisQuotaStore,
    reporter: UsageReporter,
) -> None:
    customer, start = await paid("acct-1")
    await charge(store, "acct-1", 10_000)  # pro includes 10,000 units
    assert await reporter.run_once() == []

    await charge(store, "acct-1", 20)
    await charge(store, "acct-1", 5)
    (report,) = await reporter.run_once()
    assert (report.units, report.identifier) == (25, f"acct-1:{start}:0:25")
    assert stripe_double.metered_total(customer) == 25
    event = stripe_double.meter_events[report.identifier]
    assert event["event_name"] == "metergate_overage_units"
    assert event["payload"] == {"stripe_customer_id": customer, "value": "25"}
    assert event["timestamp"] == int(clock.now)
    assert await reporter.run_once() == []

    await charge(store, "acct-1", 7)
    (report,) = await reporter.run_once()
    assert report.identifier == f"acct-1:{start}:25:32"
    assert stripe_double.metered_total(customer) == 32
    usage = await redis_client.hgetall(usage_key("acct-1"))
    assert usage[b"reported"] == b"32"
    assert b"report_pending" not in usage


async def test_a_crash_after_sending_resends_the_same_event_and_bills_once(
    paid: PaidAccount,
    stripe_billing: StripeBilling,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    clock: Clock,
    store: RedisQuotaStore,
) -> None:
    customer, start = await paid("acct-1")
    await charge(store, "acct-1", 10_040)

    dying = UsageReporter(redis_client, stripe_billing, clock=clock)
    claim = await dying.claim("acct-1")
    assert claim is not None
    await dying.send(claim)  # Stripe has the 40 units; the process dies before committing.
    assert stripe_double.metered_total(customer) == 40

    await charge(store, "acct-1", 9)  # traffic goes on meanwhile
    sent_at = int(clock.now)
    clock.advance(60)  # the next interval: the resend must still be the very same event
    restarted = UsageReporter(redis_client, stripe_billing, clock=clock)
    reports = await restarted.run_once()
    # First the same claim again (same identifier: Stripe drops it), then the 9 new units.
    assert [(r.identifier, r.units) for r in reports] == [
        (f"acct-1:{start}:0:40", 40),
        (f"acct-1:{start}:40:49", 9),
    ]
    sent = [p for _, path, p in stripe_double.requests if path == "/v1/billing/meter_events"]
    assert [(p["identifier"], int(p["timestamp"])) for p in sent] == [
        (f"acct-1:{start}:0:40", sent_at),
        (f"acct-1:{start}:0:40", sent_at),  # same parameters, so Stripe's key accepts it
        (f"acct-1:{start}:40:49", sent_at + 60),
    ]
    assert len(stripe_double.meter_events) == 2
    assert stripe_double.metered_total(customer) == 49
    assert await restarted.run_once() == []


async def test_an_account_stripe_refuses_does_not_hold_up_the_others(
    paid: PaidAccount,
    stripe_billing: StripeBilling,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    clock: Clock,
    store: RedisQuotaStore,
) -> None:
    await paid("acct-1")
    second, _ = await paid("acct-2")
    for account in ("acct-1", "acct-2"):
        await charge(store, account, 10_040)
    dying = UsageReporter(redis_client, stripe_billing, clock=clock)
    claim = await dying.claim("acct-1")
    assert claim is not None
    await dying.send(claim)
    # A claim whose resend differs from what Stripe holds under its key (as one written
    # before timestamps were kept would): Stripe answers 400 idempotency_error.
    await redis_client.hset(usage_key("acct-1"), "report_pending_at", claim.timestamp - 30)
    reports = await UsageReporter(redis_client, stripe_billing, clock=clock).run_once()
    assert [r.account for r in reports] == ["acct-2"]  # reported all the same
    assert stripe_double.metered_total(second) == 40
    assert await redis_client.hget(usage_key("acct-1"), "report_pending") is not None  # kept


async def test_a_new_period_starts_counting_from_zero(
    paid: PaidAccount,
    stripe_double: StripeDouble,
    clock: Clock,
    store: RedisQuotaStore,
    reporter: UsageReporter,
) -> None:
    customer, start = await paid("acct-1", tier="starter")
    await charge(store, "acct-1", 1_100)  # starter includes 1,000
    (first,) = await reporter.run_once()
    assert first.units == 100

    clock.advance(PERIOD + 60)  # the renewal: charge.lua starts the next period
    await charge(store, "acct-1", 1_003)
    (second,) = await reporter.run_once()
    assert (second.period_start, second.reported, second.units) == (start + PERIOD, 0, 3)
    assert stripe_double.metered_total(customer) == 103


async def test_stripe_down_keeps_the_claim_for_the_next_run(
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    clock: Clock,
    store: RedisQuotaStore,
) -> None:
    settings = stripe_double.settings
    billing = StripeBilling(
        stripe_double.make_settings(
            max_network_retries=0,
            price_ids=settings.price_ids,
            overage_price_ids=settings.overage_price_ids,
            meter_event_name=settings.meter_event_name,
        ),
        redis_client,
    )
    try:
        customer, _ = await paid_account("acct-1", billing, redis_client, clock)
        await paid_account("acct-2", billing, redis_client, clock)
        await charge(store, "acct-1", 10_010)
        await charge(store, "acct-2", 10_020)
        reporter = UsageReporter(redis_client, billing, clock=clock)

        stripe_double.down = "500"
        assert await reporter.run_once() == []
        pending = await redis_client.hget(usage_key("acct-1"), "report_pending")
        pending2 = await redis_client.hget(usage_key("acct-2"), "report_pending")
        assert (pending is None) != (pending2 is None)  # stopped after the first failure

        stripe_double.down = None
        assert sorted(r.units for r in await reporter.run_once()) == [10, 20]
        assert stripe_double.metered_total(customer) == 10
        assert stripe_double.metered_total() == 30
    finally:
        await billing.aclose()


async def test_accounts_without_a_customer_or_overage_are_skipped(
    paid: PaidAccount,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    clock: Clock,
    store: RedisQuotaStore,
    reporter: UsageReporter,
) -> None:
    await redis_client.sadd(PAID_ACCOUNTS, "no-customer")
    await write_active_plan(redis_client, "no-customer", "pro", int(clock.now))
    await charge(store, "no-customer", 10_050)
    await paid("quiet")
    await charge(store, "quiet", 10)
    assert await reporter.run_once() == []
    assert stripe_double.meter_event_requests == 0


async def test_run_reporter_reports_in_the_background_until_cancelled(
    paid: PaidAccount,
    stripe_billing: StripeBilling,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    gateway_config: Config,
    clock: Clock,
    store: RedisQuotaStore,
) -> None:
    customer, _ = await paid("acct-1")
    await charge(store, "acct-1", 10_004)
    task = asyncio.create_task(
        run_reporter(
            redis_client, stripe_billing, gateway_config, clock=clock, interval_seconds=0.01
        )
    )
    try:
        for _ in range(200):
            if stripe_double.metered_total(customer) == 4:
                break
            await asyncio.sleep(0.01)
        await charge(store, "acct-1", 2)
        for _ in range(200):
            if stripe_double.metered_total(customer) == 6:
                break
            await asyncio.sleep(0.01)
        assert stripe_double.metered_total(customer) == 6
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_overage_charged_after_the_last_report_is_billed_after_rollover(
    paid: PaidAccount,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    clock: Clock,
    store: RedisQuotaStore,
    reporter: UsageReporter,
) -> None:
    customer, start = await paid("acct-1", tier="starter")
    await charge(store, "acct-1", 1_100)  # starter includes 1,000
    (first,) = await reporter.run_once()
    assert first.units == 100
    await charge(store, "acct-1", 40)  # overage the reporter has not seen yet

    clock.advance(PERIOD + 60)  # the period ends before the next report
    await charge(store, "acct-1", 1_002)
    reports = await reporter.run_once()
    # First the old period's last 40 units (stamped inside it), then the new period's 2.
    assert [(r.period_start, r.reported, r.overage) for r in reports] == [
        (start, 100, 140),
        (start + PERIOD, 0, 2),
    ]
    assert stripe_double.meter_events[reports[0].identifier]["timestamp"] == start + PERIOD - 1
    assert stripe_double.metered_total(customer) == 142
    assert await reporter.run_once() == []
    usage = await redis_client.hgetall(usage_key("acct-1"))
    assert b"carry_period_start" not in usage


async def test_a_claim_sent_just_before_rollover_is_not_billed_twice(
    paid: PaidAccount,
    stripe_double: StripeDouble,
    clock: Clock,
    store: RedisQuotaStore,
    reporter: UsageReporter,
) -> None:
    customer, start = await paid("acct-1", tier="starter")
    await charge(store, "acct-1", 1_030)
    claim = await reporter.claim("acct-1")
    assert claim is not None and claim.units == 30
    await reporter.send(claim)  # sent, then the period rolls over before the commit
    await charge(store, "acct-1", 5)  # 35 overage in the old period now
    clock.advance(PERIOD + 60)
    await charge(store, "acct-1", 1)
    assert await reporter.commit(claim) == 1

    reports = await reporter.run_once()
    assert [(r.period_start, r.reported, r.overage) for r in reports] == [(start, 30, 35)]
    assert stripe_double.metered_total(customer) == 35


async def test_overage_of_a_lapsed_account_is_reported_before_it_leaves_the_set(
    paid: PaidAccount,
    stripe_double: StripeDouble,
    redis_client: redis.Redis,
    clock: Clock,
    store: RedisQuotaStore,
    reporter: UsageReporter,
) -> None:
    customer, start = await paid("acct-1")
    plans = Plans(redis_client, AuditLog(redis_client, clock=clock), clock=clock)
    await charge(store, "acct-1", 10_012)
    # The subscription stops paying before the reporter ran: the account leaves the paid set
    # but its 12 overage units are still billed, once.
    await plans.apply(
        PlanChange(account="acct-1", status="unpaid", fresh=True),
        created=start,
        event_id="evt_unpaid",
        who="test",
        source="test",
    )
    assert not await redis_client.sismember(PAID_ACCOUNTS, "acct-1")
    assert await redis_client.sismember(LAPSED_ACCOUNTS, "acct-1")
    (report,) = await reporter.run_once()
    assert report.units == 12 and stripe_double.metered_total(customer) == 12
    assert not await redis_client.sismember(LAPSED_ACCOUNTS, "acct-1")
    assert await reporter.run_once() == []


async def test_a_claim_left_without_a_timestamp_is_stamped_in_its_own_period(
    paid: PaidAccount,
    stripe_billing: StripeBilling,
    redis_client: redis.Redis,
    clock: Clock,
) -> None:
    # As the code before timestamps were kept left it, after its period rolled over.
    await paid("acct-1")
    now = int(clock.now)
    ended = now - 500
    await redis_client.hset(
        usage_key("acct-1"),
        mapping={
            "period_start": ended,
            "period_end": ended + 30 * 86400,
            "carry_period_start": ended - 30 * 86400,
            "carry_period_end": ended,
            "carry_overage": 40,
            "carry_reported": 0,
            "report_pending": f"{ended - 30 * 86400}:0:40",
        },
    )
    report = await UsageReporter(redis_client, stripe_billing, clock=clock).claim("acct-1")
    assert report is not None
    assert (report.claim, report.timestamp) == (f"{ended - 30 * 86400}:0:40", ended - 1)
    assert (
        await redis_client.hget(usage_key("acct-1"), "report_pending_at") == str(ended - 1).encode()
    )
