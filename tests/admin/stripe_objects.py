"""Stripe objects for the test double, built from Stripe's official example objects.

Every builder deep-copies the example from ``fixtures3.json`` (Stripe's openapi repository)
and overrides what the double knows, so each object keeps every key of the real one; the
fixture's placeholder values that would mean something (a ``cancel_at``, a discount, a
``pending_update``) are reset to null. Also: the form-body parser for requests as
stripe-python sends them (``items[0][price]=...``, ``expand[0]=...``).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

Json = dict[str, Any]

# Stripe's official example objects, vendored (fixtures/README.md); STRIPE_FIXTURES3 may
# point at a newer copy.
FIXTURES_PATH = Path(
    os.environ.get("STRIPE_FIXTURES3")
    or Path(__file__).resolve().parent / "fixtures" / "stripe_fixtures3.json"
)


@cache
def _resources() -> dict[str, Json]:
    resources: dict[str, Json] = json.loads(FIXTURES_PATH.read_text())["resources"]
    return resources


def official(name: str) -> Json:
    """A deep copy of Stripe's example object for one resource (``"billing.meter"``...)."""
    return copy.deepcopy(_resources()[name])


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def add_month(ts: int) -> int:
    """One calendar month later (day clamped), as Stripe's monthly billing anchor does."""
    d = datetime.fromtimestamp(ts, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    for day in (d.day, 30, 29, 28):
        try:
            return int(d.replace(year=year, month=month, day=day).timestamp())
        except ValueError:
            continue
    raise AssertionError("unreachable")


# -- request bodies ---------------------------------------------------------------------------


def parse_form(pairs: list[tuple[str, str]]) -> Json:
    """``a[b][0][c]=v`` pairs into nested dicts; all-digit keys (and ``x[]``) become lists."""
    root: Json = {}
    for raw_key, value in pairs:
        head, _, rest = raw_key.partition("[")
        parts = [head] + ([p.rstrip("]") for p in ("[" + rest).split("[")[1:]] if rest else [])
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":
                part = str(len(node))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    fixed = {k: _listify(v) for k, v in node.items()}
    if fixed and all(k.isdigit() for k in fixed):
        return [fixed[k] for k in sorted(fixed, key=int)]
    return fixed


def as_bool(value: Any) -> bool:
    return value in (True, "true", "True", "1")


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


# -- objects --------------------------------------------------------------------------------


def customer(cid: str, created: int, params: Json) -> Json:
    obj = official("customer")
    obj.update(
        id=cid,
        created=created,
        email=params.get("email"),
        name=params.get("name"),
        description=params.get("description"),
        phone=params.get("phone"),
        metadata=dict(params.get("metadata") or {}),
        discount=None,
        currency=None,
        shipping=None,
        address=None,
        invoice_prefix=cid[-8:].upper(),
    )
    obj["invoice_settings"].update(default_payment_method=None, custom_fields=None, footer=None)
    return obj


# Stripe's test payment methods: https://docs.stripe.com/testing#cards
TEST_CARDS: dict[str, tuple[str, str]] = {
    "pm_card_visa": ("visa", "4242"),
    "pm_card_mastercard": ("mastercard", "4444"),
    "pm_card_amex": ("amex", "8431"),
    "pm_card_chargeDeclined": ("visa", "0002"),
    "pm_card_chargeDeclinedInsufficientFunds": ("visa", "9995"),
    "pm_card_authenticationRequired": ("visa", "3184"),
    "pm_card_chargeCustomerFail": ("visa", "0341"),
}


def payment_method(pmid: str, created: int, brand: str, last4: str) -> Json:
    obj = official("payment_method")
    obj.update(id=pmid, created=created, customer=None, metadata={}, allow_redisplay="unspecified")
    obj["billing_details"].update(email=None, phone=None)
    obj["billing_details"]["address"] = {k: None for k in obj["billing_details"]["address"]}
    card = obj["card"]
    card.update(
        brand=brand,
        display_brand=brand,
        last4=last4,
        exp_month=12,
        exp_year=datetime.now(UTC).year + 3,
        fingerprint=secrets.token_hex(8),
        generated_from=None,
        wallet=None,
    )
    card["networks"] = {"available": [brand], "preferred": None}
    return obj


def product(pid: str, created: int, params: Json) -> Json:
    obj = official("product")
    obj.update(
        id=pid,
        created=created,
        updated=created,
        name=params.get("name") or "product",
        description=params.get("description"),
        metadata=dict(params.get("metadata") or {}),
        default_price=None,
        package_dimensions=None,
        type="service",
        active=as_bool(params.get("active", "true")),
    )
    return obj


def price(prid: str, created: int, params: Json) -> Json:
    obj = official("price")
    recurring_in = params.get("recurring")
    decimal = params.get("unit_amount_decimal")
    amount = params.get("unit_amount")
    if decimal is None and amount is not None:
        decimal = str(amount)
    if amount is None and decimal is not None and float(decimal).is_integer():
        amount = int(float(decimal))
    obj.update(
        id=prid,
        created=created,
        currency=params.get("currency", "usd"),
        product=params["product"],
        lookup_key=params.get("lookup_key"),
        nickname=params.get("nickname"),
        metadata=dict(params.get("metadata") or {}),
        unit_amount=None if amount is None else int(amount),
        unit_amount_decimal=decimal,
        transform_quantity=None,
        custom_unit_amount=None,
        billing_scheme=params.get("billing_scheme", "per_unit"),
        active=as_bool(params.get("active", "true")),
    )
    if recurring_in:
        obj["type"] = "recurring"
        obj["recurring"] = {
            "interval": recurring_in.get("interval", "month"),
            "interval_count": int(recurring_in.get("interval_count", 1)),
            "meter": recurring_in.get("meter"),
            "usage_type": recurring_in.get("usage_type", "licensed"),
            "trial_period_days": None,
        }
    else:
        obj["type"] = "one_time"
        obj["recurring"] = None
    return obj


def plan_from_price(p: Json) -> Json:
    obj = official("plan")
    recurring = p["recurring"] or {}
    obj.update(
        id=p["id"],
        created=p["created"],
        currency=p["currency"],
        product=p["product"],
        amount=p["unit_amount"],
        amount_decimal=p["unit_amount_decimal"],
        interval=recurring.get("interval", "month"),
        interval_count=recurring.get("interval_count", 1),
        meter=recurring.get("meter"),
        usage_type=recurring.get("usage_type", "licensed"),
        metadata=p["metadata"],
        nickname=p["nickname"],
        transform_usage=None,
        billing_scheme=p["billing_scheme"],
        livemode=False,
    )
    return obj


def subscription_item(
    siid: str, sub_id: str, p: Json, created: int, period: tuple[int, int]
) -> Json:
    obj = official("subscription_item")
    metered = (p["recurring"] or {}).get("usage_type") == "metered"
    obj.update(
        id=siid,
        created=created,
        subscription=sub_id,
        price=copy.deepcopy(p),
        plan=plan_from_price(p),
        # Metered items have no quantity: the meter says how much.
        quantity=None if metered else 1,
        billing_thresholds=None,
        current_period_start=period[0],
        current_period_end=period[1],
    )
    return obj


def subscription(sub_id: str, customer_id: str, created: int) -> Json:
    obj = official("subscription")
    obj.update(
        id=sub_id,
        customer=customer_id,
        created=created,
        start_date=created,
        billing_cycle_anchor=created,
        billing_cycle_anchor_config=None,
        cancel_at=None,
        canceled_at=None,
        cancel_at_period_end=False,
        ended_at=None,
        trial_start=None,
        trial_end=None,
        next_pending_invoice_item_invoice=None,
        pause_collection=None,
        pending_invoice_item_interval=None,
        pending_update=None,
        transfer_data=None,
        billing_thresholds=None,
        latest_invoice=None,
        default_payment_method=None,
        metadata={},
        billing_schedules=[],
        managed_payments=None,
        billing_mode={"type": "flexible", "flexible": {"proration_discounts": "included"}},
    )
    obj["items"] = {
        "object": "list",
        "data": [],
        "has_more": False,
        "total_count": 0,
        "url": f"/v1/subscription_items?subscription={sub_id}",
    }
    obj["payment_settings"].update(payment_method_types=None, save_default_payment_method=None)
    return obj


def invoice(
    inv_id: str,
    sub: Json,
    created: int,
    *,
    status: str,
    billing_reason: str,
    base_url: str,
) -> Json:
    obj = official("invoice")
    template = obj["lines"]["data"][0]
    lines = []
    total = 0
    for item in sub["items"]["data"]:
        p = item["price"]
        amount = (p["unit_amount"] or 0) * (item["quantity"] or 0)
        total += amount
        line = copy.deepcopy(template)
        line.update(
            id=new_id("il"),
            invoice=inv_id,
            amount=amount,
            subtotal=amount,
            description=f"{item['quantity'] or 0} x {p['id']}",
            quantity=item["quantity"],
            period={"start": item["current_period_start"], "end": item["current_period_end"]},
            subscription=None,
            discountable=True,
        )
        line["parent"] = {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": sub["id"],
                "subscription_item": item["id"],
            },
        }
        line["pricing"] = {
            "type": "price_details",
            "unit_amount_decimal": p["unit_amount_decimal"],
            "price_details": {"price": p["id"], "product": p["product"]},
        }
        lines.append(line)
    paid = status == "paid"
    first = sub["items"]["data"][0] if sub["items"]["data"] else None
    obj.update(
        id=inv_id,
        customer=sub["customer"],
        created=created,
        effective_at=created,
        status=status,
        billing_reason=billing_reason,
        amount_due=total,
        amount_paid=total if paid else 0,
        amount_remaining=0 if paid else total,
        amount_overpaid=0,
        subtotal=total,
        subtotal_excluding_tax=total,
        total=total,
        total_excluding_tax=total,
        attempted=True,
        attempt_count=1,
        auto_advance=not paid,
        due_date=None,
        from_invoice=None,
        last_finalization_error=None,
        next_payment_attempt=None,
        shipping_cost=None,
        shipping_details=None,
        customer_shipping=None,
        customer_address=None,
        hosted_invoice_url=f"{base_url}/invoice/{inv_id}",
        invoice_pdf=f"{base_url}/invoice/{inv_id}/pdf",
        number=inv_id[-8:].upper(),
        webhooks_delivered_at=created,
        period_start=first["current_period_start"] if first else created,
        period_end=first["current_period_end"] if first else created,
        default_payment_method=sub.get("default_payment_method"),
    )
    obj["lines"] = {
        "object": "list",
        "data": lines,
        "has_more": False,
        "url": f"/v1/invoices/{inv_id}/lines",
    }
    # basil: the subscription an invoice bills is under parent.subscription_details.
    obj["parent"] = {
        "type": "subscription_details",
        "quote_details": None,
        "subscription_details": {"metadata": dict(sub["metadata"]), "subscription": sub["id"]},
    }
    obj["status_transitions"].update(finalized_at=created, paid_at=created if paid else None)
    return obj


