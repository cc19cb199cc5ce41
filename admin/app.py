"""The admin app factory: billing API, Stripe webhooks, plan writing; resources in cleanup_ctx.

Without STRIPE_SECRET_KEY the app runs in local mode (``LocalBilling``): the same API end to
end, no Stripe. The Stripe side is imported lazily, only when it is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from admin import billing_api, metrics
from admin.appkeys import (
    AUDIT,
    BILLING,
    CLAIMS,
    CLOCK,
    CONSUMER,
    PLANS,
    PRICE_TIERS,
    RATE_LIMIT,
    RECEIVER,
    REDIS,
    SETTINGS,
    VERIFIER,
)
from admin.audit import AuditLog
from admin.billing_backend import BillingBackend, BillingError
from admin.keys import rate_key
from admin.local_billing import LocalBilling
from admin.plans import Plans
from admin.stats import compute_stats, sample_hourly
from admin.webhook_consumer import WebhookConsumer
from admin.webhooks import WebhookReceiver, parse_secrets
from config.settings import DEFAULT_REDIS_URL, Settings
from gateway import metrics as gateway_metrics
from gateway.auth import token_verifier
from gateway.errors import AuthError, json_error, unauthorized
from gateway.redis_client import create_redis

log = logging.getLogger("metergate.admin")

REDIS_TIMEOUT_SECONDS = 2.0
HOURLY_SAMPLE_SECONDS = 300.0
LOCAL_RENEW_SECONDS = 60.0

Ctx = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    billing: BillingBackend | None = None,
    env: Mapping[str, str] | None = None,
    consume_webhooks: bool = True,
    background: bool = True,
    rate_limit: tuple[int, int] = (60, 60),
) -> web.Application:
    """Build the admin app.

    ``billing`` replaces the backend chosen from the environment (tests); ``env`` replaces
    ``os.environ``; ``consume_webhooks=False`` stores webhooks without applying them (the
    crash test); ``background=False`` runs no periodic jobs.
    """
    env = os.environ if env is None else env
    app = web.Application(middlewares=[_errors, _authenticate])
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[RATE_LIMIT] = rate_limit
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_billing_ctx(billing, env))
    app.cleanup_ctx.append(_consumer_ctx(consume_webhooks))
    if background:
        app.cleanup_ctx.append(_background_ctx)
    app.router.add_get("/pricing", billing_api.pricing)
    app.router.add_get("/health/billing", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/webhooks/stripe", _webhook)
    app.router.add_post("/billing/subscribe", billing_api.subscribe)
    app.router.add_post("/billing/upgrade", billing_api.upgrade)
    app.router.add_post("/billing/cancel", billing_api.cancel)
    app.router.add_get("/billing/status", billing_api.status)
    app.router.add_get("/billing/usage", billing_api.usage)
    app.router.add_get("/billing/payment-methods", billing_api.payment_methods)
    app.router.add_get("/billing/portal", billing_api.portal)
    app.router.add_get("/billing/invoices", billing_api.invoices)
    app.router.add_get("/billing/admin/stats", _stats)
    return app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = create_redis(settings.redis_url or DEFAULT_REDIS_URL, timeout=REDIS_TIMEOUT_SECONDS)
    app[REDIS] = client
    app[AUDIT] = AuditLog(client, clock=app[CLOCK])
    app[PLANS] = Plans(client, app[AUDIT], clock=app[CLOCK])
    async with token_verifier(
        settings.config.auth, secret=settings.jwt_secret, clock=app[CLOCK]
    ) as verifier:
        app[VERIFIER] = verifier
        yield
    await client.aclose()


def _billing_ctx(injected: BillingBackend | None, env: Mapping[str, str]) -> Ctx:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        billing = injected
        stripe_settings: Any = getattr(injected, "settings", None)
        if billing is None:
            stripe_settings = _stripe_settings(env)
            if stripe_settings is not None:
                from admin.stripe_billing import StripeBilling

                billing = StripeBilling(stripe_settings, app[REDIS])
            else:
                billing = LocalBilling(
                    app[REDIS], app[PLANS], app[SETTINGS].config, clock=app[CLOCK]
                )
        app[BILLING] = billing
        prices = getattr(stripe_settings, "price_ids", None) or {}
        app[PRICE_TIERS] = {str(price): str(tier) for tier, price in prices.items()}
        secret = getattr(stripe_settings, "webhook_secret", None) or env.get(
            "STRIPE_WEBHOOK_SECRET"
        )
        app[RECEIVER] = WebhookReceiver(app[REDIS], parse_secrets(secret), app[CLOCK])
        if billing.mode == "local":
            log.warning(
                "admin: LOCAL billing mode (no STRIPE_SECRET_KEY): subscriptions are kept in "
                "Redis, nothing is charged"
            )
        else:
            log.info("admin: Stripe billing mode")
        if not app[RECEIVER].secrets:
            log.warning("admin: STRIPE_WEBHOOK_SECRET unset: /webhooks/stripe answers 503")
        yield
        if injected is None:
            await billing.aclose()

    return ctx


def _stripe_settings(env: Mapping[str, str]) -> object | None:
    if not env.get("STRIPE_SECRET_KEY"):
        return None  # local mode, without importing the Stripe side at all
    from admin.stripe_settings import StripeSettings

    return StripeSettings.from_env(env)


def _consumer_ctx(consume: bool) -> Ctx:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        # Its own connection: a blocking XREADGROUP must not hold one the API needs.
        client = create_redis(
            settings.redis_url or DEFAULT_REDIS_URL, timeout=REDIS_TIMEOUT_SECONDS + 2
        )
        prices: dict[str, str] = app[PRICE_TIERS]
        consumer = WebhookConsumer(
            client, app[PLANS], app[AUDIT], app[BILLING], prices, clock=app[CLOCK]
        )
        app[CONSUMER] = consumer
        task = asyncio.create_task(consumer.run()) if consume else None
        yield
        await _stop(task)
        await client.aclose()

    return ctx


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    jobs: list[tuple[float, Callable[[], Awaitable[object]]]] = [
        (HOURLY_SAMPLE_SECONDS, lambda: sample_hourly(app[REDIS], app[CLOCK]()))
    ]
    billing = app[BILLING]
    if isinstance(billing, LocalBilling):
        # Stripe renews and ends subscriptions itself; locally this loop does.
        jobs.append((LOCAL_RENEW_SECONDS, billing.renew_due))
    tasks = [asyncio.create_task(_every(seconds, job)) for seconds, job in jobs]
    reporter = _usage_reporter(app)
    if reporter is not None:
        tasks.append(asyncio.create_task(reporter))
    yield
    for task in tasks:
        await _stop(task)


def _usage_reporter(app: web.Application) -> Coroutine[Any, Any, None] | None:
    """The Stripe side's usage reporter, when it exists and Stripe is configured."""
    billing = app[BILLING]
    if billing.mode != "stripe":
        return None
    try:
        from admin import usage_reporter  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    run = getattr(usage_reporter, "run_reporter", None)
    if run is None:
        return None
    result: Coroutine[Any, Any, None] = run(
        app[REDIS], billing, app[SETTINGS].config, clock=app[CLOCK]
    )
    return result


