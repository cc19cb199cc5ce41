"""What a quota store does: charge a request's units, or refund them.

Route pricing and the proxy only know this contract; ``gateway.redis_quota`` implements it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from enum import IntEnum
from typing import Protocol

import msgspec


class Reason(IntEnum):
    OK = 0
    QUOTA_EXHAUSTED = 1
    OVERAGE_CAP = 2
    RATE_LIMITED = 3
    TIER_NOT_ALLOWED = 4


class Decision(msgspec.Struct, frozen=True, array_like=True):
    """The outcome of one charge; also what a later refund needs to undo it exactly."""

    allowed: bool
    reason: Reason
    used: int  # units used this period, after this charge when allowed
    included: int  # units the applied tier includes
    reset_seconds: int  # until the period ends
    tier: str  # the tier whose rules applied (free for a lapsed plan)
    period_start: int
    overage: int  # units of this charge beyond the included ones
    retry_after_ms: int
    day: str = ""  # the analytics day the units were counted on


class QuotaStore(Protocol):
    def charge(
        self, account: str, route: str, cost: int, allowed_tiers: str = ""
    ) -> Awaitable[Decision]:
        """Atomically decide and charge ``cost`` units; raise QuotaStoreUnavailable.

        An awaitable rather than a coroutine: on the hot path it is the future the batch
        settles, awaited without a coroutine frame around it."""
        ...

    async def refund(self, account: str, route: str, cost: int, decision: Decision) -> int:
        """Give back the units of an allowed charge; returns the units refunded."""
        ...

    async def ping(self) -> bool: ...
