"""JWKS keys are fetched from a real server, refreshed on rotation, never fetched in a flood."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa

from config import Config
from config.load import validate
from gateway.jwks import JwksCache
from tests.conftest import Clock, echo, load_test_config, replace_section

Start = Callable[..., Awaitable[TestServer]]


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEYS = {"k1": _key(), "k2": _key()}


def _jwk(kid: str, private: bool = False) -> dict[str, Any]:
    key = KEYS[kid] if private else KEYS[kid].public_key()
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def token(kid: str, *, signer: str | None = None, sub: str = "acct-jwks") -> str:
    claims = {"sub": sub, "exp": int(time.time()) + 3600}
    return jwt.encode(claims, KEYS[signer or kid], algorithm="RS256", headers={"kid": kid})


class JwksServer:
    """Serves the current key set and counts the fetches."""

    def __init__(self, kids: list[str], delay: float = 0.0) -> None:
        self.kids = kids
        self.delay = delay
        self.fetches = 0
        self.status = 200
        self.private = False

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": [_jwk(k, self.private) for k in self.kids]})


async def _setup(
    start_upstream: Start,
    start_gateway: Start,
    jwks: JwksServer | None,
    *,
    jwks_url: str | None = None,
    **auth: Any,
) -> tuple[TestServer, list[str]]:
    hits: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        hits.append(request.raw_path)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": record})
    if jwks is not None:
        jwks_server = await start_upstream({"/.well-known/jwks.json": jwks.handle})
        jwks_url = str(jwks_server.make_url("/.well-known/jwks.json"))
    config: Config = replace_section(
        load_test_config(str(upstream.make_url(""))),
        auth={"algorithms": ("RS256",), "jwks_url": jwks_url, **auth},
    )
    validate(config)
    return await start_gateway(config), hits


async def _status(session: aiohttp.ClientSession, gateway: TestServer, tok: str) -> int:
    headers = {"Authorization": f"Bearer {tok}"}
    async with session.get(gateway.make_url("/signals"), headers=headers) as resp:
        if resp.status == 401:
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
            assert (await resp.json())["error"]["code"] == "invalid_token"
        return resp.status


async def test_known_kid_passes_and_keys_are_cached(start_upstream, start_gateway) -> None:
    jwks = JwksServer(["k1"])
    gateway, hits = await _setup(start_upstream, start_gateway, jwks)
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            assert await _status(session, gateway, token("k1", sub=f"acct-{i}")) == 200
        # Signed by another key under a known kid: the signature check still refuses it.
        assert await _status(session, gateway, token("k1", signer="k2")) == 401
    assert jwks.fetches == 1
    assert len(hits) == 3


async def test_key_published_with_its_private_part_still_verifies(
    start_upstream, start_gateway
) -> None:
    # A careless IdP publishing "d" must not turn every request into a 500.
    jwks = JwksServer(["k1"])
    jwks.private = True
    gateway, hits = await _setup(start_upstream, start_gateway, jwks)
    async with aiohttp.ClientSession() as session:
        assert await _status(session, gateway, token("k1")) == 200
        assert await _status(session, gateway, token("k1", signer="k2")) == 401
    assert len(hits) == 1


async def test_rotation_refreshes_once_and_passes(start_upstream, start_gateway) -> None:
    jwks = JwksServer(["k1"])
    gateway, _ = await _setup(
        start_upstream, start_gateway, jwks, jwks_refresh_cooldown_seconds=0.0
    )
    async with aiohttp.ClientSession() as session:
        assert await _status(session, gateway, token("k1")) == 200
        jwks.kids = ["k1", "k2"]
        assert await _status(session, gateway, token("k2")) == 200
        assert jwks.fetches == 2
        # Both keys are now known: no more fetches.
        assert await _status(session, gateway, token("k1", sub="acct-x")) == 200
        assert await _status(session, gateway, token("k2", sub="acct-y")) == 200
    assert jwks.fetches == 2


async def test_flood_of_unknown_kids_fetches_at_most_once_per_cooldown(
    start_upstream, start_gateway
) -> None:
    jwks = JwksServer(["k1"])
    gateway, hits = await _setup(start_upstream, start_gateway, jwks)
    async with aiohttp.ClientSession() as session:
        assert await _status(session, gateway, token("k1")) == 200
        forged = [token(uuid.uuid4().hex, signer="k2") for _ in range(30)]
        statuses = await asyncio.gather(*(_status(session, gateway, t) for t in forged))
    assert statuses == [401] * 30
    assert jwks.fetches == 1
    assert len(hits) == 1


async def test_concurrent_first_requests_share_one_fetch(start_upstream, start_gateway) -> None:
    jwks = JwksServer(["k1"], delay=0.2)
    gateway, hits = await _setup(start_upstream, start_gateway, jwks)
    async with aiohttp.ClientSession() as session:
        tokens = [token("k1", sub=f"acct-{i}") for i in range(10)]
        statuses = await asyncio.gather(*(_status(session, gateway, t) for t in tokens))
    assert statuses == [200] * 10
    assert jwks.fetches == 1
    assert len(hits) == 10


async def test_jwks_server_down_is_401_quickly(start_upstream, start_gateway) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/jwks"
    gateway, hits = await _setup(start_upstream, start_gateway, None, jwks_url=url)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        assert await _status(session, gateway, token("k1")) == 401
        assert await _status(session, gateway, token("k1")) == 401
        assert time.monotonic() - started < 2
    assert hits == []


@pytest.mark.parametrize("status", [500, 404])
async def test_jwks_server_error_is_401(status: int, start_upstream, start_gateway) -> None:
    jwks = JwksServer(["k1"])
    jwks.status = status
    gateway, hits = await _setup(start_upstream, start_gateway, jwks)
    async with aiohttp.ClientSession() as session:
        assert await _status(session, gateway, token("k1")) == 401
    assert hits == []


def _closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# JwksCache with an injected clock: the cooldown and the cache age without waiting.


async def _cache(
    start_upstream: Start, jwks: JwksServer, clock: Clock, **kw: Any
) -> tuple[JwksCache, aiohttp.ClientSession]:
    server = await start_upstream({"/jwks": jwks.handle})
    session = aiohttp.ClientSession()
    return JwksCache(str(server.make_url("/jwks")), session, clock=clock, **kw), session


async def test_cache_refreshes_unknown_kid_once_per_cooldown(start_upstream) -> None:
    clock = Clock(1000.0)
    jwks = JwksServer(["k1"])
    cache, session = await _cache(start_upstream, jwks, clock, cooldown=60, max_age=3600)
    try:
        assert await cache.get("k1") is not None
        jwks.kids = ["k1", "k2"]
        # Within the cooldown an unknown kid does not fetch, however often it is asked for.
        for _ in range(5):
            assert await cache.get("k2") is None
        assert jwks.fetches == 1
        clock.advance(60)
        assert await cache.get("k2") is not None
        assert jwks.fetches == 2
        for kid in ("nope-1", "nope-2", "nope-3"):
            assert await cache.get(kid) is None
        assert jwks.fetches == 2
        clock.advance(60)
        for kid in ("nope-1", "nope-2", "nope-3"):
            assert await cache.get(kid) is None
        assert jwks.fetches == 3
    finally:
        await session.close()


async def test_concurrent_misses_after_rotation_share_one_fetch(start_upstream) -> None:
    clock = Clock(1000.0)
    jwks = JwksServer(["k1"], delay=0.1)
    cache, session = await _cache(start_upstream, jwks, clock, cooldown=60, max_age=3600)
    try:
        assert await cache.get("k1") is not None
        jwks.kids = ["k1", "k2"]
        clock.advance(60)
        found = await asyncio.gather(*(cache.get(k) for k in ["k2"] * 10 + ["k1"] * 5))
        assert all(key is not None for key in found)
        assert jwks.fetches == 2
    finally:
        await session.close()


async def test_cache_refetches_when_it_ages_out(start_upstream) -> None:
    clock = Clock(1000.0)
    jwks = JwksServer(["k1"])
    cache, session = await _cache(start_upstream, jwks, clock, cooldown=60, max_age=600)
    try:
        assert await cache.get("k1") is not None
        clock.advance(599)
        assert await cache.get("k1") is not None
        assert jwks.fetches == 1
        # k1 was revoked: once the cache ages out, it is gone.
        jwks.kids = ["k2"]
        clock.advance(1)
        assert await cache.get("k1") is None
        assert jwks.fetches == 2
    finally:
        await session.close()


async def test_failed_fetch_keeps_the_keys_it_had(start_upstream) -> None:
    clock = Clock(1000.0)
    jwks = JwksServer(["k1"])
    cache, session = await _cache(start_upstream, jwks, clock, cooldown=60, max_age=600)
    try:
        assert await cache.get("k1") is not None
        jwks.status = 503
        clock.advance(600)
        assert await cache.get("k1") is not None
        assert jwks.fetches == 2
    finally:
        await session.close()


async def test_hanging_jwks_server_times_out(start_upstream) -> None:
    clock = Clock(1000.0)
    jwks = JwksServer(["k1"], delay=10)
    cache, session = await _cache(start_upstream, jwks, clock, timeout=0.3)
    try:
        started = time.monotonic()
        assert await cache.get("k1") is None
        assert time.monotonic() - started < 2
    finally:
        await session.close()


async def test_after_a_failed_fetch_the_next_try_comes_before_the_cooldown(
    start_upstream,
) -> None:
    clock = Clock(1000.0)
    jwks = JwksServer(["k1"])
    jwks.status = 503
    cache, session = await _cache(start_upstream, jwks, clock, cooldown=300, max_age=3600)
    try:
        assert await cache.get("k1") is None  # the JWKS server is down at start-up
        clock.advance(5)
        assert await cache.get("k1") is None  # still within the short retry: no fetch
        assert jwks.fetches == 1
        jwks.status = 200
        clock.advance(5)  # 10 s after the failure, far less than the 300 s cooldown
        assert await cache.get("k1") is not None
        assert jwks.fetches == 2
        clock.advance(10)
        assert await cache.get("k-unknown") is None  # healthy again: the full cooldown
        assert jwks.fetches == 2
    finally:
        await session.close()
