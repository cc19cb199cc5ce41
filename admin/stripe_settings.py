"""Stripe deployment settings, read from the environment (never from gateway.toml).

Without STRIPE_SECRET_KEY the admin app runs in local mode: ``from_env`` returns None.
Price ids may be missing (before ``metergate stripe-setup`` has been run); a tier without
a flat price id cannot be subscribed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TypeVar

import msgspec

from config import ConfigError

DEFAULT_API_BASE = "https://api.stripe.com"
DEFAULT_METER_EVENT_NAME = "metergate_overage_units"
PAID_TIERS = ("starter", "pro", "enterprise")

_N = TypeVar("_N", int, float)


class StripeSettings(msgspec.Struct, frozen=True, kw_only=True):
    secret_key: str
    publishable_key: str | None = None
    webhook_secret: str | None = None
    # tier -> Stripe price id of the flat monthly price / the metered overage price
    price_ids: dict[str, str] = {}
    overage_price_ids: dict[str, str] = {}
    meter_event_name: str = DEFAULT_METER_EVENT_NAME
    api_base: str = DEFAULT_API_BASE
    # StripeClient retries nothing unless told; retried writes reuse their idempotency key.
    max_network_retries: int = 2
    timeout_seconds: float = 10.0
    circuit_failure_threshold: int = 5
    circuit_cooldown_seconds: float = 30.0
    usage_report_interval_seconds: float = 60.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, tiers: Iterable[str] = PAID_TIERS
    ) -> StripeSettings | None:
        """Settings from STRIPE_* variables; None (local mode) without STRIPE_SECRET_KEY."""
        env = os.environ if env is None else env
        secret = env.get("STRIPE_SECRET_KEY") or ""
        if not secret:
            return None
        tiers = tuple(tiers)
        prices = {t: v for t in tiers if (v := env.get(f"STRIPE_{t.upper()}_PRICE_ID"))}
        overage = {t: v for t in tiers if (v := env.get(f"STRIPE_{t.upper()}_OVERAGE_PRICE_ID"))}
        api_base = (env.get("STRIPE_API_BASE") or DEFAULT_API_BASE).rstrip("/")
        if not api_base.startswith(("http://", "https://")):
            raise ConfigError("STRIPE_API_BASE: expected an http:// or https:// URL")
        return cls(
            secret_key=secret,
            publishable_key=env.get("STRIPE_PUBLISHABLE_KEY") or None,
            webhook_secret=env.get("STRIPE_WEBHOOK_SECRET") or None,
            price_ids=prices,
            overage_price_ids=overage,
            meter_event_name=env.get("STRIPE_METER_EVENT_NAME") or DEFAULT_METER_EVENT_NAME,
            api_base=api_base,
            max_network_retries=_number(env, "STRIPE_MAX_NETWORK_RETRIES", 2, int),
            timeout_seconds=_number(env, "STRIPE_TIMEOUT_SECONDS", 10.0, float),
            circuit_failure_threshold=_number(env, "STRIPE_CIRCUIT_FAILURES", 5, int),
            circuit_cooldown_seconds=_number(env, "STRIPE_CIRCUIT_COOLDOWN_SECONDS", 30.0, float),
            usage_report_interval_seconds=_number(
                env, "STRIPE_USAGE_REPORT_INTERVAL_SECONDS", 60.0, float
            ),
        )

    def tier_for_price(self, price_id: str) -> str | None:
        """Our tier name for a flat monthly price id (None for any other price)."""
        for tier, pid in self.price_ids.items():
            if pid == price_id:
                return tier
        return None

    def is_overage_price(self, price_id: str) -> bool:
        return price_id in self.overage_price_ids.values()


def _number(env: Mapping[str, str], var: str, default: _N, kind: type[_N]) -> _N:
    raw = env.get(var)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{var}: {raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{var}: must be >= 0")
    return value
