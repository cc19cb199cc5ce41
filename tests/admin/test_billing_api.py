"""The billing API end to end in local mode: real admin app, real Redis, real gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import redis.asyncio as redis
from aiohttp.test_utils import TestServer

from admin import keys
from admin.app import create_app
from admin.appkeys import BILLING
from admin.audit import AuditLog
from admin.plans import PlanChange, Plans
from config.load import validate
from tests.admin import support
from tests.admin.support import StartAdmin
from tests.conftest import Clock, auth, echo, load_test_config, make_settings, replace_section
from tests.gateway.test_jwks import JwksServer, token

start_admin = support.start_admin

PRO = {"tier": "pro", "payment_method_id": "pm_card_visa"}


async def call(
    server: TestServer, method: str, path: str, *, sub: str = "acct-1", **kw: Any
) -> tuple[int, Any]:
    headers = {**auth(sub, **kw.pop("claims", {})), **kw.pop("headers", {})}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, str(server.make_url(path)), headers=headers, **kw) as resp,
    ):
        return resp.status, await resp.json()


async def test_status_of_a_free_account_is_the_calendar_month(start_admin: StartAdmin) -> None:
    server = await start_admin()
    status, body = await call(server, "GET", "/billing/status")
    assert status == 200
    assert body == {
        "has_subscription": False,
        "tier": "free",
        "status": "active",
        "usage": {
            "current": 0,
            "included": 100,
            "remaining": 100,
            "usage_percentage": 0.0,
            "overage": 0,
        },
        "expires_at": "2026-10-01T00:00:00Z",
        "overage_cost_usd": 0.0,
    }


async def test_subscribe_then_status_in_the_issue_shape(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    status, body = await call(server, "POST", "/billing/subscribe", json=PRO)
    assert status == 201, body
    assert body["subscription"]["tier"] == "pro"
    assert body["subscription"]["status"] == "active"
    assert body["requires_action"] is False and body["client_secret"] is None
    start = int(clock.now)
    await redis_client.hset(
        keys.usage_key("acct-1"),
        mapping={"period_start": start, "used": 2500, "overage": 0},
    )
    status, body = await call(server, "GET", "/billing/status")
    assert status == 200
    assert body == {
        "has_subscription": True,
        "tier": "pro",
        "status": "active",
        "usage": {
            "current": 2500,
            "included": 10000,
            "remaining": 7500,
            "usage_percentage": 25.0,
            "overage": 0,
        },
        "expires_at": "2026-10-21T14:13:20Z",
        "overage_cost_usd": 0.0,
    }
    plan = await redis_client.hgetall(keys.plan_key("acct-1"))
    assert plan[b"tier"] == b"pro" and plan[b"status"] == b"active"
    assert plan[b"period_start"] == str(start).encode()
    assert await redis_client.sismember(keys.PAID_ACCOUNTS, "acct-1")


async def test_overage_cost_in_status(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    await call(server, "POST", "/billing/subscribe", json=PRO)
    await redis_client.hset(
        keys.usage_key("acct-1"),
        mapping={"period_start": int(clock.now), "used": 10150, "overage": 150},
    )
    _, body = await call(server, "GET", "/billing/status")
    assert body["usage"]["overage"] == 150
    assert body["usage"]["remaining"] == 0
    assert body["usage"]["usage_percentage"] == 101.5
    assert body["overage_cost_usd"] == 3.0


async def test_subscribe_lets_the_gateway_use_the_pro_quota(
    start_admin: StartAdmin,
    start_gateway: Any,
    start_upstream: Any,
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    admin = await start_admin()
    config = load_test_config(
        str(upstream.make_url("")).rstrip("/"), str(admin.make_url("")).rstrip("/")
    )
    gateway = await start_gateway(config)
    headers = auth("acct-gw")
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # 20 x 5 units: the free tier's 100
            async with session.get(gateway.make_url("/export/pdf"), headers=headers) as resp:
                assert resp.status == 200
        async with session.get(gateway.make_url("/export/pdf"), headers=headers) as resp:
            assert resp.status == 429
        # Through the gateway, at cost 0, with the token passed on to the admin app.
        async with session.post(
            gateway.make_url("/billing/subscribe"), json=PRO, headers=headers
        ) as resp:
            assert resp.status == 201, await resp.text()
        async with session.get(gateway.make_url("/export/pdf"), headers=headers) as resp:
            assert resp.status == 200
            assert "q=10000" in resp.headers["RateLimit-Policy"]
            seen = dict((await resp.json())["headers"])
            assert seen["X-Metergate-Tier"] == "pro"
        async with session.get(gateway.make_url("/billing/status"), headers=headers) as resp:
            body = await resp.json()
            assert body["tier"] == "pro"
            assert body["usage"]["current"] == 5  # a fresh count in the paid period


async def test_declined_card_is_402_and_changes_nothing(
    start_admin: StartAdmin, redis_client: redis.Redis
) -> None:
    server = await start_admin()
    body = {"tier": "pro", "payment_method_id": "pm_card_chargeDeclined"}
    status, reply = await call(server, "POST", "/billing/subscribe", json=body)
    assert status == 402
    assert reply["error"]["code"] == "card_declined"
    assert not await redis_client.exists(keys.plan_key("acct-1"))


async def test_retried_subscribe_gives_the_same_subscription(start_admin: StartAdmin) -> None:
    server = await start_admin()
    _, first = await call(server, "POST", "/billing/subscribe", json=PRO)
    status, again = await call(server, "POST", "/billing/subscribe", json=PRO)
    assert status == 200
    assert again["subscription"]["id"] == first["subscription"]["id"]


async def test_concurrent_subscribes_make_one_customer_and_one_subscription(
    start_admin: StartAdmin, redis_client: redis.Redis
) -> None:
    server = await start_admin()
    results = await asyncio.gather(
        *(
            call(
                server, "POST", "/billing/subscribe", json=PRO, headers={"Idempotency-Key": f"k{i}"}
            )
            for i in range(8)
        )
    )
    ids = {body["subscription"]["id"] for status, body in results if status in (200, 201)}
    assert len(ids) == 1
    subs = [k async for k in redis_client.scan_iter(match=keys.local_subscription_key("*"))]
    assert len(subs) == 1
    assert await redis_client.hlen(keys.CUSTOMERS) == 1


async def test_subscribe_validation(start_admin: StartAdmin) -> None:
    server = await start_admin()
    cases: list[tuple[Any, int, str]] = [
        ({"tier": "platinum", "payment_method_id": "pm_card_visa"}, 400, "unknown_tier"),
        ({"tier": "free", "payment_method_id": "pm_card_visa"}, 400, "unknown_tier"),
        ({"tier": "pro"}, 400, "invalid_request"),
        ({"tier": 3, "payment_method_id": "pm"}, 400, "invalid_request"),
        ({"tier": "pro", "payment_method_id": " "}, 400, "invalid_request"),
    ]
    for payload, want_status, code in cases:
        status, body = await call(server, "POST", "/billing/subscribe", json=payload)
        assert (status, body["error"]["code"]) == (want_status, code), payload
    status, body = await call(server, "POST", "/billing/subscribe", data=b"{not json")
    assert (status, body["error"]["code"]) == (400, "invalid_json")


async def test_upgrade_and_downgrade(start_admin: StartAdmin, redis_client: redis.Redis) -> None:
    server = await start_admin()
    status, body = await call(server, "POST", "/billing/upgrade", json={"tier": "enterprise"})
    assert (status, body["error"]["code"]) == (409, "no_subscription")
    _, first = await call(server, "POST", "/billing/subscribe", json=PRO)
    status, body = await call(server, "POST", "/billing/upgrade", json={"tier": "enterprise"})
    assert status == 200 and body["subscription"]["tier"] == "enterprise"
    assert body["subscription"]["id"] == first["subscription"]["id"]
    _, st = await call(server, "GET", "/billing/status")
    assert st["tier"] == "enterprise" and st["usage"]["included"] == 100_000
    status, body = await call(server, "POST", "/billing/upgrade", json={"tier": "starter"})
    assert status == 200 and body["subscription"]["tier"] == "starter"
    assert (await redis_client.hget(keys.plan_key("acct-1"), "tier")) == b"starter"
    # Back up again: a new change, not a replay of the first upgrade.
    status, body = await call(server, "POST", "/billing/upgrade", json={"tier": "enterprise"})
    assert body["subscription"]["tier"] == "enterprise"
    status, body = await call(server, "POST", "/billing/subscribe", json=PRO)
    assert (status, body["error"]["code"]) == (409, "already_subscribed")


async def test_cancel_at_once(start_admin: StartAdmin, redis_client: redis.Redis) -> None:
    server = await start_admin()
    await call(server, "POST", "/billing/subscribe", json=PRO)
    status, body = await call(server, "POST", "/billing/cancel", json={"at_period_end": False})
    assert status == 200 and body["subscription"]["status"] == "canceled"
    _, st = await call(server, "GET", "/billing/status")
    assert st["has_subscription"] is False and st["tier"] == "free"
    assert st["usage"]["included"] == 100
    assert not await redis_client.sismember(keys.PAID_ACCOUNTS, "acct-1")
    assert await redis_client.zcard(keys.CHURN) == 1
    status, body = await call(server, "POST", "/billing/cancel", json={"at_period_end": False})
    assert (status, body["error"]["code"]) == (409, "no_subscription")


async def test_cancel_at_period_end_keeps_the_plan_until_then(
    start_admin: StartAdmin, redis_client: redis.Redis
) -> None:
    server = await start_admin()
    await call(server, "POST", "/billing/subscribe", json=PRO)
    status, body = await call(server, "POST", "/billing/cancel", json={"at_period_end": True})
    assert status == 200
    assert body["subscription"]["status"] == "active"
    assert body["subscription"]["cancel_at_period_end"] is True
    _, st = await call(server, "GET", "/billing/status")
    assert st["has_subscription"] is True and st["tier"] == "pro"
    assert await redis_client.hget(keys.plan_key("acct-1"), "cancel_at_period_end") == b"1"


async def test_payment_methods_portal_and_invoices(start_admin: StartAdmin) -> None:
    server = await start_admin()
    assert (await call(server, "GET", "/billing/payment-methods"))[1] == {"payment_methods": []}
    assert (await call(server, "GET", "/billing/invoices"))[1] == {"invoices": []}
    status, body = await call(server, "GET", "/billing/portal")
    assert (status, body["error"]["code"]) == (409, "no_customer")
    await call(server, "POST", "/billing/subscribe", json=PRO)
    _, body = await call(server, "GET", "/billing/payment-methods")
    assert [m["id"] for m in body["payment_methods"]] == ["pm_card_visa"]
    assert body["payment_methods"][0]["is_default"] is True
    _, body = await call(server, "GET", "/billing/invoices")
    assert len(body["invoices"]) == 1 and body["invoices"][0]["amount_due"] == 9900
    status, body = await call(
        server, "GET", "/billing/portal", params={"return_url": "https://example.com/account"}
    )
    assert status == 200 and body["url"].startswith("https://example.com/account")


async def test_usage_by_day_and_route(start_admin: StartAdmin, redis_client: redis.Redis) -> None:
    server = await start_admin()
    await redis_client.hset(
        keys.daily_prefix("acct-1") + "2026-09-21", mapping={"/signals": 7, "/export/pdf": 10}
    )
    await redis_client.hset(keys.daily_prefix("acct-1") + "2026-09-20", mapping={"/signals": 3})
    await redis_client.hset(keys.daily_prefix("acct-1") + "2026-09-10", mapping={"/signals": 99})
    await redis_client.hset(keys.daily_prefix("other") + "2026-09-21", mapping={"/signals": 50})
    status, body = await call(server, "GET", "/billing/usage", params={"days": "2"})
    assert status == 200
    assert body == {
        "days": 2,
        "total_units": 20,
        "by_route": {"/signals": 10, "/export/pdf": 10},
        "daily": [
            {"date": "2026-09-20", "units": 3, "routes": {"/signals": 3}},
            {"date": "2026-09-21", "units": 17, "routes": {"/signals": 7, "/export/pdf": 10}},
        ],
    }
    for bad in ("0", "91", "abc", "-1", "2.5"):
        status, body = await call(server, "GET", "/billing/usage", params={"days": bad})
        assert (status, body["error"]["code"]) == (400, "invalid_days"), bad
    _, body = await call(server, "GET", "/billing/usage", params={"days": "90"})
    assert len(body["daily"]) == 90 and body["total_units"] == 119


async def test_billing_needs_a_valid_token(start_admin: StartAdmin) -> None:
    server = await start_admin()
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/billing/status")) as resp:
            assert resp.status == 401
            # The same answers as the gateway's (RFC 6750: no error code without credentials).
            assert (await resp.json())["error"]["code"] == "missing_token"
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="metergate"'
        bad = {"Authorization": "Bearer not.a.token"}
        async with session.get(server.make_url("/billing/status"), headers=bad) as resp:
            assert (await resp.json())["error"]["code"] == "invalid_token"
        bad = {"Authorization": "Bearer not.a.token"}
        async with session.get(server.make_url("/billing/status"), headers=bad) as resp:
            assert resp.status == 401
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
        wrong = auth(secret="wrong-secret-0123456789-0123456789-abcdef")
        async with session.get(server.make_url("/billing/status"), headers=wrong) as resp:
            assert resp.status == 401


async def test_billing_endpoints_are_rate_limited_per_account(start_admin: StartAdmin) -> None:
    server = await start_admin(rate_limit=(3, 60))
    for _ in range(3):
        assert (await call(server, "GET", "/billing/status"))[0] == 200
    status, body = await call(server, "GET", "/billing/status")
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert (await call(server, "GET", "/billing/status", sub="acct-2"))[0] == 200
    # Public endpoints are not counted against an account.
    assert (await call(server, "GET", "/pricing"))[0] == 200


async def test_unknown_paths_and_methods_answer_json(start_admin: StartAdmin) -> None:
    server = await start_admin()
    status, body = await call(server, "GET", "/billing/nothing-here")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await call(server, "DELETE", "/pricing")
    assert (status, body["error"]["code"]) == (405, "method_not_allowed")


async def test_billing_changes_are_audited(
    start_admin: StartAdmin, redis_client: redis.Redis
) -> None:
    server = await start_admin()
    await call(server, "POST", "/billing/subscribe", json=PRO, headers={"X-Request-Id": "r-1"})
    await call(server, "POST", "/billing/upgrade", json={"tier": "enterprise"})
    entries = await AuditLog(redis_client).recent()
    whats = [(e.who, e.what) for e in reversed(entries)]
    assert ("account:acct-1", "billing.subscribed") in whats
    assert ("account:acct-1", "billing.tier_changed") in whats
    assert ("local", "plan.updated") in whats
    subscribed = next(e for e in entries if e.what == "billing.subscribed")
    assert subscribed.source == "r-1" and subscribed.account == "acct-1"
    assert subscribed.when == 1_790_000_000


async def test_redis_down_is_503_not_500() -> None:
    settings = make_settings(load_test_config("http://127.0.0.1:9"), "redis://127.0.0.1:1/0")
    app = create_app(settings, background=False, consume_webhooks=False, env={})
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        status, body = await call(server, "GET", "/billing/status")
        assert (status, body["error"]["code"]) == (503, "store_unavailable")
        status, body = await call(server, "GET", "/health/billing")
        assert status == 503 and body["redis"] is False
    finally:
        await server.close()


async def test_billing_verifies_jwks_tokens_like_the_gateway(
    start_admin: StartAdmin, start_upstream
) -> None:
    jwks = JwksServer(["k1"])
    jwks_server = await start_upstream({"/jwks": jwks.handle})
    config = replace_section(
        load_test_config("http://127.0.0.1:9"),
        auth={"algorithms": ("RS256",), "jwks_url": str(jwks_server.make_url("/jwks"))},
    )
    validate(config)
    server = await start_admin(config)
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {token('k1', sub='acct-jwks')}"}
        async with session.get(server.make_url("/billing/status"), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["tier"] == "free"
        forged = {"Authorization": f"Bearer {token('k1', signer='k2')}"}
        async with session.get(server.make_url("/billing/status"), headers=forged) as resp:
            assert resp.status == 401
    assert jwks.fetches == 1


async def test_subscribe_after_a_cancel_makes_a_new_subscription(
    start_admin: StartAdmin, redis_client: redis.Redis
) -> None:
    server = await start_admin()
    _, first = await call(server, "POST", "/billing/subscribe", json=PRO)
    await call(server, "POST", "/billing/upgrade", json={"tier": "starter"})
    await call(server, "POST", "/billing/cancel", json={"at_period_end": False})
    status, again = await call(server, "POST", "/billing/subscribe", json=PRO)
    assert status == 201, again
    assert again["subscription"]["id"] != first["subscription"]["id"]
    assert (again["subscription"]["tier"], again["subscription"]["status"]) == ("pro", "active")
    _, st = await call(server, "GET", "/billing/status")
    assert (st["has_subscription"], st["tier"], st["status"]) == (True, "pro", "active")
    billing = server.app[BILLING]
    old = await billing.get_subscription(first["subscription"]["id"])
    assert old is not None and old.status == "canceled"
    subs = [k async for k in redis_client.scan_iter(match=keys.local_subscription_key("*"))]
    assert len(subs) == 2


async def test_status_of_an_unpaid_subscription_is_the_free_tier(
    start_admin: StartAdmin, redis_client: redis.Redis, clock: Clock
) -> None:
    server = await start_admin()
    plans = Plans(redis_client, AuditLog(redis_client, clock=clock), clock=clock)
    start = int(clock.now)
    for status in ("incomplete", "unpaid", "paused"):
        await plans.apply(
            PlanChange(
                account="acct-1",
                tier="pro",
                status=status,
                period_start=start,
                period_end=start + 30 * 86400,
                subscription_id="sub_1",
                may_replace=True,
                fresh=True,
            ),
            created=start,
            event_id=f"evt_{status}",
            who="test",
            source="test",
        )
        _, st = await call(server, "GET", "/billing/status")
        assert (st["has_subscription"], st["tier"], st["status"]) == (False, "free", status)
        assert st["usage"]["included"] == 100
        assert not await redis_client.sismember(keys.PAID_ACCOUNTS, "acct-1")
