"""Each route charges its configured cost; unknown paths are refused, never forwarded."""

from __future__ import annotations

import aiohttp
import pytest
import redis.asyncio as redis

from gateway import keys
from tests.conftest import auth, echo, load_test_config

ROUTE_COSTS = [
    ("/signals", 1),
    ("/signals/history/AAPL", 2),
    ("/export/csv", 3),
    ("/export/pdf", 5),
]


@pytest.mark.parametrize(("path", "cost"), ROUTE_COSTS)
async def test_each_route_charges_its_cost(
    path: str, cost: int, start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url(path), headers=auth("acct-cost")) as resp:
            assert resp.status == 200
            body = await resp.json()
            assert body["path"] == path
            assert (
                resp.headers["RateLimit"]
                == f'"monthly";r={100 - cost};t=' + resp.headers["RateLimit"].split(";t=")[1]
            )
    used = await redis_client.hget(keys.usage_key("acct-cost"), "used")
    assert int(used) == cost


async def test_unknown_path_is_404_and_not_forwarded(start_upstream, start_gateway) -> None:
    seen: list[str] = []

    async def record(request):
        seen.append(request.raw_path)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": record})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/admin/secret"), headers=auth()) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "route_not_found"
        async with session.post(gateway.make_url("/signals"), headers=auth()) as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET"
    assert seen == []
