"""Admin fixtures: the Stripe test double (see tests/admin/stripe_double.py) and its settings.

- ``stripe_double``: started on a loopback port with gateway.toml's catalogue in it;
  ``stripe_double.settings`` is a StripeSettings pointing at it (price ids, meter event
  name, webhook secret), with short timeouts and a quick circuit breaker for tests.
- ``bare_stripe_double``: the same, empty (``settings`` has no price ids).
- ``stripe_billing``: a StripeBilling on ``stripe_double`` and the test Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from admin.stripe_billing import StripeBilling
from admin.stripe_setup import cents
from config import Config, load_config
from tests.admin.stripe_double import StripeDouble
from tests.conftest import ROOT

EVENT_NAME = "metergate_overage_units"


@pytest.fixture(scope="session")
def gateway_config() -> Config:
    return load_config(ROOT / "gateway.toml")


@pytest.fixture
async def bare_stripe_double() -> AsyncIterator[StripeDouble]:
    double = StripeDouble()
    await double.start()
    yield double
    await double.close()


@pytest.fixture
async def stripe_double(bare_stripe_double: StripeDouble, gateway_config: Config) -> StripeDouble:
    double = bare_stripe_double
    tiers = [
        (
            name,
            int(tier.monthly_price_usd * 100),
            cents(tier.overage_unit_price_usd) if tier.overage_unit_price_usd else None,
        )
        for name, tier in gateway_config.tiers.items()
        if tier.monthly_price_usd > 0
    ]
    flat, overage = double.seed_catalog(tiers, EVENT_NAME)
    double.settings = double.make_settings(
        meter_event_name=EVENT_NAME, price_ids=flat, overage_price_ids=overage
    )
    return double


@pytest.fixture
async def stripe_billing(
    stripe_double: StripeDouble, redis_client: redis.Redis
) -> AsyncIterator[StripeBilling]:
    billing = StripeBilling(stripe_double.settings, redis_client)
    yield billing
    await billing.aclose()
