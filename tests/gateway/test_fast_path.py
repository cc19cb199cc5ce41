"""The metered fast path (Proxy.admit): a request whose target and token the gateway has
seen is charged as its head is read, and its task is made only once the charge is decided.
It must answer as handle() does: the same refusals, the same 503, nothing charged for a
request that is never served."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp import web
from prometheus_client import REGISTRY

from config import Config, parse_config
from gateway import keys
from gateway.periods import calendar_month
from tests.conftest import (
    ROOT,
    Clock,
    GatewayServer,
    auth,
    hold_redis,
    load_test_config,
    replace_section,
)

DAY = 86400


@pytest.fixture
async def backend(start_upstream) -> tuple[list[str], str]:
    """An upstream, and the paths that reached it."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"ok": True})

    upstream = await start_upstream({"/{tail:.*}": answer})
    return seen, str(upstream.make_url(""))


async def _get(
    gateway: GatewayServer, path: str, token: dict[str, str], method: str = "GET"
) -> tuple[int, Any, dict[str, str]]:
    """Status, JSON body and headers; the same ``token`` (auth()) for requests that are to
    find it known."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, gateway.make_url(path), headers=token) as resp:
            body = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, body, dict(resp.headers)


async def _used(client: redis.Redis, account: str) -> int:
    return int(await client.hget(keys.usage_key(account), "used") or 0)


async def _plan(client: redis.Redis, account: str, clock: Clock, tier: str = "pro") -> int:
    start = int(clock.now) - 10 * DAY
    plan = {"tier": tier, "status": "active", "period_start": start,
            "period_end": start + 30 * DAY}  # fmt: skip
    await client.hset(keys.plan_key(account), mapping=plan)  # type: ignore[arg-type]
    return start


def _abandoned(outcome: str) -> float:
    value = REGISTRY.get_sample_value("metergate_abandoned_charges_total", {"outcome": outcome})
    return value or 0.0


async def _eventually(check: Any, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not await check():
            await asyncio.sleep(0.02)


def _timeout(config: Config, seconds: float) -> Config:
    return replace_section(config, metering={"redis_timeout_seconds": seconds})


async def _taken(gateway: GatewayServer) -> None:
    """A request is on the fast path: deferred (waiting for Redis), with no task yet."""

    async def deferred() -> bool:
        return len(gateway.front.deferred) == 1 and not gateway.front.tasks

    await _eventually(deferred, 2.0)


async def _refunds(before: float, count: int) -> bool:
    return _abandoned("refunded") == before + count


async def test_a_known_request_waits_for_its_charge_with_no_task(
    start_gateway, backend, redis_client: redis.Redis, clock: Clock
) -> None:
    seen, url = backend
    gateway = await start_gateway(_timeout(load_test_config(url), 3.0))
    account, token = "acct-fast", auth("acct-fast")
    await _plan(redis_client, account, clock)
    status, _, first = await _get(gateway, "/signals", token)
    assert status == 200  # target and token now known

    hold = await hold_redis(redis_client, 400_000)
    pending = asyncio.ensure_future(_get(gateway, "/signals", token))
    await _taken(gateway)
    status, body, headers = await asyncio.wait_for(pending, 5)
    await hold
    assert (status, body) == (200, {"ok": True})
    remaining = [int(h["RateLimit"].split(";")[1].removeprefix("r=")) for h in (first, headers)]
    assert remaining[1] == remaining[0] - 1
    assert await _used(redis_client, account) == 2 and len(seen) == 2


async def test_a_refusal_on_the_fast_path_is_the_slow_paths(
    start_gateway, backend, redis_client: redis.Redis, clock: Clock
) -> None:
    seen, url = backend
    gateway = await start_gateway(load_test_config(url))
    account, token = "acct-fast-refused", auth("acct-fast-refused")
    month_start = calendar_month(clock.now)[0]  # no plan: the free tier, by calendar month
    await redis_client.hset(
        keys.usage_key(account), mapping={"period_start": month_start, "used": 100, "overage": 0}
    )
    slow = await _get(gateway, "/signals", token)  # the token verified: handle()
    hold = await hold_redis(redis_client, 300_000)
    pending = asyncio.ensure_future(_get(gateway, "/signals", token))
    await _taken(gateway)  # known: admit()
    fast = await pending
    await hold
    assert slow[0] == fast[0] == 429
    assert slow[1] == fast[1] and slow[1]["error"]["code"] == "quota_exceeded"
    for name in ("RateLimit", "RateLimit-Policy", "Content-Type"):
        assert slow[2][name] == fast[2][name]
    assert seen == [] and await _used(redis_client, account) == 100


async def test_a_charge_that_times_out_on_the_fast_path_is_a_503_and_given_back_late(
    start_gateway, backend, redis_client: redis.Redis, clock: Clock
) -> None:
    seen, url = backend
    gateway = await start_gateway(_timeout(load_test_config(url), 0.2))
    account, token = "acct-fast-timeout", auth("acct-fast-timeout")
    await _plan(redis_client, account, clock)
    assert (await _get(gateway, "/export/pdf", token))[0] == 200
    refunded = _abandoned("refunded")

    hold = await hold_redis(redis_client, 600_000)
    pending = asyncio.ensure_future(_get(gateway, "/export/pdf", token))
    await _taken(gateway)
    status, body, headers = await pending
    assert (status, body["error"]["code"], headers["Retry-After"]) == (
        503,
        "metering_unavailable",
        "1",
    )
    await hold
    # Redis ran the charge once released; nobody was served, so it is given back.
    await _eventually(lambda: _settled(redis_client, account, 5))
    await _eventually(lambda: _refunds(refunded, 1))
    assert len(seen) == 1


async def _settled(client: redis.Redis, account: str, used: int) -> bool:
    return await _used(client, account) == used


async def test_a_request_deferred_past_the_shutdown_deadline_is_never_served_nor_paid(
    start_gateway, backend, redis_client: redis.Redis, clock: Clock
) -> None:
    seen, url = backend
    gateway = await start_gateway(_timeout(load_test_config(url), 3.0))
    account, token = "acct-fast-shutdown", auth("acct-fast-shutdown")
    await _plan(redis_client, account, clock)
    assert (await _get(gateway, "/export/pdf", token))[0] == 200
    refunded = _abandoned("refunded")

    hold = await hold_redis(redis_client, 900_000)
    pending = asyncio.ensure_future(_get(gateway, "/export/pdf", token))
    await _taken(gateway)
    await gateway.front.shutdown(timeout=0.2)  # long before Redis answers
    with pytest.raises(aiohttp.ClientError):
        await pending
    await hold
    # Redis charged it once released; the request was abandoned, so it is given back, and
    # no task was made to forward it.
    await _eventually(lambda: _settled(redis_client, account, 5))
    await _eventually(lambda: _refunds(refunded, 1))
    assert not gateway.front.tasks and len(seen) == 1


async def test_the_fast_path_without_coalescing_charges_each_request_once(
    start_gateway, backend, redis_client: redis.Redis, clock: Clock
) -> None:
    # Each charge is written as it comes, from within admit().
    seen, url = backend
    config = replace_section(load_test_config(url), metering={"coalesce": False})
    gateway = await start_gateway(config)
    account, token = "acct-fast-uncoalesced", auth("acct-fast-uncoalesced")
    await _plan(redis_client, account, clock)
    statuses = [(await _get(gateway, "/signals/history/X", token))[0] for _ in range(5)]
    assert statuses == [200] * 5 and len(seen) == 5
    assert await _used(redis_client, account) == 10
    assert not gateway.front.deferred and not gateway.front.tasks


async def test_the_gateways_own_endpoints_are_never_taken_for_a_route(
    start_gateway, backend, redis_client: redis.Redis, clock: Clock
) -> None:
    # A route whose pattern also matches /healthz (allowed: no other route has one segment):
    # POST /healthz is the route's, charged; GET /healthz stays the gateway's own, however
    # often the route was used with the same token.
    seen, url = backend
    text = (ROOT / "gateway.toml").read_text().split("[[routes]]")[0]
    route = '[[routes]]\npath = "/{page}"\nmethods = ["GET", "POST"]\ncost = 1\n'
    gateway = await start_gateway(parse_config(text + route, default_upstream_url=url))
    account, token = "acct-own", auth("acct-own")
    await _plan(redis_client, account, clock)
    assert (await _get(gateway, "/other", token))[0] == 200  # the route, GET: charged
    for _ in range(2):
        assert (await _get(gateway, "/healthz", token, method="POST"))[0] == 200
        status, body, _ = await _get(gateway, "/healthz", token)
        assert status == 200 and body != {"ok": True}  # the gateway's answer, not the backend's
    assert seen == ["/other", "/healthz", "/healthz"]
    assert await _used(redis_client, account) == 3
