"""An account's billing status and usage as the gateway enforces them (pure functions).

The effective tier and period follow ``gateway/lua/charge.lua`` exactly: a paid plan in
good standing (active, trialing, past_due within the grace) uses its own period, rolled
forward when its end has passed; anything else is the free tier on the calendar month.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal

import msgspec

from config.model import Config
from gateway.periods import calendar_month


class Usage(msgspec.Struct, frozen=True):
    current: int
    included: int
    remaining: int
    usage_percentage: float
    overage: int


class BillingStatus(msgspec.Struct, frozen=True):
    has_subscription: bool
    tier: str
    status: str
    usage: Usage
    expires_at: str
    overage_cost_usd: float


class Effective(msgspec.Struct, frozen=True):
    tier: str  # whose rules the gateway applies now
    period_start: int
    period_end: int


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def effective_plan(plan: Mapping[str, str], config: Config, now: float) -> Effective:
    tier = plan.get("tier") or "free"
    status = plan.get("status") or ""
    if tier != "free" and tier in config.tiers:
        good = status in ("active", "trialing")
        if status == "past_due":
            since = _int(plan.get("past_due_since")) or int(now)
            good = now - since <= config.billing.past_due_grace_seconds
        start, end = _int(plan.get("period_start")), _int(plan.get("period_end"))
        if good and start is not None and end is not None and end > start:
            if now >= end:
                length = end - start
                start += int((now - start) // length) * length
                end = start + length
            return Effective(tier, start, end)
    start, end = calendar_month(now)
    return Effective("free", start, end)


def billing_status(
    plan: Mapping[str, str], usage: Mapping[str, str], config: Config, now: float
) -> BillingStatus:
    effective = effective_plan(plan, config, now)
    rules = config.tiers[effective.tier]
    same_period = _int(usage.get("period_start")) == effective.period_start
    used = (_int(usage.get("used")) or 0) if same_period else 0
    overage = (_int(usage.get("overage")) or 0) if same_period else 0
    included = rules.included_units
    percentage = round(used / included * 100, 2) if included else (100.0 if used else 0.0)
    price = rules.overage_unit_price_usd or Decimal(0)
    # What the gateway enforces: an incomplete, unpaid or paused plan is the free tier.
    subscribed = effective.tier != "free"
    return BillingStatus(
        has_subscription=subscribed,
        tier=effective.tier,
        status=(plan.get("status") or "active") if plan.get("tier") else "active",
        usage=Usage(
            current=used,
            included=included,
            remaining=max(0, included - used),
            usage_percentage=percentage,
            overage=overage,
        ),
        expires_at=iso(effective.period_end),
        overage_cost_usd=float(round(overage * price, 2)),
    )
