"""What a Stripe event means for an account's plan (pure: no Redis, no network).

Since API version 2025-03-31.basil a subscription's period lives on its items and an
invoice names its subscription under ``parent.subscription_details``; older shapes are
read too so that a pinned older API version still works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from admin.plans import ENDED, PlanChange

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
    }
)
INVOICE_EVENTS = frozenset(
    {"invoice.paid", "invoice.payment_failed", "invoice.payment_action_required"}
)
HANDLED = SUBSCRIPTION_EVENTS | INVOICE_EVENTS | {"customer.deleted"}


class Event(msgspec.Struct, frozen=True):
    """The envelope fields every Stripe event has; ``object`` is ``data.object``."""

    id: str
    type: str
    created: int
    object: dict[str, Any]


class Meaning(msgspec.Struct, frozen=True, kw_only=True):
    """An event's effect: a plan change (account still to resolve) or only an audit note."""

    customer_id: str | None
    subscription_id: str | None
    metadata: dict[str, Any]
    change: PlanChange | None  # account is "" until resolved


class MalformedEvent(ValueError):
    pass


def parse_event(body: bytes) -> Event:
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedEvent(f"body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedEvent("event must be a JSON object")
    event_id, kind, created = raw.get("id"), raw.get("type"), raw.get("created")
    data = raw.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(event_id, str) or not event_id or len(event_id) > 255:
        raise MalformedEvent("event has no id")
    if not isinstance(kind, str) or not kind:
        raise MalformedEvent("event has no type")
    if not isinstance(created, int) or isinstance(created, bool):
        raise MalformedEvent("event has no created timestamp")
    if not isinstance(obj, dict):
        raise MalformedEvent("event has no data.object")
    return Event(event_id, kind, created, obj)


def _id(value: object) -> str | None:
    """An expandable field: either an id string or an object with an id."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _metadata(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return dict(meta) if isinstance(meta, dict) else {}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def subscription_fields(
    sub: Mapping[str, Any], price_tiers: Mapping[str, str]
) -> tuple[str | None, int | None, int | None]:
    """(tier, period_start, period_end) of a subscription object."""
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    rows = [i for i in data if isinstance(i, dict)] if isinstance(data, list) else []
    tier: str | None = None
    chosen: Mapping[str, Any] | None = None
    for item in rows:
        price = item.get("price") if isinstance(item.get("price"), dict) else {}
        assert isinstance(price, dict)
        found = price_tiers.get(str(price.get("id")))
        meta_tier = _metadata(price).get("tier")
        if found or isinstance(meta_tier, str):
            tier = found or str(meta_tier)
            chosen = item
            break
    if tier is None:
        meta_tier = _metadata(sub).get("tier")
        tier = meta_tier if isinstance(meta_tier, str) and meta_tier else None
    if chosen is None and rows:
        chosen = rows[0]
    source: Mapping[str, Any] = chosen if chosen is not None else sub
    start = _int(source.get("current_period_start")) or _int(sub.get("current_period_start"))
    end = _int(source.get("current_period_end")) or _int(sub.get("current_period_end"))
    return tier, start, end


def _invoice_subscription(invoice: Mapping[str, Any]) -> str | None:
    parent = invoice.get("parent")
    if isinstance(parent, dict):
        details = parent.get("subscription_details")
        if isinstance(details, dict) and _id(details.get("subscription")):
            return _id(details.get("subscription"))
    if _id(invoice.get("subscription")):
        return _id(invoice.get("subscription"))
    for line in _invoice_lines(invoice):
        found = _line_subscription(line)
        if found:
            return found
    return None


def _invoice_lines(invoice: Mapping[str, Any]) -> list[dict[str, Any]]:
    lines = invoice.get("lines")
    data = lines.get("data") if isinstance(lines, dict) else None
    return [x for x in data if isinstance(x, dict)] if isinstance(data, list) else []


def _line_subscription(line: Mapping[str, Any]) -> str | None:
    parent = line.get("parent")
    if isinstance(parent, dict):
        details = parent.get("subscription_item_details")
        if isinstance(details, dict) and _id(details.get("subscription")):
            return _id(details.get("subscription"))
    return _id(line.get("subscription"))


def invoice_period(invoice: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The service period the invoice paid for: its latest subscription line."""
    best: tuple[int, int] | None = None
    for line in _invoice_lines(invoice):
        period = line.get("period")
        if not _line_subscription(line) or not isinstance(period, dict):
            continue
        start, end = _int(period.get("start")), _int(period.get("end"))
        if start is None or end is None or end <= start:
            continue
        if best is None or end > best[1]:
            best = (start, end)
    return best if best else (None, None)


def interpret(event: Event, price_tiers: Mapping[str, str]) -> Meaning:
    obj = event.object
    kind = event.type
    if kind in SUBSCRIPTION_EVENTS:
        tier, start, end = subscription_fields(obj, price_tiers)
        status = obj.get("status") if isinstance(obj.get("status"), str) else None
        if kind == "customer.subscription.deleted":
            status = "canceled"
        sub_id = _id(obj.get("id"))
        change = None
        if kind != "customer.subscription.trial_will_end":
            change = PlanChange(
                account="",
                tier=tier,
                status=status,
                period_start=start,
                period_end=end,
                subscription_id=sub_id,
                customer_id=_id(obj.get("customer")),
                cancel_at_period_end=bool(obj.get("cancel_at_period_end")),
                may_replace=status is not None and status not in ENDED,
            )
        return Meaning(
            customer_id=_id(obj.get("customer")),
            subscription_id=sub_id,
            metadata=_metadata(obj),
            change=change,
        )
    if kind in INVOICE_EVENTS:
        sub_id = _invoice_subscription(obj)
        change = None
        if kind == "invoice.paid" and sub_id:
            start, end = invoice_period(obj)
            change = PlanChange(
                account="",
                status="active",
                period_start=start,
                period_end=end,
                subscription_id=sub_id,
            )
        elif (
            kind == "invoice.payment_failed"
            and sub_id
            # A first payment that fails leaves the subscription incomplete, never paid.
            and obj.get("billing_reason") != "subscription_create"
        ):
            change = PlanChange(account="", status="past_due", subscription_id=sub_id)
        return Meaning(
            customer_id=_id(obj.get("customer")),
            subscription_id=sub_id,
            metadata={},
            change=change,
        )
    if kind == "customer.deleted":
        return Meaning(
            customer_id=_id(obj.get("id")),
            subscription_id=None,
            metadata=_metadata(obj),
            # Final: no later event can bring a deleted customer back, so it applies even
            # when it shares its second with the subscription.deleted it caused.
            change=PlanChange(account="", to_free=True, fresh=True),
        )
    return Meaning(customer_id=None, subscription_id=None, metadata={}, change=None)
