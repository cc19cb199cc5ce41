"""Refunds: customers never pay for a backend that could not answer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import msgspec
import pytest
import redis.asyncio as redis
from aiohttp import web
from prometheus_client import REGISTRY

from config import Config
from gateway import keys, redis_quota
from gateway.periods import calendar_month, utc_day
from tests.conftest import Clock, auth, echo, load_test_config

DAY = 86400


def _refunded(route: str) -> float:
    return REGISTRY.get_sample_value("metergate_units_refunded_total", {"route": route}) or 0.0


def _with_timeout(config: Config, seconds: float) -> Config:
    upstreams = dict(config.upstreams)
    upstreams["default"] = msgspec.structs.replace(upstreams["default"], timeout_seconds=seconds)
    return msgspec.structs.replace(config, upstreams=upstreams)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _usage(client: redis.Redis, account: str) -> int:
    return int(await client.hget(keys.usage_key(account), "used") or 0)


async def _daily(client: redis.Redis, account: str, day: str, route: str) -> int:
    return int(await client.hget(keys.daily_key(account, day), route) or 0)


async def _fetch(gateway, path: str, account: str) -> tuple[int, bytes | None]:
    """Status and body, or None as body when the gateway cut the answer short."""
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url(path), headers=auth(account)) as resp:
            try:
                return resp.status, await resp.read()
            except aiohttp.ClientPayloadError:
                return resp.status, None


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """A backend written on bare sockets, for answers aiohttp would not produce."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _two_served_then(
    gateway, redis_client: redis.Redis, clock: Clock, account: str, path: str, cost: int = 5
) -> tuple[int, bytes | None]:
    """Serve two good requests, then the failing one; usage must end where it began + 2."""
    for _ in range(2):
        assert (await _fetch(gateway, "/signals", account))[0] == 200
    before = _refunded(path)
    result = await _fetch(gateway, path, account)
    assert await _usage(redis_client, account) == 2
    day = utc_day(clock.now)
    assert await _daily(redis_client, account, day, "/signals") == 2
    assert await _daily(redis_client, account, day, path) == 0
    assert _refunded(path) - before == cost
    return result


async def test_connection_refused_is_refunded(
    start_gateway, redis_client: redis.Redis, clock: Clock, start_upstream
) -> None:
    good = await start_upstream({"/{tail:.*}": echo})
    dead = f'[upstreams.dead]\nurl = "http://127.0.0.1:{_closed_port()}"\n'
    config = load_test_config(str(good.make_url("")), extra=dead)
    # /signals stays on a live backend; /export/pdf goes to a closed port.
    routes = tuple(
        msgspec.structs.replace(r, upstream="dead") if r.path == "/export/pdf" else r
        for r in config.routes
    )
    gateway = await start_gateway(msgspec.structs.replace(config, routes=routes))
    status, body = await _two_served_then(
        gateway, redis_client, clock, "acct-refused", "/export/pdf"
    )
    assert status == 502
    assert body is not None and b"upstream_unavailable" in body