async def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except (RedisError, BillingError) as exc:
            log.warning("admin background job failed: %s", exc)


async def _stop(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    # Cancelled again until it ends: a cancellation that lands inside redis-py (say, while
    # it connects) can come out as a ConnectionError, which the loops catch and go on.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError):
        await task


@web.middleware
async def _authenticate(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not request.path.startswith("/billing/"):
        return await handler(request)
    claims = await request.app[VERIFIER].verify_header(request.headers.get("Authorization"))
    request[CLAIMS] = claims
    limit, window = request.app[RATE_LIMIT]
    now = request.app[CLOCK]()
    key = rate_key(claims.sub, int(now // window))
    async with request.app[REDIS].pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.expire(key, window * 2)
        count, _ = await pipe.execute()
    if int(count) > limit:
        retry = max(1, int(window - now % window))
        return json_error(
            429,
            "rate_limited",
            f"at most {limit} billing requests per {window} s",
            headers={"Retry-After": str(retry)},
        )
    return await handler(request)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except billing_api.RequestError as exc:
        return json_error(exc.status, exc.code, str(exc))
    except BillingError as exc:
        metrics.BILLING_ERRORS.labels(exc.code).inc()
        return json_error(exc.status, exc.code, str(exc))
    except AuthError as exc:
        return unauthorized(exc)
    except RedisError as exc:
        log.warning("admin: redis error on %s: %s", request.path, exc)
        metrics.BILLING_ERRORS.labels("store_unavailable").inc()
        return json_error(503, "store_unavailable", "the billing store is unavailable")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        return json_error(exc.status, code, exc.reason, headers=_allow(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        # Never a traceback to the client: logged here, a stable code there.
        log.exception("admin: unexpected error on %s %s", request.method, request.path)
        metrics.BILLING_ERRORS.labels("internal_error").inc()
        return json_error(500, "internal_error", "internal error")


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


async def _webhook(request: web.Request) -> web.StreamResponse:
    return await request.app[RECEIVER].handle(request)


async def _webhook_backlog(app: web.Application) -> dict[str, object]:
    backlog = await app[CONSUMER].backlog()
    metrics.WEBHOOK_PENDING.set(backlog.pending)
    metrics.WEBHOOK_LAG.set(backlog.lag)
    metrics.WEBHOOK_OLDEST_AGE.set(backlog.oldest_age_seconds)
    return {
        "pending": backlog.pending,
        "lag": backlog.lag,
        "backlog": backlog.total,
        "oldest_unapplied_age_seconds": round(backlog.oldest_age_seconds, 3),
    }


async def _health(request: web.Request) -> web.Response:
    billing = request.app[BILLING]
    try:
        async with asyncio.timeout(2.0):
            health = await billing.health()
    except (TimeoutError, BillingError) as exc:
        health = {"reachable": False, "error": str(exc) or type(exc).__name__}
    try:
        webhooks: dict[str, object] | None = await _webhook_backlog(request.app)
        redis_ok = True
    except RedisError:
        webhooks, redis_ok = None, False
    local = billing.mode == "local"
    reachable = bool(health.get("reachable"))
    body = {
        "status": "ok" if redis_ok and reachable else "degraded",
        "mode": billing.mode,
        "stripe_reachable": None if local else reachable,
        "circuit": health.get("circuit"),
        "redis": redis_ok,
        "webhooks": webhooks,
        "webhook_secret_configured": bool(request.app[RECEIVER].secrets),
        "billing": health,
    }
    return web.json_response(body, status=200 if redis_ok else 503, dumps=_dumps)


def _dumps(obj: object) -> str:
    return msgspec.json.encode(obj, enc_hook=str).decode()


async def _metrics(request: web.Request) -> web.Response:
    with contextlib.suppress(RedisError):
        await _webhook_backlog(request.app)
    body, content_type = gateway_metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _stats(request: web.Request) -> web.Response:
    if not request[CLAIMS].is_admin:
        return json_error(403, "forbidden", "operators only (a token with role admin)")
    now = request.app[CLOCK]()
    stats = await compute_stats(request.app[REDIS], request.app[SETTINGS].config, now)
    return web.json_response(stats)
