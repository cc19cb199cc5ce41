"""Forwarding: header rewriting both ways, streamed request bodies, body limits, pooling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as redis
from aiohttp import web
from aiohttp.test_utils import TestServer

from config import Config
from gateway import keys
from tests.conftest import auth, echo, load_test_config, make_token, replace_section

UPLOAD_ROUTE = """
[[routes]]
path = "/signals/upload"
methods = ["POST", "PUT"]
cost = 2
"""
META_ROUTE = """
[[routes]]
path = "/signals/meta"
methods = ["GET", "HEAD"]
cost = 1
"""


def _seen(body: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def _used(client: redis.Redis, account: str) -> int:
    return int(await client.hget(keys.usage_key(account), "used") or 0)


async def _gateway_over_echo(start_upstream: Any, start_gateway: Any) -> TestServer:
    """A gateway with the default routes in front of an upstream that echoes what it got."""
    upstream = await start_upstream({"/{tail:.*}": echo})
    return await start_gateway(load_test_config(str(upstream.make_url(""))))


async def test_request_headers_hop_by_hop_identity_and_forwarding(
    start_upstream, start_gateway
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    headers = {
        **auth("acct-fwd"),
        "Connection": "keep-alive, X-Hop-Secret",
        "X-Hop-Secret": "must not pass",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic dXNlcjpwYXNz",
        "Proxy-Connection": "keep-alive",
        "X-Metergate-Account": "someone-else",
        "x-metergate-tier": "enterprise",
        "X-Metergate-Units": "0",
        "X-Metergate-Role": "admin",
        "X-Metergate-Anything": "x",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Via": "1.0 client-proxy",
        "X-Request-Id": "abc-123",
        "Accept": "text/csv",
    }
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals?x=1"), headers=headers) as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body["path"] == "/signals?x=1"
    seen = _seen(body)
    for gone in (
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "x-hop-secret",
        "authorization",
        "x-metergate-role",
        "x-metergate-anything",
    ):
        assert gone not in seen, gone
    assert seen["x-metergate-account"] == ["acct-fwd"]
    assert seen["x-metergate-tier"] == ["free"]
    assert seen["x-metergate-units"] == ["1"]
    assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{gateway.port}"]
    assert seen["via"] == ["1.0 client-proxy, 1.1 metergate"]
    assert seen["x-request-id"] == ["abc-123"]
    assert seen["accept"] == ["text/csv"]
    assert seen["host"] == [f"127.0.0.1:{upstream.port}"]


async def test_x_forwarded_for_without_a_prior_value(start_upstream, start_gateway) -> None:
    gateway = await _gateway_over_echo(start_upstream, start_gateway)
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth()) as resp:
            seen = _seen(await resp.json())
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["via"] == ["1.1 metergate"]


async def test_admin_upstream_receives_the_authorization_header(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    default = await start_upstream({"/{tail:.*}": echo})
    admin = await start_upstream({"/{tail:.*}": echo})
    config = load_test_config(str(default.make_url("")), admin_url=str(admin.make_url("")))
    gateway = await start_gateway(config)
    token = make_token("acct-admin", role="admin")
    headers = {"Authorization": f"Bearer {token}", "X-Metergate-Role": "forged"}
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/billing/x"), headers=headers) as resp:
            assert resp.status == 200
            seen = _seen(await resp.json())
    assert seen["authorization"] == [f"Bearer {token}"]
    assert seen["x-metergate-account"] == ["acct-admin"]
    assert seen["x-metergate-role"] == ["admin"]
    assert "x-metergate-units" not in seen  # cost 0: nothing charged
    assert await _used(redis_client, "acct-admin") == 0


async def test_response_headers_hop_by_hop_removed_and_via_added(
    start_upstream, start_gateway
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.Response(
            text="ok",
            headers={
                "Connection": "X-Backend-Hop",
                "X-Backend-Hop": "internal",
                "Keep-Alive": "timeout=99",
                "Trailer": "X-Checksum",
                "Upgrade": "h2c",
                "Proxy-Authenticate": "Basic",
                "Via": "1.1 backend",
                "X-Kept": "yes",
                "Cache-Control": "max-age=5",
            },
        )
        return resp

    upstream = await start_upstream({"/{tail:.*}": answer})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth()) as resp:
            assert resp.status == 200
            assert await resp.text() == "ok"
            got = resp.headers
    for gone in ("X-Backend-Hop", "Keep-Alive", "Trailer", "Upgrade", "Proxy-Authenticate"):
        assert gone not in got, gone
    assert got.get("Connection", "keep-alive").lower() == "keep-alive"
    assert got["Via"] == "1.1 backend, 1.1 metergate"
    assert got["X-Kept"] == "yes"
    assert got["Cache-Control"] == "max-age=5"
    assert got["Content-Length"] == "2"


async def test_upstream_4xx_passes_through_unchanged_and_is_charged(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": "unknown symbol"}, status=422, headers={"X-Backend": "1"}
        )

    upstream = await start_upstream({"/{tail:.*}": answer})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    async with aiohttp.ClientSession() as session:
        url = gateway.make_url("/signals/history/NOPE")
        async with session.get(url, headers=auth("acct-422")) as resp:
            assert resp.status == 422
            assert await resp.json() == {"error": "unknown symbol"}
            assert resp.headers["X-Backend"] == "1"
            assert resp.headers["Content-Type"].startswith("application/json")
    assert await _used(redis_client, "acct-422") == 2


# -- request bodies -----------------------------------------------------------------------


async def test_request_body_with_content_length_reaches_the_backend(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    received: list[bytes] = []

    async def store(request: web.Request) -> web.StreamResponse:
        received.append(await request.read())
        return web.json_response({"te": request.headers.get("Transfer-Encoding")})

    upstream = await start_upstream({"/{tail:.*}": store})
    gateway = await start_gateway(load_test_config(str(upstream.make_url("")), extra=UPLOAD_ROUTE))
    payload = bytes(range(256)) * 1000
    async with aiohttp.ClientSession() as session:
        url = gateway.make_url("/signals/upload")
        async with session.post(url, data=payload, headers=auth("acct-up")) as resp:
            assert resp.status == 200
    assert received == [payload]
    assert await _used(redis_client, "acct-up") == 2


async def test_chunked_request_body_is_streamed_not_buffered(start_upstream, start_gateway) -> None:
    """The client holds back its second chunk until the backend has read the first: a
    gateway that buffered the whole body before forwarding would never get there."""
    first_arrived = asyncio.Event()

    async def store(request: web.Request) -> web.StreamResponse:
        first = await request.content.readexactly(1000)
        first_arrived.set()
        rest = await request.read()
        return web.json_response(
            {
                "te": request.headers.get("Transfer-Encoding"),
                "first": first.decode(),
                "rest": len(rest),
            }
        )

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await asyncio.wait_for(first_arrived.wait(), 5)
        for _ in range(10):
            yield b"b" * 10_000

    upstream = await start_upstream({"/{tail:.*}": store})
    gateway = await start_gateway(load_test_config(str(upstream.make_url("")), extra=UPLOAD_ROUTE))
    async with aiohttp.ClientSession() as session:
        url = gateway.make_url("/signals/upload")
        async with session.put(url, data=body(), headers=auth("acct-chunk")) as resp:
            assert resp.status == 200
            got = await resp.json()
    assert got == {"te": "chunked", "first": "a" * 1000, "rest": 100_000}


async def test_body_over_the_limit_with_content_length_is_413_before_charging(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": record})
    config = load_test_config(str(upstream.make_url("")), extra=UPLOAD_ROUTE)
    gateway = await start_gateway(replace_section(config, limits={"max_request_body_bytes": 1000}))
    async with aiohttp.ClientSession() as session:
        url = gateway.make_url("/signals/upload")
        async with session.post(url, data=b"x" * 1000, headers=auth("acct-413")) as resp:
            assert resp.status == 200
        async with session.post(url, data=b"x" * 1001, headers=auth("acct-413")) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"
    assert seen == ["/signals/upload"]
    assert await _used(redis_client, "acct-413") == 2


async def test_chunked_body_over_the_limit_is_413_and_refunded(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 500
            await asyncio.sleep(0)

    upstream = await start_upstream({"/{tail:.*}": echo})
    config = load_test_config(str(upstream.make_url("")), extra=UPLOAD_ROUTE)
    gateway = await start_gateway(replace_section(config, limits={"max_request_body_bytes": 4000}))
    async with aiohttp.ClientSession() as session:
        url = gateway.make_url("/signals/upload")
        async with session.post(url, data=body(), headers=auth("acct-413c")) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"
    assert await _used(redis_client, "acct-413c") == 0


# -- answers without a body ---------------------------------------------------------------


async def _bodyless(request: web.Request) -> web.StreamResponse:
    status = int(request.query.get("status", "200"))
    if status == 304:
        return web.Response(status=304, headers={"ETag": '"v1"'})
    if status == 204:
        return web.Response(status=204, headers={"X-Done": "1"})
    return web.Response(body=b"m" * 1234, content_type="application/octet-stream")


@pytest.mark.parametrize(
    ("method", "query", "status", "length"),
    [
        ("HEAD", "", 200, "1234"),
        ("GET", "?status=204", 204, None),
        ("GET", "?status=304", 304, None),
    ],
)
async def test_answers_without_a_body_keep_the_connection_usable(
    method: str,
    query: str,
    status: int,
    length: str | None,
    start_upstream,
    start_gateway,
    redis_client: redis.Redis,
) -> None:
    upstream = await start_upstream({"/{tail:.*}": _bodyless})
    gateway = await start_gateway(load_test_config(str(upstream.make_url("")), extra=META_ROUTE))
    # One connection: stray body bytes would corrupt the next answer on it.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        url = gateway.make_url("/signals/meta" + query)
        async with session.request(method, url, headers=auth("acct-nobody")) as resp:
            assert resp.status == status
            assert await resp.read() == b""
            assert resp.headers.get("Content-Length") == length
            assert "Transfer-Encoding" not in resp.headers
        async with session.get(gateway.make_url("/signals/meta"), headers=auth()) as resp:
            assert resp.status == 200
            assert await resp.read() == b"m" * 1234
    assert await _used(redis_client, "acct-nobody") == 1


# -- backend failures and pooling ---------------------------------------------------------


async def test_backend_down_is_502_and_too_slow_is_504(start_upstream, start_gateway) -> None:
    import msgspec

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": slow})
    config = load_test_config(str(upstream.make_url("")))
    upstreams = dict(config.upstreams)
    upstreams["default"] = msgspec.structs.replace(upstreams["default"], timeout_seconds=0.2)
    gateway = await start_gateway(msgspec.structs.replace(config, upstreams=upstreams))
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth()) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"]["code"] == "upstream_timeout"
        await upstream.close()
        async with session.get(gateway.make_url("/signals"), headers=auth()) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_unavailable"


async def test_backend_connections_are_kept_alive_and_reused(start_upstream, start_gateway) -> None:
    peers: list[tuple[str, int]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": record})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(gateway.make_url("/signals"), headers=auth()) as resp:
                assert resp.status == 200
                await resp.read()
    assert len(peers) == 20
    assert len(set(peers)) == 1


async def test_repeated_forwarding_headers_are_joined_not_dropped(
    start_upstream, start_gateway
) -> None:
    """RFC 9110 5.3: repeated field lines are one comma-joined list; keep every hop."""
    gateway = await _gateway_over_echo(start_upstream, start_gateway)
    headers = [
        *auth().items(),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-For", "198.51.100.2"),
        ("Via", "1.0 first"),
        ("Via", "1.1 second"),
    ]
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=headers) as resp:
            seen = _seen(await resp.json())
    assert seen["x-forwarded-for"] == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert seen["via"] == ["1.0 first, 1.1 second, 1.1 metergate"]


# -- clients that stall -------------------------------------------------------------------


def _tight(config: Config, *, max_connections: int) -> Config:
    """At most max_connections to the backend, a client timeout of half a second."""
    upstreams = dict(config.upstreams)
    upstreams["default"] = msgspec.structs.replace(
        upstreams["default"], max_connections=max_connections, connect_timeout_seconds=3.0
    )
    config = msgspec.structs.replace(config, upstreams=upstreams)
    return replace_section(config, limits={"client_body_timeout_seconds": 0.5})


async def test_stalled_uploads_get_408_refunded_and_free_their_backend_connections(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    arrived = asyncio.Semaphore(0)

    async def store(request: web.Request) -> web.StreamResponse:
        arrived.release()
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": store})
    config = load_test_config(str(upstream.make_url("")), extra=UPLOAD_ROUTE)
    gateway = await start_gateway(_tight(config, max_connections=2))
    stalled = []
    for n in range(2):
        # The first chunk of a chunked body, then nothing: each holds a backend connection.
        head = (
            "POST /signals/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {make_token(f'acct-stall-{n}')}\r\n\r\n5\r\nhello\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(head.encode())
        stalled.append((reader, writer))
    for _ in range(2):
        await asyncio.wait_for(arrived.acquire(), 5)

    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth("acct-third")) as resp:
            assert resp.status == 200
    assert loop.time() - started < 1.5

    for n, (reader, writer) in enumerate(stalled):
        answer = await asyncio.wait_for(reader.read(), 5)  # then the gateway hangs up
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b'"request_timeout"' in answer
        writer.close()
        assert await _used(redis_client, f"acct-stall-{n}") == 0


HOOK_ROUTE = """
[[routes]]
path = "/hooks"
methods = ["POST"]
public = true
max_body_bytes = 100
"""


async def test_a_route_body_limit_is_413_for_a_length_and_for_a_chunked_body(
    start_upstream, start_gateway
) -> None:
    seen: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(len(await request.read()))
        return web.json_response({})

    upstream = await start_upstream({"/hooks": hook, "/{tail:.*}": echo})
    gateway = await start_gateway(load_test_config(str(upstream.make_url("")), extra=HOOK_ROUTE))
    async with aiohttp.ClientSession() as session:
        url = gateway.make_url("/hooks")
        async with session.post(url, data=b"x" * 100) as resp:
            assert resp.status == 200
        async with session.post(url, data=b"x" * 101) as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (413, "body_too_large")

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"x" * 50

        async with session.post(url, data=chunks()) as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (413, "body_too_large")
    assert seen == [100]


async def test_a_slow_upload_to_a_small_limit_route_holds_no_backend_connection(
    start_upstream, start_gateway
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    config = load_test_config(str(upstream.make_url("")), extra=HOOK_ROUTE)
    gateway = await start_gateway(_tight(config, max_connections=1))
    # A chunked upload that stalls after its first chunk: read into the gateway, never
    # forwarded piecemeal, so the only backend connection stays free for others.
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"POST /hooks HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth("acct-hook")) as resp:
            assert resp.status == 200
    assert loop.time() - started < 0.4
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    writer.close()


async def test_a_client_that_stops_reading_is_dropped_and_frees_the_backend(
    start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(2000):  # 128 MB: far more than the socket buffers hold
            await resp.write(b"x" * 65536)
        await resp.write_eof()
        return resp

    upstream = await start_upstream({"/export/csv": big, "/{tail:.*}": echo})
    gateway = await start_gateway(
        _tight(load_test_config(str(upstream.make_url(""))), max_connections=1)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        f"GET /export/csv HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {make_token('acct-stuck')}\r\n\r\n".encode()
    )
    # Never read: the gateway's writes fill the socket buffers, then stall.
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth("acct-next")) as resp:
            assert resp.status == 200
    assert loop.time() - started < 2.5
    received = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
        received += len(chunk)
    assert received < 2000 * 65536  # cut off, not served whole
    writer.close()
    # The backend answered: the units stay charged.
    assert await _used(redis_client, "acct-stuck") == 3


# -- spoofing through header spellings ----------------------------------------------------


async def _raw_echo(port: int, account: str, lines: list[str]) -> dict[str, list[str]]:
    """Send a GET /signals as `account` with these extra header lines over a raw socket;
    what the backend saw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        auth_line = f"Authorization: Bearer {make_token(account)}"
        head = ["GET /signals HTTP/1.1", "Host: gw", "Connection: close", auth_line, *lines]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 200 "), data
    return _seen(json.loads(rest.partition(b"\r\n\r\n")[2]))


