"""StripeBilling against the Stripe double over HTTP: the real stripe library, real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from admin.billing_backend import (
    BillingUnavailable,
    CardDeclined,
    InvalidBillingRequest,
)
from admin.stripe_billing import StripeBilling, customer_key
from tests.admin.stripe_double import StripeDouble


async def test_ensure_customer_creates_one_and_stores_it(
    stripe_billing: StripeBilling, stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    assert cid.startswith("cus_")
    assert await redis_client.get("mg:{acct-1}:customer") == cid.encode()
    assert customer_key("acct-1") == "mg:{acct-1}:customer"
    assert stripe_double.customers[cid]["metadata"] == {"metergate_account": "acct-1"}
    assert await stripe_billing.ensure_customer("acct-1") == cid
    assert len(stripe_double.customers) == 1


async def test_ensure_customer_finds_the_stripe_customer_when_redis_lost_it(
    stripe_billing: StripeBilling, stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    await redis_client.delete(customer_key("acct-1"))
    assert await stripe_billing.ensure_customer("acct-1") == cid
    assert len(stripe_double.customers) == 1


async def test_subscribe_two_items_default_incomplete_and_default_payment_method(
    stripe_billing: StripeBilling, stripe_double: StripeDouble
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-1")

    assert state.status == "active"
    assert state.tier == "pro"
    assert state.customer_id == cid
    assert state.client_secret is None
    assert state.latest_invoice_status == "paid"
    sub = stripe_double.subscriptions[state.id]
    prices = [item["price"]["id"] for item in sub["items"]["data"]]
    settings = stripe_double.settings
    assert prices == [settings.price_ids["pro"], settings.overage_price_ids["pro"]]
    metered = sub["items"]["data"][1]["price"]["recurring"]
    assert metered["usage_type"] == "metered"
    assert metered["meter"] in stripe_double.meters
    # Periods come from the item (basil), one calendar month.
    item = sub["items"]["data"][0]
    assert (state.period_start, state.period_end) == (
        item["current_period_start"],
        item["current_period_end"],
    )
    assert 28 * 86400 <= state.period_end - state.period_start <= 31 * 86400
    create = next(p for m, path, p in stripe_double.requests if path == "/v1/subscriptions")
    assert create["payment_behavior"] == "default_incomplete"
    assert create["expand"] == ["latest_invoice.confirmation_secret"]
    default_pm = stripe_double.customers[cid]["invoice_settings"]["default_payment_method"]
    assert default_pm is not None
    assert stripe_double.payment_methods[default_pm]["customer"] == cid
    methods = await stripe_billing.payment_methods(cid)
    assert [(m.id, m.brand, m.last4, m.is_default) for m in methods] == [
        (default_pm, "visa", "4242", True)
    ]
    # Every request carried the library's current API version (basil or later).
    assert stripe_double.stripe_versions == {stripe_double.api_version}


async def test_three_d_secure_returns_the_confirmation_client_secret(
    stripe_billing: StripeBilling, stripe_double: StripeDouble
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe(
        "acct-1", cid, "starter", "pm_card_authenticationRequired", "req-3ds"
    )
    assert state.status == "incomplete"
    assert state.latest_invoice_status == "open"
    assert state.client_secret is not None
    assert "_secret_" in state.client_secret

    stripe_double.confirm_payment(state.id)
    after = await stripe_billing.get_subscription(state.id)
    assert after is not None
    assert (after.status, after.client_secret) == ("active", None)


async def test_card_declined_is_card_declined(
    stripe_billing: StripeBilling, stripe_double: StripeDouble
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    with pytest.raises(CardDeclined, match="generic_decline") as info:
        await stripe_billing.subscribe("acct-1", cid, "pro", "pm_card_chargeDeclined", "req-d")
    assert info.value.status == 402
    assert stripe_double.subscriptions == {}


async def test_free_tier_and_unknown_ids_are_invalid_requests(
    stripe_billing: StripeBilling,
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    with pytest.raises(InvalidBillingRequest):
        await stripe_billing.subscribe("acct-1", cid, "free", "pm_card_visa", "req-free")
    with pytest.raises(InvalidBillingRequest) as info:
        await stripe_billing.subscribe("acct-1", cid, "pro", "pm_nope", "req-nope")
    assert info.value.status == 400
    assert await stripe_billing.get_subscription("sub_missing") is None


async def test_upgrade_and_downgrade_replace_both_items_with_proration(
    stripe_billing: StripeBilling, stripe_double: StripeDouble
) -> None:
    settings = stripe_double.settings
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe("acct-1", cid, "starter", "pm_card_visa", "req-1")
    items_before = [i["id"] for i in stripe_double.subscriptions[state.id]["items"]["data"]]

    up = await stripe_billing.change_tier(state.id, "enterprise", "req-2")
    assert (up.tier, up.status) == ("enterprise", "active")
    sub = stripe_double.subscriptions[state.id]
    assert [i["price"]["id"] for i in sub["items"]["data"]] == [
        settings.price_ids["enterprise"],
        settings.overage_price_ids["enterprise"],
    ]
    assert [i["id"] for i in sub["items"]["data"]] == items_before  # replaced in place
    assert {p["proration_behavior"] for p in stripe_double.prorations} == {"create_prorations"}
    assert [(p["from_price"], p["to_price"]) for p in stripe_double.prorations] == [
        (settings.price_ids["starter"], settings.price_ids["enterprise"]),
        (settings.overage_price_ids["starter"], settings.overage_price_ids["enterprise"]),
    ]

    down = await stripe_billing.change_tier(state.id, "pro", "req-3")
    assert down.tier == "pro"
    assert [i["price"]["id"] for i in sub["items"]["data"]] == [
        settings.price_ids["pro"],
        settings.overage_price_ids["pro"],
    ]
    # The same request retried is the same change, not a second one.
    again = await stripe_billing.change_tier(state.id, "pro", "req-3")
    assert again.tier == "pro"
    assert len(stripe_double.prorations) == 4


async def test_cancel_at_period_end_then_at_once(
    stripe_billing: StripeBilling, stripe_double: StripeDouble
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-1")

    later = await stripe_billing.cancel(state.id, True, "req-c1")
    assert (later.status, later.cancel_at_period_end) == ("active", True)
    assert stripe_double.subscriptions[state.id]["cancel_at"] == later.period_end

    now = await stripe_billing.cancel(state.id, False, "req-c2")
    assert now.status == "canceled"
    with pytest.raises(InvalidBillingRequest):
        await stripe_billing.change_tier(state.id, "starter", "req-c3")


async def test_concurrent_subscribe_makes_one_customer_and_one_subscription(
    stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    # Five processes (own StripeBilling each) handle the same retried request at once.
    billings = [StripeBilling(stripe_double.settings, redis_client) for _ in range(5)]
    stripe_double.latency = 0.02  # requests overlap at the double, as at Stripe

    async def subscribe(b: StripeBilling) -> str:
        cid = await b.ensure_customer("acct-1")
        return (await b.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-same")).id

    try:
        results = await asyncio.gather(*(subscribe(b) for b in billings), return_exceptions=True)
    finally:
        for b in billings:
            await b.aclose()
    # Overlapping duplicates get 409 from Stripe; stripe-python retries them with the same
    # key, and the replay is the first answer: every caller sees the one subscription.
    assert len(set(results)) == 1 and isinstance(results[0], str), results
    assert len(stripe_double.customers) == 1
    assert len(stripe_double.subscriptions) == 1


async def test_concurrent_ensure_customer_makes_one_customer(
    stripe_billing: StripeBilling, stripe_double: StripeDouble
) -> None:
    stripe_double.latency = 0.05
    ids = await asyncio.gather(*(stripe_billing.ensure_customer("acct-9") for _ in range(5)))
    assert len(set(ids)) == 1
    assert len(stripe_double.customers) == 1


async def test_a_transient_500_is_retried_with_the_same_idempotency_key(
    stripe_billing: StripeBilling, stripe_double: StripeDouble
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    stripe_double.fail_next(1)
    state = await stripe_billing.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-1")
    assert state.status == "active"
    assert stripe_billing.breaker.consecutive_failures == 0


async def test_stripe_down_opens_the_circuit_and_calls_fail_fast(
    stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    settings = stripe_double.make_settings(
        max_network_retries=0,
        circuit_failure_threshold=3,
        circuit_cooldown_seconds=0.3,
        price_ids=stripe_double.settings.price_ids,
        overage_price_ids=stripe_double.settings.overage_price_ids,
    )
    billing = StripeBilling(settings, redis_client)
    try:
        cid = await billing.ensure_customer("acct-1")
        stripe_double.down = "500"
        for _ in range(3):
            with pytest.raises(BillingUnavailable):
                await billing.invoices(cid)
        assert (await billing.health())["circuit"]["state"] == "open"  # type: ignore[index]
        requests = len(stripe_double.requests)

        started = time.perf_counter()
        for _ in range(20):
            with pytest.raises(BillingUnavailable) as info:
                await billing.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-x")
            assert info.value.status == 503
        assert time.perf_counter() - started < 0.1  # no network, no timeouts, no retries
        assert len(stripe_double.requests) == requests

        # After the cooldown one probe goes out; Stripe is back, so the circuit closes.
        stripe_double.down = None
        await asyncio.sleep(0.35)
        assert (await billing.health())["circuit"]["state"] == "half_open"  # type: ignore[index]
        assert await billing.invoices(cid) is not None
        assert (await billing.health())["circuit"]["state"] == "closed"  # type: ignore[index]
    finally:
        await billing.aclose()


async def test_half_open_probe_failure_reopens(
    stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    settings = stripe_double.make_settings(
        max_network_retries=0, circuit_failure_threshold=1, circuit_cooldown_seconds=0.2
    )
    billing = StripeBilling(settings, redis_client)
    try:
        stripe_double.down = "close"
        with pytest.raises(BillingUnavailable):
            await billing.invoices("cus_x")
        assert billing.breaker.state.name == "OPEN"
        await asyncio.sleep(0.25)
        with pytest.raises(BillingUnavailable):
            await billing.invoices("cus_x")  # the probe, and Stripe still down
        assert billing.breaker.state.name == "OPEN"
    finally:
        await billing.aclose()


async def test_a_hanging_stripe_times_out_as_unavailable(
    stripe_double: StripeDouble, redis_client: redis.Redis
) -> None:
    settings = stripe_double.make_settings(max_network_retries=0, timeout_seconds=0.2)
    billing = StripeBilling(settings, redis_client)
    try:
        stripe_double.down = "hang"
        started = time.perf_counter()
        with pytest.raises(BillingUnavailable):
            await billing.invoices("cus_x")
        assert time.perf_counter() - started < 1.0
    finally:
        await billing.aclose()


async def test_portal_invoices_and_usage(
    stripe_billing: StripeBilling, stripe_double: StripeDouble
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    await stripe_billing.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-1")
    url = await stripe_billing.portal_url(cid, "https://example.com/account")
    assert url.startswith(stripe_double.base_url)
    assert any(key.startswith(f"portal:{cid}:") for key in stripe_double._idempotent)
    invoices = await stripe_billing.invoices(cid)
    assert [(i.status, i.amount_due, i.currency) for i in invoices] == [("paid", 9900, "usd")]

    await stripe_billing.report_usage(cid, 25, "acct-1:1:0:25", int(time.time()))
    await stripe_billing.report_usage(cid, 25, "acct-1:1:0:25", int(time.time()))
    assert stripe_double.metered_total(cid) == 25
    # Without the idempotency key too, Stripe drops a repeated identifier.
    await stripe_billing.client.v1.billing.meter_events.create_async(
        {
            "event_name": "metergate_overage_units",
            "payload": {"stripe_customer_id": cid, "value": "25"},
            "identifier": "acct-1:1:0:25",
        }
    )
    assert stripe_double.metered_total(cid) == 25
    health = await stripe_billing.health()
    assert health["mode"] == "stripe"
    assert health["reachable"] is True
