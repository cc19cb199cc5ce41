"""``metergate stripe-setup``: the Stripe catalogue for gateway.toml's paid tiers, made once.

Per paid tier: a product (found again by ``metadata.metergate_tier``), a flat monthly price
(lookup key ``metergate_<tier>_monthly``) and, when the tier has an overage price, a metered
price (``metergate_<tier>_overage``) on one Billing Meter (found again by its event name).
Run again, it finds all of these and creates nothing; a price whose amount no longer matches
gateway.toml is replaced by a new one that takes over the lookup key (Stripe prices are
immutable), so existing subscriptions keep what they signed up for.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import stripe

from admin.stripe_billing import make_client
from admin.stripe_settings import StripeSettings
from config import Config

TIER_METADATA = "metergate_tier"


class SetupResult(msgspec.Struct, kw_only=True):
    env: dict[str, str]
    created: list[str]
    found: list[str]


def cents(usd: Decimal) -> str:
    """USD as Stripe's decimal cents string: 0.02 -> "2", 0.005 -> "0.5"."""
    value = (usd * 100).normalize()
    return format(value, "f")


Note = Callable[[bool, str], None]


async def run_setup(
    client: stripe.StripeClient,
    config: Config,
    *,
    event_name: str,
    log: Callable[[str], None] = print,
) -> SetupResult:
    """Find or create products, prices and the meter; return the STRIPE_* variables to set."""
    result = SetupResult(env={"STRIPE_METER_EVENT_NAME": event_name}, created=[], found=[])

    def note(created: bool, what: str) -> None:
        (result.created if created else result.found).append(what)
        log(f"{'created' if created else 'found  '} {what}")

    paid = {name: t for name, t in config.tiers.items() if t.monthly_price_usd > 0}
    meter_id = None
    if any(t.allows_overage for t in paid.values()):
        meter_id = await _meter(client, event_name, note)
    products = await _products(client)
    for name, tier in paid.items():
        product_id = products.get(name)
        if product_id is None:
            product = await client.v1.products.create_async(
                {"name": f"Metergate {name.title()}", "metadata": {TIER_METADATA: name}},
                {"idempotency_key": f"stripe-setup:product:{name}"},
            )
            product_id = str(product.id)
        note(name not in products, f"product {product_id} ({name})")
        flat: dict[str, Any] = {"interval": "month", "usage_type": "licensed"}
        price_id = await _price(
            client, f"metergate_{name}_monthly", product_id, tier.monthly_price_usd, flat, note
        )
        result.env[f"STRIPE_{name.upper()}_PRICE_ID"] = price_id
        if tier.allows_overage and tier.overage_unit_price_usd is not None and meter_id:
            metered = {"interval": "month", "usage_type": "metered", "meter": meter_id}
            price_id = await _price(
                client,
                f"metergate_{name}_overage",
                product_id,
                tier.overage_unit_price_usd,
                metered,
                note,
            )
            result.env[f"STRIPE_{name.upper()}_OVERAGE_PRICE_ID"] = price_id
    return result


async def _products(client: stripe.StripeClient) -> dict[str, str]:
    """Our products by tier. Listed, not searched: search lags behind writes."""
    found: dict[str, str] = {}
    page = await client.v1.products.list_async({"active": True, "limit": 100})
    async for product in page.auto_paging_iter():
        tier = product.to_dict().get("metadata", {}).get(TIER_METADATA)
        if tier and tier not in found:
            found[tier] = str(product.id)
    return found


async def _price(
    client: stripe.StripeClient,
    lookup_key: str,
    product_id: str,
    usd: Decimal,
    recurring: dict[str, Any],
    note: Note,
) -> str:
    amount = cents(usd)
    page = await client.v1.prices.list_async({"lookup_keys": [lookup_key], "active": True})
    for existing in page.data:
        data = existing.to_dict()
        same = (
            data.get("product") == product_id
            and Decimal(str(data.get("unit_amount_decimal"))) == Decimal(amount)
            and all((data.get("recurring") or {}).get(k) == v for k, v in recurring.items())
        )
        if same:
            note(False, f"price {data['id']} ({lookup_key})")
            return str(data["id"])
    replacing = bool(page.data)
    price = await client.v1.prices.create_async(
        {
            "product": product_id,
            "currency": "usd",
            "unit_amount_decimal": Decimal(amount),
            "billing_scheme": "per_unit",
            "recurring": recurring,  # type: ignore[typeddict-item]
            "lookup_key": lookup_key,
            "transfer_lookup_key": replacing,
            "metadata": {"metergate_lookup_key": lookup_key},
        },
        {"idempotency_key": f"stripe-setup:price:{lookup_key}:{amount}"},
    )
    note(True, f"price {price.id} ({lookup_key}){' replacing the old amount' if replacing else ''}")
    return str(price.id)


async def _meter(client: stripe.StripeClient, event_name: str, note: Note) -> str:
    page = await client.v1.billing.meters.list_async({"status": "active", "limit": 100})
    async for meter in page.auto_paging_iter():
        if meter.event_name == event_name:
            note(False, f"meter {meter.id} ({event_name})")
            return str(meter.id)
    meter = await client.v1.billing.meters.create_async(
        {
            "display_name": "Metergate overage units",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        },
        {"idempotency_key": f"stripe-setup:meter:{event_name}"},
    )
    note(True, f"meter {meter.id} ({event_name})")
    return str(meter.id)


def env_lines(result: SetupResult) -> list[str]:
    return [f"{name}={value}" for name, value in sorted(result.env.items())]


def main(config: Config, env: Mapping[str, str]) -> int:
    """The command: needs STRIPE_SECRET_KEY (and STRIPE_API_BASE for a non-Stripe server)."""
    settings = StripeSettings.from_env(env)
    if settings is None:
        print("metergate: stripe-setup needs STRIPE_SECRET_KEY", file=sys.stderr)
        return 2
    event_name = settings.meter_event_name

    async def setup() -> SetupResult:
        async with aiohttp.ClientSession() as session:
            client = make_client(settings, session)
            return await run_setup(client, config, event_name=event_name, log=_stderr)

    try:
        result = asyncio.run(setup())
    except stripe.StripeError as exc:
        print(f"metergate: Stripe refused: {exc.user_message or exc}", file=sys.stderr)
        return 1
    created = len(result.created)
    _stderr(f"{created} created, {len(result.found)} already there. Set these variables:")
    for line in env_lines(result):
        print(line)
    return 0


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)
