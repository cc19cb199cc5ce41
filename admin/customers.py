"""Forgetting a billing customer that no longer exists (deleted at Stripe)."""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis.asyncio as redis

from admin import keys

_FORGET = resources.files("admin").joinpath("lua", "forget_customer.lua").read_text()


async def forget_customer(client: redis.Redis, account: str, customer_id: str) -> bool:
    """Drop ``customer_id`` from the account's customer key and the customer -> account map.

    The next subscribe then creates a new customer instead of failing on the deleted one.
    """
    forgotten = bool(await client.eval(_FORGET, 1, keys.customer_key(account), customer_id))
    # The map is a global key on another slot than the account's: a step of its own.
    mapped: Any = await client.hget(keys.CUSTOMERS, customer_id)
    if mapped is not None and mapped.decode() == account:
        await client.hdel(keys.CUSTOMERS, customer_id)
    return forgotten
