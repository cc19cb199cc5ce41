"""The yardstick: a metering proxy written the way most Python gateways are.

An aiohttp server that, for every request, verifies the JWT with PyJWT, looks the route's
cost up, charges it with one redis-py EVALSHA (the same charge.lua and key layout as
metergate, so the work done in Redis is identical) and forwards with an aiohttp
ClientSession, reading the answer and sending it back. No caching, no coalescing: the
benchmark's "what does the obvious implementation cost" line. It runs on uvloop with the
access log off, like metergate, so the comparison is of the code and not of the loop.

Run: ``python -m loadtests.yardstick PORT REDIS_URL UPSTREAM_URL SECRET [CONFIG]``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import aiohttp
import jwt
import redis.asyncio as redis
from aiohttp import web

from config.load import load_config
from config.model import Config
from gateway.keys import CHARGE_KEYS, account_keys
from gateway.periods import calendar_month, utc_day
from gateway.redis_quota import tier_table
from gateway.routing import PricedRoute, RouteTable

_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host")
)
_CHARGE = resources.files("gateway").joinpath("lua", "charge.lua").read_bytes()
_CHARGE_SHA = hashlib.sha1(_CHARGE).hexdigest()

CONFIG = web.AppKey("config", Config)
REDIS = web.AppKey("redis", redis.Redis)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
SECRET = web.AppKey("secret", str)
TABLE = web.AppKey("table", RouteTable)


async def proxy(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    route = request.app[TABLE].match(request.method, request.path)
    if not isinstance(route, PricedRoute):
        return web.json_response({"error": "route_not_found"}, status=404)
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return web.json_response({"error": "missing_token"}, status=401)
    try:
        claims = jwt.decode(
            header[7:],
            request.app[SECRET],
            algorithms=list(config.auth.algorithms),
            options={"require": ["exp", "sub"]},
            leeway=config.auth.leeway_seconds,
        )
    except jwt.PyJWTError:
        return web.json_response({"error": "invalid_token"}, status=401)

    if route.cost:
        now = time.time()
        month_start, month_end = calendar_month(now)
        reply = await request.app[REDIS].evalsha(
            _CHARGE_SHA,
            CHARGE_KEYS,
            *account_keys(claims["sub"], utc_day(now)),
            int(now * 1000),
            tier_table(config),
            month_start,
            month_end,
            config.billing.daily_usage_ttl_seconds,
            config.billing.past_due_grace_seconds,
            route.cost,
            route.name,
            "",
        )
        if reply[0] & 7 != 0:  # a flat reply led by its code: reason + 8 x tier (0: allowed)
            return web.json_response({"error": "quota_exceeded"}, status=429)

    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    headers.pop("Authorization", None)
    headers["X-Metergate-Account"] = claims["sub"]
    async with request.app[SESSION].request(
        request.method, request.app[UPSTREAM] + request.path_qs, headers=headers
    ) as upstream:
        body = await upstream.read()
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        out.pop("Content-Length", None)
        return web.Response(status=upstream.status, body=body, headers=out)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    client = redis.Redis.from_url(sys.argv[2])
    await client.script_load(_CHARGE)
    app[REDIS] = client
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    yield
    await app[SESSION].close()
    await client.aclose()


def create_app(config: Config, upstream: str, secret: str) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[TABLE] = RouteTable(config)
    app[UPSTREAM] = upstream.rstrip("/")
    app[SECRET] = secret
    app.cleanup_ctx.append(_resources)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    port, _, upstream, secret = sys.argv[1:5]
    config = load_config(Path(sys.argv[5] if len(sys.argv) > 5 else "gateway.toml"))
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    web.run_app(
        create_app(config, upstream, secret),
        host="127.0.0.1",
        port=int(port),
        access_log=None,
        print=None,
        loop=loop_factory() if loop_factory else None,
    )


if __name__ == "__main__":
    main()
