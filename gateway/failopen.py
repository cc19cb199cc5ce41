"""What the gateway let through unmetered while Redis was down (fail-open mode).

Units are tallied in memory per account and route, and written to the Redis Stream
``mg:failopen`` once Redis answers again, so operators (and billing) can reconcile them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from gateway import keys, metrics
from gateway.redis_client import REDIS_ERRORS, RedisClient

log = logging.getLogger(__name__)
_Field = bytes | bytearray | memoryview | str | int | float


class FailOpenLedger:
    def __init__(self, client: RedisClient, *, interval: float = 1.0, maxlen: int = 100_000):
        self._redis = client
        self._interval = interval
        self._maxlen = maxlen
        self._tally: Counter[tuple[str, str]] = Counter()
        self._since = 0.0
        # Bumped each time the tally is taken to be written: a record from before cannot
        # be taken back from a tally that no longer holds it.
        self._generation = 0

    def record(self, account: str, route: str, units: int) -> int:
        """Tally units let through; returns the receipt ``unrecord`` takes."""
        if not self._tally:
            self._since = time.time()
        self._tally[(account, route)] += units
        metrics.FAIL_OPEN.labels(route).inc(units)
        return self._generation

    def unrecord(self, account: str, route: str, units: int, receipt: int) -> bool:
        """Take back units recorded for a request the backend then failed (a refund).

        Only while the tally that holds them is not being or has not been written: the
        record may count a failed request, never miss a served one.
        """
        if receipt != self._generation:
            return False
        key = (account, route)
        left = self._tally.get(key, 0) - units
        if left > 0:
            self._tally[key] = left
        else:
            self._tally.pop(key, None)
        return True

    async def flush(self) -> bool:
        """Write the tally to the stream; keep it when Redis is still down."""
        if not self._tally:
            return True
        tally, since = self._tally, self._since
        self._tally = Counter()
        self._generation += 1
        try:
            pipe = self._redis.pipeline(transaction=False)
            for (account, route), units in tally.items():
                fields: dict[_Field, _Field] = {
                    "account": account,
                    "route": route,
                    "units": units,
                    "since": int(since),
                    "until": int(time.time()),
                }
                pipe.xadd(keys.FAILOPEN_KEY, fields, maxlen=self._maxlen, approximate=True)
            await pipe.execute()
        except REDIS_ERRORS:
            self._tally.update(tally)
            self._since = since
            return False
        log.warning("reconciled %d units let through while Redis was down", sum(tally.values()))
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()
