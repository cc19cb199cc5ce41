"""One billing change at a time per account, whether from the API or from a Stripe event.

A change reads the subscription from Stripe and writes what it read to the plan. Two at
once could interleave: the webhook consumer reads the subscription, the API upgrades it
and writes the new tier, then the consumer writes the tier it read, which is the old one.
Both sides write states "fresh" from Stripe (apply_plan.lua does not order those by event
time), so only holding this lock from the read to the write keeps them apart.

redis-py's Lock: SET NX with a TTL, released by a script that checks the token, so a
holder whose lock expired never frees another's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.exceptions import LockNotOwnedError

from admin import keys

log = logging.getLogger(__name__)

WAIT_SECONDS = 30.0  # how long a second change waits for the first
# How long the lock lives: longer than the Stripe calls one change makes (three, each up to
# StripeBilling's deadline of about 31.5 s), or a slow change would lose it half way.
TTL_SECONDS = 300.0


class BillingBusy(Exception):
    """Another billing change of the account held the lock for longer than the wait."""


@contextlib.asynccontextmanager
async def account_lock(
    client: redis.Redis, account: str, *, wait_seconds: float = WAIT_SECONDS
) -> AsyncIterator[None]:
    lock = client.lock(
        keys.billing_lock_key(account),
        timeout=TTL_SECONDS,
        sleep=0.05,
        blocking_timeout=wait_seconds,
        thread_local=False,  # one lock object per change, awaited on one loop
    )
    if not await lock.acquire():
        raise BillingBusy(f"another billing change of {account} is in progress")
    try:
        yield
    finally:
        try:
            await lock.release()
        except LockNotOwnedError:
            # The change outlived the TTL; another may have begun meanwhile. Nothing to undo
            # here, but an operator should know Stripe was that slow.
            log.warning("the billing lock of %s expired before its change ended", account)
