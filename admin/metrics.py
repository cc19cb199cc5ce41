"""Prometheus metrics of the admin app (served with the gateway's on the admin's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

WEBHOOKS_RECEIVED = Counter(
    "metergate_webhooks_received_total",
    "Stripe webhook deliveries, by outcome (accepted, bad_signature, malformed, ...).",
    ["outcome"],
)
WEBHOOKS_PROCESSED = Counter(
    "metergate_webhooks_processed_total",
    "Webhook events taken off the stream, by outcome (applied, stale, duplicate, ...).",
    ["outcome"],
)
WEBHOOK_PENDING = Gauge(
    "metergate_webhook_pending",
    "Events delivered to a consumer and not yet acknowledged (XPENDING).",
    multiprocess_mode="max",
)
WEBHOOK_LAG = Gauge(
    "metergate_webhook_lag",
    "Events in the stream not yet delivered to the consumer group.",
    multiprocess_mode="max",
)
WEBHOOK_OLDEST_AGE = Gauge(
    "metergate_webhook_oldest_unapplied_seconds",
    "Age of the oldest event received and not yet applied (0 when none).",
    multiprocess_mode="max",
)
BILLING_ERRORS = Counter("metergate_billing_errors_total", "Billing API errors, by code.", ["code"])
