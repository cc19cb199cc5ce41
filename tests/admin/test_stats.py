"""GET /billing/admin/stats: every figure from seeded plans, usage, churn and daily hashes."""

from __future__ import annotations

from typing import Any

import aiohttp
import redis.asyncio as redis

from admin import keys
from tests.admin import support
from tests.admin.support import StartAdmin
from tests.conftest import Clock, auth

start_admin = support.start_admin

DAY = 86400


async def seed(client: redis.Redis, now: int) -> None:
    start, end = now - 10 * DAY, now + 20 * DAY
    plans: dict[str, dict[str, Any]] = {
        "a1": {"tier": "pro", "status": "active"},
        "a2": {"tier": "starter", "status": "trialing"},
        "a3": {"tier": "enterprise", "status": "past_due", "past_due_since": now - DAY},
        "a4": {"tier": "pro", "status": "past_due", "past_due_since": now - 4 * DAY},
        "a5": {"tier": "pro", "status": "canceled"},
    }
    for account, fields in plans.items():
        await client.hset(
            keys.plan_key(account),
            mapping={**fields, "period_start": start, "period_end": end},
        )
        if fields["status"] != "canceled":
            await client.sadd(keys.PAID_ACCOUNTS, account)
    usage = {"a1": 100, "a2": 10, "a3": 0, "a4": 500}
    for account, overage in usage.items():
        await client.hset(
            keys.usage_key(account),
            mapping={"period_start": start, "used": 1000 + overage, "overage": overage},
        )
    await client.zadd(
        keys.CHURN, {"x:sub_a": now - 2 * DAY, "y:sub_b": now - 29 * DAY, "z:sub_c": now - 31 * DAY}
    )
    await client.zadd(keys.STARTS, {"a2:sub_2": now - 5 * DAY, "old:sub": now - 90 * DAY})
    await client.hset(
        keys.daily_prefix("a1") + "2026-09-21", mapping={"/signals": 10, "/export/pdf": 50}
    )
    await client.hset(keys.daily_prefix("a2") + "2026-09-20", mapping={"/signals": 5})


async def stats(server: Any) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            server.make_url("/billing/admin/stats"), headers=auth("ops", role="admin")
        ) as resp,
    ):
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def test_revenue_churn_and_usage_figures(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    now = int(clock.now)  # 2026-09-21T14:13:20Z
    await seed(redis_client, now)
    server = await start_admin()
    body = await stats(server)
    # a1 pro + a2 starter (trialing) + a3 enterprise (past_due within the 3-day grace);
    # a4 is past its grace, a5 canceled.
    assert body["mrr_usd"] == 627.0
    assert body["arr_usd"] == 7524.0
    assert body["active_subscriptions"] == 3
    assert body["arpu_usd"] == 209.0
    assert body["active_subscriptions_by_tier"] == {"starter": 1, "pro": 1, "enterprise": 1}
    # Two churned in 30 days; one started: 3 + 2 - 1 = 4 paying 30 days ago.
    assert body["churn"] == {
        "window_days": 30,
        "churned": 2,
        "started": 1,
        "subscriptions_at_window_start": 4,
        "rate": 0.5,
    }
    assert body["clv_usd"] == 418.0
    # 100 x 0.02 (pro) + 10 x 0.03 (starter); a4's overage is not honoured as paid.
    assert body["overage_revenue_this_period_usd"] == 2.3
    usage = body["usage"]
    assert usage["top_routes"] == [
        {"route": "/export/pdf", "units": 50},
        {"route": "/signals", "units": 15},
    ]
    assert usage["by_day"]["2026-09-21"] == 60 and usage["by_day"]["2026-09-20"] == 5
    assert len(usage["by_day"]) == 30
    assert usage["by_hour_today"] == {"14": 60}
    clock.advance(3600)
    await redis_client.hincrby(keys.daily_prefix("a1") + "2026-09-21", "/signals", 7)
    body = await stats(server)
    assert body["usage"]["by_hour_today"] == {"14": 60, "15": 7}


async def test_no_churn_means_no_clv(start_admin: StartAdmin, redis_client: redis.Redis) -> None:
    server = await start_admin()
    body = await stats(server)
    assert body["clv_usd"] is None
    assert body["churn"]["rate"] == 0.0
    assert body["mrr_usd"] == 0.0 and body["active_subscriptions"] == 0


async def test_usage_over_thirty_days_is_one_scan_of_the_keyspace(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    # Every stats call sums 30 days of daily hashes over all accounts; a SCAN per day
    # walked the whole keyspace 30 times.
    now = int(clock.now)
    await seed(redis_client, now)
    for i in range(40):  # other keys and days than the window's: walked past, not summed
        await redis_client.hset(keys.daily_prefix(f"old-{i}") + "2026-07-01", "/signals", 1)
    server = await start_admin()
    before = (await redis_client.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0)
    body = await stats(server)
    after = (await redis_client.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0)
    # This database's few keys fit one SCAN call, so one walk (the hourly snapshot of
    # today included) is one call; a walk per day was 30 or more.
    assert after - before == 1
    assert body["usage"]["by_day"]["2026-09-21"] == 60
    assert sum(body["usage"]["by_day"].values()) == 65
