"""Redis keys the admin app adds to the gateway's layout (``gateway.keys``).

Per-account keys carry the gateway's ``{acct}`` hash tag so they sit on the plan's slot.
Global indices (streams, sets, sorted sets) are single keys of their own.

- ``mg:{acct}:customer``      the account's billing customer id (written by ensure_customer)
- ``mg:{acct}:subscription``  the last subscription id created for the account
- ``mg:{acct}:subscribe_request`` hash: that subscription's id, tier and payment method
- ``mg:{acct}:rl:<window>``   billing API requests in one rate-limit window
- ``mg:{acct}:billing_lock``  one billing change at a time per account (admin.billing_lock)
- ``mg:customers``            hash customer id -> account
- ``mg:accounts:paid``        set of accounts whose plan pays (active, trialing, past_due)
- ``mg:accounts:lapsed``      set of accounts that stopped paying, until their overage is reported
- ``mg:churn``                sorted set ``acct:sub`` -> time the subscription stopped paying
- ``mg:starts``               sorted set ``acct:sub`` -> time the subscription started paying
- ``mg:webhooks``             stream of verified Stripe events (consumer group ``appliers``)
- ``mg:webhooks:dead``        stream of events that failed every delivery (dead letters)
- ``mg:webhook:seen:<id>``    an event already applied (TTL)
- ``mg:audit``                capped stream of every billing change
- ``mg:usage:hourly:<day>``   hour -> today's total units when sampled (stats by hour)
- ``mg:local:sub:<id>``       local mode: one subscription (hash)
- ``mg:local:idem:<key>``     local mode: idempotency key -> subscription id
- ``mg:local:pm:<cus>``       local mode: the customer's default payment method
- ``mg:local:invoices:<cus>`` local mode: simulated invoices (list, newest first)
"""

from __future__ import annotations

from gateway.keys import PREFIX, account_tag, plan_key, usage_key

__all__ = ["PREFIX", "plan_key", "usage_key"]

CUSTOMERS = f"{PREFIX}:customers"
PAID_ACCOUNTS = f"{PREFIX}:accounts:paid"
LAPSED_ACCOUNTS = f"{PREFIX}:accounts:lapsed"
CHURN = f"{PREFIX}:churn"
STARTS = f"{PREFIX}:starts"
WEBHOOK_STREAM = f"{PREFIX}:webhooks"
WEBHOOK_GROUP = "appliers"
WEBHOOK_DEAD_STREAM = f"{PREFIX}:webhooks:dead"
AUDIT_STREAM = f"{PREFIX}:audit"


_tag = account_tag


def customer_key(account: str) -> str:
    return f"{_tag(account)}:customer"


def subscription_key(account: str) -> str:
    return f"{_tag(account)}:subscription"


def subscribe_request_key(account: str) -> str:
    return f"{_tag(account)}:subscribe_request"


def rate_key(account: str, window: int) -> str:
    return f"{_tag(account)}:rl:{window}"


def daily_prefix(account: str) -> str:
    return f"{_tag(account)}:daily:"


def webhook_seen_key(event_id: str) -> str:
    return f"{PREFIX}:webhook:seen:{event_id}"


def local_subscription_key(subscription_id: str) -> str:
    return f"{PREFIX}:local:sub:{subscription_id}"


def local_idempotency_key(key: str) -> str:
    return f"{PREFIX}:local:idem:{key}"


def local_payment_method_key(customer_id: str) -> str:
    return f"{PREFIX}:local:pm:{customer_id}"


def local_invoices_key(customer_id: str) -> str:
    return f"{PREFIX}:local:invoices:{customer_id}"


def billing_lock_key(account: str) -> str:
    return f"{_tag(account)}:billing_lock"


def hourly_usage_key(day: str) -> str:
    return f"{PREFIX}:usage:hourly:{day}"