async def test_timeout_is_refunded(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        if request.path == "/export/pdf":
            await asyncio.sleep(2)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": slow})
    config = _with_timeout(load_test_config(str(upstream.make_url(""))), 0.2)
    gateway = await start_gateway(config)
    status, body = await _two_served_then(
        gateway, redis_client, clock, "acct-timeout", "/export/pdf"
    )
    assert status == 504
    assert body is not None and b"upstream_timeout" in body


@pytest.mark.parametrize("failure", [502, 503, 504])
async def test_configured_5xx_answers_are_refunded_and_passed_on(
    failure: int, start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        if request.path == "/export/pdf":
            return web.Response(status=failure, text="backend says no")
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": failing})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    status, body = await _two_served_then(gateway, redis_client, clock, "acct-5xx", "/export/pdf")
    assert (status, body) == (failure, b"backend says no")


@pytest.mark.parametrize("failure", [500, 501, 404, 429])
async def test_other_error_answers_are_charged(
    failure: int, start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=failure, text="as the backend said")

    upstream = await start_upstream({"/{tail:.*}": failing})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    before = _refunded("/export/csv")
    assert await _fetch(gateway, "/export/csv", "acct-4xx") == (failure, b"as the backend said")
    assert await _usage(redis_client, "acct-4xx") == 3
    assert _refunded("/export/csv") == before


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_cut_short_is_refunded_and_the_client_sees_the_cut(
    framing: str, raw_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\n"
        if framing == "content-length":
            writer.write(head + b"Content-Length: 100000\r\n\r\n" + b"x" * 40_000)
        else:
            head += b"Transfer-Encoding: chunked\r\n\r\n"
            writer.write(head + b"9c40\r\n" + b"x" * 40_000 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        # Close without finishing the body: RST-free EOF in the middle of the answer.

    url = await raw_upstream(answer)
    gateway = await start_gateway(load_test_config(url))
    before = _refunded("/export/csv")
    status, body = await _fetch(gateway, "/export/csv", "acct-cut")
    assert status == 200
    assert body is None  # the client must not mistake a cut body for a whole one
    assert await _usage(redis_client, "acct-cut") == 0
    assert await _daily(redis_client, "acct-cut", utc_day(clock.now), "/export/csv") == 0
    assert _refunded("/export/csv") - before == 3


async def test_refund_after_the_period_changed_gives_nothing_back(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    """The charge belonged to last month; refunding it into this month's count would let
    the count fall below what this month really served."""
    gateway_box: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/export/pdf":
            # While this request is in flight the month ends and another one is served.
            clock.now = calendar_month(clock.now)[1] + 5
            assert (await _fetch(gateway_box[0], "/signals", "acct-period"))[0] == 200
            return web.Response(status=503)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": handler})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    gateway_box.append(gateway)
    charged_day = utc_day(clock.now)
    before = _refunded("/export/pdf")
    assert (await _fetch(gateway, "/export/pdf", "acct-period"))[0] == 503
    usage = await redis_client.hgetall(keys.usage_key("acct-period"))
    assert int(usage[b"used"]) == 1
    assert int(usage[b"period_start"]) == calendar_month(clock.now)[0]
    assert _refunded("/export/pdf") == before
    # The analytics of the day of the charge keep it too: it was not given back.
    assert await _daily(redis_client, "acct-period", charged_day, "/export/pdf") == 5


async def test_refund_never_takes_the_count_below_zero(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    """An operator reset the count while the request was in flight: nothing to give back."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await redis_client.hset(keys.usage_key("acct-reset"), "used", 1)
        return web.Response(status=502)

    upstream = await start_upstream({"/{tail:.*}": handler})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    assert (await _fetch(gateway, "/export/pdf", "acct-reset"))[0] == 502
    assert await _usage(redis_client, "acct-reset") == 0


async def test_paid_overage_is_refunded_with_the_units(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=504)

    upstream = await start_upstream({"/{tail:.*}": handler})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    start = int(clock.now) - DAY
    await redis_client.hset(
        keys.plan_key("acct-ov"),
        mapping={
            "tier": "pro",
            "status": "active",
            "period_start": start,
            "period_end": start + 30 * DAY,
        },
    )
    await redis_client.hset(
        keys.usage_key("acct-ov"), mapping={"period_start": start, "used": 9_998, "overage": 0}
    )
    assert (await _fetch(gateway, "/export/pdf", "acct-ov"))[0] == 504
    usage = await redis_client.hgetall(keys.usage_key("acct-ov"))
    assert (int(usage[b"used"]), int(usage[b"overage"])) == (9_998, 0)


@pytest.mark.parametrize("raw_pipeline", [True, False], ids=["raw-pipe", "redis-py"])
async def test_a_refund_leaves_no_overage_that_was_not_used(
    start_upstream,
    start_gateway,
    redis_client: redis.Redis,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    raw_pipeline: bool,
) -> None:
    # X (2 units) is charged 998 -> 1000 inside the quota and its backend answers 503
    # slowly; meanwhile Y (2 units) is charged 1000 -> 1002, overage 2, and served. Once X
    # is refunded everything served fits the 1000 included units: no overage is billed.
    monkeypatch.setattr(redis_quota, "RAW_PIPELINE", raw_pipeline)
    x_arrived, release_x = asyncio.Event(), asyncio.Event()

    async def history(request: web.Request) -> web.StreamResponse:
        if request.match_info["symbol"] == "SLOW":
            x_arrived.set()
            await release_x.wait()
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"ok": True})

    upstream = await start_upstream({"/signals/history/{symbol}": history})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    account = "acct-interleaved"
    start = int(clock.now) - 10 * DAY
    plan = {"tier": "starter", "status": "active", "period_start": start,
            "period_end": start + 30 * DAY}  # fmt: skip
    await redis_client.hset(keys.plan_key(account), mapping=plan)  # type: ignore[arg-type]
    await redis_client.hset(
        keys.usage_key(account), mapping={"period_start": start, "used": 998, "overage": 0}
    )

    x = asyncio.create_task(_fetch(gateway, "/signals/history/SLOW", account))
    await asyncio.wait_for(x_arrived.wait(), 5)
    assert await _fetch(gateway, "/signals/history/OK", account) == (200, b'{"ok": true}')
    usage = await redis_client.hmget(keys.usage_key(account), "used", "overage")
    assert [int(v or 0) for v in usage] == [1002, 2]
    release_x.set()
    assert (await x)[0] == 503
    usage = await redis_client.hmget(keys.usage_key(account), "used", "overage")
    assert [int(v or 0) for v in usage] == [1000, 0]


async def test_a_request_cancelled_by_shutdown_is_refunded(
    start_gateway, redis_client: redis.Redis, raw_upstream
) -> None:
    arrived = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.set()
        await asyncio.sleep(30)

    gateway = await start_gateway(load_test_config(await raw_upstream(never_answers)))
    before = _refunded("/export/pdf")
    pending = asyncio.ensure_future(_fetch(gateway, "/export/pdf", "acct-shutdown"))
    await asyncio.wait_for(arrived.wait(), 5)
    assert await _usage(redis_client, "acct-shutdown") == 5  # charged, then forwarded
    # Past its grace period the request is cancelled, unserved: it must not pay.
    await gateway.front.shutdown(timeout=0.2)
    with pytest.raises(aiohttp.ClientError):
        await pending
    assert await _usage(redis_client, "acct-shutdown") == 0
    assert _refunded("/export/pdf") - before == 5
