"""The ``metergate`` command: gateway, admin, up, token, check."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence

from config import ConfigError, Settings, load_settings
from gateway import compiled

log = logging.getLogger("metergate")

DEV_SECRET_BANNER = """
************************************************************************
*  METERGATE_JWT_SECRET is not set: using the fixed DEVELOPMENT secret. *
*  Anyone can mint tokens for this gateway. Never run it like this in   *
*  production: set METERGATE_JWT_SECRET (or configure RS256/JWKS).      *
************************************************************************"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = os.environ.get("METERGATE_LOG_LEVEL") or "INFO"
    if not isinstance(logging.getLevelNamesMapping().get(level.upper()), int):
        print(
            f"metergate: config error: METERGATE_LOG_LEVEL: unknown level {level!r} "
            "(expected DEBUG, INFO, WARNING, ERROR or CRITICAL)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"metergate: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metergate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gateway", help="run the metering proxy")
    p.set_defaults(func=_cmd_gateway)

    p = sub.add_parser("admin", help="run the admin app (billing API, Stripe webhooks)")
    p.set_defaults(func=_cmd_admin)

    p = sub.add_parser("up", help="development: Redis, demo backend, gateway and admin at once")
    p.add_argument("--data-dir", default="var", help="where the embedded Redis keeps its data")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("token", help="print a JWT signed with the configured secret")
    p.add_argument("--sub", required=True, help="the account id")
    p.add_argument("--admin", action="store_true", help="add role=admin (operators)")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser("check", help="validate gateway.toml and the environment, then exit")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "stripe-setup", help="create the Stripe products, prices and meter once; print env vars"
    )
    p.set_defaults(func=_cmd_stripe_setup)
    return parser


def _settings() -> Settings:
    return load_settings()


def _serving(serve: Callable[[], int]) -> int:
    # A port in use is an operator's everyday mistake: one line, not an OSError traceback.
    from gateway.server import ListenError

    try:
        return serve()
    except ListenError as exc:
        print(f"metergate: {exc}", file=sys.stderr)
        return 1


def uses_dev_secret(settings: Settings) -> bool:
    return settings.dev_secret and all(a.startswith("HS") for a in settings.config.auth.algorithms)


def warn_dev_secret(settings: Settings) -> None:
    if uses_dev_secret(settings):
        log.warning(DEV_SECRET_BANNER)


def _cmd_check(args: argparse.Namespace) -> int:
    settings = _settings()
    config = settings.config
    if uses_dev_secret(settings):
        # One line on stderr: check's output is read by scripts and CI, not watched.
        print(
            "metergate: warning: METERGATE_JWT_SECRET is not set: the fixed development "
            "secret would be used (anyone can mint tokens)",
            file=sys.stderr,
        )
    print(
        f"{settings.config_path}: OK — {len(config.routes)} routes, "
        f"{len(config.tiers)} tiers, {len(config.upstreams)} upstreams"
    )
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from gateway.auth import issue_token

    settings = _settings()
    if not all(a.startswith("HS") for a in settings.config.auth.algorithms):
        print("metergate: token signs HS* tokens only; use your identity provider", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("metergate: --ttl must be positive", file=sys.stderr)
        return 2
    if settings.dev_secret:
        print("metergate: warning: signed with the development secret", file=sys.stderr)
    algorithm = settings.config.auth.algorithms[0]
    print(
        issue_token(
            settings.jwt_secret, args.sub, admin=args.admin, ttl=args.ttl, algorithm=algorithm
        )
    )
    return 0


def _gateway_worker(index: int, channel: socket.socket | None = None) -> None:
    # Runs in a spawned worker process: settings are read again from the same environment.
    # With a channel, the gateway's connections come from the balancer on it.
    from gateway.app import gateway_sites
    from gateway.server import ListenError, run, serve

    settings = load_settings()
    if settings.workers > 1:
        # Each worker chooses for itself: one restarted after an edit may run the source.
        log.info("worker %d: hot path %s", index, compiled.describe())
    try:
        sites = gateway_sites(settings, reuse_port=settings.workers > 1, channel=channel)
        run(serve(sites))
    except ListenError as exc:
        if settings.workers == 1:
            raise
        print(f"metergate: worker {index}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def _cmd_gateway(args: argparse.Namespace) -> int:
    settings = _settings()
    warn_dev_secret(settings)
    log.info(
        "gateway on http://%s:%d (%d worker%s%s), redis %s, hot path %s",
        settings.gateway_host,
        settings.gateway_port,
        settings.workers,
        "" if settings.workers == 1 else "s",
        ", exact balance"
        if settings.workers > 1 and settings.config.gateway.balance == "exact"
        else "",
        "configured" if settings.redis_url else "redis://127.0.0.1:6379/0 (default)",
        compiled.describe(),
    )

    def gateway() -> int:
        if settings.workers == 1:
            _gateway_worker(0)
            return 0
        from gateway.balance import Balancer
        from gateway.server import bind, check_listen, run_workers

        # Checked here so a port in use is one line, not every worker failing in a loop.
        if settings.metrics_host is not None:
            check_listen(settings.metrics_host, settings.metrics_port, reuse_port=True)
        if settings.config.gateway.balance == "exact":
            balancer = Balancer(bind(settings.gateway_host, settings.gateway_port))
            return run_workers(_gateway_worker, settings.workers, balancer=balancer)
        check_listen(settings.gateway_host, settings.gateway_port, reuse_port=True)
        return run_workers(_gateway_worker, settings.workers)

    return _serving(gateway)


def _cmd_admin(args: argparse.Namespace) -> int:
    from gateway.dev import run_admin

    settings = _settings()
    return _serving(lambda: run_admin(settings))


def _cmd_stripe_setup(args: argparse.Namespace) -> int:
    from admin.stripe_setup import main as stripe_setup

    return stripe_setup(_settings().config, os.environ)


def _cmd_up(args: argparse.Namespace) -> int:
    from gateway.dev import run_up

    settings = _settings()
    return _serving(lambda: run_up(settings, data_dir=args.data_dir))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
