"""Billing periods: UTC calendar months for the free tier, roll-forward for paid plans."""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
import pytest
import redis.asyncio as redis

from gateway import keys
from gateway.periods import PeriodClock, calendar_month, utc_day
from tests.conftest import Clock, auth, echo, load_test_config

DAY = 86400


def _ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


@pytest.mark.parametrize(
    ("moment", "start", "end"),
    [
        (_ts(2026, 9, 21, 14, 13), _ts(2026, 9, 1), _ts(2026, 10, 1)),
        (_ts(2026, 12, 31, 23, 59, 59), _ts(2026, 12, 1), _ts(2027, 1, 1)),
        (_ts(2027, 1, 1), _ts(2027, 1, 1), _ts(2027, 2, 1)),
        (_ts(2028, 2, 29, 12), _ts(2028, 2, 1), _ts(2028, 3, 1)),
        (_ts(2026, 3, 31, 23, 59, 59), _ts(2026, 3, 1), _ts(2026, 4, 1)),
    ],
)
def test_calendar_month_is_the_utc_month(moment: int, start: int, end: int) -> None:
    assert calendar_month(moment) == (start, end)
    assert calendar_month(moment + 0.999) == (start, end)


def test_utc_day() -> None:
    assert utc_day(_ts(2026, 9, 21, 23, 59, 59)) == "2026-09-21"
    assert utc_day(_ts(2026, 9, 22)) == "2026-09-22"


def test_period_clock_agrees_with_the_plain_functions_across_boundaries() -> None:
    clock = PeriodClock()
    edges = [_ts(2026, 12, 31, 23, 59, 59), _ts(2027, 1, 1), _ts(2027, 1, 31, 23, 59, 59)]
    moments = [*edges, edges[0] - 0.5, *(e + d for e in edges for d in (-1, 0.5, 1, DAY))]
    # Forwards, backwards (a test clock may go back) and interleaved.
    for now in [*moments, *reversed(moments), *moments[::2]]:
        assert clock.month(now) == calendar_month(now), now
        assert clock.day(now) == utc_day(now), now
        assert clock.month_and_day(now) == (calendar_month(now), utc_day(now)), now


async def _get(gateway, path: str, account: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url(path), headers=auth(account)) as resp:
            await resp.read()
            return resp.status, resp.headers.get("RateLimit", "")


async def _usage(client: redis.Redis, account: str) -> dict[str, int]:
    raw = await client.hgetall(keys.usage_key(account))
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_free_tier_count_starts_fresh_each_utc_month(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    clock.now = _ts(2026, 9, 30, 23, 59, 58)
    for _ in range(100):
        assert (await _get(gateway, "/signals", "acct-month"))[0] == 200
    status, ratelimit = await _get(gateway, "/signals", "acct-month")
    assert status == 429
    clock.now = _ts(2026, 10, 1)  # the first second of the next month
    status, ratelimit = await _get(gateway, "/export/pdf", "acct-month")
    assert status == 200
    assert ratelimit == f'"monthly";r=95;t={31 * DAY}'
    assert await _usage(redis_client, "acct-month") == {
        "period_start": _ts(2026, 10, 1),
        "period_end": _ts(2026, 11, 1),
        "used": 5,
        "overage": 0,
    }


async def test_paid_period_rolls_forward_without_a_renewal_event(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    start = int(clock.now) - 20 * DAY
    length = 30 * DAY
    await redis_client.hset(
        keys.plan_key("acct-roll"),
        mapping={
            "tier": "pro",
            "status": "active",
            "period_start": start,
            "period_end": start + length,
        },
    )
    await redis_client.hset(
        keys.usage_key("acct-roll"),
        mapping={"period_start": start, "used": 10_050, "overage": 50},
    )
    # 75 days in: the renewal webhook never came; two and a half periods have passed.
    clock.now = start + 75 * DAY
    status, ratelimit = await _get(gateway, "/export/csv", "acct-roll")
    assert status == 200
    rolled = start + 2 * length
    assert ratelimit == f'"monthly";r=9997;t={rolled + length - int(clock.now)}'
    plan = await redis_client.hgetall(keys.plan_key("acct-roll"))
    assert int(plan[b"period_start"]) == rolled
    assert int(plan[b"period_end"]) == rolled + length
    assert plan[b"tier"] == b"pro"
    assert await _usage(redis_client, "acct-roll") == {
        "period_start": rolled,
        "period_end": rolled + length,
        "used": 3,
        "overage": 0,
        # The old period's 50 overage units were never reported: kept for the reporter.
        "carry_period_start": start,
        "carry_overage": 50,
        "carry_reported": 0,
    }


async def test_a_plan_set_to_cancel_does_not_roll_forward_past_its_end(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    start = int(clock.now) - 20 * DAY
    plan = {
        "tier": "pro",
        "status": "active",
        "period_start": start,
        "period_end": start + 30 * DAY,
        "cancel_at_period_end": 1,
    }
    await redis_client.hset(keys.plan_key("acct-leaving"), mapping=plan)
    status, ratelimit = await _get(gateway, "/export/csv", "acct-leaving")
    assert (status, ratelimit.split(";")[0]) == (200, '"monthly"')  # pro until the end ...
    assert (await redis_client.hget(keys.usage_key("acct-leaving"), "period_start")) == str(
        start
    ).encode()
    # ... and after it free rules, though the deletion's webhook never came.
    clock.now = start + 200 * DAY
    status, _ = await _get(gateway, "/export/csv", "acct-leaving")
    assert status == 200
    stored = await redis_client.hgetall(keys.plan_key("acct-leaving"))
    assert int(stored[b"period_end"]) == start + 30 * DAY  # not rolled forward
    usage = await redis_client.hgetall(keys.usage_key("acct-leaving"))
    assert int(usage[b"period_start"]) == calendar_month(clock.now)[0]  # the free tier's


async def test_period_end_itself_belongs_to_the_next_period(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    start, end = int(clock.now) - 10 * DAY, int(clock.now) + 20 * DAY
    await redis_client.hset(
        keys.plan_key("acct-edge"),
        mapping={"tier": "starter", "status": "active", "period_start": start, "period_end": end},
    )
    assert (await _get(gateway, "/signals", "acct-edge"))[0] == 200
    clock.now = end - 0.001
    assert (await _get(gateway, "/signals", "acct-edge"))[0] == 200
    assert (await _usage(redis_client, "acct-edge"))["used"] == 2
    clock.now = end
    assert (await _get(gateway, "/signals", "acct-edge"))[0] == 200
    usage = await _usage(redis_client, "acct-edge")
    assert (usage["period_start"], usage["used"]) == (end, 1)
