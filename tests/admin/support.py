"""Helpers for the admin app's tests: start it on loopback, build and sign Stripe events.

Events are Stripe's official examples (``fixtures/stripe_fixtures3.json``) deep-copied with
the fields a test cares about overridden, and signed exactly as Stripe signs them.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from admin.app import create_app
from admin.appkeys import CONSUMER
from admin.webhook_consumer import WebhookConsumer
from config import Config
from tests.admin.stripe_objects import FIXTURES_PATH
from tests.conftest import Clock, load_test_config, make_settings

FIXTURES = FIXTURES_PATH
WEBHOOK_SECRET = "whsec_test_0123456789abcdef"
OLD_SECRET = "whsec_test_old_secret_fedcba9876"
LOCAL_ENV: dict[str, str] = {"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}

_resources: dict[str, Any] = json.loads(FIXTURES.read_text())["resources"]


def official(kind: str) -> dict[str, Any]:
    return copy.deepcopy(_resources[kind])


def subscription_object(
    sub_id: str = "sub_1",
    *,
    customer: str = "cus_1",
    status: str = "active",
    tier: str = "pro",
    start: int = 1_790_000_000,
    end: int = 1_792_592_000,
    account: str | None = None,
    cancel_at_period_end: bool = False,
) -> dict[str, Any]:
    """Stripe's example subscription (basil: the period on the item) for one of our tiers."""
    sub = official("subscription")
    sub.update(
        id=sub_id,
        customer=customer,
        status=status,
        cancel_at_period_end=cancel_at_period_end,
        metadata={"account": account} if account else {},
    )
    item = sub["items"]["data"][0]
    item.update(current_period_start=start, current_period_end=end, subscription=sub_id)
    item["price"]["id"] = f"price_{tier}_flat"
    item["price"]["metadata"] = {"tier": tier}
    return sub


def invoice_object(
    sub_id: str = "sub_1",
    *,
    customer: str = "cus_1",
    start: int = 1_792_592_000,
    end: int = 1_795_184_000,
    billing_reason: str = "subscription_cycle",
) -> dict[str, Any]:
    invoice = official("invoice")
    invoice.update(customer=customer, subscription=None, billing_reason=billing_reason)
    invoice["parent"] = {
        "quote_details": None,
        "subscription_details": {"metadata": {}, "subscription": sub_id},
        "type": "subscription_details",
    }
    line = invoice["lines"]["data"][0]
    line["period"] = {"start": start, "end": end}
    line["parent"]["type"] = "subscription_item_details"
    line["parent"]["invoice_item_details"] = None
    line["parent"]["subscription_item_details"]["subscription"] = sub_id
    line["parent"]["subscription_item_details"]["proration"] = False
    return invoice


def event(
    event_type: str, obj: dict[str, Any], *, created: int, event_id: str = "evt_1"
) -> dict[str, Any]:
    evt = official("event")
    evt.update(id=event_id, type=event_type, created=created, api_version="2025-03-31.basil")
    evt["data"] = {"object": obj}
    return evt


def signature(body: bytes, secret: str, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return mac.hexdigest()


def stripe_headers(
    body: bytes, timestamp: int, secrets: tuple[str, ...] = (WEBHOOK_SECRET,)
) -> dict[str, str]:
    parts = [f"t={timestamp}"] + [f"v1={signature(body, s, timestamp)}" for s in secrets]
    return {"Stripe-Signature": ",".join(parts), "Content-Type": "application/json"}


def encode(evt: dict[str, Any]) -> bytes:
    return json.dumps(evt, indent=2).encode()


def consumer(server: TestServer) -> WebhookConsumer:
    return server.app[CONSUMER]


StartAdmin = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def start_admin(redis_url: str, redis_client: Any, clock: Clock) -> AsyncIterator[StartAdmin]:
    """Start a real admin app on loopback; local mode unless a billing backend is given."""
    servers: list[TestServer] = []

    async def start(
        config: Config | None = None,
        *,
        env: dict[str, str] | None = None,
        **kw: Any,
    ) -> TestServer:
        config = config or load_test_config("http://127.0.0.1:9")
        kw.setdefault("consume_webhooks", False)
        kw.setdefault("background", False)
        app: web.Application = create_app(
            make_settings(config, redis_url),
            clock=clock,
            env=LOCAL_ENV if env is None else env,
            **kw,
        )
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()
