"""How the gateway is served (gateway.front, as `metergate gateway` runs it): its own
endpoints and the proxy answer; Expect: 100-continue is answered only once a request is
authenticated and paid for; requests that do not parse get JSON errors."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp import web

from gateway import keys
from gateway.app import PROXY
from tests.conftest import auth, echo, load_test_config, replace_section

UPLOAD = """
[[routes]]
path = "/upload"
methods = ["POST"]
cost = 1
"""


async def _config(start_upstream, received: list[int] | None = None):
    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        if received is not None:
            received.append(len(body))
        return web.json_response({"bytes": len(body)})

    upstream = await start_upstream({"/upload": upload, "/{tail:.*}": echo})
    return load_test_config(str(upstream.make_url("")), extra=UPLOAD)


async def test_own_endpoints_and_the_proxy_answer(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    gateway = await start_gateway(await _config(start_upstream))
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/healthz")) as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        async with session.get(gateway.make_url("/readyz")) as resp:
            assert resp.status == 200
        async with session.get(gateway.make_url("/signals"), headers=auth("acct-s")) as resp:
            assert resp.status == 200
            assert (await resp.json())["path"] == "/signals"
        async with session.get(gateway.make_url("/nowhere"), headers=auth("acct-s")) as resp:
            assert resp.status == 404
        async with session.get(gateway.make_url("/metrics")) as resp:
            assert "metergate_requests_total" in await resp.text()
        async with session.get(gateway.make_url("/metrics?x=1")) as resp:
            assert resp.status == 200
    assert int(await redis_client.hget(keys.usage_key("acct-s"), "used")) == 1


async def _raw(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return reader, writer


def _head(token_headers: dict[str, str], length: int) -> bytes:
    lines = [
        "POST /upload HTTP/1.1",
        "Host: gw",
        f"Content-Length: {length}",
        "Expect: 100-continue",
        *(f"{k}: {v}" for k, v in token_headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_100_continue_only_after_the_request_is_paid_for(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    received: list[int] = []
    gateway = await start_gateway(await _config(start_upstream, received))
    assert gateway.port is not None

    # No token: refused at once, and the client is never invited to send its body.
    reader, writer = await _raw(gateway.port, _head({}, 1000))
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 401")
    writer.close()

    # Paid for: 100 Continue, then the body goes through to the backend.
    reader, writer = await _raw(gateway.port, _head(auth("acct-c"), 1000))
    interim = await asyncio.wait_for(reader.readline(), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n"
    assert await reader.readline() == b"\r\n"
    writer.write(b"x" * 1000)
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 200")
    writer.close()
    assert received == [1000]
    assert int(await redis_client.hget(keys.usage_key("acct-c"), "used")) == 1


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /signals HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, "bad_request"),
        (
            b"GET /signals HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "request_head_too_large",
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"GET /signals?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "uri_too_long",
        ),
    ],
    ids=["garbage", "bad-header-name", "header-too-large", "cl-and-te", "uri-too-long"],
)
async def test_malformed_requests_get_json_errors(
    request_bytes: bytes, status: int, code: str, start_upstream, start_gateway
) -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({})

    upstream = await start_upstream({"/{tail:.*}": record})
    gateway = await start_gateway(load_test_config(str(upstream.make_url("")), extra=UPLOAD))
    assert gateway.port is not None
    reader, writer = await _raw(gateway.port, request_bytes)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert b"Connection: close" in head  # what follows a broken head cannot be trusted
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"]["code"] == code
    assert seen == []


async def test_the_access_log_has_a_line_per_request_when_on(
    start_upstream, start_gateway, caplog: pytest.LogCaptureFixture
) -> None:
    config = replace_section(await _config(start_upstream), gateway={"access_log": True})
    gateway = await start_gateway(config)
    caplog.set_level(logging.INFO, logger="metergate.access")
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals?x=1"), headers=auth("acct-l")) as resp:
            body = await resp.read()
        async with session.get(gateway.make_url("/nowhere"), headers=auth("acct-l")) as resp:
            assert resp.status == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "metergate.access"]
    assert len(lines) == 2
    address, request, rest = lines[0].split('"')
    status, sent, seconds = rest.split()
    address = address.strip()
    assert (address, request) == ("127.0.0.1", "GET /signals?x=1 HTTP/1.1")
    assert (int(status), int(sent)) == (200, len(body))
    assert 0 <= float(seconds) < 5
    assert '"GET /nowhere HTTP/1.1" 404 ' in lines[1]


async def test_the_access_log_is_silent_when_off(
    start_upstream, start_gateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway(await _config(start_upstream))
    caplog.set_level(logging.INFO, logger="metergate.access")
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth("acct-q")) as resp:
            assert resp.status == 200
    assert [r for r in caplog.records if r.name == "metergate.access"] == []


async def test_the_backends_ratelimit_fields_are_replaced_by_the_gateways(
    start_upstream, start_gateway
) -> None:
    async def limited(request: web.Request) -> web.Response:
        fields = {"RateLimit": '"backend";r=1;t=1', "RateLimit-Policy": '"backend";q=1'}
        return web.json_response({}, headers=fields)

    upstream = await start_upstream({"/{tail:.*}": limited})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth("acct-rl2")) as resp:
            assert resp.status == 200
            states = resp.headers.getall("RateLimit")
            policies = resp.headers.getall("RateLimit-Policy")
    assert len(states) == 1 and states[0].startswith('"monthly";r=')
    assert len(policies) == 1 and policies[0].startswith('"monthly";q=')


async def test_only_short_targets_of_known_routes_are_cached(start_upstream, start_gateway) -> None:
    gateway = await start_gateway(await _config(start_upstream))
    long_query = "/signals?q=" + "a" * 300
    async with aiohttp.ClientSession() as session:
        for target in ("/signals?x=1", "/nowhere", long_query, "/signals?x=1"):
            async with session.get(gateway.make_url(target), headers=auth("acct-cache")):
                pass
    assert set(gateway.runner.app[PROXY]._canonical) == {"/signals?x=1"}
