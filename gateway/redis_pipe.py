"""A raw-protocol Redis pipeline for script calls: one write per batch, replies matched FIFO.

redis-py encodes every argument of every command again and waits for each reply under its
own timeout; charges are the gateway's hottest Redis traffic, so here a caller hands over
commands already encoded (their constant parts once), a whole batch leaves in one
``transport.write``, hiredis parses the replies and each settles the oldest waiting call.

Never resent: a connection lost or timed out with calls in flight fails all of them with
QuotaStoreUnavailable (a charge Redis may have applied must not be applied twice), and the
next call connects again. A NOSCRIPT reply means the call did not run, so that call alone is
sent again, once, after SCRIPT LOAD.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import hiredis
import redis.asyncio as redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

from gateway.errors import QuotaStoreUnavailable
from gateway.resp import command


@dataclass(frozen=True, slots=True)
class Address:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host:port
    username: str | None = None
    password: str | None = None
    db: int = 0


def address_of(client: redis.Redis) -> Address | None:
    """Where the client connects, or None when this pipeline cannot (TLS, RESP3, ...)."""
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if kw.get("protocol") not in (None, 2, "2") or kw.get("credential_provider"):
        return None
    username, password = kw.get("username"), kw.get("password")
    db = int(kw.get("db") or 0)
    if pool.connection_class is Connection:
        host, port = str(kw.get("host", "localhost")), int(kw.get("port", 6379))
        return Address(host, port, None, username, password, db)
    if pool.connection_class is UnixDomainSocketConnection:
        return Address(path=str(kw["path"]), username=username, password=password, db=db)
    return None


@dataclass(frozen=True, slots=True)
class Script:
    source: bytes
    sha: str


class Call:
    """One command of a batch; ``script`` is set for EVALSHA (reloaded on NOSCRIPT)."""

    __slots__ = ("future", "payload", "retried", "script")

    def __init__(
        self, future: asyncio.Future[Any] | None, payload: bytes, script: Script | None = None
    ) -> None:
        self.future, self.payload, self.script, self.retried = future, payload, script, False


class _Connection(asyncio.Protocol):
    def __init__(self, pipe: RedisPipe, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._pipe, self._loop, self._timeout = pipe, loop, timeout
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._waiting: deque[Call] = deque()
        # (calls sent once this batch was written, its deadline); one timer watches the oldest.
        self._deadlines: deque[tuple[int, float]] = deque()
        self._sent = 0
        self._received = 0
        self._timer: asyncio.TimerHandle | None = None
        self.alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport; they offer its methods.
        self._transport = cast(asyncio.Transport, transport)

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
            self.fail(QuotaStoreUnavailable("redis unavailable: TimeoutError"))
        else:
            self._timer = self._loop.call_at(deadlines[0][1], self._expire)

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
                if type(reply) is hiredis.ReplyError:
                    if (
                        call.script is not None
                        and not call.retried
                        and str(reply).startswith("NOSCRIPT")
                    ):
                        call.retried = True
                        retry.append(call)
                        continue
                    if future is not None and not future.done():
                        future.set_exception(QuotaStoreUnavailable(f"redis error: {reply}"))
                elif future is not None and not future.done():
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.fail(QuotaStoreUnavailable(f"redis protocol error: {exc}"))
            return
        finally:
            self._received += received
        if retry:
            # Those calls did not run (the script cache was flushed, or a new server): load
            # the scripts, then run exactly them again; the batch's others are settled already.
            sources = {c.script.source for c in retry if c.script is not None}
            loads = [Call(None, command("SCRIPT", "LOAD", s)) for s in sources]
            self.write(loads + retry)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.fail(QuotaStoreUnavailable("redis unavailable: connection lost"))

    def fail(self, error: QuotaStoreUnavailable) -> None:
        if not self.alive:
            return
        self.alive = False
        self._pipe.lost(self)
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

    def futures(self) -> list[asyncio.Future[Any]]:
        return [c.future for c in self._waiting if c.future is not None]

    def close(self) -> None:
        self.alive = False
        self._pipe.lost(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()


class RedisPipe:
    """Sends batches of pre-encoded commands on one persistent connection, in order."""

    def __init__(self, address: Address, *, timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self._conn: _Connection | None = None
        self._queue: list[Call] = []  # waiting for the connection
        self._connecting: asyncio.Task[None] | None = None

    def send(self, calls: list[Call]) -> None:
        conn = self._conn
        if conn is not None:
            conn.write(calls)
            return
        self._queue.extend(calls)
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        address = self._address
        conn: _Connection | None = None

        def factory() -> _Connection:
            return _Connection(self, loop, self._timeout)

        try:
            async with asyncio.timeout(self._timeout):
                if address.path is not None:
                    _, conn = await loop.create_unix_connection(factory, address.path)
                else:
                    _, conn = await loop.create_connection(factory, address.host, address.port)
                await self._hello(loop, conn)
            if not conn.alive:  # lost right after the handshake
                raise ConnectionResetError
        except Exception as exc:  # whatever failed, the waiting calls get their 503
            if conn is not None:
                conn.close()
            error = QuotaStoreUnavailable(f"redis unavailable: {exc.__class__.__name__}")
            queue, self._queue = self._queue, []
            for call in queue:
                if call.future is not None and not call.future.done():
                    call.future.set_exception(error)
            return
        finally:
            self._connecting = None
        self._conn = conn
        queue, self._queue = self._queue, []
        if queue:
            conn.write(queue)

    async def _hello(self, loop: asyncio.AbstractEventLoop, conn: _Connection) -> None:
        address = self._address
        commands = []
        if address.password is not None:
            auth = (address.username, address.password) if address.username else (address.password,)
            commands.append(command("AUTH", *auth))
        if address.db:
            commands.append(command("SELECT", address.db))
        if not commands:
            return
        calls = [Call(loop.create_future(), c) for c in commands]
        conn.write(calls)
        results = await asyncio.gather(
            *(c.future for c in calls if c.future), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def aclose(self) -> None:
        if self._connecting is not None:
            await asyncio.gather(self._connecting, return_exceptions=True)
        conn = self._conn
        if conn is None:
            return
        # Let the calls in flight be answered (the timeout bounds this), then close.
        if futures := conn.futures():
            await asyncio.gather(*futures, return_exceptions=True)
        conn.close()
