"""A raw-protocol Redis pipeline for script calls: one write per batch, replies matched FIFO.

redis-py encodes every argument of every command again and waits for each reply under its
own timeout; charges are the gateway's hottest Redis traffic, so here a caller hands over
commands already encoded (their constant parts once), a whole batch leaves in one
``transport.write``, hiredis parses the replies and each settles the oldest waiting call.

Never resent: a connection lost or timed out with calls in flight fails all of them with
QuotaStoreUnavailable (a charge Redis may have applied must not be applied twice), and the
next call connects again. A NOSCRIPT reply means the call did not run, so that call alone is
sent again, once, after SCRIPT LOAD.

A timeout does not tell whether Redis ran a call, only that it has not answered yet. So a
timed-out connection fails its callers at once but keeps reading for LATE_REPLY_WINDOW
seconds (new calls go on a new connection): a call with a ``late`` hook is told the reply
that came after all, or LOST when the connection ended first and the outcome is unknown.

The connection is borrowed from the redis-py client's pool, connected there (TLS, AUTH,
SELECT), so it lives and dies with that client: closing the client closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard, cast

import hiredis
import redis.asyncio as redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)

from gateway.errors import QuotaStoreUnavailable
from gateway.redis_client import OutageLog
from gateway.resp import command

log = logging.getLogger(__name__)

# How long a timed-out connection keeps reading for the replies its callers gave up on.
LATE_REPLY_WINDOW = 10.0
# What a ``late`` hook is told when the connection ended before the reply came.
LOST = QuotaStoreUnavailable("redis connection ended before the reply")
_CONNECTIONS = (Connection, SSLConnection, UnixDomainSocketConnection)


def supports(client: object) -> TypeGuard[redis.Redis]:
    """Whether this pipeline can carry the client's traffic (TCP, TLS or unix; RESP2)."""
    # A cluster client routes each key to its node; this pipeline has one connection. A TLS
    # connection is taken over like a plain one: its transport hands over decrypted bytes.
    if not isinstance(client, redis.Redis):
        return False
    pool = client.connection_pool
    return pool.connection_class in _CONNECTIONS and (
        pool.connection_kwargs.get("protocol") in (None, 2, "2")
    )


@dataclass(frozen=True, slots=True)
class Script:
    source: bytes
    sha: str


