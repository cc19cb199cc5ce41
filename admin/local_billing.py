"""BillingBackend without Stripe: subscriptions kept in Redis, monthly periods, no charges.

Local mode makes ``make run`` a complete demo offline. Every state change goes through
``Plans.apply`` exactly as a Stripe webhook would, so the gateway cannot tell the modes
apart. The payment method is taken as given; ``pm_card_chargeDeclined`` is declined, like
Stripe's test card of that name, so the demo can show a 402.
"""

from __future__ import annotations

import calendar
import hashlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as redis

from admin import keys
from admin.billing_backend import (
    BillingConflict,
    CardDeclined,
    InvalidBillingRequest,
    InvoiceInfo,
    PaymentMethodInfo,
    SubscriptionState,
)
from admin.plans import ENDED, Plans, change_from_state
from config.model import Config

DECLINED_PAYMENT_METHODS = frozenset({"pm_card_chargeDeclined", "pm_card_visa_chargeDeclined"})
IDEMPOTENCY_TTL_SECONDS = 24 * 3600  # as long as Stripe keeps an idempotency key


def add_month(ts: int) -> int:
    """The same moment one calendar month later (the 31st becomes the month's last day)."""
    moment = datetime.fromtimestamp(ts, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return int(moment.replace(year=year, month=month, day=day).timestamp())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


class LocalBilling:
    mode = "local"

    def __init__(
        self,
        client: redis.Redis,
        plans: Plans,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._plans = plans
        self._config = config
        self._clock = clock

    async def ensure_customer(self, account: str) -> str:
        # Derived from the account: concurrent first calls agree on one id without a lock.
        customer_id = "cus_local_" + hashlib.sha256(account.encode()).hexdigest()[:16]
        await self._redis.set(keys.customer_key(account), customer_id, nx=True)
        stored = _text(await self._redis.get(keys.customer_key(account)))
        await self._redis.hset(keys.CUSTOMERS, stored, account)
        return stored

    async def subscribe(
        self,
        account: str,
        customer_id: str,
        tier: str,
        payment_method_id: str,
        idempotency_key: str,
    ) -> SubscriptionState:
        self._paid_tier(tier)
        idem = keys.local_idempotency_key(idempotency_key)
        earlier = _text(await self._redis.get(idem))
        if earlier:
            state = await self.get_subscription(earlier)
            # A key reused after that subscription ended or changed tier asks for a new one.
            if state is not None and state.status not in ENDED and state.tier == tier:
                return state
            await self._redis.delete(idem)
        if payment_method_id in DECLINED_PAYMENT_METHODS:
            raise CardDeclined("Your card was declined.")
        now = int(self._clock())
        sub_id = "sub_local_" + uuid.uuid4().hex[:20]
        if not await self._redis.set(idem, sub_id, nx=True, ex=IDEMPOTENCY_TTL_SECONDS):
            raise BillingConflict("a request with this idempotency key is in progress")
        state = SubscriptionState(
            id=sub_id,
            customer_id=customer_id,
            tier=tier,
            status="active",
            period_start=now,
            period_end=add_month(now),
            latest_invoice_status="paid",
        )
        await self._redis.hset(
            keys.local_payment_method_key(customer_id), "default", payment_method_id
        )
        await self._save(account, state)
        await self._redis.set(keys.subscription_key(account), sub_id)
        await self._invoice(state)
        await self._apply(account, state, "subscribed")
        return state

    async def change_tier(
        self, subscription_id: str, tier: str, idempotency_key: str
    ) -> SubscriptionState:
        self._paid_tier(tier)
        account, state = await self._load(subscription_id)
        if state.status in ("canceled", "incomplete_expired"):
            raise BillingConflict("the subscription has ended")
        # No charges locally, so no proration either: the period and the usage stay.
        state = msgspec.structs.replace(state, tier=tier, cancel_at_period_end=False)
        await self._save(account, state)
        await self._apply(account, state, "tier_changed")
        return state

    async def cancel(
        self, subscription_id: str, at_period_end: bool, idempotency_key: str
    ) -> SubscriptionState:
        account, state = await self._load(subscription_id)
        if state.status == "canceled":
            return state
        if at_period_end:
            state = msgspec.structs.replace(state, cancel_at_period_end=True)
        else:
            state = msgspec.structs.replace(state, status="canceled", cancel_at_period_end=False)
        await self._save(account, state)
        await self._apply(account, state, "canceled")
        return state

    async def get_subscription(self, subscription_id: str) -> SubscriptionState | None:
        raw: Any = await self._redis.hget(keys.local_subscription_key(subscription_id), "state")
        if not raw:
            return None
        return msgspec.json.decode(raw, type=SubscriptionState)

    async def renew_due(self) -> int:
        """Renew or end every local subscription whose period is over (Stripe does this)."""
        now = int(self._clock())
        changed = 0
        async for raw_key in self._redis.scan_iter(match=keys.local_subscription_key("*")):
            key = _text(raw_key)
            sub_id = key.rsplit(":", 1)[1]
            try:
                account, state = await self._load(sub_id)
            except BillingConflict:
                continue
            if state.status != "active" or state.period_end > now:
                continue
            if state.cancel_at_period_end:
                state = msgspec.structs.replace(state, status="canceled")
                reason = "ended"
            else:
                start = state.period_end
                while add_month(start) <= now:
                    start = add_month(start)
                state = msgspec.structs.replace(
                    state, period_start=start, period_end=add_month(start)
                )
                await self._invoice(state)
                reason = "renewed"
            await self._save(account, state)
            await self._apply(account, state, reason)
            changed += 1
        return changed

    async def payment_methods(self, customer_id: str) -> list[PaymentMethodInfo]:
        default = _text(
            await self._redis.hget(keys.local_payment_method_key(customer_id), "default")
        )
        if not default:
            return []
        brand = default.removeprefix("pm_card_").split("_")[0] or None
        return [
            PaymentMethodInfo(
                id=default, brand=brand, last4="4242", exp_month=12, exp_year=2034, is_default=True
            )
        ]

    async def portal_url(self, customer_id: str, return_url: str) -> str:
        # No hosted portal offline: the customer manages billing through this API.
        return return_url

    async def invoices(self, customer_id: str, limit: int = 24) -> list[InvoiceInfo]:
        rows: Any = await self._redis.lrange(keys.local_invoices_key(customer_id), 0, limit - 1)
        return [msgspec.json.decode(row, type=InvoiceInfo) for row in rows]

    async def report_usage(
        self, customer_id: str, units: int, identifier: str, timestamp: int
    ) -> None:
        return None  # nothing is charged locally

    async def health(self) -> dict[str, object]:
        return {"mode": self.mode, "reachable": True, "circuit": {"state": "closed"}}

    async def aclose(self) -> None:
        return None

    def _paid_tier(self, tier: str) -> None:
        if tier not in self._config.tiers or tier == "free":
            raise InvalidBillingRequest(f"unknown paid tier {tier!r}")

    async def _load(self, subscription_id: str) -> tuple[str, SubscriptionState]:
        key = keys.local_subscription_key(subscription_id)
        raw: Any = await self._redis.hmget(key, "account", "state")
        if not raw[0] or not raw[1]:
            raise BillingConflict(f"no subscription {subscription_id}")
        return _text(raw[0]), msgspec.json.decode(raw[1], type=SubscriptionState)

    async def _save(self, account: str, state: SubscriptionState) -> None:
        await self._redis.hset(
            keys.local_subscription_key(state.id),
            mapping={"account": account, "state": msgspec.json.encode(state)},
        )

    async def _invoice(self, state: SubscriptionState) -> None:
        price = self._config.tiers[state.tier].monthly_price_usd
        cents = int(price * 100)
        invoice = InvoiceInfo(
            id="in_local_" + uuid.uuid4().hex[:20],
            status="paid",
            amount_due=cents,
            amount_paid=0,  # simulated: nothing is charged locally
            currency="usd",
            created=int(self._clock()),
            hosted_invoice_url=None,
        )
        key = keys.local_invoices_key(state.customer_id)
        await self._redis.lpush(key, msgspec.json.encode(invoice))
        await self._redis.ltrim(key, 0, 99)

    async def _apply(self, account: str, state: SubscriptionState, what: str) -> None:
        # The state was made just now, so it is newer than anything the plan holds.
        await self._plans.apply(
            change_from_state(account, state, fresh=True),
            created=int(self._clock()),
            event_id=f"local:{state.id}",
            who="local",
            source=f"local:{what}:{state.id}",
        )
