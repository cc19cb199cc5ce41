"""POST /webhooks/stripe: verify Stripe's signature, append the event to a stream, answer 200.

Nothing is applied here: the event is made durable first (``mg:webhooks``) and Stripe gets
its 2xx at once, so a slow or failing apply never makes Stripe retry or give up; the
consumer group in ``admin.webhook_consumer`` applies it, at least once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence

import redis.asyncio as redis
from aiohttp import web
from redis.exceptions import RedisError

from admin import keys, metrics
from admin.events import MalformedEvent, parse_event
from gateway.errors import json_error

log = logging.getLogger(__name__)

TOLERANCE_SECONDS = 300
STREAM_MAXLEN = 1_000_000


class SignatureError(ValueError):
    pass


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The v1 signature Stripe computes: HMAC-SHA256 of ``"<t>.<raw body>"``."""
    payload = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def verify_signature(
    body: bytes,
    header: str | None,
    secrets: Sequence[str],
    now: float,
    tolerance: int = TOLERANCE_SECONDS,
) -> int:
    """Check ``Stripe-Signature`` over the raw body as stripe-python does, with our clock.

    Any one ``v1`` signature may match any one secret: Stripe sends several while an
    endpoint's secret is being rolled, and we may list several secrets while we roll ours.
    """
    if not header:
        raise SignatureError("missing Stripe-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None:
        raise SignatureError("Stripe-Signature has no timestamp")
    if not candidates:
        raise SignatureError("Stripe-Signature has no v1 signature")
    expected = [sign(body, secret, timestamp) for secret in secrets]
    if not any(hmac.compare_digest(e, c) for e in expected for c in candidates):
        raise SignatureError("no v1 signature matches the payload")
    # Checked after the signature, so that a forged header learns nothing about the clock.
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"timestamp outside the tolerance of {tolerance} s")
    return timestamp


def parse_secrets(raw: str | None) -> tuple[str, ...]:
    """STRIPE_WEBHOOK_SECRET, possibly several secrets separated by commas (rotation)."""
    return tuple(s.strip() for s in (raw or "").split(",") if s.strip())


class WebhookReceiver:
    def __init__(
        self, client: redis.Redis, secrets: Sequence[str], clock: Callable[[], float]
    ) -> None:
        self._redis = client
        self.secrets = tuple(secrets)
        self._clock = clock

    async def handle(self, request: web.Request) -> web.Response:
        if not self.secrets:
            metrics.WEBHOOKS_RECEIVED.labels("disabled").inc()
            return json_error(
                503,
                "webhooks_disabled",
                "STRIPE_WEBHOOK_SECRET is not set: this admin app accepts no Stripe webhooks",
            )
        body = await request.read()
        header = request.headers.get("Stripe-Signature")
        try:
            verify_signature(body, header, self.secrets, self._clock())
        except SignatureError as exc:
            metrics.WEBHOOKS_RECEIVED.labels("bad_signature").inc()
            return json_error(400, "invalid_signature", str(exc))
        try:
            event = parse_event(body)
        except MalformedEvent as exc:
            metrics.WEBHOOKS_RECEIVED.labels("malformed").inc()
            return json_error(400, "malformed_event", str(exc))
        fields: dict[str, str | int | bytes] = {
            "id": event.id,
            "type": event.type,
            "created": event.created,
            "body": body,
        }
        try:
            await self._redis.xadd(
                keys.WEBHOOK_STREAM,
                fields,  # type: ignore[arg-type]
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
        except RedisError as exc:
            # Not stored, so not acknowledged: Stripe retries the delivery later.
            log.warning("webhook %s not stored: %s", event.id, exc)
            metrics.WEBHOOKS_RECEIVED.labels("store_failed").inc()
            return json_error(503, "webhook_store_unavailable", "could not store the event")
        metrics.WEBHOOKS_RECEIVED.labels("accepted").inc()
        return web.json_response({"received": True, "id": event.id})
