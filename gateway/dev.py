"""`metergate up` (everything in one process for development) and `metergate admin`."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from config.load import ConfigError
from config.settings import Settings
from gateway import compiled
from gateway.auth import issue_token
from gateway.cli import warn_dev_secret
from gateway.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from gateway.server import Site, address, run, serve

log = logging.getLogger("metergate")


def _admin_app(settings: Settings) -> web.Application:
    from admin.app import create_app

    if (settings.redis_url or "").split("://")[0].endswith("+cluster"):
        # Its scripts and indices were written and tested for one Redis; the gateway's
        # charging is what runs on a cluster.
        raise ConfigError(
            "METERGATE_REDIS_URL: the admin app does not support Redis Cluster yet; "
            "give it a plain redis:// URL"
        )
    return create_app(settings)


def _admin_upstream_follows_listen(settings: Settings) -> Settings:
    """In `up` the admin app runs here, so the gateway's admin upstream is wherever it listens
    (METERGATE_ADMIN_LISTEN may move it off the 8081 written in gateway.toml)."""
    config = settings.config
    if "admin" not in config.upstreams:
        return settings
    upstreams = dict(config.upstreams)
    url = f"http://{settings.admin_host}:{settings.admin_port}"
    upstreams["admin"] = msgspec.structs.replace(upstreams["admin"], url=url)
    return msgspec.structs.replace(
        settings, config=msgspec.structs.replace(config, upstreams=upstreams)
    )


def run_admin(settings: Settings) -> int:
    warn_dev_secret(settings)
    app = _admin_app(settings)
    log.info("admin on http://%s:%d", settings.admin_host, settings.admin_port)
    run(serve([Site(app, settings.admin_host, settings.admin_port)]))
    return 0


def run_up(settings: Settings, *, data_dir: str = "var") -> int:
    from gateway.app import gateway_sites
    from gateway.demo_backend import create_demo_backend

    settings = _admin_upstream_follows_listen(settings)
    warn_dev_secret(settings)
    # The demo backend serves where the default upstream points (127.0.0.1:9000 as shipped).
    backend = urlsplit(settings.config.upstreams["default"].url)
    backend_host, backend_port = backend.hostname or "127.0.0.1", backend.port or 80
    embedded: EmbeddedRedis | None = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis(Path(data_dir) / "redis", persistent=True)
        try:
            embedded.start()
        except EmbeddedRedisError as exc:
            log.error("%s", exc)
            return 1
        log.info("embedded redis-server on %s (data in %s)", embedded.url, embedded.data_dir)
        settings = msgspec.structs.replace(settings, redis_url=embedded.url)
    try:
        sites = [
            Site(
                create_demo_backend(), backend_host, backend_port, runner_args={"access_log": None}
            ),
            *gateway_sites(settings),
        ]
        sites.append(Site(_admin_app(settings), settings.admin_host, settings.admin_port))

        def ready() -> None:
            token = issue_token(settings.jwt_secret, "demo-account", ttl=30 * 86400)
            base = f"http://{settings.gateway_host}:{settings.gateway_port}"
            scrape = f"{base}/metrics"
            if settings.metrics_host is not None:
                scrape = f"http://{address(settings.metrics_host, settings.metrics_port)}/metrics"
            print(
                "\nMetergate is up:\n"
                f"  gateway       {base}\n"
                f"  demo backend  http://{backend_host}:{backend_port}\n"
                f"  admin         http://{settings.admin_host}:{settings.admin_port}\n"
                f"  metrics       {scrape}\n"
                f"  hot path      {compiled.describe()}\n\n"
                "Try it (a free-tier account, 100 units a month):\n\n"
                f"  curl -i -H 'Authorization: Bearer {token}' {base}/signals\n\n"
                "Ctrl-C stops everything.\n",
                flush=True,
            )

        run(serve(sites, started=ready))
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
