"""The double's webhooks are signed exactly as Stripe signs them: stripe-python accepts them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer

from admin.stripe_billing import StripeBilling
from tests.admin.stripe_double import StripeDouble


@pytest.fixture
async def receiver(
    start_upstream: Callable[..., Awaitable[TestServer]], stripe_double: StripeDouble
) -> list[tuple[bytes, str]]:
    received: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers.get("Stripe-Signature", "")))
        return web.Response(status=200)

    server = await start_upstream({"/webhooks/stripe": hook})
    stripe_double.webhook_url = str(server.make_url("/webhooks/stripe"))
    return received


def verify(payload: bytes, header: str, secret: str = "whsec_double") -> Any:
    return stripe.Webhook.construct_event(payload, header, secret)


async def test_state_changes_become_signed_events_in_stripe_order(
    stripe_double: StripeDouble, stripe_billing: StripeBilling, receiver: list[tuple[bytes, str]]
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-1")
    await stripe_billing.change_tier(state.id, "starter", "req-2")
    await stripe_billing.cancel(state.id, False, "req-3")

    statuses = await stripe_double.deliver()
    assert set(statuses) == {200}
    events = [verify(payload, header) for payload, header in receiver]
    types = [e.type for e in events]
    assert types == [
        "customer.created",
        "payment_method.attached",
        "customer.updated",
        "customer.subscription.created",
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    ]
    created = events[3].to_dict()
    assert created["data"]["object"]["id"] == state.id
    assert created["data"]["object"]["metadata"]["metergate_account"] == "acct-1"
    assert created["api_version"] == stripe.api_version
    assert created["request"]["idempotency_key"] == "req-1:subscription"
    updated = events[8].to_dict()
    assert "items" in updated["data"]["previous_attributes"]
    assert stripe_double.outbox == []


async def test_resend_duplicate_reorder_and_bad_signatures(
    stripe_double: StripeDouble, stripe_billing: StripeBilling, receiver: list[tuple[bytes, str]]
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe(
        "acct-1", cid, "pro", "pm_card_authenticationRequired", "req-1"
    )
    stripe_double.confirm_payment(state.id)
    events = stripe_double.take_outbox()
    assert [e["type"] for e in events][-4:] == [
        "invoice.payment_action_required",
        "invoice.paid",
        "invoice.payment_succeeded",
        "customer.subscription.updated",
    ]
    last = events[-1]
    await stripe_double.deliver([last, last, events[3]])  # duplicate, then an older one
    ids = [verify(p, h).id for p, h in receiver]
    assert ids == [last["id"], last["id"], events[3]["id"]]

    fresh = await stripe_double.emit("customer.subscription.updated", state.id)
    assert fresh["data"]["object"]["status"] == "active"
    assert verify(*receiver[-1]).id == fresh["id"]

    stale = int(time.time()) - 3600
    await stripe_double.send_event(last, timestamp=stale)
    with pytest.raises(stripe.SignatureVerificationError):
        verify(*receiver[-1])
    await stripe_double.send_event(last, secret="whsec_wrong")
    with pytest.raises(stripe.SignatureVerificationError):
        verify(*receiver[-1])
    await stripe_double.send_event(last, signature="")
    assert receiver[-1][1] == ""


async def test_renewal_failure_and_end_of_a_cancelled_period(
    stripe_double: StripeDouble, stripe_billing: StripeBilling
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-1")
    stripe_double.take_outbox()

    stripe_double.advance_period(state.id)
    renewed = await stripe_billing.get_subscription(state.id)
    assert renewed is not None
    assert (renewed.status, renewed.period_start) == ("active", state.period_end)

    stripe_double.fail_payment(state.id)
    failed = await stripe_billing.get_subscription(state.id)
    assert failed is not None and failed.status == "past_due"
    assert "invoice.payment_failed" in [e["type"] for e in stripe_double.take_outbox()]

    await stripe_billing.cancel(state.id, True, "req-2")
    stripe_double.advance_period(state.id)
    ended = await stripe_billing.get_subscription(state.id)
    assert ended is not None and ended.status == "canceled"
    assert stripe_double.take_outbox()[-1]["type"] == "customer.subscription.deleted"
