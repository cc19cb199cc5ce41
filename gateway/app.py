"""The gateway application factory: shared resources as typed AppKeys in cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from config.load import RESERVED_PATHS
from config.model import Upstream
from config.settings import DEFAULT_REDIS_URL, Settings
from gateway import metrics
from gateway.auth import token_verifier
from gateway.failopen import FailOpenLedger
from gateway.front import Admit, Handler, Request
from gateway.proxy import Proxy
from gateway.redis_client import RedisClient, create_client
from gateway.redis_pipe import LATE_REPLY_WINDOW
from gateway.redis_quota import RedisQuotaStore, through_redis_py
from gateway.server import Site
from gateway.upstream import UpstreamPool

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey[RedisClient]("redis")
POOLS = web.AppKey("pools", dict[str, UpstreamPool])
STORE = web.AppKey("store", RedisQuotaStore)
PROXY = web.AppKey("proxy", Proxy)


def gateway_sites(
    settings: Settings, *, reuse_port: bool = False, channel: socket.socket | None = None
) -> list[Site]:
    """What `metergate gateway` serves: the gateway (on its port, or on the connections
    a balancer hands over on ``channel``), and its metrics listener if set."""
    app = create_app(settings)
    config = settings.config
    separate = settings.metrics_host is not None
    sites = [
        Site(
            app,
            settings.gateway_host,
            settings.gateway_port,
            reuse_port=reuse_port,
            handler=functools.partial(gateway_handler, metrics=not separate),
            admit=gateway_admit,
            limits=config.limits,
            access_log=config.gateway.access_log,
            channel=channel,
        )
    ]
    if settings.metrics_host is not None:
        # Started after the gateway's app, whose store /readyz pings.
        sites.append(
            Site(
                web.Application(),
                settings.metrics_host,
                settings.metrics_port,
                reuse_port=reuse_port,
                handler=lambda _: metrics_handler(app),
                limits=config.limits,
                counted=False,
            )
        )
    return sites


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> web.Application:
    """Build the gateway; resources open on startup and close on cleanup, in reverse order."""
    # The app holds the resources; requests are served by gateway.front through
    # ``gateway_handler``, not by aiohttp's router.
    app = web.Application()
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_pools_ctx)
    app.cleanup_ctx.append(_proxy_ctx(clock))
    return app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    url = settings.redis_url or DEFAULT_REDIS_URL
    timeout = settings.config.metering.redis_timeout_seconds
    client = create_client(url, timeout=timeout)
    if through_redis_py(client):
        # Charges go through redis-py (a cluster): its client reads on past the timeout, so
        # a charge whose caller got its 503 is still answered, and refunded if Redis
        # applied it (redis_quota._send). The raw pipeline keeps its own late window.
        await client.aclose()
        client = create_client(url, timeout=timeout, read_timeout=timeout + LATE_REPLY_WINDOW)
    app[REDIS] = client
    yield
    await client.aclose()


def _pool(upstream: Upstream) -> UpstreamPool:
    return UpstreamPool(
        upstream.url,
        max_connections=upstream.max_connections,
        connect_timeout=upstream.connect_timeout_seconds,
        read_timeout=upstream.timeout_seconds,
        keepalive=30.0,
    )


async def _pools_ctx(app: web.Application) -> AsyncIterator[None]:
    pools = {name: _pool(up) for name, up in app[SETTINGS].config.upstreams.items()}
    app[POOLS] = pools
    yield
    await asyncio.gather(*(p.close() for p in pools.values()))


def _proxy_ctx(
    clock: Callable[[], float],
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        config = settings.config
        client = app[REDIS]
        store = RedisQuotaStore(client, config, clock=clock, on_batch=metrics.BATCH_SIZES.observe)
        failopen = FailOpenLedger(client) if config.metering.fail_open else None
        app[STORE] = store
        async with token_verifier(config.auth, secret=settings.jwt_secret, clock=clock) as v:
            app[PROXY] = Proxy(
                config,
                v,
                store,
                app[POOLS],
                failopen=failopen,
                clock=clock,
                reserved=RESERVED_PATHS,  # answered by the gateway itself (gateway_handler)
            )
            task = asyncio.create_task(failopen.run()) if failopen else None
            yield
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:
                if failopen is not None:
                    await failopen.flush()
                await store.aclose()
            finally:
                # Last: the requests drained and the late replies followed up, every tally
                # is in; the timer that would write them dies with the loop.
                metrics.flush()

    return ctx


OwnEndpoint = Callable[[web.Application], Awaitable[tuple[int, str, bytes]]]


def _own_endpoints(*, metrics: bool) -> dict[str, OwnEndpoint]:
    own: dict[str, OwnEndpoint] = {"/healthz": _health, "/readyz": _ready}
    if metrics:
        own["/metrics"] = _render_metrics
    return own


async def _answer(app: web.Application, request: Request, endpoint: OwnEndpoint) -> None:
    status, content_type, body = await endpoint(app)
    request.respond(status, {"Content-Type": content_type}, body)


def gateway_handler(app: web.Application, *, metrics: bool = True) -> Handler:
    """The gateway's requests, for gateway.front: its own endpoints by exact path (with
    /metrics unless it has a listener of its own), everything else straight to the proxy."""
    own = _own_endpoints(metrics=metrics)
    proxy = app[PROXY]
    answer = functools.partial(_answer, app)

    def handle(request: Request) -> Awaitable[None]:
        # Hands back the proxy's coroutine rather than awaiting it: no frame of its own to
        # pass through each time a request resumes.
        endpoint = own.get(request.raw_path.partition("?")[0])
        if endpoint is not None and request.method in ("GET", "HEAD"):
            return answer(request, endpoint)
        return proxy.handle(request)

    return handle


def gateway_admit(app: web.Application) -> Admit | None:
    """The proxy's fast path for gateway.front (Proxy.admit), where it has one. It never takes
    the gateway's own endpoints: the proxy was told them (RESERVED_PATHS)."""
    proxy = app[PROXY]
    return proxy.admit if proxy.admits else None


def metrics_handler(app: web.Application) -> Handler:
    """The metrics listener's requests: /metrics, /healthz and /readyz, nothing else."""
    own = _own_endpoints(metrics=True)

    async def handle(request: Request) -> None:
        path = request.raw_path.partition("?")[0]
        endpoint = own.get(path)
        if endpoint is None:
            request.error(404, "not_found", f"{path} is not served here: try /metrics")
        elif request.method not in ("GET", "HEAD"):
            message = f"{request.method} is not allowed on {path}"
            request.error(405, "method_not_allowed", message, headers={"Allow": "GET, HEAD"})
        else:
            await _answer(app, request, endpoint)

    return handle


_json = msgspec.json.Encoder().encode


async def _health(app: web.Application) -> tuple[int, str, bytes]:
    return 200, "application/json", b'{"status":"ok"}'


async def _ready(app: web.Application) -> tuple[int, str, bytes]:
    config = app[SETTINGS].config
    redis_ok, backend_ok = await asyncio.gather(
        app[STORE].ping(), _reachable(config.upstreams["default"].url)
    )
    ready = (redis_ok or not config.metering.enabled) and backend_ok
    body = {"status": "ready" if ready else "not_ready", "redis": redis_ok, "backend": backend_ok}
    return (200 if ready else 503), "application/json", _json(body)


async def _reachable(url: str, timeout: float = 1.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(parts.hostname, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _render_metrics(app: web.Application) -> tuple[int, str, bytes]:
    body, content_type = metrics.render()
    return 200, content_type, body
