"""The admin app's shared resources, as typed application and request keys."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as redis
from aiohttp import web

from admin.audit import AuditLog
from admin.billing_backend import BillingBackend
from admin.plans import Plans
from admin.webhook_consumer import WebhookConsumer
from admin.webhooks import WebhookReceiver
from config.settings import Settings
from gateway.auth import Claims, TokenVerifier

SETTINGS = web.AppKey("settings", Settings)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
REDIS = web.AppKey("redis", redis.Redis)
AUDIT = web.AppKey("audit", AuditLog)
PLANS = web.AppKey("plans", Plans)
BILLING = web.AppKey("billing", BillingBackend)
VERIFIER = web.AppKey("verifier", TokenVerifier)
RECEIVER = web.AppKey("receiver", WebhookReceiver)
CONSUMER = web.AppKey("consumer", WebhookConsumer)
PRICE_TIERS = web.AppKey("price_tiers", dict[str, str])
RATE_LIMIT = web.AppKey("rate_limit", tuple[int, int])  # requests per window, window seconds

CLAIMS = web.RequestKey("claims", Claims)
