"""Charging: exact quotas under concurrency, paid tiers and overage, lapsed plans, NOSCRIPT."""

from __future__ import annotations

import asyncio
import binascii
import re
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as redis
from multidict import CIMultiDict

from config import Config
from gateway import keys
from gateway.periods import calendar_month, utc_day
from gateway.redis_client import create_redis
from gateway.redis_quota import RedisQuotaStore
from tests.conftest import Clock, auth, echo, load_test_config, replace_section

DAY = 86400


async def _upstream_config(start_upstream, extra: str = "") -> Config:
    upstream = await start_upstream({"/{tail:.*}": echo})
    return load_test_config(str(upstream.make_url("")), extra=extra)


async def _get_many(gateway, path: str, headers: dict[str, str], n: int) -> list[int]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.get(gateway.make_url(path), headers=headers) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def _get(gateway, path: str, account: str) -> tuple[int, Any, CIMultiDict[str]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url(path), headers=auth(account)) as resp:
            return resp.status, await resp.json(), resp.headers.copy()


async def _usage(client: redis.Redis, account: str) -> dict[str, int]:
    raw = await client.hgetall(keys.usage_key(account))
    return {k.decode(): int(v) for k, v in raw.items()}


async def _write_plan(
    client: redis.Redis, account: str, clock: Clock, tier: str = "pro", **fields: object
) -> tuple[int, int]:
    start, end = int(clock.now) - 10 * DAY, int(clock.now) + 20 * DAY
    plan: dict[str, object] = {
        "tier": tier,
        "status": "active",
        "period_start": start,
        "period_end": end,
        **fields,
    }
    await client.hset(keys.plan_key(account), mapping=plan)  # type: ignore[arg-type]
    return start, end


async def _set_used(client: redis.Redis, account: str, period_start: int, used: int) -> None:
    await client.hset(
        keys.usage_key(account),
        mapping={"period_start": period_start, "used": used, "overage": 0},
    )


# -- the free tier's hard stop ------------------------------------------------------------


@pytest.mark.slow
async def test_free_tier_stops_at_exactly_100_under_parallel_requests(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    statuses = await _get_many(gateway, "/signals", auth("acct-free"), 150)
    assert statuses.count(200) == 100
    assert statuses.count(429) == 50
    assert (await _usage(redis_client, "acct-free"))["used"] == 100


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "one-by-one"])
@pytest.mark.parametrize(("n", "remaining"), [(30, 7), (8, 20), (12, 12)])
async def test_n_parallel_against_remaining_q_succeed_min_n_q(
    n: int,
    remaining: int,
    coalesce: bool,
    start_upstream,
    start_gateway,
    redis_client: redis.Redis,
    clock: Clock,
) -> None:
    config = replace_section(
        await _upstream_config(start_upstream), metering={"coalesce": coalesce}
    )
    gateway = await start_gateway(config)
    month_start, _ = calendar_month(clock.now)
    await _set_used(redis_client, "acct-q", month_start, 100 - remaining)
    statuses = await _get_many(gateway, "/signals", auth("acct-q"), n)
    assert statuses.count(200) == min(n, remaining)
    assert statuses.count(429) == n - min(n, remaining)
    assert (await _usage(redis_client, "acct-q"))["used"] == 100 - remaining + min(n, remaining)


