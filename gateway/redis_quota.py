"""The Redis quota store: one Lua script decides and charges, coalesced per loop iteration.

Charges that arrive in the same event-loop iteration are sent as one pipelined write of
EVALSHA calls (one per charge, each atomic on its own account's slot), so under load the
round trips per request fall well below one while every decision stays exact.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from config.model import Config
from gateway import keys
from gateway.errors import QuotaStoreUnavailable
from gateway.periods import PeriodClock
from gateway.quota import Decision, Reason

log = logging.getLogger(__name__)


def _script(name: str) -> tuple[bytes, str]:
    body = resources.files("gateway").joinpath("lua", name).read_bytes()
    return body, hashlib.sha1(body).hexdigest()


def tier_table(config: Config) -> str:
    """The tier rules as charge.lua reads them: name,included,overage,cap,interval_us,burst;..."""
    rows = []
    for name, tier in config.tiers.items():
        cap = -1 if tier.max_overage_units is None else tier.max_overage_units
        # Microseconds: whole milliseconds would round 3000/s down to 0 (no limit at all)
        # and 1500/s to 1000/s.
        rps = tier.requests_per_second
        interval = max(1, round(1_000_000 / rps)) if rps else 0
        rows.append(
            f"{name},{tier.included_units},{int(tier.allows_overage)},{cap},{interval},{tier.burst}"
        )
    return ";".join(rows)


class _Call:
    __slots__ = ("args", "future", "sha", "source")

    def __init__(
        self, sha: str, source: bytes, args: Sequence[Any], future: asyncio.Future[Any]
    ) -> None:
        self.sha, self.source, self.args, self.future = sha, source, args, future


class RedisQuotaStore:
    def __init__(
        self,
        client: redis.Redis,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._redis = client
        self._clock = clock
        self._tiers = tier_table(config)
        self._daily_ttl = config.billing.daily_usage_ttl_seconds
        self._grace = config.billing.past_due_grace_seconds
        self._timeout = config.metering.redis_timeout_seconds
        self._coalesce = config.metering.coalesce
        self._periods = PeriodClock()
        self._charge_src, self._charge_sha = _script("charge.lua")
        self._refund_src, self._refund_sha = _script("refund.lua")
        self._pending: list[_Call] = []
        self._on_batch = on_batch
        self._inflight: set[asyncio.Task[None]] = set()

    async def charge(
        self, account: str, route: str, cost: int, allowed_tiers: str = ""
    ) -> Decision:
        now = self._clock()
        month_start, month_end = self._periods.month(now)
        day = self._periods.day(now)
        args = (
            4,
            *keys.account_keys(account, day),
            int(now * 1000),
            self._tiers,
            month_start,
            month_end,
            cost,
            route,
            self._daily_ttl,
            self._grace,
            allowed_tiers,
        )
        reply = await self._call(self._charge_sha, self._charge_src, args)
        return Decision(
            allowed=reply[0] == 1,
            reason=Reason(reply[1]),
            used=reply[2],
            included=reply[3],
            reset_seconds=reply[4],
            tier=reply[5].decode() if isinstance(reply[5], bytes) else reply[5],
            period_start=reply[6],
            overage=reply[7],
            retry_after_ms=reply[8],
            day=day,
        )

    async def refund(self, account: str, route: str, cost: int, decision: Decision) -> int:
        args = (
            2,
            keys.usage_key(account),
            keys.daily_key(account, decision.day),
            decision.period_start,
            cost,
            decision.overage,
            route,
        )
        return int(await self._call(self._refund_sha, self._refund_src, args))

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def _call(self, sha: str, source: bytes, args: Sequence[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        call = _Call(sha, source, args, future)
        if self._coalesce:
            if not self._pending:
                asyncio.get_running_loop().call_soon(self._flush)
            self._pending.append(call)
        else:
            self._start([call])
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._start(batch)

    def _start(self, batch: list[_Call]) -> None:
        task = asyncio.create_task(self._send(batch))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send(self, batch: list[_Call]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._execute(batch)
                retry = [c for c, r in zip(batch, results, strict=True) if _noscript(r)]
                # Settle what ran before reloading: those charges are applied, so a failure
                # of the reload must not turn them into 503s the customer still pays for.
                _settle((c, r) for c, r in zip(batch, results, strict=True) if not _noscript(r))
                if retry:
                    # Not executed (the script cache was flushed, or a new server): load
                    # the scripts and run exactly those calls again.
                    for source in {c.source for c in retry}:
                        await self._redis.script_load(source)
                    _settle(zip(retry, await self._execute(retry), strict=True))
        except (RedisError, OSError, TimeoutError) as exc:
            error = QuotaStoreUnavailable(f"redis unavailable: {exc.__class__.__name__}")
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(error)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:
            call = batch[0]
            try:
                return [await self._redis.execute_command("EVALSHA", call.sha, *call.args)]  # type: ignore[no-untyped-call]
            except NoScriptError as exc:
                return [exc]
        pipe = self._redis.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command("EVALSHA", call.sha, *call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def aclose(self) -> None:
        if self._pending:
            self._flush()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)


def _settle(outcomes: Iterable[tuple[_Call, Any]]) -> None:
    for call, result in outcomes:
        if call.future.done():  # the caller went away
            continue
        if isinstance(result, Exception):
            call.future.set_exception(QuotaStoreUnavailable(f"redis error: {result}"))
        else:
            call.future.set_result(result)


def _noscript(result: object) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, RedisError) and str(result).startswith("NOSCRIPT")
    )
