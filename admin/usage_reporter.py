"""Report overage units to Stripe's Billing Meter, exactly once.

The gateway counts overage units in ``mg:{acct}:usage`` (``gateway/lua/charge.lua``).
Every ``interval`` seconds, for each account in ``mg:accounts:paid`` (and in
``mg:accounts:lapsed``, those that stopped paying, until nothing is left to report) with
a Stripe customer:

1. claim (Lua): the units beyond those already reported this period are written down as
   ``report_pending = "<period_start>:<reported>:<overage>"`` before anything is sent, with
   the event's timestamp (``report_pending_at``, inside the period);
2. send: one meter event of ``overage - reported`` units with the deterministic identifier
   ``<account>:<period_start>:<reported>:<overage>``;
3. commit (Lua): ``reported = overage`` if the period is unchanged; the claim is cleared.

A process that dies between 2 and 3 finds its claim at the next run and sends the same event
again (same identifier and value), which Stripe drops as a duplicate; new units wait for
the next claim. So a unit is billed once, never twice and never lost while the usage hash
holds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from importlib.resources import files

import msgspec
import redis.asyncio as redis
from prometheus_client import Counter

from admin.billing_backend import (
    BillingBackend,
    BillingError,
    BillingUnavailable,
    InvalidBillingRequest,
)
from admin.keys import LAPSED_ACCOUNTS, PAID_ACCOUNTS, customer_key, usage_key

log = logging.getLogger("metergate.usage")

# Stripe's limit on a meter event identifier.
_MAX_IDENTIFIER = 100

REPORTED = Counter(
    "metergate_overage_units_reported_total", "Overage units sent to Stripe's Billing Meter."
)
REJECTED = Counter(
    "metergate_overage_units_rejected_total", "Overage units Stripe refused (see the logs)."
)


def _script(name: str) -> str:
    return files("admin").joinpath("lua", name).read_text()


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class UsageReport(msgspec.Struct, frozen=True, kw_only=True):
    """One claim: the units of ``(reported, overage]`` in the period starting ``period_start``."""

    account: str
    customer_id: str
    period_start: int
    period_end: int | None
    reported: int
    overage: int
    timestamp: int  # the meter event's, fixed when claimed: a resend is the same event

    @property
    def claim(self) -> str:
        return f"{self.period_start}:{self.reported}:{self.overage}"

    @property
    def units(self) -> int:
        return self.overage - self.reported

    @property
    def identifier(self) -> str:
        identifier = f"{self.account}:{self.claim}"
        if len(identifier) > _MAX_IDENTIFIER:
            identifier = hashlib.sha256(identifier.encode()).hexdigest()
        return identifier


class UsageReporter:
    def __init__(
        self,
        redis_client: redis.Redis,
        backend: BillingBackend,
        *,
        interval_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis_client
        self._backend = backend
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._claim = redis_client.register_script(_script("claim_usage_report.lua"))
        self._commit = redis_client.register_script(_script("commit_usage_report.lua"))

    async def claim(self, account: str) -> UsageReport | None:
        """Write down (or find) the account's unsent claim; None when nothing is due."""
        customer_id = _text(await self._redis.get(customer_key(account)))
        if not customer_id:
            return None
        reply = await self._claim(keys=[usage_key(account)], args=[int(self._clock())])
        if not reply or int(reply[0]) == 0:
            return None
        claim = _text(reply[1]) or "0:0:0"
        period_start, reported, overage = (int(x) for x in claim.split(":"))
        period_end = _text(reply[2])
        return UsageReport(
            account=account,
            customer_id=customer_id,
            period_start=period_start,
            period_end=int(period_end) if period_end else None,
            reported=reported,
            overage=overage,
            timestamp=int(reply[3]),
        )

    async def send(self, report: UsageReport) -> None:
        await self._backend.report_usage(
            report.customer_id, report.units, report.identifier, report.timestamp
        )

    async def commit(self, report: UsageReport) -> int:
        """1 recorded, 2 the period had rolled over, 0 someone else committed it."""
        result = await self._commit(
            keys=[usage_key(report.account)],
            args=[report.claim, report.period_start, report.overage],
        )
        return int(result)

    async def report_account(self, account: str) -> list[UsageReport]:
        """Send what is due: first a claim left by a crashed run, then the units since."""
        sent: list[UsageReport] = []
        for _ in range(2):
            report = await self.claim(account)
            if report is None:
                break
            try:
                await self.send(report)
            except InvalidBillingRequest as exc:
                # Stripe will never take this one (too old, customer gone): do not block the
                # account's later reports on it, and leave a trace to reconcile by hand.
                log.error("Stripe refused %d overage units of %s: %s", report.units, account, exc)
                REJECTED.inc(report.units)
                await self.commit(report)
                continue
            await self.commit(report)
            REPORTED.inc(report.units)
            sent.append(report)
        return sent

    async def run_once(self) -> list[UsageReport]:
        """One pass over the paid accounts; stops early (claims kept) if Stripe is down."""
        sent: list[UsageReport] = []
        for accounts in (PAID_ACCOUNTS, LAPSED_ACCOUNTS):
            async for raw in self._redis.sscan_iter(accounts):
                account = _text(raw)
                if not account:
                    continue
                try:
                    sent += await self.report_account(account)
                    if accounts == LAPSED_ACCOUNTS and await self.claim(account) is None:
                        # No longer paying and nothing left to bill: done with it.
                        await self._redis.srem(LAPSED_ACCOUNTS, account)
                except BillingUnavailable as exc:
                    log.warning("usage report paused, Stripe unavailable: %s", exc)
                    return sent
                except BillingError as exc:
                    # This account's claim stays for the next pass; the others go on.
                    log.error("usage report of %s failed: %s", account, exc)
        return sent

    async def run_forever(self) -> None:
        """Report every ``interval_seconds`` until cancelled (an admin app background task)."""
        task = asyncio.current_task()
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("usage report failed; retrying next interval")
            if task is not None and task.cancelling():
                # A stop lost on the way: redis-py can swallow a cancellation that lands in
                # its timeouts, or turn it into its own error. Going on would keep this task,
                # and whoever awaits its end, going for ever (seen 1 run in 5 of a test).
                raise asyncio.CancelledError
            await asyncio.sleep(self.interval_seconds)


async def run_reporter(
    redis_client: redis.Redis,
    backend: BillingBackend,
    config: object = None,
    *,
    clock: Callable[[], float] = time.time,
    interval_seconds: float | None = None,
) -> None:
    """The admin app's background task (Stripe mode): report every interval until cancelled.

    The interval is ``interval_seconds``, else the backend's
    ``settings.usage_report_interval_seconds`` (STRIPE_USAGE_REPORT_INTERVAL_SECONDS).
    """
    if interval_seconds is None:
        settings = getattr(backend, "settings", None)
        interval_seconds = float(getattr(settings, "usage_report_interval_seconds", 60.0))
    reporter = UsageReporter(redis_client, backend, interval_seconds=interval_seconds, clock=clock)
    await reporter.run_forever()
