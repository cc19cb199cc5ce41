"""The Redis quota store: one Lua script decides and charges, coalesced per loop iteration.

Charges that arrive in the same event-loop iteration leave in one pipelined write, as one
call of charge.lua carrying all of them (up to _MAX_BATCH a call): Redis runs the script
once for the lot instead of once per request, and each charge is still decided on its
own, in order, atomically. So under load the round trips per request fall well below one
while every decision stays exact. Refunds ride along in the same write. This holds for
``redis://``, ``rediss://`` (TLS) and ``unix://``. Through redis-py (a cluster, RESP3), each
call carries one charge: a cluster call keeps to one slot.

A charge whose caller stopped waiting (Redis answered after the timeout, so the request got
its 503; or the caller was cancelled) is followed up when the reply comes: units Redis
charged after all are refunded. One whose reply never comes (the connection ended) may or
may not have been charged; it is counted and logged with its account, route and units.
Both paths do this: through redis-py the callers get their 503 from a timer while the
call goes on (its client reads past the timeout: app.py), and each cluster node's calls
go in a pipeline of their own, so a node that cannot be reached fails only its own.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import Any, Final, final

import msgspec
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError, ResponseError

from config.model import Config
from gateway import keys, metrics
from gateway.errors import QuotaStoreUnavailable
from gateway.periods import PeriodClock
from gateway.quota import Decision, Reason
from gateway.redis_client import REDIS_ERRORS, OutageLog, RedisClient
from gateway.redis_pipe import LOST, Call, RedisPipe, Script, Waiter, supports, tell
from gateway.resp import bulk, header

# The raw pipeline (gateway.redis_pipe) carries charges and refunds when the client's URL
# allows it (redis://, rediss:// or unix://; RESP2; not a cluster); False sends everything
# through redis-py.
RAW_PIPELINE = True
# Accounts whose encoded charge keys are kept, and routes whose arguments are; past it
# that cache starts over.
_KEY_CACHE_SIZE = 4096
# Batches sent through redis-py at once, and not yet past their callers' timeout (a call
# then reads on for its late reply, its slot given to the next batch). A cluster node's
# pool does not wait for a free connection, it fails; each batch holds at most one
# connection per node, so this stays below the per-node pool (create_client's 64).
_MAX_INFLIGHT = 48
# Charges in one script call at most: a call runs alone in Redis, so a burst of thousands
# is cut into calls that each hold it well under a millisecond or two.
_MAX_BATCH = 128

log = logging.getLogger(__name__)


def _script(name: str) -> tuple[bytes, str]:
    body = resources.files("gateway").joinpath("lua", name).read_bytes()
    return body, hashlib.sha1(body).hexdigest()


def _evalsha(sha: str, numkeys: int, nargs: int) -> bytes:
    return header(3 + numkeys + nargs) + bulk("EVALSHA") + bulk(sha) + bulk(numkeys)


def through_redis_py(client: RedisClient) -> bool:
    """Whether charges on this client go through redis-py rather than the raw pipeline (a
    cluster, RESP3, or RAW_PIPELINE off). Its client then has to read on past the timeout
    (create_client's read_timeout), or late replies are lost to the follow-up."""
    return not (RAW_PIPELINE and supports(client))


def tier_table(config: Config) -> str:
    """The tier rules as charge.lua reads them: name,included,overage,cap,interval_us,burst;..."""
    rows = []
    for name, tier in config.tiers.items():
        cap = -1 if tier.max_overage_units is None else tier.max_overage_units
        # Microseconds: whole milliseconds would round 3000/s down to 0 (no limit at all)
        # and 1500/s to 1000/s.
        rps = tier.requests_per_second
        interval = max(1, round(1_000_000 / rps)) if rps else 0
        rows.append(
            f"{name},{tier.included_units},{int(tier.allows_overage)},{cap},{interval},{tier.burst}"
        )
    return ";".join(rows)


class _Call:
    """A script call through redis-py. ``late``, when set, is told the reply of a call
    whose caller stopped waiting (timed out, or cancelled), or LOST when none came."""

    __slots__ = ("args", "future", "late", "sha", "source")

    def __init__(
        self,
        sha: str,
        source: bytes,
        args: Sequence[Any],
        future: asyncio.Future[Any],
        late: Callable[[Any], None] | None = None,
    ) -> None:
        self.sha, self.source, self.args, self.future = sha, source, args, future
        self.late = late

    def waited(self) -> bool:
        """Whether its caller still waits for it."""
        return not self.future.done()


@final
class _Charge:
    """A charge waiting for the next batch: the account, the route, its cost and encoded
    arguments, and what its decision settles (a future, or a waiter that acts on it at once:
    RedisQuotaStore.charge_to). A native class, not a tuple: the compiled module would unbox
    a typed tuple on every read from a list and box it again on every append."""

    __slots__ = ("account", "cost", "future", "route", "route_args")

    def __init__(
        self,
        account: str,
        route: str,
        cost: int,
        route_args: bytes,
        future: Waiter,
    ) -> None:
        self.account, self.route, self.cost = account, route, cost
        self.route_args, self.future = route_args, future


class RedisQuotaStore:
    def __init__(
        self,
        client: RedisClient,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._redis = client
        self._clock = clock
        self._tiers = tier_table(config)
        # The tier table's rows, as replies name them: each one's name and included units.
        self._tier_names = tuple(config.tiers)
        self._included = tuple(tier.included_units for tier in config.tiers.values())
        self._daily_ttl = config.billing.daily_usage_ttl_seconds
        self._grace = config.billing.past_due_grace_seconds
        self._timeout = config.metering.redis_timeout_seconds
        self._coalesce = config.metering.coalesce
        self._periods = PeriodClock()
        self._charge_src, self._charge_sha = _script("charge.lua")
        self._refund_src, self._refund_sha = _script("refund.lua")
        self._pending: list[_Call] = []
        self._on_batch = on_batch
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(_MAX_INFLIGHT)
        self._loop: asyncio.AbstractEventLoop | None = None
        # The next write, in the order the calls came: the charges that came since the
        # last refund are still open to more (self._charges); a refund closes them, so
        # they go to Redis before it, as they came.
        self._charges: list[_Charge] = []
        self._queued: list[list[_Charge] | Call] = []
        # The constant parts of a charge call, encoded once: an account's keys per day, a
        # route's arguments per route, the month's per month.
        self._charge_script = Script(self._charge_src, self._charge_sha)
        self._refund_script = Script(self._refund_src, self._refund_sha)
        self._pipe = (
            RedisPipe(
                client, timeout=self._timeout, scripts=(self._charge_script, self._refund_script)
            )
            if RAW_PIPELINE and supports(client)
            else None
        )
        self._refund_head = _evalsha(self._refund_sha, 2, 5)
        self._charge_head = bulk("EVALSHA") + bulk(self._charge_sha)
        self._month: tuple[tuple[int, int], bytes] = ((0, 0), b"")
        self._settings = bulk(self._daily_ttl) + bulk(self._grace)
        # Route name -> (cost, allowed tiers, their encoding): by name, as a string's hash is
        # kept where a tuple key is built and hashed anew on every charge.
        self._routes: dict[str, tuple[int, str, bytes]] = {}
        self._accounts: dict[str, tuple[str, bytes]] = {}
        self._late_refunds: set[asyncio.Task[None]] = set()
        self._outage = OutageLog()  # through redis-py; the pipe keeps its own

    def charge(
        self, account: str, route: str, cost: int, allowed_tiers: str = ""
    ) -> Awaitable[Decision]:
        """Atomically decide and charge ``cost`` units; raises QuotaStoreUnavailable.

        An awaitable rather than a coroutine: on the hot path it is the future the batch
        settles, awaited without a coroutine frame around it."""
        if self._pipe is None:
            return self._charge_one(account, route, cost, allowed_tiers)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # Settled with its Decision by its _Batch when the batch's reply comes.
        future: asyncio.Future[Decision] = loop.create_future()
        self._enqueue(future, account, route, cost, allowed_tiers)
        return future

    @property
    def takes_waiters(self) -> bool:
        """Whether charge_to() can take a charge (not through redis-py)."""
        return self._pipe is not None

    def charge_to(
        self, waiter: Waiter, account: str, route: str, cost: int, allowed_tiers: str = ""
    ) -> bool:
        """The same charge, its decision (or QuotaStoreUnavailable) handed to ``waiter`` as
        the reply is read, with no future to await: the proxy's fast path (Proxy.admit).
        A waiter that is ``done()`` before then counts as a caller gone away. False, and
        nothing sent, where charges go through redis-py, which only settles futures."""
        if self._pipe is None:
            return False
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._enqueue(waiter, account, route, cost, allowed_tiers)
        return True

    def _enqueue(
        self, waiter: Waiter, account: str, route: str, cost: int, allowed_tiers: str
    ) -> None:
        """Queue a charge for this loop iteration's write (or write it now, not coalescing)."""
        loop = self._loop
        assert loop is not None
        known = self._routes.get(route)
        if known is not None and known[0] == cost and known[1] == allowed_tiers:
            route_args = known[2]
        else:
            route_args = self._route_args(route, cost, allowed_tiers)
        charge = _Charge(account, route, cost, route_args, waiter)
        if not self._coalesce:
            self._write([[charge]])
        else:
            if not self._charges and not self._queued:
                loop.call_soon(self._flush_pipe)
            self._charges.append(charge)

    def _route_args(self, route: str, cost: int, allowed_tiers: str) -> bytes:
        """A charge's own arguments (cost, route, allowed tiers), encoded and kept for the
        route (charge() looks there first)."""
        if len(self._routes) >= _KEY_CACHE_SIZE:
            self._routes.clear()
        args = bulk(cost) + bulk(route) + bulk(allowed_tiers)
        self._routes[route] = (cost, allowed_tiers, args)
        return args

    async def _charge_one(
        self, account: str, route: str, cost: int, allowed_tiers: str
    ) -> Decision:
        """Through redis-py (a cluster, RESP3): one charge per script call."""
        try:
            account.encode()
        except UnicodeEncodeError as exc:  # fails here, not the batch it would join
            raise QuotaStoreUnavailable(f"account not encodable: {exc}") from None
        now = self._clock()
        (month_start, month_end), day = self._periods.month_and_day(now)
        args = (
            keys.CHARGE_KEYS,
            *keys.account_keys(account, day),
            int(now * 1000),
            self._tiers,
            month_start,
            month_end,
            self._daily_ttl,
            self._grace,
            cost,
            route,
            allowed_tiers,
        )
        late = functools.partial(self._late, [(account, route, cost)], day)
        replies = await self._call(self._charge_sha, self._charge_src, args, late)
        try:
            decision = self._read(replies, [cost], day)[0]
        except QuotaStoreUnavailable:
            # The script ran (it answered), so the charge may have been applied.
            self._unknown([(account, route, cost)], unreadable=True)
            raise
        if isinstance(decision, QuotaStoreUnavailable):
            raise decision
        return decision

    def _read(
        self, replies: Any, costs: list[int], day: str
    ) -> list[Decision | QuotaStoreUnavailable]:
        """Each charge's decision, or its own error, from a script call's reply; raises
        QuotaStoreUnavailable for a reply of another shape (as from another script)."""
        return _read_reply(replies, costs, day, self._tier_names, self._included)

    def _charge_call(self, charges: list[_Charge], now: float) -> tuple[bytes, str, list[_Charge]]:
        """One EVALSHA of charge.lua carrying ``charges``, the day their units count on, and
        the charges it carries: one whose keys cannot be encoded fails alone, here."""
        month, day = self._periods.month_and_day(now)
        if self._month[0] != month:
            self._month = (month, bulk(self._tiers) + bulk(month[0]) + bulk(month[1]))
        accounts = self._accounts
        carried: list[_Charge] = []
        key_parts: list[bytes] = []
        for charge in charges:
            if charge.future.done():  # its caller went away before the write: not charged
                continue
            account = charge.account
            account_keys = accounts.get(account)
            if account_keys is None or account_keys[0] != day:
                try:
                    encoded = b"".join([bulk(k) for k in keys.account_keys(account, day)])
                except UnicodeEncodeError as exc:
                    error = QuotaStoreUnavailable(f"account not encodable: {exc}")
                    charge.future.set_exception(error)
                    continue
                if len(accounts) >= _KEY_CACHE_SIZE:
                    accounts.clear()
                account_keys = accounts[account] = (day, encoded)
            key_parts.append(account_keys[1])
            carried.append(charge)
        n = len(carried)
        nkeys = keys.CHARGE_KEYS * n
        head = header(3 + nkeys + 6 + 3 * n) + self._charge_head + bulk(nkeys)
        shared = bulk(int(now * 1000)) + self._month[1] + self._settings
        payload = b"".join([head, *key_parts, shared, *[c.route_args for c in carried]])
        return payload, day, carried

    def _flush_pipe(self) -> None:
        segments, self._queued = self._queued, []
        if self._charges:
            segments.append(self._charges)
            self._charges = []
        self._write(segments)

    def _write(self, segments: list[list[_Charge] | Call]) -> None:
        """Charges and refunds of one loop iteration, in the order they came, in one write;
        each run of charges as one script call per _MAX_BATCH of them, so a burst does not
        hold Redis for long. Whatever fails here fails its calls: none is left waiting."""
        assert self._pipe is not None and self._loop is not None
        calls: list[Call] = []
        count = 0
        try:
            now = self._clock()
            for segment in segments:
                if isinstance(segment, Call):
                    calls.append(segment)
                    count += 1
                    continue
                for at in range(0, len(segment), _MAX_BATCH):
                    payload, day, batch = self._charge_call(segment[at : at + _MAX_BATCH], now)
                    if batch:
                        waiter = _Batch(self, batch, day)
                        calls.append(Call(waiter, payload, self._charge_script, waiter.late))
                        count += len(batch)
        except Exception as exc:
            log.error("encoding a Redis batch failed: %r", exc, exc_info=exc)
            _fail_all(segments, QuotaStoreUnavailable(f"redis batch failed: {exc!r}"))
            return
        if not calls:
            return
        self._pipe.send(calls)
        if self._on_batch is not None:
            self._on_batch(count)

    def _late(self, charges: list[tuple[str, str, int]], day: str, replies: Any) -> None:
        """A script call (account, route and cost of each charge it carried) answered after
        its callers had their 503 or went away, or never (LOST). The raw pipeline's and
        redis-py's alike."""
        if replies is not LOST and isinstance(replies, Exception):
            # Redis's error for the whole call (NOSCRIPT too): the script did not run.
            metrics.ABANDONED.labels("not_charged").inc(len(charges))
            return
        try:
            decisions = self._read(replies, [cost for _, _, cost in charges], day)
        except QuotaStoreUnavailable:  # LOST, or a reply that cannot be read
            self._unknown(charges, unreadable=replies is not LOST)
            return
        for (account, route, cost), decision in zip(charges, decisions, strict=True):
            self._follow_up(account, route, cost, decision)

    def _unknown(self, charges: list[tuple[str, str, int]], *, unreadable: bool = False) -> None:
        """Charges applied, or not: their connection ended before their replies, or Redis
        answered what cannot be read (another script's shape)."""
        # One line per script call, not per charge: a Redis that hangs can leave a whole
        # connection's worth of calls unanswered at once.
        units: Counter[tuple[str, str]] = Counter()
        for account, route, cost in charges:
            units[(account, route)] += cost
        metrics.ABANDONED.labels("unknown").inc(len(charges))
        log.warning(
            "%s %d charges; they may have been applied (units by account and route): %s",
            "an unreadable reply from Redis to" if unreadable else "no reply from Redis to",
            len(charges),
            _json([[account, route, n] for (account, route), n in units.items()]).decode(),
        )

    def _follow_up(
        self,
        account: str,
        route: str,
        cost: int,
        decision: Decision | QuotaStoreUnavailable | None,
    ) -> None:
        """A decision nobody acts on: units it charged are given back. An error (the charge
        failed in Redis) or None (the call did not run) charged nothing."""
        if not isinstance(decision, Decision) or not decision.allowed or not cost:
            metrics.ABANDONED.labels("not_charged").inc()
            return
        task = asyncio.ensure_future(self._refund_abandoned(account, route, cost, decision))
        self._late_refunds.add(task)
        task.add_done_callback(self._late_refunds.discard)

    async def _refund_abandoned(
        self, account: str, route: str, cost: int, decision: Decision
    ) -> None:
        try:
            units = await self.refund(account, route, cost, decision)
        except QuotaStoreUnavailable as exc:
            metrics.ABANDONED.labels("refund_failed").inc()
            metrics.REDIS_ERRORS.labels("refund").inc()
            log.error(
                "refund of %s units to %s on %s (charged after its request was refused) failed: %s",
                cost,
                account,
                route,
                exc,
            )
        else:
            metrics.ABANDONED.labels("refunded").inc()
            metrics.REFUNDS.labels(route).inc(units)

    async def refund(self, account: str, route: str, cost: int, decision: Decision) -> int:
        if self._pipe is not None:
            payload = self._refund_head + b"".join(
                [
                    bulk(keys.usage_key(account)),
                    bulk(keys.daily_key(account, decision.day)),
                    bulk(decision.period_start),
                    bulk(cost),
                    bulk(decision.overage),
                    bulk(route),
                    bulk(decision.included),
                ]
            )
            return int(await self._pipe_call(payload, self._refund_script))
        args = (
            2,
            keys.usage_key(account),
            keys.daily_key(account, decision.day),
            decision.period_start,
            cost,
            decision.overage,
            route,
            decision.included,
        )
        return int(await self._call(self._refund_sha, self._refund_src, args))

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.ping())
        except REDIS_ERRORS:
            return False

    def _pipe_call(self, payload: bytes, script: Script) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        call = Call(future, payload, script)
        if self._coalesce:
            if not self._charges and not self._queued:
                loop.call_soon(self._flush_pipe)
            if self._charges:
                self._queued.append(self._charges)
                self._charges = []
            self._queued.append(call)
        else:
            self._write([call])
        return future

    async def _call(
        self,
        sha: str,
        source: bytes,
        args: Sequence[Any],
        late: Callable[[Any], None] | None = None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        call = _Call(sha, source, args, future, late)
        if self._coalesce:
            if not self._pending:
                loop.call_soon(self._flush)
            self._pending.append(call)
        else:
            self._start([call])
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._start(batch)

    def _start(self, batch: list[_Call]) -> None:
        task = asyncio.create_task(self._send(batch))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send(self, batch: list[_Call]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        # The callers get their 503 when the timeout passes, but a call already sent is not
        # cut off: it runs on until its reply (the client reads LATE_REPLY_WINDOW longer,
        # app.py), so a charge Redis applied late is known and refunded, as on the pipe.
        # Its slot is freed at that moment too: a connection that hangs must not hold up
        # the next batches (they take another, or fail at once when there is none).
        loop = asyncio.get_running_loop()
        deadline_at = loop.time() + self._timeout  # the callers' 503, slot wait included
        slots = self._slots
        try:
            async with asyncio.timeout_at(deadline_at):
                await slots.acquire()
        except TimeoutError:
            _time_out(batch)
            return
        held = True

        def deadline() -> None:
            nonlocal held
            _time_out(batch)
            if held:
                held = False
                slots.release()

        timer = loop.call_at(deadline_at, deadline)
        try:
            # A caller that stopped waiting for a slot (its 503, or gone) is not sent.
            batch = [c for c in batch if not c.future.done()]
            if not batch:
                return
            if isinstance(self._redis, RedisCluster):
                # Learn the slot map first (a no-op once known): before it, redis-py sends
                # a script to any node and each MOVED costs a round trip.
                await self._redis.initialize()
            results = await self._execute(batch)
            retry = [c for c, r in zip(batch, results, strict=True) if _noscript(r) and c.waited()]
            reload_failed: Exception | None = None
            # Settle what ran before reloading: those charges are applied, so a failure of
            # the reload must not turn them into 503s the customer still pays for. A
            # NOSCRIPT whose caller is gone did not run: its late hook is told so.
            retried = {id(c) for c in retry}
            _settle([(c, r) for c, r in zip(batch, results, strict=True) if id(c) not in retried])
            if retry:
                # Not executed (the script cache was flushed, or a new server): load the
                # scripts and run exactly those calls again, those still waited for.
                loaded, reload_failed = await self._reload(retry, deadline_at)
                again = [c for c in loaded if c.waited()]
                rerun = {id(c) for c in again}
                _settle([(c, NOT_RUN) for c in retry if id(c) not in rerun])
                if again:
                    results = [*results, *await self._execute(again)]
                    _settle(list(zip(again, results[len(batch) :], strict=True)))
            trouble = next((r for r in results if r is LOST or r is NOT_SENT), reload_failed)
            if trouble is not None:  # a node, or a connection, failed: logged once
                self._outage.failed(trouble)
            else:
                self._outage.ok()
        except Exception as exc:
            # Raised before anything was sent (_execute gives a call sent and not answered
            # as LOST): the waiting calls fail; one left unsettled would hold its request
            # forever. Only the expected kinds go unlogged.
            if isinstance(exc, REDIS_ERRORS):
                self._outage.failed(exc)
            else:
                log.error("redis client failed: %r", exc, exc_info=exc)
            _fail(batch, QuotaStoreUnavailable(f"redis unavailable: {exc.__class__.__name__}"))
        finally:
            _time_out(batch)  # none left waiting, whatever happened (no-op when settled)
            timer.cancel()
            if held:
                held = False
                slots.release()

    async def _reload(
        self, calls: list[_Call], deadline_at: float
    ) -> tuple[list[_Call], Exception | None]:
        """Load the scripts ``calls`` met NOSCRIPT for: the calls whose server has them
        now, and a failure to load them. Raises when a single server fails it.

        On a cluster every primary is asked (a call may have met NOSCRIPT on the node an
        ASK sent it to, which the slot map does not name), but each on its own and all at
        once, each for no longer than the callers wait: redis-py's script_load raises if
        one primary fails, so one node down would fail the calls of the nodes that are up.
        A call whose node failed its load did not run, and fails alone."""
        client = self._redis
        if not isinstance(client, RedisCluster):
            for source in {c.source for c in calls}:
                await client.script_load(source)
            return calls, None
        sources = {c.source for c in calls}
        nodes = client.get_primaries()
        outcomes = await asyncio.gather(
            *(_load_on(client, node, sources, deadline_at) for node in nodes),
            return_exceptions=True,
        )
        failed: Exception | None = None
        down: set[str] = set()
        for primary, outcome in zip(nodes, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancelled
                failed = outcome
                down.add(primary.name)
        loaded: list[_Call] = []
        for call in calls:
            owner = _node_of(client, call)
            if isinstance(owner, Exception):  # the call is not run
                failed = owner
            elif owner.name not in down:
                loaded.append(call)
        return loaded, failed

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        """Each call's reply, Redis's error reply, or LOST for a call sent whose reply never
        came (it may have run). Raises only when nothing was sent."""
        commands = [("EVALSHA", call.sha, *call.args) for call in batch]
        client = self._redis
        if not isinstance(client, RedisCluster):
            return await _pipelined(client.connection_pool, commands)
        # One pipeline per node, so that one node refusing its connection fails its own
        # calls as unsent, not the calls other nodes ran (redis-py's own pipeline raises
        # the first node's error for all). Every key of a call shares the account's hash
        # tag: its first says the node. The pipeline follows MOVED/ASK, re-sends nothing.
        # Each command is pinned to the node it was grouped under, so that a pipeline
        # never spans two nodes even if the slot map changes meanwhile.
        results: list[Any] = [None] * len(batch)
        unsent: BaseException | None = None
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for index, call in enumerate(batch):
            node = _node_of(client, call)
            if isinstance(node, Exception):  # this call is not sent
                unsent, results[index] = node, NOT_SENT
                continue
            groups.setdefault(node.name, (node, []))[1].append(index)
        parts = [part for _, part in groups.values()]
        outcomes = await asyncio.gather(
            *(
                _cluster_pipelined(client, node, [commands[i] for i in part])
                for node, part in groups.values()
            ),
            return_exceptions=True,
        )
        for part, outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancelled
                if len(parts) == 1 and unsent is None:
                    raise outcome  # nothing sent
                unsent = outcome
                outcome = [NOT_SENT] * len(part)
            for i, result in zip(part, outcome, strict=True):
                results[i] = result
        if unsent is not None and all(r is NOT_SENT for r in results):
            raise unsent
        return results

    async def aclose(self) -> None:
        # Every reply in, late ones too, and the refunds they owe applied: a reply may owe
        # a refund, and a refund is one more call to wait for.
        while True:
            if self._pending:
                self._flush()
            if self._charges or self._queued:
                self._flush_pipe()
            waits = [*self._inflight, *self._late_refunds]
            if waits:
                await asyncio.wait(waits)
                continue
            if self._pipe is not None:
                await self._pipe.settled()
            if not (self._pending or self._inflight or self._late_refunds):
                break
        if self._pipe is not None:
            await self._pipe.aclose()


_REASONS: Final = tuple(Reason)  # indexed by the script's reason code
assert all(reason == code for code, reason in enumerate(_REASONS))


def _read_reply(
    replies: Any,
    costs: list[int],
    day: str,
    tiers: tuple[str, ...],
    included: tuple[int, ...],
) -> list[Decision | QuotaStoreUnavailable]:
    """The decisions of charges costing ``costs``, from charge.lua's flat reply: per charge
    code (reason + 8 x tier row), used, reset_s, period_start, a rate-limited refusal adding
    retry_ms; or one error for that charge alone. ``tiers`` and ``included`` are the tier
    table's rows (names and included units). Another shape raises QuotaStoreUnavailable,
    for the whole call: past a misread entry, none of the others can be trusted."""
    if not isinstance(replies, list):
        raise QuotaStoreUnavailable(f"redis answered {len(costs)} charges with {replies!r:.200}")
    # Typed, not Any: the compiled module indexes and converts directly.
    entries: list[Any] = replies
    decisions: list[Decision | QuotaStoreUnavailable] = []
    at = 0
    try:
        for cost in costs:
            head = entries[at]
            if type(head) is not int:
                if not isinstance(head, Exception):
                    raise TypeError(f"entry {at} is {head!r:.50}")
                decisions.append(QuotaStoreUnavailable(f"redis error: {head}"))
                at += 1
                continue
            code: int = head
            reason, row = code & 7, code >> 3
            if reason >= len(_REASONS) or row >= len(tiers) or code < 0:
                raise ValueError(f"entry {at} names no reason or tier: {code}")
            # Typed: compiled, these assignments check the type; from source, the test does.
            used: int = entries[at + 1]
            reset: int = entries[at + 2]
            period_start: int = entries[at + 3]
            if type(used) is not int or type(reset) is not int or type(period_start) is not int:
                raise TypeError(f"entry {at} has a field that is not an integer")
            retry_ms = 0
            if reason == 3:
                retry_ms = entries[at + 4]
                if type(retry_ms) is not int:
                    raise TypeError(f"entry {at} has a retry time that is not an integer")
                at += 5
            else:
                at += 4
            units = included[row]
            overage = 0
            if reason == 0:  # the units of this charge beyond the included ones
                beyond = used - units
                overage = cost if beyond > cost else beyond if beyond > 0 else 0
            decisions.append(
                Decision(
                    reason == 0,
                    _REASONS[reason],
                    used,
                    units,
                    reset,
                    tiers[row],
                    period_start,
                    overage,
                    retry_ms,
                    day,
                )
            )
        if at != len(entries):
            raise ValueError(f"{len(entries) - at} entries more than {len(costs)} charges")
    except (TypeError, ValueError, IndexError) as exc:
        message = f"redis answered {len(costs)} charges with {replies!r:.200}: {exc}"
        raise QuotaStoreUnavailable(message) from None
    return decisions


@final
class _Batch:
    """The charges of one script call, handed each its decision as the call's reply is read
    (a redis_pipe.Waiter): no future of its own, and no loop pass between the reply and
    the requests it lets through."""

    __slots__ = ("charges", "day", "settled", "store")

    def __init__(self, store: RedisQuotaStore, charges: list[_Charge], day: str) -> None:
        self.store, self.charges, self.day = store, charges, day
        self.settled = False

    def done(self) -> bool:
        return self.settled

    def set_exception(self, exception: BaseException, /) -> None:
        """The call failed (the pipe fails calls with QuotaStoreUnavailable)."""
        self.settled = True
        for charge in self.charges:
            if not charge.future.done():  # done: the caller went away
                charge.future.set_exception(exception)

    def set_result(self, result: Any, /) -> None:
        """Hand each charge its own decision, or its own error; the reply of a charge whose
        caller went away is followed up."""
        charges = self.charges
        try:
            decisions = self.store._read(result, [c.cost for c in charges], self.day)
        except QuotaStoreUnavailable as exc:
            self.set_exception(exc)
            # The script ran (it answered), so its charges may have been applied.
            self.store._unknown([(c.account, c.route, c.cost) for c in charges], unreadable=True)
            return
        self.settled = True
        for index in range(len(charges)):  # indexed, not zipped: no iterator objects
            charge, decision = charges[index], decisions[index]
            future = charge.future
            if future.done():  # cancelled: the request will not be forwarded
                try:
                    self.store._follow_up(charge.account, charge.route, charge.cost, decision)
                except Exception:  # logged; the batch's other charges are settled all the same
                    log.exception("following up a charge whose caller went away failed")
            elif type(decision) is Decision:
                future.set_result(decision)
            else:
                future.set_exception(decision)

    def late(self, replies: Any) -> None:
        self.store._late([(c.account, c.route, c.cost) for c in self.charges], self.day, replies)


_json = msgspec.json.Encoder().encode


def _fail_all(segments: Iterable[list[_Charge] | Call], error: QuotaStoreUnavailable) -> None:
    for segment in segments:
        futures = [segment.future] if isinstance(segment, Call) else [c.future for c in segment]
        for future in futures:
            if future is not None and not future.done():
                future.set_exception(error)


def _settle(outcomes: Iterable[tuple[_Call, Any]]) -> None:
    for call, result in outcomes:
        if call.future.done():  # the caller timed out or went away: a late reply
            if call.late is not None:
                tell(call.late, result)
            continue
        if result is LOST:  # sent, and its connection failed: its 503, and perhaps charged
            call.future.set_exception(QuotaStoreUnavailable(f"redis unavailable: {result}"))
            if call.late is not None:
                tell(call.late, result)
            continue
        if result is NOT_SENT or result is NOT_RUN:
            call.future.set_exception(QuotaStoreUnavailable(str(result)))
            continue
        if isinstance(result, Exception):
            call.future.set_exception(QuotaStoreUnavailable(f"redis error: {result}"))
        else:
            call.future.set_result(result)


def _fail(calls: Iterable[_Call], error: QuotaStoreUnavailable) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(error)


def _time_out(calls: Iterable[_Call]) -> None:
    _fail(calls, QuotaStoreUnavailable("redis unavailable: TimeoutError"))


# Told to a late hook whose call was not run (it met NOSCRIPT, and nobody waits any more).
NOT_RUN = QuotaStoreUnavailable("redis did not run the script (NOSCRIPT)")
# A call of a batch whose node could not be reached: never sent.
NOT_SENT = QuotaStoreUnavailable("redis unavailable: no connection to the node")


def _node_of(cluster: RedisCluster, call: _Call) -> ClusterNode | Exception:
    """The node serving a call's keys (all share the account's hash tag: the first says
    it), or why none does (a slot no node serves)."""
    try:
        node = cluster.get_node_from_key(call.args[1])
    except Exception as exc:
        return exc
    return node if node is not None else ConnectionError("no node for the key")


async def _load_on(
    cluster: RedisCluster, node: ClusterNode, sources: set[bytes], deadline_at: float
) -> None:
    """The scripts loaded on one node, by ``deadline_at`` (loop time) or TimeoutError."""
    async with asyncio.timeout_at(deadline_at):
        for source in sources:
            await cluster.execute_command("SCRIPT LOAD", source, target_nodes=node)


async def _cluster_pipelined(
    cluster: RedisCluster, node: ClusterNode, commands: list[tuple[Any, ...]]
) -> list[Any]:
    """Calls of one node in one cluster pipeline: as _pipelined (a failure to connect
    raises, as nothing was sent; a call its connection failed is LOST)."""
    pipe = cluster.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command, target_nodes=node)
    try:
        results = list(await pipe.execute(raise_on_error=False))
    except Exception as exc:
        if _before_sending(exc):
            raise
        return [LOST] * len(commands)
    # A call failed by its connection (not by Redis's answer) was sent.
    return [r if not isinstance(r, Exception) or _answered(r) else LOST for r in results]


async def _pipelined(pool: ConnectionPool, commands: list[tuple[Any, ...]]) -> list[Any]:
    """The commands in one write on a connection of redis-py's pool, their replies read in
    order: Redis's error replies are results; once the connection fails, the rest are LOST
    (sent, perhaps run). Raises only while taking the connection: nothing was sent."""
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    packed: list[bytes] = []
    failed: BaseException | None = None
    try:
        packed = conn.pack_commands(commands)
    except BaseException as exc:  # nothing sent; handled below (compiled: no await here)
        failed = exc
    if failed is not None:
        await pool.release(conn)
        raise failed
    results: list[Any] = []
    try:
        await conn.send_packed_command(packed)
        for _ in commands:
            try:
                results.append(await conn.read_response())
            except ResponseError as exc:
                results.append(exc)
    except BaseException as exc:  # handled below: compiled code must not suspend in one
        failed = exc
    if failed is not None:  # replies may still be on the way: the connection is dropped
        await conn.disconnect(nowait=True)
    await pool.release(conn)
    if failed is not None and not isinstance(failed, Exception):
        raise failed  # cancelled
    return results + [LOST] * (len(commands) - len(results))


def _answered(error: Exception) -> bool:
    """Whether an error is Redis's own reply (the call did not run, or failed in Redis),
    not a connection's failure to bring one."""
    return isinstance(error, ResponseError)


def _before_sending(error: Exception) -> bool:
    """Whether redis-py failed to get a connection, so it sent nothing: no free one, or
    none could be made ("Error 111 connecting to ...", "Timeout connecting to server")."""
    return isinstance(error, MaxConnectionsError) or "connecting to" in str(error)


def _noscript(result: object) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, RedisError) and str(result).startswith("NOSCRIPT")
    )
