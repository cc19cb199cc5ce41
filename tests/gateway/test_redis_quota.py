"""The quota store's batches: one charge.lua call carries many charges, each on its own.

Every test runs twice: over plain TCP, and over TLS (``rediss://``) to a server of the
suite's own, whose data the test checks through its plain port."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import hiredis
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import keys, redis_quota
from gateway.embedded_redis import EmbeddedRedis
from gateway.errors import QuotaStoreUnavailable
from gateway.periods import calendar_month
from gateway.quota import Decision, Reason
from gateway.redis_client import create_redis
from gateway.redis_pipe import Script
from gateway.redis_quota import RedisQuotaStore
from gateway.resp import bulk
from tests.conftest import TEST_DB, Clock, hold_redis, load_test_config, replace_section

StoreFactory = Callable[..., RedisQuotaStore]


@pytest.fixture(params=["tcp", "tls"])
def urls(request: pytest.FixtureRequest, redis_url: str) -> tuple[str, str]:
    """Where the store connects, and where the test looks at the data."""
    if request.param == "tcp":
        return redis_url, redis_url
    server: EmbeddedRedis = request.getfixturevalue("tls_redis")
    return server.tls_url(TEST_DB), f"redis://127.0.0.1:{server.port}/{TEST_DB}"


@pytest.fixture
async def redis_client(urls: tuple[str, str]) -> AsyncIterator[redis.Redis]:
    """The test's view of the store's database (conftest's, on the server in use)."""
    client = redis.Redis.from_url(urls[1])
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def make_store(
    urls: tuple[str, str], redis_client: redis.Redis, clock: Clock
) -> AsyncIterator[StoreFactory]:
    """Stores on their own clients, as the gateway has them, on a database redis_client
    has emptied; closed after the test."""
    made: list[tuple[RedisQuotaStore, redis.Redis]] = []

    def make(timeout: float | None = None, **kwargs: Any) -> RedisQuotaStore:
        client = create_redis(urls[0], timeout=2.0)
        config = load_test_config("http://127.0.0.1:9")
        if timeout is not None:
            config = replace_section(config, metering={"redis_timeout_seconds": timeout})
        store = RedisQuotaStore(client, config, clock=clock, **kwargs)
        made.append((store, client))
        return store

    yield make
    for store, client in made:
        await store.aclose()
        await client.aclose()


# Holds Redis for ARGV[1] microseconds: no other client is served meanwhile, as when a slow
# command or a stalled disk holds a real one.
async def _closed(store: RedisQuotaStore) -> None:
    """The store closed: every reply in, late ones too, and the refunds they owe."""
    async with asyncio.timeout(5):
        await store.aclose()


def _abandoned(outcome: str) -> float:
    value = REGISTRY.get_sample_value("metergate_abandoned_charges_total", {"outcome": outcome})
    return value or 0.0


async def _evalsha_calls(client: redis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture(params=[True, False], ids=["raw-pipeline", "redis-py"])
def either_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores made in the test send through the raw pipeline, or through redis-py (as on a
    cluster)."""
    monkeypatch.setattr(redis_quota, "RAW_PIPELINE", request.param)


@pytest.fixture
def one_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores made in the test send through redis-py, one batch in flight at a time."""
    monkeypatch.setattr(redis_quota, "RAW_PIPELINE", False)
    monkeypatch.setattr(redis_quota, "_MAX_INFLIGHT", 1)


@pytest.mark.usefixtures("either_path")
async def test_a_charge_that_fails_in_redis_fails_alone(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    # Not a hash: the script's HMGET of this usage key fails (WRONGTYPE) mid-batch.
    await redis_client.set(keys.usage_key("acct-broken"), "not a hash")
    store = make_store()
    before, broken, after = await asyncio.gather(
        store.charge("acct-before", "/signals", 1),
        store.charge("acct-broken", "/signals", 1),
        store.charge("acct-after", "/signals", 1),
        return_exceptions=True,
    )
    assert isinstance(broken, QuotaStoreUnavailable) and "WRONGTYPE" in str(broken)
    assert not isinstance(before, BaseException) and before.allowed and before.used == 1
    assert not isinstance(after, BaseException) and after.allowed and after.used == 1
    for account in ("acct-before", "acct-after"):
        assert await redis_client.hget(keys.usage_key(account), "used") == b"1"
    assert await redis_client.get(keys.usage_key("acct-broken")) == b"not a hash"
    assert await redis_client.exists(keys.daily_key("acct-broken", "2026-09-21")) == 0


@pytest.mark.usefixtures("either_path")
async def test_a_reply_of_another_shape_fails_its_charge_as_unavailable(
    make_store: StoreFactory,
) -> None:
    """A 503 (or fail-open), never a 500: as from a script of another version."""
    store = make_store()
    source = b"local r = {} for i = 1, #KEYS / 3 do r[i] = {0, 1} end return r"
    sha = hashlib.sha1(source).hexdigest()
    store._charge_src, store._charge_sha = source, sha
    store._charge_script = Script(source, sha)
    store._charge_head = bulk("EVALSHA") + bulk(sha)
    unknown = _abandoned("unknown")
    with pytest.raises(QuotaStoreUnavailable, match="redis answered"):
        await store.charge("acct-shape", "/signals", 1)
    # The script ran: what it did cannot be told, so the charge is reported as perhaps made.
    assert _abandoned("unknown") == unknown + 1


async def test_a_burst_is_one_write_of_several_script_calls_decided_in_order(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    writes: list[int] = []
    store = make_store(on_batch=writes.append)
    burst = 2 * redis_quota._MAX_BATCH + 44
    calls_before = await _evalsha_calls(redis_client)
    decisions = await asyncio.gather(
        *(store.charge("acct-burst", "/signals", 1) for _ in range(burst))
    )
    assert writes == [burst]
    assert await _evalsha_calls(redis_client) - calls_before == 3
    # The free tier's 100 units go to the first 100 charges, as if they had come one by one.
    included = load_test_config("http://127.0.0.1:9").tiers["free"].included_units
    assert [d.allowed for d in decisions] == [True] * included + [False] * (burst - included)
    assert [d.used for d in decisions[:included]] == list(range(1, included + 1))
    assert await redis_client.hget(keys.usage_key("acct-burst"), "used") == str(included).encode()


@pytest.mark.usefixtures("either_path")
async def test_an_account_that_cannot_be_encoded_fails_alone_and_nothing_waits_forever(
    make_store: StoreFactory,
) -> None:
    # The verifier refuses such a sub; the store must not strand a batch on one anyway.
    store = make_store()
    async with asyncio.timeout(5):
        first, bad, last = await asyncio.gather(
            store.charge("acct-enc-1", "/signals", 1),
            store.charge("acct-\ud800", "/signals", 1),
            store.charge("acct-enc-2", "/signals", 1),
            return_exceptions=True,
        )
    assert isinstance(bad, QuotaStoreUnavailable)
    assert not isinstance(first, BaseException) and first.used == 1
    assert not isinstance(last, BaseException) and last.used == 1


async def test_a_refund_goes_before_a_charge_that_came_after_it_in_the_same_write(
    make_store: StoreFactory, redis_client: redis.Redis, clock: Clock
) -> None:
    # A free account at 99 of 100 units is charged its 100th, whose backend then fails.
    # Its refund and the account's next charge leave in one write: refunded first, the
    # next charge fits, as it would have one by one.
    writes: list[int] = []
    store = make_store(on_batch=writes.append)
    account = "acct-order"
    # As after a Redis restart: no script cached. The pipe loads both on connecting, so
    # the refund is not answered NOSCRIPT and sent again behind the charge.
    await redis_client.script_flush()
    await redis_client.hset(
        keys.usage_key(account),
        mapping={"period_start": calendar_month(clock.now)[0], "used": 99, "overage": 0},
    )
    hundredth = await store.charge(account, "/signals", 1)
    assert (hundredth.allowed, hundredth.used) == (True, 100)
    refund = asyncio.ensure_future(store.refund(account, "/signals", 1, hundredth))
    await asyncio.sleep(0)  # the refund is queued; the flush is not run yet
    following = store.charge(account, "/signals", 1)
    assert await refund == 1
    decision = await following
    assert writes[-1] == 2  # the refund and the charge, in one write
    assert (decision.allowed, decision.used) == (True, 100), decision


async def test_a_caller_gone_before_the_write_costs_its_batch_nothing(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    gone = store.charge("acct-\ud800", "/signals", 1)
    asyncio.ensure_future(gone).cancel()  # its request went away before the flush
    async with asyncio.timeout(5):
        decision = await store.charge("acct-stays", "/signals", 1)
    assert decision.allowed and decision.used == 1


@pytest.mark.usefixtures("either_path")
async def test_a_charge_redis_answers_after_its_timeout_is_refunded(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    store = make_store(timeout=0.2)
    account = "acct-late"
    assert (await store.charge(account, "/signals", 1)).used == 1  # connected, scripts loaded
    refunded = _abandoned("refunded")
    hold = await hold_redis(redis_client, 700_000)
    with pytest.raises(QuotaStoreUnavailable, match="TimeoutError"):
        await store.charge(account, "/signals", 1)  # the request gets its 503 ...
    await hold  # ... yet Redis charges it once released
    await _closed(store)  # waits for the late reply and the refund it owes
    assert await redis_client.hget(keys.usage_key(account), "used") == b"1"
    daily = await redis_client.hgetall(keys.daily_key(account, "2026-09-21"))
    assert daily == {b"/signals": b"1"}
    assert _abandoned("refunded") == refunded + 1


async def test_a_charge_whose_caller_went_away_is_refunded(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    store = make_store()
    account = "acct-cancelled"
    refunded = _abandoned("refunded")
    gone = asyncio.ensure_future(store.charge(account, "/signals", 2))
    stays = store.charge(account, "/signals", 1)
    await asyncio.sleep(0)  # both are in the write
    gone.cancel()  # its request went away: it will not be forwarded
    assert (await stays).used == 3  # charged after the one that went away
    await _closed(store)
    assert await redis_client.hget(keys.usage_key(account), "used") == b"1"
    assert _abandoned("refunded") == refunded + 1


@pytest.mark.usefixtures("either_path")
async def test_a_charge_whose_caller_goes_away_while_redis_runs_it_is_refunded(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    store = make_store()
    account = "acct-gone-in-flight"
    assert (await store.charge(account, "/signals", 1)).used == 1  # connected
    refunded = _abandoned("refunded")
    hold = await hold_redis(redis_client, 300_000)
    gone = asyncio.ensure_future(store.charge(account, "/signals", 2))
    await asyncio.sleep(0.05)  # sent, not yet run
    gone.cancel()  # as a shutdown cancels its handler
    await hold  # Redis runs it once released
    await _closed(store)
    # Counted once the refund is applied: checked before anything else may run.
    assert _abandoned("refunded") == refunded + 1
    assert await redis_client.hget(keys.usage_key(account), "used") == b"1"


@pytest.mark.usefixtures("one_slot")
async def test_through_redis_py_a_hung_call_frees_its_slot_at_the_timeout(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    """The call reads on for its late reply, but the next batch does not wait for it."""
    store = make_store(timeout=0.2)
    account = "acct-slot"
    assert (await store.charge(account, "/signals", 1)).used == 1  # connected
    refunded = _abandoned("refunded")
    hold = await hold_redis(redis_client, 900_000)
    with pytest.raises(QuotaStoreUnavailable, match="TimeoutError"):
        await store.charge(account, "/signals", 1)  # holds the only slot, its 503 at 0.2 s
    with pytest.raises(QuotaStoreUnavailable, match="TimeoutError"):
        await store.charge(account, "/signals", 2)  # sent at once all the same
    await hold  # Redis runs both once released
    await _closed(store)
    # Both were sent and both refunded; had the second waited for the slot, it would have
    # been refused unsent.
    assert _abandoned("refunded") == refunded + 2
    assert await redis_client.hget(keys.usage_key(account), "used") == b"1"


async def test_through_redis_py_a_connection_lost_while_its_caller_waits_is_unknown(
    urls: tuple[str, str],
    redis_client: redis.Redis,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 503 comes when the connection gives up, and the charge is reported unknown."""
    monkeypatch.setattr(redis_quota, "RAW_PIPELINE", False)
    client = create_redis(urls[0], timeout=2.0, read_timeout=0.3)
    config = replace_section(
        load_test_config("http://127.0.0.1:9"), metering={"redis_timeout_seconds": 2.0}
    )
    store = RedisQuotaStore(client, config, clock=clock)
    try:
        assert (await store.charge("acct-cut", "/signals", 1)).used == 1  # connected
        unknown = _abandoned("unknown")
        hold = await hold_redis(redis_client, 900_000)
        with pytest.raises(QuotaStoreUnavailable, match="ended before the reply"):
            await store.charge("acct-cut", "/signals", 1)  # the read gives up at 0.3 s
        assert _abandoned("unknown") == unknown + 1
        await hold
    finally:
        await store.aclose()
        await client.aclose()


@pytest.mark.usefixtures("one_slot")
async def test_through_redis_py_the_timeout_counts_the_wait_for_a_slot(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    store = make_store(timeout=0.4)
    account = "acct-queued"
    assert (await store.charge(account, "/signals", 1)).used == 1  # connected
    hold = await hold_redis(redis_client, 1_200_000)
    first = asyncio.ensure_future(store.charge(account, "/signals", 1))
    await asyncio.sleep(0.1)  # the first batch holds the only slot
    started = time.monotonic()
    with pytest.raises(QuotaStoreUnavailable, match="TimeoutError"):
        await store.charge(account, "/signals", 1)  # waits for the slot, then its call
    # Its 503 at its own timeout (0.4 s), not that much after it got the slot, which the
    # first one's timeout freed 0.3 s in (0.7 s).
    assert time.monotonic() - started < 0.55
    with pytest.raises(QuotaStoreUnavailable):
        await first
    await hold


def test_a_failure_to_connect_is_known_to_have_sent_nothing() -> None:
    """The cluster path tells "nothing sent" from "sent, no reply" by redis-py's errors."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed: nothing listens

    async def refused() -> Exception:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        try:
            await client.ping()
        except Exception as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("connected to a closed port")

    error = asyncio.run(refused())
    assert redis_quota._before_sending(error)
    assert redis_quota._before_sending(MaxConnectionsError("Too many connections"))
    assert not redis_quota._before_sending(RedisTimeoutError("Timeout reading from redis"))
    assert not redis_quota._answered(RedisConnectionError("Connection closed by server."))
    assert redis_quota._answered(ResponseError("BUSY Redis is busy running a script"))


async def test_a_charge_through_redis_py_never_answered_is_counted_and_logged_with_its_units(
    urls: tuple[str, str],
    redis_client: redis.Redis,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client stops reading before Redis answers: applied or not, nobody can tell, so
    the account and units are logged for reconciliation, as the raw pipeline does."""
    monkeypatch.setattr(redis_quota, "RAW_PIPELINE", False)
    client = create_redis(urls[0], timeout=0.2, read_timeout=0.5)
    config = replace_section(
        load_test_config("http://127.0.0.1:9"), metering={"redis_timeout_seconds": 0.2}
    )
    store = RedisQuotaStore(client, config, clock=clock)
    account = "acct-unanswered"
    try:
        assert (await store.charge(account, "/signals", 1)).used == 1  # connected
        unknown = _abandoned("unknown")
        hold = await hold_redis(redis_client, 900_000)
        with pytest.raises(QuotaStoreUnavailable, match="TimeoutError"):
            await store.charge(account, "/signals", 2)  # the 503 comes at 0.2 s ...
        await _closed(store)  # ... and the client gives up reading at 0.5 s
        assert _abandoned("unknown") == unknown + 1
        assert f'[["{account}","/signals",2]]' in caplog.text
        await hold
    finally:
        await client.aclose()


@pytest.mark.usefixtures("either_path")
async def test_a_denied_charge_answered_late_is_not_refunded(
    make_store: StoreFactory, redis_client: redis.Redis, clock: Clock
) -> None:
    store = make_store(timeout=0.2)
    account = "acct-late-denied"
    included = load_test_config("http://127.0.0.1:9").tiers["free"].included_units
    await redis_client.hset(
        keys.usage_key(account),
        mapping={"period_start": calendar_month(clock.now)[0], "used": included, "overage": 0},
    )
    assert not (await store.charge(account, "/signals", 1)).allowed  # connected
    not_charged = _abandoned("not_charged")
    hold = await hold_redis(redis_client, 700_000)
    with pytest.raises(QuotaStoreUnavailable):
        await store.charge(account, "/signals", 1)
    await hold
    await _closed(store)
    assert await redis_client.hget(keys.usage_key(account), "used") == str(included).encode()
    assert _abandoned("not_charged") == not_charged + 1


@pytest.mark.usefixtures("either_path")
async def test_closing_waits_for_a_late_reply_and_its_refund(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    # A shutdown while Redis is held: the charge times out during aclose, and aclose still
    # returns only once Redis answered it and the refund it owes is applied.
    store = make_store(timeout=0.2)
    account = "acct-closing"
    await store.charge(account, "/signals", 1)
    refunded = _abandoned("refunded")
    hold = await hold_redis(redis_client, 700_000)
    pending = asyncio.ensure_future(store.charge(account, "/signals", 1))
    await asyncio.sleep(0)  # queued
    await _closed(store)
    # Counted once the refund is applied: checked before anything else may run.
    assert _abandoned("refunded") == refunded + 1
    left = [t for t in asyncio.all_tasks() if "_refund_abandoned" in repr(t.get_coro())]
    assert not left, left
    assert isinstance(pending.exception(), QuotaStoreUnavailable)
    await hold
    assert await redis_client.hget(keys.usage_key(account), "used") == b"1"


async def test_closing_refunds_a_charge_cancelled_in_flight_and_skips_one_cancelled_before(
    make_store: StoreFactory, redis_client: redis.Redis
) -> None:
    store = make_store()
    account = "acct-shutdown"
    await store.charge(account, "/signals", 1)  # connected
    refunded = _abandoned("refunded")
    before = asyncio.ensure_future(store.charge(account, "/signals", 5))
    before.cancel()  # cancelled before its write: never sent
    in_flight = asyncio.ensure_future(store.charge(account, "/signals", 2))
    await asyncio.sleep(0)  # sent
    in_flight.cancel()  # as a shutdown cancels its handler
    await _closed(store)
    assert await redis_client.hget(keys.usage_key(account), "used") == b"1"
    daily = await redis_client.hgetall(keys.daily_key(account, "2026-09-21"))
    assert daily == {b"/signals": b"1"}
    assert _abandoned("refunded") == refunded + 1  # the one in flight only


_TIERS = ("free", "starter", "pro", "enterprise")
_INCLUDED = (100, 10_000, 100_000, 1_000_000)


def _read(replies: object, costs: list[int], day: str = "") -> list[object]:
    return list(redis_quota._read_reply(replies, costs, day, _TIERS, _INCLUDED))


def test_a_reply_is_read_entry_by_entry() -> None:
    pro, free, starter = 0 + 8 * 2, 3 + 8 * 0, 0 + 8 * 1
    allowed, refused, error, other = _read(
        [pro, 100_002, 86400, 1790000000, free, 5, -7, 1790000000, 250,
         hiredis.ReplyError("WRONGTYPE"), starter, 12, 60, 1790000000],
        [3, 1, 1, 2],
        "2026-09-21",
    )  # fmt: skip
    assert isinstance(allowed, Decision) and isinstance(refused, Decision)
    assert (allowed.allowed, allowed.reason, allowed.tier) == (True, Reason.OK, "pro")
    assert (allowed.used, allowed.included, allowed.reset_seconds) == (100_002, 100_000, 86400)
    # The units of the charge beyond the included ones: 2 of its 3.
    assert (allowed.period_start, allowed.overage, allowed.retry_after_ms) == (1790000000, 2, 0)
    assert allowed.day == "2026-09-21"
    # A rate-limited refusal adds when to retry; a lapsed period's reset can be negative.
    assert (refused.allowed, refused.reason, refused.tier) == (False, Reason.RATE_LIMITED, "free")
    assert (refused.reset_seconds, refused.retry_after_ms, refused.overage) == (-7, 250, 0)
    # An error is one entry, for its charge alone; the next charge reads on after it.
    assert isinstance(error, QuotaStoreUnavailable) and "WRONGTYPE" in str(error)
    assert isinstance(other, Decision)
    assert (other.tier, other.used, other.overage) == ("starter", 12, 0)


def test_overage_is_the_part_of_the_cost_beyond_the_included_units() -> None:
    def overage(used: int, cost: int) -> int:
        (decision,) = _read([8, used, 60, 1790000000], [cost])  # starter: 10,000 included
        assert isinstance(decision, Decision)
        return decision.overage

    assert [overage(u, 5) for u in (9_999, 10_000, 10_003, 10_040)] == [0, 0, 3, 5]


@pytest.mark.parametrize(
    "replies",
    [
        [],  # a charge short
        [0, 12, 86400],  # a field short
        [0, 12, 86400, 1790000000, 0],  # one too many
        [3, 12, 86400, 1790000000],  # a rate limit without its retry
        [8 * 7, 12, 86400, 1790000000],  # no such tier row
        [5, 12, 86400, 1790000000],  # no such reason
        [-1, 12, 86400, 1790000000],
        [[0, 12, 86400, 1790000000]],  # an entry of another script's shape
        ["0", 12, 86400, 1790000000],
        [0, "12", 86400, 1790000000],
        "OK",
    ],
)
def test_a_reply_of_another_shape_raises(replies: object) -> None:
    with pytest.raises(QuotaStoreUnavailable, match="redis answered 1 charges"):
        _read(replies, [1])
