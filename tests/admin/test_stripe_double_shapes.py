"""Every object the Stripe double returns has every key of Stripe's official example object.

Checked on the wire (raw JSON over HTTP), recursively: a key of the official object may
not be missing, and where both values are non-null they have the same JSON type.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from admin.stripe_billing import StripeBilling
from tests.admin.stripe_double import StripeDouble
from tests.admin.stripe_objects import Json, official


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


# Maps whose keys are the user's, not Stripe's: only their type is compared.
FREE_FORM = frozenset({"metadata"})


def shape_problems(reference: Json, ours: Json, path: str) -> list[str]:
    problems: list[str] = []
    for key, expected in reference.items():
        where = f"{path}.{key}"
        if key not in ours:
            problems.append(f"{where} is missing")
            continue
        actual = ours[key]
        if expected is None or actual is None:
            continue
        if _kind(expected) != _kind(actual):
            problems.append(f"{where} is {_kind(actual)}, Stripe's is {_kind(expected)}")
        elif isinstance(expected, dict) and key not in FREE_FORM:
            problems += shape_problems(expected, actual, where)
        elif isinstance(expected, list) and expected and isinstance(expected[0], dict):
            for i, element in enumerate(actual):
                problems += shape_problems(expected[0], element, f"{where}[{i}]")
    return problems


def fixture_name(obj: Json) -> str:
    return f"deleted_{obj['object']}" if obj.get("deleted") else str(obj["object"])


def check(obj: Json, seen: set[str]) -> list[str]:
    """Compare an object (and the Stripe objects nested in it) with the official ones."""
    name = fixture_name(obj)
    seen.add(name)
    reference = official(name)
    if name == "event":
        problems = shape_problems({k: v for k, v in reference.items() if k != "data"}, obj, name)
        return problems + check(obj["data"]["object"], seen)
    problems = shape_problems(reference, obj, name)
    if name == "subscription":
        for item in obj["items"]["data"]:
            problems += check(item, seen)
    if name == "subscription_item":
        problems += check(item_price := obj["price"], seen) + check(obj["plan"], seen)
        assert item_price["object"] == "price"
    if name == "invoice":
        for line in obj["lines"]["data"]:
            problems += check(line, seen)
    return problems


@pytest.fixture
async def http(stripe_double: StripeDouble) -> Any:
    headers = {"Authorization": f"Bearer {stripe_double.secret_key}"}
    async with aiohttp.ClientSession(stripe_double.base_url, headers=headers) as session:

        async def get(path: str, method: str = "GET") -> Json:
            async with session.request(method, path) as response:
                assert response.status == 200, await response.text()
                body: Json = await response.json()
                return body

        yield get


async def test_every_object_the_double_returns_has_the_official_shape(
    stripe_double: StripeDouble, stripe_billing: StripeBilling, http: Any
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe("acct-1", cid, "pro", "pm_card_visa", "req-1")
    await stripe_billing.cancel(state.id, True, "req-2")
    await stripe_billing.portal_url(cid, "https://example.com")
    await stripe_billing.report_usage(cid, 3, "id-1", 1_790_000_000)
    other = await stripe_billing.ensure_customer("acct-2")

    objects: list[Json] = [
        await http(f"/v1/customers/{cid}"),
        await http(f"/v1/subscriptions/{state.id}"),
        *(await http(f"/v1/invoices?customer={cid}"))["data"],
        *(await http(f"/v1/payment_methods?customer={cid}&type=card"))["data"],
        *(await http("/v1/products"))["data"],
        *(await http("/v1/prices"))["data"],
        *(await http("/v1/billing/meters"))["data"],
        *stripe_double.meter_events.values(),
        *stripe_double.portal_sessions.values(),
        await http(f"/v1/customers/{other}", "DELETE"),
        *stripe_double.events,
    ]
    seen: set[str] = set()
    problems = [p for obj in objects for p in check(obj, seen)]
    assert problems == []
    assert seen >= {
        "customer",
        "deleted_customer",
        "subscription",
        "subscription_item",
        "invoice",
        "line_item",
        "price",
        "plan",
        "product",
        "payment_method",
        "billing.meter",
        "billing.meter_event",
        "billing_portal.session",
        "event",
    }


async def test_expanded_invoice_carries_the_confirmation_secret(
    stripe_billing: StripeBilling, http: Any, redis_client: redis.Redis
) -> None:
    cid = await stripe_billing.ensure_customer("acct-1")
    state = await stripe_billing.subscribe(
        "acct-1", cid, "pro", "pm_card_authenticationRequired", "req-1"
    )
    plain = await http(f"/v1/subscriptions/{state.id}")
    assert isinstance(plain["latest_invoice"], str)
    expanded = await http(
        f"/v1/subscriptions/{state.id}?expand[]=latest_invoice.confirmation_secret"
    )
    invoice = expanded["latest_invoice"]
    assert check(invoice, set()) == []
    assert invoice["confirmation_secret"]["client_secret"] == state.client_secret
    # basil: the subscription is under parent.subscription_details, periods on the items.
    assert invoice["parent"]["subscription_details"]["subscription"] == state.id
    assert "current_period_start" not in plain
    assert plain["items"]["data"][0]["current_period_start"] == state.period_start


def test_the_checker_notices_a_missing_key_and_a_wrong_type() -> None:
    customer = official("customer")
    del customer["email"]
    customer["balance"] = "0"
    customer["invoice_settings"].pop("footer")
    assert sorted(shape_problems(official("customer"), customer, "customer")) == [
        "customer.balance is str, Stripe's is number",
        "customer.email is missing",
        "customer.invoice_settings.footer is missing",
    ]
