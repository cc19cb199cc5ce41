"""Typed, frozen business configuration decoded from gateway.toml.

Everything here is what backend teams edit: tiers, routes, upstreams, auth rules and
gateway limits. Deployment settings (addresses, secrets, Redis URL) live in
``config.settings`` and come from the environment.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

import msgspec

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
# Upper bounds also refuse inf (TOML allows it), which would turn a timeout into a hang.
Timeout = Annotated[float, msgspec.Meta(gt=0, le=3600)]
Cache = Annotated[float, msgspec.Meta(ge=0, le=86400)]
# Counts of units: the Lua script works in doubles, exact only below 2**53.
Units = Annotated[int, msgspec.Meta(ge=0, lt=2**53)]
# Seconds handed to Redis (TTLs, grace): at most about 68 years.
Seconds = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Tier(_Frozen, frozen=True):
    """A subscription tier: what it costs and how many units it includes."""

    monthly_price_usd: Decimal
    included_units: Units
    # None means no overage: the tier stops hard at its included units.
    overage_unit_price_usd: Decimal | None = None
    # A spend limit: at most this many overage units per period (None: unlimited).
    max_overage_units: Units | None = None
    # Requests per second with a burst (GCRA); 0 disables the rate limit.
    requests_per_second: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.0
    burst: Annotated[int, msgspec.Meta(gt=0, le=1_000_000)] = 1

    @property
    def allows_overage(self) -> bool:
        return self.overage_unit_price_usd is not None and self.overage_unit_price_usd > 0


class Upstream(_Frozen, frozen=True):
    url: str
    # The admin app verifies the JWT itself, so its upstream keeps Authorization.
    forward_authorization: bool = False
    timeout_seconds: Timeout = 30.0
    connect_timeout_seconds: Timeout = 2.0
    max_connections: Annotated[int, msgspec.Meta(gt=0, le=65535)] = 256


class Route(_Frozen, frozen=True):
    path: str
    methods: tuple[Method, ...] = ("GET",)
    # Below 2**31: larger costs cannot be charged exactly (every request would be a 503).
    cost: Annotated[int, msgspec.Meta(ge=0, lt=2**31)] = 0
    upstream: str = "default"
    # A public route needs no token (pricing, Stripe's webhook); it must cost 0.
    public: bool = False
    # Only these tiers may call the route (None: every tier); others get 403.
    tiers: tuple[str, ...] | None = None
    # This route's own request body limit, at most limits.max_request_body_bytes (413
    # beyond). Up to 64 KiB the body is read whole before a backend connection is taken,
    # so a slow upload holds no backend connection: meant for public routes (webhooks).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=0, lt=2**53)] | None = None


class Auth(_Frozen, frozen=True):
    algorithms: tuple[Algorithm, ...] = ("HS256",)
    issuer: str | None = None
    audience: str | None = None
    # Clock skew allowance: minutes at most, or expired tokens stay valid.
    leeway_seconds: Annotated[int, msgspec.Meta(ge=0, le=300)] = 30
    # For RS*/ES*/PS*: a PEM public key file, or a JWKS URL (not both).
    public_key_file: str | None = None
    jwks_url: str | None = None
    jwks_refresh_cooldown_seconds: Cache = 300.0
    jwks_cache_seconds: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 3600.0
    token_cache_size: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 10_000


class Billing(_Frozen, frozen=True):
    # A past_due subscription keeps its paid tier this long after the first failed payment.
    past_due_grace_seconds: Seconds = 3 * 24 * 3600
    # Per-day per-route analytics are kept this long.
    daily_usage_ttl_seconds: Annotated[int, msgspec.Meta(gt=0, lt=2**31)] = 40 * 24 * 3600


class Metering(_Frozen, frozen=True):
    enabled: bool = True
    # Upstream statuses that mean "the backend could not answer": the charge is refunded.
    refund_statuses: tuple[int, ...] = (502, 503, 504)
    # When Redis is unreachable: False answers 503 (fail closed); True lets requests
    # through and counts them for reconciliation.
    fail_open: bool = False
    # Bounded: the promise is a 503 within about a second when Redis is down.
    redis_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=5)] = 0.5
    # Pipeline the charges of one event-loop iteration into one Redis write.
    coalesce: bool = True


class Limits(_Frozen, frozen=True):
    max_request_body_bytes: Annotated[int, msgspec.Meta(ge=0, lt=2**53)] = 10 * 1024 * 1024
    max_header_bytes: PosInt = 8190
    max_line_bytes: PosInt = 8190
    # Each read of a client's request body and each write of the answer to it must make
    # progress within this: a client that stalls must not hold a backend connection.
    client_body_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0


class GatewaySection(_Frozen, frozen=True):
    listen: str = "127.0.0.1:8080"
    # 0 means one worker process per CPU.
    workers: NonNegInt = 1
    # How several workers share the connections: "kernel" (SO_REUSEPORT, by a hash of
    # each connection's addresses) or "exact" (the starting process accepts and hands
    # each to the worker with the fewest; gateway/balance.py).
    balance: Literal["kernel", "exact"] = "kernel"
    access_log: bool = False
    # host:port of a listener of its own for /metrics (also /healthz and /readyz), which
    # the public port then no longer answers; "" serves /metrics on the public port.
    metrics_listen: str = ""


class AdminSection(_Frozen, frozen=True):
    listen: str = "127.0.0.1:8081"


class Config(_Frozen, frozen=True):
    gateway: GatewaySection = GatewaySection()
    admin: AdminSection = AdminSection()
    auth: Auth = Auth()
    metering: Metering = Metering()
    billing: Billing = Billing()
    limits: Limits = Limits()
    upstreams: dict[str, Upstream] = {}
    tiers: dict[str, Tier] = {}
    routes: tuple[Route, ...] = ()

    @property
    def free_tier(self) -> Tier:
        return self.tiers["free"]
