"""Writing the plan the gateway enforces (``mg:{acct}:plan``), from webhooks and the API alike.

Every state change, whether a Stripe event or a local subscription, goes through
``Plans.apply``: one atomic Lua step that refuses changes older than what was applied,
then the global indices (paid accounts, starts and churn) and the audit log.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import msgspec
import redis.asyncio as redis
from redis.exceptions import NoScriptError

from admin import keys
from admin.audit import AuditLog
from admin.billing_backend import SubscriptionState

# Statuses in which a subscription is still paid for (past_due: within the gateway's grace).
PAYING = frozenset({"active", "trialing", "past_due"})
# Statuses after which a subscription will never be paid for again.
ENDED = frozenset({"canceled", "incomplete_expired"})


class PlanChange(msgspec.Struct, frozen=True, kw_only=True):
    """What one event or request changes; None leaves a field as stored."""

    account: str
    tier: str | None = None
    status: str | None = None
    period_start: int | None = None
    period_end: int | None = None
    subscription_id: str | None = None
    customer_id: str | None = None
    cancel_at_period_end: bool | None = None
    # Back to the free tier (customer deleted): the paid fields are removed.
    to_free: bool = False
    # A live new subscription may replace the stored one; anything else must match it.
    may_replace: bool = False
    # Fetched from Stripe just now: newer than whatever was applied before.
    fresh: bool = False


class ApplyResult(msgspec.Struct, frozen=True, kw_only=True):
    applied: bool
    reason: str  # applied, stale, other_subscription, ended
    tier: str
    status: str
    previous_tier: str
    previous_status: str


def change_from_state(account: str, state: SubscriptionState, *, fresh: bool = False) -> PlanChange:
    return PlanChange(
        account=account,
        tier=state.tier,
        status=state.status,
        period_start=state.period_start,
        period_end=state.period_end,
        subscription_id=state.id,
        customer_id=state.customer_id,
        cancel_at_period_end=state.cancel_at_period_end,
        may_replace=state.status not in ENDED,
        fresh=fresh,
    )


def is_paid(tier: str, status: str) -> bool:
    """Whether the plan is paid for (past_due counts: the grace is the gateway's business)."""
    return tier != "free" and status in PAYING


def _script() -> tuple[bytes, str]:
    body = resources.files("admin").joinpath("lua", "apply_plan.lua").read_bytes()
    return body, hashlib.sha1(body).hexdigest()


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Plans:
    def __init__(
        self, client: redis.Redis, audit: AuditLog, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = client
        self._audit = audit
        self._clock = clock
        self._src, self._sha = _script()

    async def apply(
        self, change: PlanChange, *, created: int, event_id: str, who: str, source: str
    ) -> ApplyResult:
        """Apply ``change`` unless the stored plan comes from a newer event."""
        now = int(self._clock())
        fields: list[str | int] = []
        for name, value in (
            ("tier", change.tier),
            ("status", change.status),
            ("period_start", change.period_start),
            ("period_end", change.period_end),
            ("customer_id", change.customer_id),
            ("cancel_at_period_end", change.cancel_at_period_end),
        ):
            if value is not None:
                fields += [name, int(value) if isinstance(value, bool) else value]
        args: list[str | int] = [
            created,
            event_id,
            now,
            "free" if change.to_free else "set",
            change.subscription_id or "",
            int(change.may_replace),
            int(change.fresh),
            created,
            *fields,
        ]
        plan = keys.plan_key(change.account)
        try:
            reply: Any = await self._redis.evalsha(self._sha, 1, plan, *args)
        except NoScriptError:
            reply = await self._redis.eval(self._src.decode(), 1, plan, *args)
        applied, reason, tier, status, prev_tier, prev_status = (_text(v) for v in reply)
        result = ApplyResult(
            applied=applied == "1",
            reason=reason,
            tier=tier,
            status=status,
            previous_tier=prev_tier,
            previous_status=prev_status,
        )
        # The indices live on other slots than the plan, so they follow the script rather
        # than sit in it; they are derived from the stored result, so a retry repairs them.
        await self._index(change, result, created)
        if result.applied:
            await self._audit.record(
                who=who,
                what="plan.free" if change.to_free else "plan.updated",
                account=change.account,
                source=source,
                details={
                    "tier": tier,
                    "status": status,
                    "previous_tier": prev_tier,
                    "previous_status": prev_status,
                    "subscription_id": change.subscription_id,
                    "period_end": change.period_end,
                    "cancel_at_period_end": change.cancel_at_period_end,
                },
            )
        return result

    async def _index(self, change: PlanChange, result: ApplyResult, created: int) -> None:
        account = change.account
        async with self._redis.pipeline(transaction=False) as pipe:
            if is_paid(result.tier, result.status):
                pipe.sadd(keys.PAID_ACCOUNTS, account)
                pipe.srem(keys.LAPSED_ACCOUNTS, account)
            else:
                # The usage reporter still owes Stripe this account's unreported overage: it
                # scans the lapsed set too and drops the account once nothing is due.
                pipe.smove(keys.PAID_ACCOUNTS, keys.LAPSED_ACCOUNTS, account)
            if change.customer_id:
                pipe.hset(keys.CUSTOMERS, change.customer_id, account)
            if result.applied:
                member = f"{account}:{change.subscription_id or ''}"
                was = result.previous_tier != "free" and result.previous_status in PAYING
                now = result.tier != "free" and result.status in PAYING
                if now and not was:
                    pipe.zadd(keys.STARTS, {member: created})
                elif was and not now:
                    pipe.zadd(keys.CHURN, {member: created})
            await pipe.execute()

    async def read(self, account: str) -> dict[str, str]:
        raw: Any = await self._redis.hgetall(keys.plan_key(account))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def account_for_customer(
        self, customer_id: str | None, metadata: Mapping[str, object] | None = None
    ) -> str | None:
        """The account of a customer: its metadata, else the ``mg:customers`` map.

        StripeBilling writes ``metergate_account``; ``account`` is read too, for objects
        made by hand or by older versions.
        """
        for name in ("metergate_account", "account"):
            account = (metadata or {}).get(name)
            if isinstance(account, str) and account:
                return account
        if not customer_id:
            return None
        found: Any = await self._redis.hget(keys.CUSTOMERS, customer_id)
        return found.decode() if found else None
