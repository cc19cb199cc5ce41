"""The billing backend on Stripe: stripe-python's async StripeClient on a shared aiohttp session.

Every call goes through one circuit breaker and one error mapping, so the billing API
only ever sees our ``BillingError`` types. Every write carries an idempotency key derived
from the caller's, so a retried request (by stripe-python, by the client, by a restarted
process) replays Stripe's first answer instead of creating a second object.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as redis
import stripe
from stripe.params import SubscriptionUpdateParamsItem

from admin.billing_backend import (
    BillingBackend,
    BillingConflict,
    BillingError,
    BillingUnavailable,
    CardDeclined,
    InvalidBillingRequest,
    InvoiceInfo,
    PaymentMethodInfo,
    SubscriptionState,
)
from admin.circuit import CircuitBreaker, CircuitOpen
from admin.customers import forget_customer
from admin.keys import customer_key
from admin.stripe_settings import StripeSettings

_T = TypeVar("_T")
Json = dict[str, Any]

# Ties a Stripe customer to our account: searched for, and set on every customer we create.
ACCOUNT_METADATA = "metergate_account"
_LOCK_SECONDS = 30
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _customer_lock_key(account: str) -> str:
    return f"{customer_key(account)}:lock"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def make_client(settings: StripeSettings, session: aiohttp.ClientSession) -> stripe.StripeClient:
    """A StripeClient on our aiohttp session, pointed at settings.api_base."""
    http_client = stripe.AIOHTTPClient(
        session=session, timeout=aiohttp.ClientTimeout(total=settings.timeout_seconds)
    )
    return stripe.StripeClient(
        settings.secret_key,
        base_addresses={"api": settings.api_base, "meter_events": settings.api_base},
        max_network_retries=settings.max_network_retries,
        http_client=http_client,
    )


class StripeBilling:
    """BillingBackend on Stripe. Create inside the event loop; ``aclose()`` at shutdown."""

    mode = "stripe"

    def __init__(
        self,
        settings: StripeSettings,
        redis_client: redis.Redis,
        *,
        session: aiohttp.ClientSession | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.settings = settings
        self._redis = redis_client
        self._owns_session = session is None
        self._session = session or aiohttp.ClientSession()
        self.client = make_client(settings, self._session)
        self.breaker = breaker or CircuitBreaker(
            settings.circuit_failure_threshold, settings.circuit_cooldown_seconds
        )
        self._unlock = redis_client.register_script(_UNLOCK)
        # One logical call may take every retry and its backoff; past this it is a failure.
        backoff = sum(min(0.5 * 2**i, 5.0) for i in range(settings.max_network_retries))
        self._deadline = settings.timeout_seconds * (settings.max_network_retries + 1) + backoff
        self.last_success_at: float | None = None

    # -- the one door to Stripe ------------------------------------------------------------

    async def _call(self, make: Callable[[], Awaitable[_T]]) -> _T:
        try:
            self.breaker.before_call()
        except CircuitOpen as exc:
            raise BillingUnavailable(str(exc)) from None
        try:
            async with asyncio.timeout(self._deadline):
                result = await make()
        except (stripe.APIConnectionError, TimeoutError) as exc:
            self.breaker.record_failure(type(exc).__name__)
            raise BillingUnavailable("Stripe is unreachable") from exc
        except stripe.StripeError as exc:
            status = exc.http_status
            if status is None or status >= 500:
                self.breaker.record_failure(f"HTTP {status}")
                raise BillingUnavailable(f"Stripe failed: HTTP {status}") from exc
            # Stripe answered: it is up, whatever it said.
            self.breaker.record_success()
            raise _map_error(exc) from exc
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.record_success()
        self.last_success_at = time.time()
        return result

    # -- BillingBackend --------------------------------------------------------------------

    async def ensure_customer(self, account: str) -> str:
        key = customer_key(account)
        token = secrets.token_hex(8)
        lock = _customer_lock_key(account)
        gone: str | None = None
        for _ in range(200):
            existing = _text(await self._redis.get(key))
            if existing and existing != gone:
                if not await self._customer_gone(existing):
                    return existing
                # Deleted at Stripe (customer.deleted not applied yet): make a new one.
                gone = existing
                await forget_customer(self._redis, account, existing)
                continue
            # Concurrent calls for one account: one creates, the others wait for its id.
            if await self._redis.set(lock, token, nx=True, ex=_LOCK_SECONDS):
                try:
                    return await self._find_or_create_customer(account, gone)
                finally:
                    await self._unlock(keys=[lock], args=[token])
            await asyncio.sleep(0.05)
        raise BillingConflict(f"another request is creating the customer of {account}")

    async def _customer_gone(self, customer_id: str) -> bool:
        try:
            found = await self._call(lambda: self.client.v1.customers.retrieve_async(customer_id))
        except InvalidBillingRequest as exc:
            cause = exc.__cause__
            if isinstance(cause, stripe.InvalidRequestError) and cause.code == "resource_missing":
                return True
            raise
        # Stripe answers a deleted customer with {"id", "deleted": true}.
        return bool(found.to_dict().get("deleted"))

    async def _find_or_create_customer(self, account: str, replacing: str | None) -> str:
        key = customer_key(account)
        existing = _text(await self._redis.get(key))
        if existing and existing != replacing:
            return existing
        # Redis may have lost the id (flushed, restored): Stripe's metadata is the record.
        query = f"metadata['{ACCOUNT_METADATA}']:'{account}'"
        found = await self._call(
            lambda: self.client.v1.customers.search_async({"query": query, "limit": 1})
        )
        found_ids = [str(c.id) for c in found.data if str(c.id) != replacing]
        customer_id = found_ids[0] if found_ids else await self._create_customer(account, replacing)
        await self._redis.set(key, customer_id)
        return customer_id

    def _new_customer(self, account: str, idem: str) -> Awaitable[stripe.Customer]:
        return self.client.v1.customers.create_async(
            {"metadata": {ACCOUNT_METADATA: account}}, {"idempotency_key": idem}
        )

    async def _create_customer(self, account: str, replacing: str | None) -> str:
        for _ in range(5):
            # A replacement needs its own key, or Stripe would replay the deleted customer.
            idem = f"customer:{account}" + (f":after:{replacing}" if replacing else "")
            created = await self._call(functools.partial(self._new_customer, account, idem))
            customer_id = str(created.id)
            response = created.last_response
            replayed = response is not None and any(
                name.lower() == "idempotent-replayed" and value == "true"
                for name, value in response.headers.items()
            )
            if not replayed or not await self._customer_gone(customer_id):
                return customer_id
            replacing = customer_id  # the first answer, replayed, is a deleted customer
        raise BillingConflict(f"could not create a customer for {account}")

    async def subscribe(
        self,
        account: str,
        customer_id: str,
        tier: str,
        payment_method_id: str,
        idempotency_key: str,
    ) -> SubscriptionState:
        items = self._items_for(tier)
        v1 = self.client.v1
        # Attaching a test token (pm_card_visa) yields a new id: use what Stripe answers.
        attached = await self._call(
            lambda: v1.payment_methods.attach_async(
                payment_method_id,
                {"customer": customer_id},
                {"idempotency_key": f"{idempotency_key}:attach"},
            )
        )
        pm_id = str(attached.id)
        await self._call(
            lambda: v1.customers.update_async(
                customer_id,
                {"invoice_settings": {"default_payment_method": pm_id}},
                {"idempotency_key": f"{idempotency_key}:default"},
            )
        )
        sub = await self._call(
            lambda: v1.subscriptions.create_async(
                {
                    "customer": customer_id,
                    "items": [{"price": price} for price in items],
                    "payment_behavior": "default_incomplete",
                    "payment_settings": {"save_default_payment_method": "on_subscription"},
                    "default_payment_method": pm_id,
                    "metadata": {ACCOUNT_METADATA: account, "tier": tier},
                    "expand": ["latest_invoice.confirmation_secret"],
                },
                {"idempotency_key": f"{idempotency_key}:subscription"},
            )
        )
        return self._state(sub.to_dict())

    async def change_tier(
        self, subscription_id: str, tier: str, idempotency_key: str
    ) -> SubscriptionState:
        prices = self._items_for(tier)
        current = await self._retrieve(subscription_id)
        if current is None:
            raise InvalidBillingRequest(f"no subscription {subscription_id}")
        flat, overage = self._our_items(current)
        if flat is None:
            raise InvalidBillingRequest(f"subscription {subscription_id} has no Metergate price")
        # Replace both items in one update: the flat price is prorated, the metered one is
        # billed on what the meter records, so the new overage price applies from now on.
        items: list[SubscriptionUpdateParamsItem] = [{"id": flat["id"], "price": prices[0]}]
        if overage is not None and len(prices) > 1:
            items.append({"id": overage["id"], "price": prices[1]})
        elif overage is not None:
            items.append({"id": overage["id"], "deleted": True})
        elif len(prices) > 1:
            items.append({"price": prices[1]})
        sub = await self._call(
            lambda: self.client.v1.subscriptions.update_async(
                subscription_id,
                {
                    "items": items,
                    "proration_behavior": "create_prorations",
                    "metadata": {"tier": tier},
                    "expand": ["latest_invoice.confirmation_secret"],
                },
                {"idempotency_key": f"{idempotency_key}:change"},
            )
        )
        return self._state(sub.to_dict())

    async def cancel(
        self, subscription_id: str, at_period_end: bool, idempotency_key: str
    ) -> SubscriptionState:
        subs = self.client.v1.subscriptions
        expand = ["latest_invoice.confirmation_secret"]
        if at_period_end:
            sub = await self._call(
                lambda: subs.update_async(
                    subscription_id,
                    {"cancel_at_period_end": True, "expand": expand},
                    {"idempotency_key": f"{idempotency_key}:cancel_at_period_end"},
                )
            )
        else:
            sub = await self._call(
                lambda: subs.cancel_async(
                    subscription_id,
                    # invoice_now: a final invoice for the un-invoiced metered usage (the
                    # overage) and the prorated flat price; without it they go unbilled.
                    {"prorate": True, "invoice_now": True, "expand": expand},
                    {"idempotency_key": f"{idempotency_key}:cancel"},
                )
            )
        return self._state(sub.to_dict())

    async def get_subscription(self, subscription_id: str) -> SubscriptionState | None:
        sub = await self._retrieve(subscription_id)
        return None if sub is None else self._state(sub)

    async def payment_methods(self, customer_id: str) -> list[PaymentMethodInfo]:
        v1 = self.client.v1
        customer = await self._call(lambda: v1.customers.retrieve_async(customer_id))
        default = (customer.to_dict().get("invoice_settings") or {}).get("default_payment_method")
        methods = await self._call(
            lambda: v1.payment_methods.list_async({"customer": customer_id, "type": "card"})
        )
        result = []
        for pm in methods.data:
            data = pm.to_dict()
            card = data.get("card") or {}
            result.append(
                PaymentMethodInfo(
                    id=data["id"],
                    brand=card.get("brand"),
                    last4=card.get("last4"),
                    exp_month=card.get("exp_month"),
                    exp_year=card.get("exp_year"),
                    is_default=data["id"] == default,
                )
            )
        return result

    async def portal_url(self, customer_id: str, return_url: str) -> str:
        session = await self._call(
            lambda: self.client.v1.billing_portal.sessions.create_async(
                {"customer": customer_id, "return_url": return_url},
                # A session per request; the key makes stripe-python's retries replay it.
                {"idempotency_key": f"portal:{customer_id}:{secrets.token_hex(8)}"},
            )
        )
        return str(session.url)

    async def invoices(self, customer_id: str, limit: int = 24) -> list[InvoiceInfo]:
        page = await self._call(
            lambda: self.client.v1.invoices.list_async({"customer": customer_id, "limit": limit})
        )
        return [
            InvoiceInfo(
                id=d["id"],
                status=d.get("status"),
                amount_due=int(d.get("amount_due") or 0),
                amount_paid=int(d.get("amount_paid") or 0),
                currency=str(d.get("currency") or "usd"),
                created=int(d.get("created") or 0),
                hosted_invoice_url=d.get("hosted_invoice_url"),
            )
            for d in (inv.to_dict() for inv in page.data)
        ]

    async def report_usage(
        self, customer_id: str, units: int, identifier: str, timestamp: int
    ) -> None:
        # The identifier dedupes at Stripe; the same string as idempotency key makes a retry
        # of this very request replay its first answer instead of failing as a duplicate.
        await self._call(
            lambda: self.client.v1.billing.meter_events.create_async(
                {
                    "event_name": self.settings.meter_event_name,
                    "payload": {"stripe_customer_id": customer_id, "value": str(units)},
                    "identifier": identifier,
                    "timestamp": timestamp,
                },
                {"idempotency_key": f"meter:{identifier}"},
            )
        )

    async def health(self) -> dict[str, object]:
        circuit = self.breaker.snapshot()
        return {
            "mode": self.mode,
            "reachable": circuit["state"] != "open",
            "circuit": circuit,
            "last_success_at": self.last_success_at,
            "api_base": self.settings.api_base,
        }

    async def aclose(self) -> None:
        if self._owns_session:
            await self._session.close()

    # -- helpers ---------------------------------------------------------------------------

    def _items_for(self, tier: str) -> list[str]:
        flat = self.settings.price_ids.get(tier)
        if flat is None:
            raise InvalidBillingRequest(f"tier {tier!r} cannot be subscribed")
        overage = self.settings.overage_price_ids.get(tier)
        return [flat] if overage is None else [flat, overage]

    async def _retrieve(self, subscription_id: str) -> Json | None:
        try:
            sub = await self._call(
                lambda: self.client.v1.subscriptions.retrieve_async(
                    subscription_id, {"expand": ["latest_invoice.confirmation_secret"]}
                )
            )
        except InvalidBillingRequest as exc:
            if isinstance(exc.__cause__, stripe.InvalidRequestError) and (
                exc.__cause__.http_status == 404
            ):
                return None
            raise
        return sub.to_dict()

    def _our_items(self, sub: Json) -> tuple[Json | None, Json | None]:
        flat = overage = None
        for item in sub["items"]["data"]:
            price_id = item["price"]["id"]
            if self.settings.tier_for_price(price_id) is not None:
                flat = item
            elif self.settings.is_overage_price(price_id):
                overage = item
        return flat, overage

    def _state(self, sub: Json) -> SubscriptionState:
        flat, _ = self._our_items(sub)
        item = flat or sub["items"]["data"][0]
        tier = self.settings.tier_for_price(item["price"]["id"]) or str(
            (sub.get("metadata") or {}).get("tier") or "unknown"
        )
        invoice = sub.get("latest_invoice")
        invoice = invoice if isinstance(invoice, dict) else {}
        secret = (invoice.get("confirmation_secret") or {}).get("client_secret")
        needs_action = sub["status"] == "incomplete" and invoice.get("status") == "open"
        return SubscriptionState(
            id=sub["id"],
            customer_id=_customer_id(sub["customer"]),
            tier=tier,
            status=sub["status"],
            # basil: the billing period lives on the item, not on the subscription.
            period_start=int(item["current_period_start"]),
            period_end=int(item["current_period_end"]),
            cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
            client_secret=secret if needs_action else None,
            latest_invoice_status=invoice.get("status"),
        )


def _customer_id(value: Any) -> str:
    return str(value["id"]) if isinstance(value, dict) else str(value)


def _map_error(exc: stripe.StripeError) -> BillingError:
    """A Stripe 4xx as our error type (5xx and network errors are handled by the caller)."""
    message = exc.user_message or str(exc) or type(exc).__name__
    if isinstance(exc, stripe.CardError):
        decline = getattr(exc.error, "decline_code", None) if exc.error else None
        return CardDeclined(f"{message} ({decline})" if decline else message)
    if isinstance(exc, stripe.IdempotencyError) or exc.http_status == 409:
        return BillingConflict(message)
    if isinstance(exc, stripe.RateLimitError):
        return BillingUnavailable("Stripe is rate limiting requests")
    if isinstance(exc, (stripe.AuthenticationError, stripe.PermissionError)):
        return BillingUnavailable("Stripe refused the API key")
    if isinstance(exc, stripe.InvalidRequestError):
        return InvalidBillingRequest(message)
    return BillingError(message)


def _conforms(backend: StripeBilling) -> BillingBackend:
    return backend  # mypy checks here that StripeBilling implements the contract
