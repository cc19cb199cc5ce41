"""`metergate stripe-setup` against the Stripe double: creates once, then only finds."""

from __future__ import annotations

import asyncio
import os
import sys
from decimal import Decimal

import aiohttp
import msgspec

from admin.stripe_billing import make_client
from admin.stripe_settings import StripeSettings
from admin.stripe_setup import run_setup
from config import Config
from tests.admin.stripe_double import StripeDouble
from tests.conftest import ROOT

EVENT = "metergate_overage_units"


async def setup(double: StripeDouble, config: Config) -> tuple[dict[str, str], list[str]]:
    async with aiohttp.ClientSession() as session:
        client = make_client(double.settings, session)
        result = await run_setup(client, config, event_name=EVENT, log=lambda _: None)
    return result.env, result.created


async def test_setup_twice_creates_nothing_the_second_time(
    bare_stripe_double: StripeDouble, gateway_config: Config
) -> None:
    double = bare_stripe_double
    env, created = await setup(double, gateway_config)
    assert len(created) == 1 + 3 + 3 + 3  # meter, products, flat prices, overage prices
    assert len(double.products) == 3 and len(double.prices) == 6 and len(double.meters) == 1

    (meter,) = double.meters.values()
    assert meter["event_name"] == EVENT
    assert meter["default_aggregation"] == {"formula": "sum"}
    assert meter["customer_mapping"] == {"event_payload_key": "stripe_customer_id", "type": "by_id"}
    pro = double.prices[env["STRIPE_PRO_PRICE_ID"]]
    assert (pro["unit_amount"], pro["lookup_key"]) == (9900, "metergate_pro_monthly")
    assert pro["recurring"]["usage_type"] == "licensed"
    overage = double.prices[env["STRIPE_PRO_OVERAGE_PRICE_ID"]]
    assert overage["unit_amount_decimal"] == "2"  # $0.02 per unit, in cents
    assert overage["recurring"]["usage_type"] == "metered"
    assert overage["recurring"]["meter"] == meter["id"]
    assert overage["product"] == pro["product"]
    assert double.products[pro["product"]]["metadata"] == {"metergate_tier": "pro"}
    assert "STRIPE_FREE_PRICE_ID" not in env

    writes = sum(1 for method, _, _ in double.requests if method == "POST")
    env2, created2 = await setup(double, gateway_config)
    assert created2 == []
    assert env2 == env
    assert sum(1 for method, _, _ in double.requests if method == "POST") == writes

    # The settings built from the printed variables subscribe through these prices.
    settings = StripeSettings.from_env({"STRIPE_SECRET_KEY": "sk", **env})
    assert settings is not None
    assert settings.price_ids["enterprise"] == env["STRIPE_ENTERPRISE_PRICE_ID"]
    assert settings.overage_price_ids["starter"] == env["STRIPE_STARTER_OVERAGE_PRICE_ID"]


async def test_a_changed_price_gets_a_new_stripe_price_that_takes_the_lookup_key(
    bare_stripe_double: StripeDouble, gateway_config: Config
) -> None:
    env, _ = await setup(bare_stripe_double, gateway_config)
    tiers = dict(gateway_config.tiers)
    tiers["pro"] = msgspec.structs.replace(tiers["pro"], monthly_price_usd=Decimal("119"))
    changed = msgspec.structs.replace(gateway_config, tiers=tiers)

    env2, created = await setup(bare_stripe_double, changed)
    assert len(created) == 1
    assert env2["STRIPE_PRO_PRICE_ID"] != env["STRIPE_PRO_PRICE_ID"]
    new = bare_stripe_double.prices[env2["STRIPE_PRO_PRICE_ID"]]
    old = bare_stripe_double.prices[env["STRIPE_PRO_PRICE_ID"]]
    assert (new["unit_amount"], new["lookup_key"], old["lookup_key"]) == (
        11900,
        "metergate_pro_monthly",
        None,
    )


async def test_the_command_prints_the_variables(bare_stripe_double: StripeDouble) -> None:
    env = {
        **os.environ,
        "STRIPE_SECRET_KEY": bare_stripe_double.secret_key,
        "STRIPE_API_BASE": bare_stripe_double.base_url,
        "METERGATE_CONFIG": str(ROOT / "gateway.toml"),
    }
    env.pop("STRIPE_METER_EVENT_NAME", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "stripe-setup",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "STRIPE_ENTERPRISE_OVERAGE_PRICE_ID",
        "STRIPE_ENTERPRISE_PRICE_ID",
        "STRIPE_METER_EVENT_NAME",
        "STRIPE_PRO_OVERAGE_PRICE_ID",
        "STRIPE_PRO_PRICE_ID",
        "STRIPE_STARTER_OVERAGE_PRICE_ID",
        "STRIPE_STARTER_PRICE_ID",
    ]
    assert "STRIPE_METER_EVENT_NAME=metergate_overage_units" in lines
    assert "10 created, 0 already there" in err.decode()


async def test_the_command_needs_a_secret_key() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    env["METERGATE_CONFIG"] = str(ROOT / "gateway.toml")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "stripe-setup",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "STRIPE_SECRET_KEY" in err.decode()
