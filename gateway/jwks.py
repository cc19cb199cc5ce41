"""A JWKS key cache fetched asynchronously, so the event loop never blocks on it.

Keys are refreshed when the cache ages out, and on an unknown ``kid`` at most once per
cooldown (a flood of tokens with random kids cannot turn into a flood of fetches).
Concurrent misses share one fetch. After a failed fetch the next attempt comes sooner
(at most ``_FAILED_RETRY`` seconds), so a JWKS outage at start-up does not lock every token
out for a whole cooldown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
import jwt

log = logging.getLogger(__name__)

_FAILED_RETRY = 10.0


class JwksCache:
    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        cooldown: float = 300.0,
        max_age: float = 3600.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._session = session
        self._cooldown = cooldown
        self._max_age = max_age
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._keys: dict[str, object] = {}
        self._fetched_at: float | None = None
        self._last_failed = False
        self._inflight: asyncio.Future[None] | None = None

    async def get(self, kid: str) -> object | None:
        key = self._keys.get(kid)
        if self._inflight is not None:
            # A fetch is under way (it already counts against the cooldown): a known key
            # still serves, a miss waits for that fetch instead of being refused.
            if key is None:
                await asyncio.shield(self._inflight)
                key = self._keys.get(kid)
            return key
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self._max_age
        cooldown = min(self._cooldown, _FAILED_RETRY) if self._last_failed else self._cooldown
        cooled = self._fetched_at is None or now - self._fetched_at >= cooldown
        if stale or (key is None and cooled):
            await self.refresh()
            key = self._keys.get(kid)
        return key

    async def refresh(self) -> None:
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.get_running_loop().create_future()
        try:
            await self._fetch()
        finally:
            self._inflight.set_result(None)
            self._inflight = None

    async def _fetch(self) -> None:
        # The attempt counts against the cooldown even when it fails.
        self._fetched_at = self._clock()
        try:
            async with self._session.get(self._url, timeout=self._timeout) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            keyset = jwt.PyJWKSet.from_dict(data)
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
            log.warning("JWKS fetch from %s failed: %s", self._url, exc)
            self._last_failed = True
            return
        self._last_failed = False
        self._keys = {k.key_id: _public(k.key) for k in keyset.keys if k.key_id}


def _public(key: object) -> object:
    # A JWK published with its private part would make PyJWT fail with AttributeError
    # (a 500) on every token: verify with the public half.
    public_key = getattr(key, "public_key", None)
    return public_key() if callable(public_key) else key
