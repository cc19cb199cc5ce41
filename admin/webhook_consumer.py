"""The consumer group that applies stored Stripe events to plans, at least once.

Each event is applied, marked seen, then acknowledged (XACK). A process that dies in
between leaves the entry pending; on start every consumer first re-claims pending entries
(XAUTOCLAIM), then periodically re-claims those idle too long, so an event Stripe was told
we have is applied after a restart. Applying twice is harmless: a seen event is skipped and
``apply_plan.lua`` refuses anything not newer than what the plan holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import redis.asyncio as redis
from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError

from admin import keys, metrics
from admin.audit import AuditLog
from admin.billing_backend import BillingBackend, BillingError, BillingUnavailable
from admin.billing_lock import BillingBusy, account_lock
from admin.customers import forget_customer
from admin.events import (
    HANDLED,
    INVOICE_EVENTS,
    SUBSCRIPTION_EVENTS,
    MalformedEvent,
    interpret,
    parse_event,
)
from admin.plans import PlanChange, Plans, change_from_state

log = logging.getLogger(__name__)

SEEN_TTL_SECONDS = 30 * 86400  # longer than Stripe's three days of retries
# An event that failed this many deliveries goes to the dead-letter stream.
MAX_DELIVERIES = 5
# How long an event waits for a billing change of its account in progress. Short: events
# are applied one at a time, so the wait holds up every other account's; one that finds
# the lock still held stays pending and is re-claimed later (claim_idle_ms).
LOCK_WAIT_SECONDS = 2.0


class Backlog(msgspec.Struct, frozen=True, kw_only=True):
    pending: int  # delivered, not acknowledged
    lag: int  # in the stream, not yet delivered
    oldest_age_seconds: float  # age of the oldest event not yet applied

    @property
    def total(self) -> int:
        return self.pending + self.lag


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class WebhookConsumer:
    def __init__(
        self,
        client: redis.Redis,
        plans: Plans,
        audit: AuditLog,
        billing: BillingBackend,
        price_tiers: Mapping[str, str],
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.time,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        batch: int = 64,
        max_deliveries: int = MAX_DELIVERIES,
        lock_wait_seconds: float = LOCK_WAIT_SECONDS,
    ) -> None:
        self._redis = client
        self._plans = plans
        self._audit = audit
        self._billing = billing
        self._price_tiers = dict(price_tiers)
        self.name = name or consumer_name()
        self._clock = clock
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._batch = batch
        self._max_deliveries = max_deliveries
        self.lock_wait_seconds = lock_wait_seconds

    async def ensure_group(self) -> None:
        # From "0": events stored before any consumer existed are applied too.
        try:
            await self._redis.xgroup_create(
                keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Apply events until cancelled; Redis failures pause the loop, never end it."""
        started = False
        last_claim = 0.0
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A stop redis-py swallowed (see UsageReporter.run_forever): end as asked.
                raise asyncio.CancelledError
            try:
                if not started:
                    await self.ensure_group()
                    # Whatever a dead process took and never acknowledged: ours now.
                    await self.reclaim(min_idle_ms=0)
                    started = True
                    last_claim = time.monotonic()
                elif time.monotonic() - last_claim > self._claim_idle_ms / 2000:
                    await self.reclaim(min_idle_ms=self._claim_idle_ms)
                    last_claim = time.monotonic()
                await self.read_new(block_ms=self._block_ms)
            except asyncio.CancelledError:
                raise
            except RedisError as exc:
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # a stop that redis-py turned
                log.warning("webhook consumer: redis error: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:
                # Never end for good: the events would wait unapplied with nobody told.
                log.exception("webhook consumer: unexpected error; going on")
                metrics.WEBHOOKS_PROCESSED.labels("error").inc()
                await asyncio.sleep(1.0)

    async def read_new(self, *, block_ms: int | None = None) -> int:
        reply: Any = await self._redis.xreadgroup(
            keys.WEBHOOK_GROUP,
            self.name,
            {keys.WEBHOOK_STREAM: ">"},
            count=self._batch,
            block=block_ms,
        )
        done = 0
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                await self.handle(entry_id, fields)
                done += 1
        return done

    async def reclaim(self, *, min_idle_ms: int) -> int:
        start: bytes | str = "0-0"
        done = 0
        while True:
            reply: Any = await self._redis.xautoclaim(
                keys.WEBHOOK_STREAM,
                keys.WEBHOOK_GROUP,
                self.name,
                min_idle_time=min_idle_ms,
                start_id=start,
                count=self._batch,
            )
            start, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                if fields is not None:
                    await self.handle(entry_id, fields)
                    done += 1
            if start in (b"0-0", "0-0"):
                return done

    async def drain(self) -> int:
        """Apply everything stored now (pending first), without blocking: for tests and tools."""
        await self.ensure_group()
        done = await self.reclaim(min_idle_ms=0)
        while True:
            n = await self.read_new(block_ms=None)
            if not n:
                return done
            done += n

    async def handle(self, entry_id: bytes, fields: Mapping[bytes, bytes]) -> str:
        try:
            outcome = await self._handle(fields)
        except Exception as exc:
            # Left pending: re-claimed and retried later, until it is known to be poison.
            event_id = fields.get(b"id", b"").decode(errors="replace")
            log.warning(
                "webhook event %s (entry %s) not applied: %r", event_id, entry_id.decode(), exc
            )
            # A billing change of the account in progress for long (BillingBusy) is no fault
            # of the event either.
            transient = isinstance(
                exc, (BillingUnavailable, BillingBusy, ConnectionError, TimeoutError)
            )
            if not transient and await self._deliveries(entry_id) >= self._max_deliveries:
                await self._dead_letter(entry_id, fields, exc)
                metrics.WEBHOOKS_PROCESSED.labels("dead_letter").inc()
                return "dead_letter"
            metrics.WEBHOOKS_PROCESSED.labels("retry").inc()
            return "retry"
        await self._redis.xack(keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP, entry_id)
        metrics.WEBHOOKS_PROCESSED.labels(outcome).inc()
        return outcome

    async def _deliveries(self, entry_id: bytes) -> int:
        rows: Any = await self._redis.xpending_range(
            keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(rows[0]["times_delivered"]) if rows else 0

    async def _dead_letter(
        self, entry_id: bytes, fields: Mapping[bytes, bytes], exc: Exception
    ) -> None:
        """Set a poison event aside (kept for an operator) so it stops being retried."""
        event_id = fields.get(b"id", b"").decode(errors="replace")
        dead: dict[bytes | str, bytes | str] = dict(fields.items())
        dead.update({"entry_id": entry_id, "error": repr(exc)[:1000]})
        await self._redis.xadd(
            keys.WEBHOOK_DEAD_STREAM,
            dead,  # type: ignore[arg-type]
            maxlen=10_000,
            approximate=True,
        )
        await self._redis.xack(keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP, entry_id)
        await self._audit.record(
            who="stripe",
            what="webhook.dead_letter",
            account="",
            source=event_id,
            details={"entry_id": entry_id.decode(), "error": repr(exc)[:500]},
        )
        log.error("webhook event %s moved to %s: %r", event_id, keys.WEBHOOK_DEAD_STREAM, exc)

    async def _handle(self, fields: Mapping[bytes, bytes]) -> str:
        event_id = fields.get(b"id", b"").decode()
        seen = keys.webhook_seen_key(event_id)
        if event_id and await self._redis.exists(seen):
            return "duplicate"
        try:
            event = parse_event(fields.get(b"body", b""))
        except MalformedEvent as exc:
            await self._audit.record(
                who="stripe",
                what="webhook.malformed",
                account="",
                source=event_id,
                details={"error": str(exc)},
            )
            return "malformed"
        if event.type not in HANDLED:
            # Stripe sends every type the endpoint subscribes to; most change no plan.
            return "ignored"
        meaning = interpret(event, self._price_tiers)
        account = await self._plans.account_for_customer(meaning.customer_id, meaning.metadata)
        outcome: str
        if account is None:
            outcome = "unmatched"
            await self._audit.record(
                who="stripe",
                what=f"webhook.unmatched.{event.type}",
                account="",
                source=event.id,
                details={"customer": meaning.customer_id},
            )
        elif meaning.change is None:
            outcome = "noted"
            await self._audit.record(
                who="stripe",
                what=f"webhook.{event.type}",
                account=account,
                source=event.id,
                details={"subscription_id": meaning.subscription_id},
            )
        elif event.type == "customer.deleted" and not await self._own_customer(
            account, meaning.customer_id
        ):
            # An old customer of the account, replaced since: the current plan stays.
            outcome = "other_customer"
        else:
            # From the read of the subscription to the plan's write, no billing change of the
            # API comes between (admin.billing_lock): it would be undone by what was read.
            async with account_lock(self._redis, account, wait_seconds=self.lock_wait_seconds):
                change = await self._current(event.type, meaning.subscription_id, meaning.change)
                change = msgspec.structs.replace(change, account=account)
                result = await self._plans.apply(
                    change, created=event.created, event_id=event.id, who="stripe", source=event.id
                )
            outcome = result.reason
            if event.type == "customer.deleted" and meaning.customer_id:
                await forget_customer(self._redis, account, meaning.customer_id)
        # Only now is the event done: a crash before this line applies it again, harmlessly.
        await self._redis.set(seen, self._clock(), ex=SEEN_TTL_SECONDS)
        return outcome

    async def _own_customer(self, account: str, customer_id: str | None) -> bool:
        """Whether ``customer_id`` is the account's customer (or the account has none)."""
        stored: Any = await self._redis.get(keys.customer_key(account))
        return stored is None or customer_id is None or stored.decode() == customer_id

    async def _current(self, kind: str, sub_id: str | None, change: PlanChange) -> PlanChange:
        """In Stripe mode, the subscription as it is now rather than as the event saw it."""
        if self._billing.mode != "stripe" or not sub_id:
            return change
        if kind not in SUBSCRIPTION_EVENTS and kind not in INVOICE_EVENTS:
            return change
        try:
            state = await self._billing.get_subscription(sub_id)
        except BillingUnavailable:
            # Not applied as sent: events of one second are ordered by their (random) ids,
            # so a stale one could win. Stripe being down is transient: the entry stays
            # pending and is delivered again.
            raise
        except BillingError as exc:
            # Stripe refused the read: the event's own content, kept in order by its time.
            log.info("re-fetch of %s failed (%s): applying the event as sent", sub_id, exc)
            return change
        if state is None:
            return change
        return change_from_state(change.account, state, fresh=True)

    async def backlog(self) -> Backlog:
        try:
            groups = await self._redis.xinfo_groups(keys.WEBHOOK_STREAM)
        except ResponseError:  # no stream yet
            return Backlog(pending=0, lag=0, oldest_age_seconds=0.0)
        # Entry ids carry Redis's wall clock, not the injected one.
        return await backlog_of(self._redis, groups, time.time())


async def backlog_of(client: redis.Redis, groups: list[dict[str, object]], now: float) -> Backlog:
    group = next((g for g in groups if _s(g.get("name")) == keys.WEBHOOK_GROUP), None)
    if group is None:
        length = await client.xlen(keys.WEBHOOK_STREAM)
        first: Any = await client.xrange(keys.WEBHOOK_STREAM, count=1)
        oldest = _age(first[0][0], now) if first else 0.0
        return Backlog(pending=0, lag=int(length), oldest_age_seconds=oldest)
    pending = int(str(group.get("pending") or 0))
    lag_raw = group.get("lag")
    last = _s(group.get("last-delivered-id")) or "0-0"
    undelivered: Any = await client.xrange(keys.WEBHOOK_STREAM, min=f"({last}", count=1)
    lag = len(undelivered) if lag_raw is None else int(str(lag_raw))
    ages = []
    if pending:
        summary: Any = await client.xpending(keys.WEBHOOK_STREAM, keys.WEBHOOK_GROUP)
        if summary.get("min"):
            ages.append(_age(summary["min"], now))
    if undelivered:
        ages.append(_age(undelivered[0][0], now))
    return Backlog(pending=pending, lag=lag, oldest_age_seconds=max(ages, default=0.0))


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _age(entry_id: bytes | str, now: float) -> float:
    millis = int(_s(entry_id).split("-", 1)[0])
    return max(0.0, now - millis / 1000)
