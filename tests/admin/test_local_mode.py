"""Local mode: no STRIPE_SECRET_KEY, the same API end to end, stated wherever it matters."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestServer

from admin import keys
from admin.appkeys import BILLING
from admin.local_billing import LocalBilling, add_month
from tests.admin import support
from tests.admin.support import StartAdmin
from tests.conftest import Clock, auth

start_admin = support.start_admin

PRO = {"tier": "pro", "payment_method_id": "pm_card_visa"}


async def get(server: TestServer, path: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(server.make_url(path), **kw) as resp:
        return resp.status, await resp.json()


async def post(server: TestServer, path: str, payload: Any, sub: str = "acct-1") -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url(path), json=payload, headers=auth(sub)) as resp,
    ):
        return await resp.json()


async def test_local_mode_is_stated_at_start_in_pricing_and_health(
    start_admin: StartAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="metergate.admin"):
        server = await start_admin(env={})
    assert "LOCAL billing mode" in caplog.text
    assert isinstance(server.app[BILLING], LocalBilling)
    status, pricing = await get(server, "/pricing")
    assert status == 200 and pricing["mode"] == "local"
    status, health = await get(server, "/health/billing")
    assert status == 200
    assert health["mode"] == "local" and health["stripe_reachable"] is None
    assert health["status"] == "ok" and health["redis"] is True
    assert health["webhook_secret_configured"] is False


async def test_pricing_comes_from_gateway_toml(start_admin: StartAdmin) -> None:
    server = await start_admin()
    _, body = await get(server, "/pricing")
    assert body["tiers"] == [
        {
            "name": "free",
            "monthly_price_usd": 0.0,
            "included_units": 100,
            "overage_unit_price_usd": None,
            "max_overage_units": None,
        },
        {
            "name": "starter",
            "monthly_price_usd": 29.0,
            "included_units": 1000,
            "overage_unit_price_usd": 0.03,
            "max_overage_units": None,
        },
        {
            "name": "pro",
            "monthly_price_usd": 99.0,
            "included_units": 10000,
            "overage_unit_price_usd": 0.02,
            "max_overage_units": None,
        },
        {
            "name": "enterprise",
            "monthly_price_usd": 499.0,
            "included_units": 100000,
            "overage_unit_price_usd": 0.01,
            "max_overage_units": None,
        },
    ]
    assert body["routes"] == [
        {"path": "/signals", "methods": ["GET"], "cost": 1},
        {"path": "/signals/history/{symbol}", "methods": ["GET"], "cost": 2},
        {"path": "/export/csv", "methods": ["GET"], "cost": 3},
        {"path": "/export/pdf", "methods": ["GET"], "cost": 5},
    ]


def test_monthly_periods() -> None:
    assert add_month(1_790_000_000) == 1_792_592_000  # 2026-09-21 -> 2026-10-21
    jan31 = 1_801_353_600  # 2027-01-31T00:00:00Z
    assert add_month(jan31) == 1_803_772_800  # 2027-02-28
    dec = 1_796_083_200  # 2026-12-01
    assert add_month(dec) == 1_798_761_600  # 2027-01-01


async def test_local_subscriptions_renew_and_end_like_stripes(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    billing = server.app[BILLING]
    assert isinstance(billing, LocalBilling)
    await post(server, "/billing/subscribe", PRO)
    await post(server, "/billing/subscribe", PRO, sub="acct-2")
    assert await billing.renew_due() == 0
    clock.advance(31 * 86400)  # past 2026-10-21
    assert await billing.renew_due() == 2
    plan = await redis_client.hgetall(keys.plan_key("acct-1"))
    assert plan[b"period_start"] == b"1792592000" and plan[b"period_end"] == b"1795270400"
    assert plan[b"status"] == b"active"
    await post(server, "/billing/cancel", {"at_period_end": True})
    clock.advance(31 * 86400)
    assert await billing.renew_due() == 2
    assert await redis_client.hget(keys.plan_key("acct-1"), "status") == b"canceled"
    assert await redis_client.hget(keys.plan_key("acct-2"), "status") == b"active"
    assert await redis_client.smembers(keys.PAID_ACCOUNTS) == {b"acct-2"}
    _, invoices = await get(server, "/billing/invoices", headers=auth("acct-2"))
    assert len(invoices["invoices"]) == 3


async def test_local_health_and_webhooks_with_a_secret(start_admin: StartAdmin) -> None:
    server = await start_admin()
    _, health = await get(server, "/health/billing")
    assert health["webhook_secret_configured"] is True
    assert health["circuit"] == {"state": "closed"}


async def test_admin_stats_need_the_admin_role(start_admin: StartAdmin) -> None:
    server = await start_admin()
    status, body = await get(server, "/billing/admin/stats", headers=auth("acct-1"))
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await get(server, "/billing/admin/stats", headers=auth("ops", role="admin"))
    assert status == 200 and body["mrr_usd"] == 0.0