def meter(mid: str, created: int, params: Json) -> Json:
    obj = official("billing.meter")
    mapping = params.get("customer_mapping") or {}
    value = params.get("value_settings") or {}
    obj.update(
        id=mid,
        created=created,
        updated=created,
        livemode=False,
        display_name=params.get("display_name") or params["event_name"],
        event_name=params["event_name"],
        event_time_window=params.get("event_time_window"),
        status="active",
        customer_mapping={
            "event_payload_key": mapping.get("event_payload_key", "stripe_customer_id"),
            "type": mapping.get("type", "by_id"),
        },
        default_aggregation={"formula": (params.get("default_aggregation") or {})["formula"]},
        value_settings={"event_payload_key": value.get("event_payload_key", "value")},
    )
    return obj


def meter_event(created: int, params: Json, identifier: str) -> Json:
    obj = official("billing.meter_event")
    obj.update(
        created=created,
        event_name=params["event_name"],
        identifier=identifier,
        livemode=False,
        payload=dict(params["payload"]),
        timestamp=int(params.get("timestamp") or created),
    )
    return obj


def portal_session(customer_id: str, created: int, return_url: str | None, base_url: str) -> Json:
    obj = official("billing_portal.session")
    sid = new_id("bps")
    obj.update(
        id=sid,
        created=created,
        customer=customer_id,
        return_url=return_url,
        flow=None,
        livemode=False,
        configuration="bpc_double",
        url=f"{base_url}/portal/session/{sid}",
    )
    return obj


def event(
    event_type: str,
    obj: Json,
    created: int,
    api_version: str,
    *,
    previous: Json | None = None,
    request_id: str | None = None,
    idempotency_key: str | None = None,
) -> Json:
    ev = official("event")
    data: Json = {"object": copy.deepcopy(obj)}
    if previous is not None:
        data["previous_attributes"] = copy.deepcopy(previous)
    ev.update(
        id=new_id("evt"),
        created=created,
        type=event_type,
        api_version=api_version,
        data=data,
        pending_webhooks=1,
        livemode=False,
        request={"id": request_id, "idempotency_key": idempotency_key},
    )
    return ev


def deleted(obj_type: str, oid: str) -> Json:
    return {"id": oid, "object": obj_type, "deleted": True}


def list_object(url: str, data: list[Json], has_more: bool = False) -> Json:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def error_body(
    kind: str,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    decline_code: str | None = None,
) -> Json:
    err: Json = {"type": kind, "message": message}
    if code:
        err["code"] = code
        err["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if param is not None:
        err["param"] = param
    if decline_code:
        err["decline_code"] = decline_code
    return {"error": err}