async def test_underscore_spellings_of_trusted_headers_are_dropped(
    start_upstream, start_gateway
) -> None:
    # CGI/WSGI map X_Metergate_Account and X-Metergate-Account to the same variable.
    gateway = await _gateway_over_echo(start_upstream, start_gateway)
    seen = await _raw_echo(
        gateway.port,
        "acct-under",
        [
            "X_Metergate_Account: victim",
            "x_metergate_tier: enterprise",
            "X_METERGATE_ROLE: admin",
            "X-Metergate_Units: 0",
            "X_Forwarded_For: 6.6.6.6",
            "X_Forwarded_Host: evil.example",
            "X_Forwarded_Proto: https",
            "X_Real_IP: 6.6.6.6",
            "X_Original_URL: /export/pdf",
            "Proxy_Authorization: Basic eA==",
            "X_Custom_Tag: kept",
        ],
    )
    names = set(seen)
    assert not {n for n in names if n.replace("_", "-").startswith("x-metergate-")} - {
        "x-metergate-account",
        "x-metergate-tier",
        "x-metergate-units",
    }
    assert seen["x-metergate-account"] == ["acct-under"]
    assert seen["x-metergate-tier"] == ["free"]
    assert seen["x-metergate-units"] == ["1"]
    for gone in (
        "x_forwarded_for",
        "x_forwarded_host",
        "x_forwarded_proto",
        "x_real_ip",
        "x_original_url",
        "proxy_authorization",
    ):
        assert gone not in seen, gone
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x_custom_tag"] == ["kept"]


async def test_route_method_and_client_address_overrides_are_dropped(
    start_upstream, start_gateway
) -> None:
    gateway = await _gateway_over_echo(start_upstream, start_gateway)
    seen = await _raw_echo(
        gateway.port,
        "acct-override",
        [
            "X-Original-URL: /export/pdf",
            "X-Rewrite-URL: /export/pdf",
            "X-HTTP-Method-Override: DELETE",
            "X-Method-Override: DELETE",
            "X-HTTP-Method: DELETE",
            "X-Real-IP: 6.6.6.6",
            "Forwarded: for=6.6.6.6;proto=https;host=evil.example",
        ],
    )
    for gone in (
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-method-override",
        "x-http-method",
        "x-real-ip",
        "forwarded",
    ):
        assert gone not in seen, gone
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