async def test_a_charge_that_does_not_fit_is_refused_whole(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    await _set_used(redis_client, "acct-fit", calendar_month(clock.now)[0], 98)
    status, _, _ = await _get(gateway, "/export/csv", "acct-fit")  # costs 3, 2 left
    assert status == 429
    status, _, _ = await _get(gateway, "/signals/history/X", "acct-fit")  # costs 2
    assert status == 200
    assert (await _usage(redis_client, "acct-fit"))["used"] == 100


async def test_429_names_tier_limit_usage_and_upgrade(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    month_start, month_end = calendar_month(clock.now)
    await _set_used(redis_client, "acct-429", month_start, 100)
    status, body, headers = await _get(gateway, "/signals", "acct-429")
    assert status == 429
    error = body["error"]
    assert error["code"] == "quota_exceeded"
    details = error["details"]
    assert details["tier"] == "free"
    assert details["limit"] == 100
    assert details["used"] == 100
    assert "starter" in details["upgrade"]
    reset = month_end - int(clock.now)
    assert details["reset_seconds"] == reset
    assert headers["Retry-After"] == str(reset)
    assert headers["RateLimit"] == f'"monthly";r=0;t={reset}'
    window = month_end - month_start
    assert headers["RateLimit-Policy"] == f'"monthly";q=100;w={window};qu="units"'
    assert headers["Content-Type"].startswith("application/json")


async def test_ratelimit_headers_are_structured_fields(
    start_upstream, start_gateway, clock: Clock
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    status, _, headers = await _get(gateway, "/export/pdf", "acct-sf")
    assert status == 200
    # sf-item: a quoted policy name, then ;key=value parameters (RFC 8941).
    item = re.compile(r'^"[a-z]+"(;[a-z]+=("[a-z]+"|\d+))+$')
    assert item.match(headers["RateLimit"]), headers["RateLimit"]
    assert item.match(headers["RateLimit-Policy"]), headers["RateLimit-Policy"]
    params = dict(p.split("=") for p in headers["RateLimit"].split(";")[1:])
    assert params["r"] == "95"
    assert int(params["t"]) == calendar_month(clock.now)[1] - int(clock.now)


# -- paid tiers ---------------------------------------------------------------------------


async def test_paid_tier_counts_overage_beyond_included_units(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    start, end = await _write_plan(redis_client, "acct-pro", clock)
    await _set_used(redis_client, "acct-pro", start, 9_999)
    status, _, headers = await _get(gateway, "/export/csv", "acct-pro")  # 3 units
    assert status == 200
    assert headers["RateLimit"] == f'"monthly";r=0;t={end - int(clock.now)}'
    assert headers["RateLimit-Policy"].startswith('"monthly";q=10000;')
    assert await _usage(redis_client, "acct-pro") == {
        "period_start": start,
        "used": 10_002,
        "overage": 2,
    }
    status, _, _ = await _get(gateway, "/export/pdf", "acct-pro")  # 5 units, all overage
    assert status == 200
    usage = await _usage(redis_client, "acct-pro")
    assert (usage["used"], usage["overage"]) == (10_007, 7)


async def test_backend_sees_the_tier_whose_rules_applied(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    await _write_plan(redis_client, "acct-tier", clock, tier="starter")
    _, body, _ = await _get(gateway, "/signals", "acct-tier")
    seen = {k.lower(): v for k, v in body["headers"]}
    assert seen["x-metergate-tier"] == "starter"
    assert seen["x-metergate-account"] == "acct-tier"
    assert seen["x-metergate-units"] == "1"


async def test_overage_cap_denies_beyond_the_spend_limit(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    config = await _upstream_config(start_upstream)
    tiers = dict(config.tiers)
    tiers["pro"] = msgspec.structs.replace(tiers["pro"], max_overage_units=5)
    gateway = await start_gateway(msgspec.structs.replace(config, tiers=tiers))
    start, _ = await _write_plan(redis_client, "acct-cap", clock)
    await _set_used(redis_client, "acct-cap", start, 10_000)
    status, _, _ = await _get(gateway, "/export/csv", "acct-cap")  # overage 3
    assert status == 200
    status, body, headers = await _get(gateway, "/export/csv", "acct-cap")  # would be 6
    assert status == 429
    assert body["error"]["code"] == "overage_cap_reached"
    assert body["error"]["details"]["tier"] == "pro"
    assert "Retry-After" in headers
    status, _, _ = await _get(gateway, "/signals/history/X", "acct-cap")  # exactly 5
    assert status == 200
    usage = await _usage(redis_client, "acct-cap")
    assert (usage["used"], usage["overage"]) == (10_005, 5)


@pytest.mark.parametrize(
    ("status", "since_offset", "paid_rules"),
    [
        ("active", None, True),
        ("trialing", None, True),
        ("past_due", -3600, True),  # within the 3-day grace
        ("past_due", -4 * DAY, False),  # beyond it
        ("unpaid", None, False),
        ("canceled", None, False),
        ("incomplete_expired", None, False),
    ],
)
async def test_plan_status_decides_whose_rules_apply(
    status: str,
    since_offset: int | None,
    paid_rules: bool,
    start_upstream,
    start_gateway,
    redis_client: redis.Redis,
    clock: Clock,
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    fields: dict[str, object] = {"status": status}
    if since_offset is not None:
        fields["past_due_since"] = int(clock.now) + since_offset
    await _write_plan(redis_client, "acct-st", clock, **fields)
    code, body, headers = await _get(gateway, "/signals", "acct-st")
    assert code == 200
    seen = {k.lower(): v for k, v in body["headers"]}
    assert seen["x-metergate-tier"] == ("pro" if paid_rules else "free")
    expected_quota = 10_000 if paid_rules else 100
    assert headers["RateLimit-Policy"].startswith(f'"monthly";q={expected_quota};')


async def test_lapsed_plan_is_hard_stopped_like_free(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    start, _ = await _write_plan(redis_client, "acct-lapsed", clock, status="unpaid")
    await _set_used(redis_client, "acct-lapsed", start, 99)
    status, _, headers = await _get(gateway, "/signals", "acct-lapsed")
    assert status == 200
    assert headers["RateLimit-Policy"].startswith('"monthly";q=100;')
    status, body, _ = await _get(gateway, "/signals", "acct-lapsed")
    assert status == 429
    assert body["error"]["details"]["tier"] == "free"


async def test_lapsed_plan_after_its_period_counts_calendar_months(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    ended = int(clock.now) - DAY
    await redis_client.hset(
        keys.plan_key("acct-gone"),
        mapping={
            "tier": "pro",
            "status": "canceled",
            "period_start": ended - 30 * DAY,
            "period_end": ended,
        },
    )
    await _set_used(redis_client, "acct-gone", ended - 30 * DAY, 5_000)
    status, _, _ = await _get(gateway, "/signals", "acct-gone")
    assert status == 200
    usage = await _usage(redis_client, "acct-gone")
    assert (usage["period_start"], usage["used"]) == (calendar_month(clock.now)[0], 1)
    plan = await redis_client.hgetall(keys.plan_key("acct-gone"))
    assert int(plan[b"period_end"]) == ended  # only paying plans roll forward


async def test_route_restricted_to_tiers_refuses_others_with_403(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    extra = """
[[routes]]
path = "/signals/premium"
methods = ["GET"]
cost = 4
tiers = ["pro", "enterprise"]
"""
    gateway = await start_gateway(await _upstream_config(start_upstream, extra))
    status, body, headers = await _get(gateway, "/signals/premium", "acct-free-user")
    assert status == 403
    assert body["error"]["code"] == "tier_not_allowed"
    assert body["error"]["details"]["tier"] == "free"
    assert "Retry-After" not in headers
    assert await redis_client.exists(keys.usage_key("acct-free-user")) == 0

    await _write_plan(redis_client, "acct-pro-user", clock)
    status, _, _ = await _get(gateway, "/signals/premium", "acct-pro-user")
    assert status == 200
    assert (await _usage(redis_client, "acct-pro-user"))["used"] == 4


async def test_routes_sharing_a_path_keep_their_own_tiers_and_cost(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    # One path, two routes: a later one for another method must not lift the first's
    # tier restriction, nor tell the backend its cost.
    extra = """
[[routes]]
path = "/reports"
methods = ["GET"]
cost = 10
tiers = ["pro"]

[[routes]]
path = "/reports"
methods = ["POST"]
cost = 1
"""
    gateway = await start_gateway(await _upstream_config(start_upstream, extra))
    status, body, _ = await _get(gateway, "/reports", "acct-free-reports")
    assert (status, body["error"]["code"]) == (403, "tier_not_allowed")

    await _write_plan(redis_client, "acct-pro-reports", clock)
    status, body, _ = await _get(gateway, "/reports", "acct-pro-reports")
    assert status == 200
    seen = {k.lower(): v for k, v in body["headers"]}
    assert seen["x-metergate-units"] == "10"
    assert (await _usage(redis_client, "acct-pro-reports"))["used"] == 10


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "one-by-one"])
async def test_more_concurrent_charges_than_redis_connections_all_get_decided(
    coalesce: bool, redis_url: str, redis_client: redis.Redis, clock: Clock
) -> None:
    """A burst wider than the connection pool waits for a connection; it is not a 503."""
    config = replace_section(
        load_test_config("http://127.0.0.1:9"), metering={"coalesce": coalesce}
    )
    client = create_redis(redis_url, timeout=2.0, max_connections=8)
    store = RedisQuotaStore(client, config, clock=clock)
    try:
        results = await asyncio.gather(
            *(store.charge(f"acct-wide-{i % 3}", "/signals", 1) for i in range(360)),
            return_exceptions=True,
        )
    finally:
        await store.aclose()
        await client.aclose()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert sum(1 for r in results if r.allowed) == 300  # type: ignore[union-attr]
    for i in range(3):
        assert (await _usage(redis_client, f"acct-wide-{i}"))["used"] == 100


async def test_tier_restriction_holds_on_a_route_that_costs_nothing(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    extra = """
[[routes]]
path = "/signals/preview"
methods = ["GET"]
tiers = ["pro"]
"""
    gateway = await start_gateway(await _upstream_config(start_upstream, extra))
    status, body, _ = await _get(gateway, "/signals/preview", "acct-free-preview")
    assert (status, body["error"]["code"]) == (403, "tier_not_allowed")

    start, _ = await _write_plan(redis_client, "acct-pro-preview", clock)
    await _set_used(redis_client, "acct-pro-preview", start, 10_000)
    status, body, _ = await _get(gateway, "/signals/preview", "acct-pro-preview")
    assert status == 200
    seen = {k.lower(): v for k, v in body["headers"]}
    assert (seen["x-metergate-tier"], seen["x-metergate-units"]) == ("pro", "0")
    assert (await _usage(redis_client, "acct-pro-preview"))["used"] == 10_000
    assert await redis_client.exists(keys.daily_key("acct-pro-preview", utc_day(clock.now))) == 0

    # Lapsed and far over the free quota: a route that costs nothing is still not closed
    # by the quota, only by its tier list.
    await redis_client.hset(keys.plan_key("acct-pro-preview"), "status", "canceled")
    status, body, _ = await _get(gateway, "/signals/preview", "acct-pro-preview")
    assert (status, body["error"]["code"]) == (403, "tier_not_allowed")


# -- Redis details ------------------------------------------------------------------------


async def test_daily_usage_by_route_is_kept_with_a_ttl(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    for path in ("/signals", "/signals", "/export/pdf"):
        assert (await _get(gateway, path, "acct-daily"))[0] == 200
    daily = keys.daily_key("acct-daily", utc_day(clock.now))
    assert await redis_client.hgetall(daily) == {b"/signals": b"2", b"/export/pdf": b"5"}
    ttl = await redis_client.ttl(daily)
    assert 0 < ttl <= 3_456_000


async def test_noscript_fallback_reloads_and_charges_once(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    assert (await _get(gateway, "/signals", "acct-ns"))[0] == 200
    await redis_client.script_flush()
    status, _, headers = await _get(gateway, "/export/csv", "acct-ns")
    assert status == 200
    assert (await _usage(redis_client, "acct-ns"))["used"] == 4
    assert headers["RateLimit"].startswith('"monthly";r=96;')


async def test_noscript_fallback_in_a_coalesced_batch(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    gateway = await start_gateway(await _upstream_config(start_upstream))
    await redis_client.script_flush()
    statuses = await _get_many(gateway, "/signals", auth("acct-nsb"), 20)
    assert statuses == [200] * 20
    assert (await _usage(redis_client, "acct-nsb"))["used"] == 20


async def test_a_batch_where_only_some_scripts_are_loaded(
    redis_url: str, redis_client: redis.Redis, clock: Clock
) -> None:
    """One pipelined batch: the charge script is cached, the refund script is not yet."""
    config = load_test_config("http://127.0.0.1:9")
    client = create_redis(redis_url, timeout=2.0)
    store = RedisQuotaStore(client, config, clock=clock)
    await redis_client.script_flush()
    try:
        first = await store.charge("acct-mixed", "/export/pdf", 5)
        second, refunded = await asyncio.gather(
            store.charge("acct-mixed", "/signals", 1),
            store.refund("acct-mixed", "/export/pdf", 5, first),
        )
    finally:
        await store.aclose()
        await client.aclose()
    assert (first.used, second.allowed, refunded) == (5, True, 5)
    assert (await _usage(redis_client, "acct-mixed"))["used"] == 1


def _crc16(data: bytes) -> int:
    return binascii.crc_hqx(data, 0)


def _keyslot(key: str) -> int:
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return _crc16(raw) % 16384


@pytest.mark.parametrize("account", ["acct-1", "user:42", "a b", "x" * 128])
def test_all_keys_of_an_account_share_one_cluster_slot(account: str) -> None:
    day = "2026-09-21"
    names = [
        *keys.account_keys(account, day),
        keys.plan_key(account),
        keys.usage_key(account),
        keys.daily_key(account, day),
    ]
    assert {_keyslot(k) for k in names} == {_crc16(account.encode()) % 16384}
    assert all(f"{{{account}}}" in k for k in names)


def test_keyslot_matches_redis_cluster_reference() -> None:
    # CLUSTER KEYSLOT values from the Redis cluster specification's examples.
    assert _keyslot("123456789") == 12739
    assert _keyslot("{user1000}.following") == _keyslot("{user1000}.followers")


async def test_a_payment_blip_does_not_wipe_the_paid_periods_usage(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    """Overage still to be billed must survive a plan that lapses and recovers within its
    period; the lapse applies free rules to the same count instead of starting a new one."""
    gateway = await start_gateway(await _upstream_config(start_upstream))
    start, _ = await _write_plan(redis_client, "acct-blip", clock)
    await _set_used(redis_client, "acct-blip", start, 10_000)
    assert (await _get(gateway, "/export/pdf", "acct-blip"))[0] == 200  # 5 units of overage

    await redis_client.hset(
        keys.plan_key("acct-blip"),
        mapping={"status": "past_due", "past_due_since": int(clock.now) - 4 * DAY},
    )
    status, body, _ = await _get(gateway, "/signals", "acct-blip")
    assert status == 429  # free rules: 10,005 used is far beyond 100
    assert body["error"]["details"]["tier"] == "free"
    usage = await _usage(redis_client, "acct-blip")
    assert (usage["period_start"], usage["used"], usage["overage"]) == (start, 10_005, 5)

    await redis_client.hset(keys.plan_key("acct-blip"), "status", "active")
    assert (await _get(gateway, "/signals", "acct-blip"))[0] == 200
    usage = await _usage(redis_client, "acct-blip")
    assert (usage["period_start"], usage["used"], usage["overage"]) == (start, 10_006, 6)
