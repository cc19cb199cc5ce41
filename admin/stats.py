"""Revenue and usage figures for operators (GET /billing/admin/stats); README defines each.

- MRR: the monthly prices of paid plans the gateway honours now (active, trialing, or
  past_due within the grace). ARR = 12 x MRR. ARPU = MRR / those subscriptions.
- 30-day churn rate: subscriptions that stopped paying in the last 30 days (``mg:churn``)
  divided by the paying subscriptions 30 days ago (now + churned - started since).
- CLV: ARPU / the 30-day churn rate (null while nobody churned).
- Overage revenue: overage units of this period x the tier's overage price, over paid plans.
- Usage patterns: units by route and by day from the gateway's daily hashes; by hour from
  snapshots of today's totals that the admin app takes (``mg:usage:hourly:<day>``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis.asyncio as redis

from admin import keys
from admin.status import effective_plan
from config.model import Config
from gateway.periods import utc_day

WINDOW_SECONDS = 30 * 86400
PATTERN_DAYS = 30


def _decode(raw: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (raw or {}).items()}


# HGETALLs per pipeline round trip while summing the daily hashes.
_CHUNK = 1000


async def _daily_totals(client: redis.Redis, days: Sequence[str]) -> dict[str, Counter[str]]:
    """Units by route over every account for each of ``days``: one SCAN of the keyspace
    for all of them (never KEYS), not one per day; then their hashes, a chunk at a time."""
    totals: dict[str, Counter[str]] = {day: Counter() for day in days}
    found: dict[bytes, str] = {}  # a dict: SCAN may return a key twice
    async for name in client.scan_iter(match=f"{keys.PREFIX}:{{*}}:daily:*", count=1000):
        # The last ":daily:" of the name: an account id cannot move the day.
        day = name.rpartition(b":daily:")[2].decode(errors="replace")
        if day in totals:
            found[name] = day
    wanted = [(day, name) for name, day in found.items()]
    for at in range(0, len(wanted), _CHUNK):
        chunk = wanted[at : at + _CHUNK]
        async with client.pipeline(transaction=False) as pipe:
            for _, name in chunk:
                pipe.hgetall(name)
            rows = await pipe.execute()
        for (day, _), row in zip(chunk, rows, strict=True):
            for route, units in _decode(row).items():
                totals[day][route] += int(units)
    return totals


async def sample_hourly(client: redis.Redis, now: float) -> None:
    """Record today's running total under the current hour; hours differ by subtraction."""
    day = utc_day(now)
    await _record_hour(client, now, sum((await _daily_totals(client, [day]))[day].values()))


async def _record_hour(client: redis.Redis, now: float, total: int) -> None:
    day = utc_day(now)
    hour = datetime.fromtimestamp(now, UTC).hour
    await client.hset(keys.hourly_usage_key(day), f"{hour:02d}", total)
    await client.expire(keys.hourly_usage_key(day), 8 * 86400)


async def by_hour(client: redis.Redis, day: str) -> dict[str, int]:
    snapshots = {
        int(h): int(v) for h, v in _decode(await client.hgetall(keys.hourly_usage_key(day))).items()
    }
    hours: dict[str, int] = {}
    previous = 0
    for hour in sorted(snapshots):
        hours[f"{hour:02d}"] = max(0, snapshots[hour] - previous)
        previous = snapshots[hour]
    return hours


def _money(value: Decimal) -> float:
    return float(round(value, 2))


async def compute_stats(client: redis.Redis, config: Config, now: float) -> dict[str, object]:
    accounts = sorted([m.decode() async for m in client.sscan_iter(keys.PAID_ACCOUNTS, count=500)])
    plans: list[dict[str, str]] = []
    usages: list[dict[str, str]] = []
    if accounts:
        async with client.pipeline(transaction=False) as pipe:
            for account in accounts:
                pipe.hgetall(keys.plan_key(account))
                pipe.hgetall(keys.usage_key(account))
            rows = await pipe.execute()
        plans = [_decode(r) for r in rows[0::2]]
        usages = [_decode(r) for r in rows[1::2]]
    mrr = Decimal(0)
    overage_revenue = Decimal(0)
    by_tier: Counter[str] = Counter()
    for plan, usage in zip(plans, usages, strict=True):
        effective = effective_plan(plan, config, now)
        if effective.tier == "free":
            continue
        tier = config.tiers[effective.tier]
        mrr += tier.monthly_price_usd
        by_tier[effective.tier] += 1
        if usage.get("period_start") == str(effective.period_start):
            overage = int(usage.get("overage") or 0)
            overage_revenue += overage * (tier.overage_unit_price_usd or Decimal(0))
    active = sum(by_tier.values())
    since = now - WINDOW_SECONDS
    churned = int(await client.zcount(keys.CHURN, since, now))
    started = int(await client.zcount(keys.STARTS, since, now))
    at_start = active + churned - started
    churn_rate = churned / at_start if at_start > 0 else 0.0
    arpu = mrr / active if active else Decimal(0)
    clv = _money(arpu / Decimal(str(churn_rate))) if churn_rate > 0 else None

    routes: Counter[str] = Counter()
    days: dict[str, int] = {}
    window = [utc_day(now - back * 86400) for back in range(PATTERN_DAYS)]
    for day, totals in (await _daily_totals(client, window)).items():
        routes.update(totals)
        days[day] = sum(totals.values())
    today = utc_day(now)
    # Today's snapshot from the same walk, so the hours include this moment.
    await _record_hour(client, now, days[today])
    return {
        "currency": "usd",
        "mrr_usd": _money(mrr),
        "arr_usd": _money(mrr * 12),
        "arpu_usd": _money(arpu),
        "active_subscriptions": active,
        "active_subscriptions_by_tier": {t: by_tier.get(t, 0) for t in config.tiers if t != "free"},
        "churn": {
            "window_days": 30,
            "churned": churned,
            "started": started,
            "subscriptions_at_window_start": max(at_start, 0),
            "rate": round(churn_rate, 4),
        },
        "clv_usd": clv,
        "overage_revenue_this_period_usd": _money(overage_revenue),
        "usage": {
            "window_days": PATTERN_DAYS,
            "top_routes": [
                {"route": route, "units": units} for route, units in routes.most_common(10)
            ],
            "by_day": dict(sorted(days.items())),
            "by_hour_today": await by_hour(client, today),
        },
    }