class Waiter(Protocol):
    """What a call's outcome is handed to: an asyncio.Future, or an object that acts on it
    at once (the quota store's charge batches, settled as their reply is read)."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class Call:
    """One command of a batch; ``script`` is set for EVALSHA (reloaded on NOSCRIPT).

    ``late``, when set, is told how the call ended once nobody waits on its future (it was
    failed by a timeout, or cancelled): its reply (a hiredis.ReplyError for an error), or
    LOST when the connection ended first, so Redis may or may not have run it."""

    __slots__ = ("future", "late", "payload", "retried", "script")

    def __init__(
        self,
        future: Waiter | None,
        payload: bytes,
        script: Script | None = None,
        late: Callable[[Any], None] | None = None,
    ) -> None:
        self.future, self.payload, self.script, self.retried = future, payload, script, False
        self.late = late


class _Connection(asyncio.Protocol):
    def __init__(
        self,
        pipe: RedisPipe,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        transport: asyncio.BaseTransport,
        borrowed: AbstractConnection | None = None,
        late_window: float = LATE_REPLY_WINDOW,
    ) -> None:
        self._pipe, self._loop, self._timeout = pipe, loop, timeout
        self._late_window = late_window
        self.borrowed = borrowed  # redis-py's connection, given back when this one ends
        # uvloop's transports do not derive from asyncio.Transport; they offer its methods.
        self._transport: asyncio.Transport | None = cast(asyncio.Transport, transport)
        # redis-py's stream protocol, told when the connection ends so its side closes too.
        self._original = transport.get_protocol()
        transport.set_protocol(self)
        self._reader = hiredis.Reader()
        self._waiting: deque[Call] = deque()
        # (calls sent once this batch was written, its deadline); one timer watches the oldest.
        self._deadlines: deque[tuple[int, float]] = deque()
        self._sent = 0
        self._received = 0
        self._timer: asyncio.TimerHandle | None = None
        self.alive = True
        self.draining = False  # timed out: reading the late replies, taking no new calls
        self.ended = loop.create_future()  # set once given back or failed
        self._idle: asyncio.Future[None] | None = None  # set once no call waits for a reply

    def write(self, calls: list[Call]) -> None:
        assert self._transport is not None
        self._transport.write(
            calls[0].payload if len(calls) == 1 else b"".join([c.payload for c in calls])
        )
        self._waiting.extend(calls)
        self._sent += len(calls)
        deadline = self._loop.time() + self._timeout
        self._deadlines.append((self._sent, deadline))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= self._received:
            deadlines.popleft()
        if not deadlines:
            return
        if deadlines[0][1] <= self._loop.time():
            self._timed_out()
        else:
            self._timer = self._loop.call_at(deadlines[0][1], self._expire)

    def _timed_out(self) -> None:
        error = QuotaStoreUnavailable("redis unavailable: TimeoutError")
        if not any(c.late is not None for c in self._waiting):
            self.fail(error)
            return
        # The callers get their 503 now, yet Redis may still run their calls: keep reading
        # a while, so a charge it ran late is known (and refunded), not guessed at.
        self.draining = True
        self._deadlines.clear()
        self._pipe.retire(self)
        self._set_idle()  # for whoever waits on the pipe: this one is draining now
        for call in self._waiting:
            if call.future is not None and not call.future.done():
                call.future.set_exception(error)
        self._timer = self._loop.call_later(self._late_window, self.fail, error)

    def idle(self) -> asyncio.Future[None]:
        """Resolved once no call on this connection waits for its reply (or it drains)."""
        if self._idle is None:
            self._idle = self._loop.create_future()
            if not self._waiting or self.draining or not self.alive:
                self._idle.set_result(None)
        return self._idle

    def _set_idle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)

    @property
    def busy(self) -> bool:
        """Whether calls wait for replies here (cancelled callers' calls too)."""
        return bool(self._waiting) and self.alive and not self.draining

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        retry: list[Call] = []
        received = 0
        try:
            while (reply := reader.gets()) is not False:
                call = waiting.popleft()
                received += 1
                future = call.future
                if future is None or future.done():
                    # Nobody waits for it (a timeout, or the caller went away); a NOSCRIPT
                    # is not retried then: the call did not run, which is all to tell.
                    if call.late is not None:
                        tell(call.late, reply)
                    continue
                if type(reply) is hiredis.ReplyError:
                    if (
                        call.script is not None
                        and not call.retried
                        and str(reply).startswith("NOSCRIPT")
                    ):
                        call.retried = True
                        retry.append(call)
                        continue
                    future.set_exception(QuotaStoreUnavailable(f"redis error: {reply}"))
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.fail(QuotaStoreUnavailable(f"redis protocol error: {exc}"))
            return
        finally:
            self._received += received
        if self.draining:
            if not waiting:  # every late reply is in: the connection is as good as new
                self.detach()
            return
        if not waiting and not retry:
            self._set_idle()
        if retry:
            # Those calls did not run (the script cache was flushed, or a new server): load
            # the scripts, then run exactly them again; the batch's others are settled already.
            sources = {c.script.source for c in retry if c.script is not None}
            loads = [Call(None, command("SCRIPT", "LOAD", s)) for s in sources]
            self.write(loads + retry)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._original.connection_lost(exc)
        self.fail(QuotaStoreUnavailable("redis unavailable: connection lost"))

    def fail(self, error: QuotaStoreUnavailable) -> None:
        if not self.alive:
            return
        self.alive = False
        self._pipe.lost(self, broken=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for call in waiting:
            if call.future is not None and not call.future.done():
                call.future.set_exception(error)
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        try:
            # Written, never answered: Redis may or may not have run them.
            for call in waiting:
                if call.late is not None:
                    tell(call.late, LOST)
        finally:
            self._set_idle()
            if not self.ended.done():
                self.ended.set_result(None)

    def detach(self) -> None:
        """Give the connection back to redis-py, every reply read (for the pool to reuse)."""
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.set_protocol(self._original)
            self._transport = None
        self._pipe.lost(self, broken=False)
        self._set_idle()
        if not self.ended.done():
            self.ended.set_result(None)


def tell(late: Callable[[Any], None], reply: Any) -> None:
    """A late hook's failure is logged, and does not keep the other calls from theirs."""
    try:
        late(reply)
    except Exception:
        log.exception("a late Redis reply's hook failed")


class RedisPipe:
    """Sends batches of pre-encoded commands on one persistent connection, in order."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        timeout: float,
        scripts: Sequence[Script] = (),
        late_window: float = LATE_REPLY_WINDOW,
    ) -> None:
        self._pool = client.connection_pool
        self._timeout = timeout
        self._late_window = late_window
        # Loaded ahead of the first calls on every new connection (a restarted or failed
        # over server has none): a NOSCRIPT call is sent again after the rest of its write,
        # which would put it behind calls that came after it.
        self._loads = [command("SCRIPT", "LOAD", s.source) for s in scripts]
        self._conn: _Connection | None = None
        self._draining: set[_Connection] = set()  # timed out, still reading late replies
        self._queue: list[Call] = []  # waiting for the connection
        self._connecting: asyncio.Task[None] | None = None
        self._returning: set[asyncio.Task[None]] = set()
        self._outage = OutageLog()  # connects that fail, logged once per outage

    def send(self, calls: list[Call]) -> None:
        conn = self._conn
        if conn is not None:
            conn.write(calls)
            return
        self._queue.extend(calls)
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def retire(self, conn: _Connection) -> None:
        """Send no more calls on ``conn`` (it is reading late replies); the next connects."""
        if self._conn is conn:
            self._conn = None
            self._draining.add(conn)

    def lost(self, conn: _Connection, *, broken: bool) -> None:
        if self._conn is conn:
            self._conn = None
        elif conn in self._draining:
            self._draining.discard(conn)
        else:
            return
        borrowed, conn.borrowed = conn.borrowed, None
        if borrowed is not None:
            task = asyncio.get_running_loop().create_task(self._give_back(borrowed, broken=broken))
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)

    async def _give_back(self, borrowed: AbstractConnection, *, broken: bool) -> None:
        # Released whatever disconnect raised, but not from a finally block: compiled code
        # must not suspend in one (gateway/compiled.py).
        failed: BaseException | None = None
        if broken:
            try:
                await borrowed.disconnect(nowait=True)
            except BaseException as exc:
                failed = exc
        await self._pool.release(borrowed)
        if failed is not None:
            raise failed
        if broken:
            # The server went away or hung: the pool's idle connections are as dead as this
            # one, and redis-py would hand them to the next ping or command unnoticed.
            with contextlib.suppress(Exception):
                await self._pool.disconnect(inuse_connections=False)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        borrowed: AbstractConnection | None = None
        failed: Exception | None = None
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    borrowed = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                writer = getattr(borrowed, "_writer", None)
                transport = writer.transport if writer is not None else None
                if transport is None or transport.is_closing():
                    raise ConnectionResetError
            except Exception as exc:  # whatever failed, the waiting calls get their 503
                failed = exc  # handled below: compiled code must not suspend in an except
            if failed is not None:
                if borrowed is not None:
                    await self._give_back(borrowed, broken=True)
                self._outage.failed(failed)  # a refused port, a certificate, a password
                error = QuotaStoreUnavailable(f"redis unavailable: {failed.__class__.__name__}")
                queue, self._queue = self._queue, []
                for call in queue:
                    if call.future is not None and not call.future.done():
                        call.future.set_exception(error)
                return
        finally:
            self._connecting = None
        assert transport is not None  # the checks above raised otherwise
        self._outage.ok()
        self._conn = conn = _Connection(
            self, loop, self._timeout, transport, borrowed, self._late_window
        )
        queue, self._queue = self._queue, []
        if queue:  # a connection is made for calls; they come after the script loads
            conn.write([Call(None, load) for load in self._loads] + queue)

    async def drained(self) -> None:
        """Wait until the timed-out connections have their late replies (or gave up)."""
        while self._draining:
            # asyncio.wait, not gather: a cancelled waiter leaves the shared futures alone.
            await asyncio.wait([c.ended for c in self._draining])

    async def settled(self) -> None:
        """Wait until every call sent has its reply, or failed and its connection is done
        reading; also calls sent meanwhile. The timeout and the late window bound it."""
        while True:
            conn = self._conn
            if self._connecting is not None:
                await asyncio.wait([self._connecting])
            elif conn is not None and conn.busy:
                await asyncio.wait([conn.idle()])
            elif self._draining:
                await self.drained()
            else:
                return

    async def aclose(self) -> None:
        await self.settled()
        conn = self._conn
        if conn is not None and conn.alive:
            conn.detach()  # every reply read: the pool can reuse it
        if self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)
