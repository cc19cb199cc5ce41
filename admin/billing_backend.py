"""What a billing backend does for the admin app: Stripe in production, local without a key.

The billing API and the webhook consumer only know this contract. ``admin.stripe_billing``
implements it with stripe-python's async ``StripeClient``; ``admin.local_billing`` keeps
subscriptions in Redis so ``make run`` is a complete demo offline.
"""

from __future__ import annotations

from typing import Protocol

import msgspec


class SubscriptionState(msgspec.Struct, frozen=True, kw_only=True):
    """A subscription as the gateway's plan needs it (basil: periods come from the item)."""

    id: str
    customer_id: str
    tier: str  # our tier name, mapped from the flat price
    status: str  # Stripe's: incomplete, active, trialing, past_due, unpaid, canceled, paused...
    period_start: int  # unix seconds
    period_end: int
    cancel_at_period_end: bool = False
    # Set when the first payment needs the customer (3-D Secure): the confirmation secret.
    client_secret: str | None = None
    latest_invoice_status: str | None = None


class PaymentMethodInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    brand: str | None
    last4: str | None
    exp_month: int | None
    exp_year: int | None
    is_default: bool


class InvoiceInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str | None
    amount_due: int  # cents
    amount_paid: int
    currency: str
    created: int
    hosted_invoice_url: str | None


class BillingError(Exception):
    """A billing failure mapped to an HTTP status and a stable code."""

    status = 502
    code = "billing_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class CardDeclined(BillingError):
    status = 402
    code = "card_declined"


class BillingConflict(BillingError):
    status = 409
    code = "billing_conflict"


class BillingUnavailable(BillingError):
    """Stripe unreachable, timing out, or the circuit breaker is open."""

    status = 503
    code = "billing_unavailable"


class InvalidBillingRequest(BillingError):
    status = 400
    code = "invalid_billing_request"


class BillingBackend(Protocol):
    mode: str  # "stripe" or "local"

    async def ensure_customer(self, account: str) -> str:
        """The account's customer id, created once even under concurrent calls."""
        ...

    async def subscribe(
        self,
        account: str,
        customer_id: str,
        tier: str,
        payment_method_id: str,
        idempotency_key: str,
    ) -> SubscriptionState: ...

    async def change_tier(
        self, subscription_id: str, tier: str, idempotency_key: str
    ) -> SubscriptionState: ...

    async def cancel(
        self, subscription_id: str, at_period_end: bool, idempotency_key: str
    ) -> SubscriptionState: ...

    async def get_subscription(self, subscription_id: str) -> SubscriptionState | None: ...

    async def payment_methods(self, customer_id: str) -> list[PaymentMethodInfo]: ...

    async def portal_url(self, customer_id: str, return_url: str) -> str: ...

    async def invoices(self, customer_id: str, limit: int = 24) -> list[InvoiceInfo]: ...

    async def report_usage(
        self, customer_id: str, units: int, identifier: str, timestamp: int
    ) -> None:
        """Send overage units to the Billing Meter; ``identifier`` makes it exactly-once."""
        ...

    async def health(self) -> dict[str, object]: ...

    async def aclose(self) -> None: ...
