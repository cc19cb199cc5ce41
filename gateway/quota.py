"""What a charge decides: allowed or refused, and why (``gateway.redis_quota`` decides)."""

from __future__ import annotations

from enum import IntEnum
from typing import final


class Reason(IntEnum):
    OK = 0
    QUOTA_EXHAUSTED = 1
    OVERAGE_CAP = 2
    RATE_LIMITED = 3
    TIER_NOT_ALLOWED = 4


@final
class Decision:
    """The outcome of one charge; also what a later refund needs to undo it exactly.

    A plain class in a compiled module (gateway/compiled.py): one is made for every metered
    request, and the compiled proxy reads its fields directly, where a msgspec.Struct's
    went through attribute lookup by name. Never changed once made."""

    __slots__ = (
        "allowed",
        "day",
        "included",
        "overage",
        "period_start",
        "reason",
        "reset_seconds",
        "retry_after_ms",
        "tier",
        "used",
    )

    def __init__(
        self,
        allowed: bool,
        reason: Reason,
        used: int,
        included: int,
        reset_seconds: int,
        tier: str,
        period_start: int,
        overage: int,
        retry_after_ms: int,
        day: str = "",
    ) -> None:
        self.allowed = allowed
        self.reason = reason
        self.used = used  # units used this period, after this charge when allowed
        self.included = included  # units the applied tier includes
        self.reset_seconds = reset_seconds  # until the period ends
        self.tier = tier  # the tier whose rules applied (free for a lapsed plan)
        self.period_start = period_start
        self.overage = overage  # units of this charge beyond the included ones
        self.retry_after_ms = retry_after_ms
        self.day = day  # the analytics day the units were counted on

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Decision({fields})"
