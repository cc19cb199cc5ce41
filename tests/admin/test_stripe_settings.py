"""StripeSettings from the environment."""

from __future__ import annotations

import pytest

from admin.stripe_settings import StripeSettings
from config import ConfigError


def test_no_secret_key_means_local_mode() -> None:
    assert StripeSettings.from_env({}) is None
    assert StripeSettings.from_env({"STRIPE_SECRET_KEY": ""}) is None


def test_everything_from_the_environment() -> None:
    settings = StripeSettings.from_env(
        {
            "STRIPE_SECRET_KEY": "sk_test_1",
            "STRIPE_PUBLISHABLE_KEY": "pk_test_1",
            "STRIPE_WEBHOOK_SECRET": "whsec_1",
            "STRIPE_STARTER_PRICE_ID": "price_s",
            "STRIPE_PRO_PRICE_ID": "price_p",
            "STRIPE_ENTERPRISE_PRICE_ID": "price_e",
            "STRIPE_STARTER_OVERAGE_PRICE_ID": "price_so",
            "STRIPE_PRO_OVERAGE_PRICE_ID": "price_po",
            "STRIPE_ENTERPRISE_OVERAGE_PRICE_ID": "price_eo",
            "STRIPE_API_BASE": "http://127.0.0.1:12111/",
            "STRIPE_MAX_NETWORK_RETRIES": "3",
            "STRIPE_TIMEOUT_SECONDS": "4.5",
        }
    )
    assert settings is not None
    assert settings.price_ids == {"starter": "price_s", "pro": "price_p", "enterprise": "price_e"}
    assert settings.overage_price_ids["pro"] == "price_po"
    assert settings.api_base == "http://127.0.0.1:12111"
    assert settings.meter_event_name == "metergate_overage_units"
    assert (settings.max_network_retries, settings.timeout_seconds) == (3, 4.5)
    assert settings.tier_for_price("price_p") == "pro"
    assert settings.tier_for_price("price_po") is None
    assert settings.is_overage_price("price_po")


def test_defaults_and_bad_values() -> None:
    settings = StripeSettings.from_env({"STRIPE_SECRET_KEY": "sk"})
    assert settings is not None
    assert settings.api_base == "https://api.stripe.com"
    assert settings.max_network_retries == 2
    assert settings.price_ids == {}
    with pytest.raises(ConfigError, match="STRIPE_TIMEOUT_SECONDS"):
        StripeSettings.from_env({"STRIPE_SECRET_KEY": "sk", "STRIPE_TIMEOUT_SECONDS": "soon"})
    with pytest.raises(ConfigError, match="STRIPE_API_BASE"):
        StripeSettings.from_env({"STRIPE_SECRET_KEY": "sk", "STRIPE_API_BASE": "api.stripe.com"})
