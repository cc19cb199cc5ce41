"""The per-tier requests-per-second limit (GCRA in charge.lua), driven by the test clock."""

from __future__ import annotations

import aiohttp
import msgspec
import pytest
import redis.asyncio as redis

from config import Config
from gateway import keys
from tests.conftest import Clock, auth, echo, load_test_config


def _limited(config: Config, tier: str, rps: float, burst: int) -> Config:
    tiers = dict(config.tiers)
    tiers[tier] = msgspec.structs.replace(tiers[tier], requests_per_second=rps, burst=burst)
    return msgspec.structs.replace(config, tiers=tiers)


async def _get(session: aiohttp.ClientSession, gateway, account: str = "acct-rl"):
    async with session.get(gateway.make_url("/signals"), headers=auth(account)) as resp:
        return resp.status, await resp.json(), resp.headers.copy()


@pytest.fixture
async def gateway(start_upstream, start_gateway):
    upstream = await start_upstream({"/{tail:.*}": echo})
    config = _limited(load_test_config(str(upstream.make_url(""))), "free", rps=2, burst=3)
    return await start_gateway(config)


async def test_burst_then_one_per_interval(gateway, redis_client: redis.Redis, clock: Clock):
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert (await _get(session, gateway))[0] == 200
        status, body, headers = await _get(session, gateway)
        assert status == 429
        assert body["error"]["code"] == "rate_limited"
        assert headers["Retry-After"] == "1"  # 500 ms, rounded up to whole seconds
        assert "upgrade" not in body["error"]["details"]
        # A refused request is not charged.
        assert int(await redis_client.hget(keys.usage_key("acct-rl"), "used")) == 3

        clock.advance(0.499)
        assert (await _get(session, gateway))[0] == 429
        clock.advance(0.001)
        assert (await _get(session, gateway))[0] == 200
        assert (await _get(session, gateway))[0] == 429

        clock.advance(10)  # idle time refills the burst, never beyond it
        assert [(await _get(session, gateway))[0] for _ in range(4)] == [200, 200, 200, 429]
    assert int(await redis_client.hget(keys.usage_key("acct-rl"), "used")) == 7


async def test_each_account_has_its_own_bucket(gateway, clock: Clock):
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert (await _get(session, gateway, "acct-a"))[0] == 200
        assert (await _get(session, gateway, "acct-a"))[0] == 429
        assert (await _get(session, gateway, "acct-b"))[0] == 200


async def test_the_limiter_state_is_kept_in_the_usage_hash(
    gateway, redis_client: redis.Redis, clock: Clock
):
    """Read and written with the units, in the charge's one read and one write."""
    now_ms = int(clock.now * 1000)
    async with aiohttp.ClientSession() as session:
        assert (await _get(session, gateway))[0] == 200
        assert (await _get(session, gateway))[0] == 200
    usage = await redis_client.hgetall(keys.usage_key("acct-rl"))
    # Each request moves the theoretical arrival time on by one interval (500 ms).
    assert float(usage[b"tat"]) == now_ms + 2 * 500
    assert int(usage[b"used"]) == 2


async def test_tiers_without_a_rate_limit_are_not_limited(
    gateway, redis_client: redis.Redis, clock: Clock
):
    start = int(clock.now) - 86400
    await redis_client.hset(
        keys.plan_key("acct-pro"),
        mapping={
            "tier": "pro",
            "status": "active",
            "period_start": start,
            "period_end": start + 30 * 86400,
        },
    )
    async with aiohttp.ClientSession() as session:
        statuses = [(await _get(session, gateway, "acct-pro"))[0] for _ in range(10)]
    assert statuses == [200] * 10
    assert await redis_client.hget(keys.usage_key("acct-pro"), "tat") is None


async def test_limits_above_500_per_second_keep_their_rate(
    start_upstream, start_gateway, clock: Clock
):
    """Whole-millisecond intervals would round 3000/s to 0 ms (no limit at all)."""
    upstream = await start_upstream({"/{tail:.*}": echo})
    config = _limited(load_test_config(str(upstream.make_url(""))), "free", rps=3000, burst=2)
    gateway = await start_gateway(config)
    clock.now = 1_790_000_000.0
    async with aiohttp.ClientSession() as session:
        assert [(await _get(session, gateway))[0] for _ in range(3)] == [200, 200, 429]
        clock.now = 1_790_000_000.0015  # 1.5 ms: 4.5 intervals, capped at the burst
        assert [(await _get(session, gateway))[0] for _ in range(3)] == [200, 200, 429]
        status, _, headers = await _get(session, gateway)
        assert (status, headers["Retry-After"]) == (429, "1")
