"""A lean keep-alive HTTP/1.1 client pool for the gateway's upstream path.

aiohttp's ClientSession costs several times its server per request (cookie jar, auto
headers, tracing, timers per read); a gateway forwarding to a known backend needs none of
it. One pool per upstream keeps idle connections LIFO (the warmest first, so the cold
ones age out), bounds the connections, closes idle ones after ``keepalive`` seconds and
notices a backend that closed one. The request line and headers (and a small body) leave
in one write.

A request on a reused connection that the backend closed meanwhile is retried once on a
fresh connection, but only when nothing of it can have been processed: no response byte
came, the method is idempotent, and its body (if any) was buffered. Everything else is an
error the proxy maps to 502 or 504.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable
from urllib.parse import urlsplit

from multidict import CIMultiDict

from gateway.errors import GatewayError
from gateway.upstream_protocol import ConnectionLost, ResponseError, UpstreamConnection, expire

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# RFC 9110 8.6: a user agent sends Content-Length: 0 on these when there is no body.
_EXPECT_BODY = frozenset({"POST", "PUT", "PATCH"})

Body = bytes | AsyncIterable[bytes] | None


class UpstreamError(GatewayError):
    """The backend could not be used for this request."""


class UpstreamUnavailable(UpstreamError):
    """No connection (refused, connect timeout, pool exhausted) or a broken exchange: 502."""


class UpstreamTimeout(UpstreamError):
    """The backend sent no response head, or read none of the body, within the upstream's
    timeout: 504."""


class BodyCut(UpstreamError):
    """The response body broke off or stalled: the client got less than announced."""


class UpstreamResponse:
    __slots__ = ("_conn", "_pool", "content_length", "raw_headers", "reason", "status")

    def __init__(self, pool: UpstreamPool, conn: UpstreamConnection) -> None:
        self._pool = pool
        self._conn: UpstreamConnection | None = conn
        self.status = conn.status
        self.reason = conn.reason
        self.raw_headers = conn.raw_headers
        self.content_length = conn.content_length

    @property
    def headers(self) -> CIMultiDict[str]:
        """The headers as text (the proxy passes ``raw_headers`` on as they came)."""
        return CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in self.raw_headers
        )

    async def read(self) -> bytes:
        """The next piece of the body, b"" at its end; BodyCut if it broke off or stalled."""
        conn = self._conn
        assert conn is not None
        waiter = conn.read_ready()
        if waiter is not None:
            handle = self._pool.loop.call_later(self._pool.read_timeout, expire, waiter)
            try:
                await waiter
            except TimeoutError:
                raise BodyCut("the backend stalled mid-body") from None
            finally:
                handle.cancel()
        try:
            return conn.take_body()
        except (ConnectionLost, ResponseError) as exc:
            raise BodyCut(str(exc)) from exc

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Give the connection back: to the idle stack when the exchange ended cleanly."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)


class UpstreamPool:
    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        default_port = 443 if secure else 80
        self._host = parts.hostname or "localhost"
        self._port = parts.port or default_port
        self._ssl = True if secure else None
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if self._port == default_port else f"{host}:{self._port}"
        self._host_header = self.host_header.encode("utf-8", "surrogateescape")
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._keepalive = keepalive
        self.loop = asyncio.get_running_loop()
        self._idle: list[UpstreamConnection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        headers: bytes = b"",
        body: Body = None,
        *,
        length: int | None = None,
    ) -> UpstreamResponse:
        """Send one request; the caller must ``release()`` the response it gets.

        ``headers`` is the encoded header block (``Name: value\\r\\n`` lines) without
        Host and body framing, which this adds: Content-Length for a bytes body, for a
        streamed one with ``length``, and 0 for a bodiless POST, PUT or PATCH (RFC 9110
        8.6); otherwise a streamed body goes chunked. ``target`` is the canonical path.
        """
        if isinstance(body, bytes):
            framing = b"Content-Length: %d\r\n" % len(body)
        elif body is not None:
            if length is not None:
                framing = b"Content-Length: %d\r\n" % length
            else:
                framing = b"Transfer-Encoding: chunked\r\n"
        elif method in _EXPECT_BODY:
            framing = b"Content-Length: 0\r\n"
        else:
            framing = b""
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
            method.encode(),
            target.encode("utf-8", "surrogateescape"),
            self._host_header,
            headers,
            framing,
        )
        chunked = body is not None and not isinstance(body, bytes) and length is None
        head_only = method == "HEAD"

        # The common case, a warm idle connection, without the acquire coroutine.
        conn = self._take_idle() if not self._closed else None
        if conn is not None:
            reused = True
        else:
            conn, reused = await self._acquire(fresh=False)
        try:
            return await self._exchange(conn, head, body, chunked, head_only)
        except ConnectionLost as exc:
            # Never a POST, even without a body: the backend may have acted on it before
            # the connection broke (RFC 9112 9.3.1).
            replayable = method in _IDEMPOTENT and (body is None or isinstance(body, bytes))
            if not (reused and not exc.partial and replayable):
                raise UpstreamUnavailable(str(exc)) from exc
        # The backend closed an idle connection as we reused it: nothing was processed.
        conn, _ = await self._acquire(fresh=True)
        try:
            return await self._exchange(conn, head, body, chunked, head_only)
        except ConnectionLost as exc:
            raise UpstreamUnavailable(str(exc)) from exc

    async def _exchange(
        self, conn: UpstreamConnection, head: bytes, body: Body, chunked: bool, head_only: bool
    ) -> UpstreamResponse:
        waiter = conn.begin(head_only=head_only)
        try:
            if body is None or isinstance(body, bytes):
                conn.write(head + body if body else head)
            else:
                conn.write(head)
                await self._send_streamed(conn, waiter, body, chunked)
            await self._wait_head(waiter)
        except ResponseError as exc:
            self._discard(conn)
            raise UpstreamUnavailable(str(exc)) from exc
        except BaseException:
            self._discard(conn)
            raise
        return UpstreamResponse(self, conn)

    async def _send_streamed(
        self,
        conn: UpstreamConnection,
        waiter: asyncio.Future[None],
        body: AsyncIterable[bytes],
        chunked: bool,
    ) -> None:
        sender = asyncio.ensure_future(_send_body(conn, body, chunked, self.read_timeout))
        try:
            await asyncio.wait((sender, waiter), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            sender.cancel()
            raise
        if not sender.done():
            # The backend answered before reading the whole body (a 413, a 401): stop
            # sending, relay its answer, and never reuse a connection left mid-request.
            sender.cancel()
            conn.keep_alive = False
            return
        exc = sender.exception()
        if exc is None:
            return
        if isinstance(exc, ConnectionLost) and waiter.done() and not waiter.exception():
            conn.keep_alive = False
            return
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled():
            waiter.exception()  # retrieved: the body's failure is the one that counts
        raise exc

    async def _wait_head(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return waiter.result()
        handle = self.loop.call_later(self.read_timeout, expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise UpstreamTimeout("the backend did not answer in time") from None
        finally:
            handle.cancel()

    # -- the pool -------------------------------------------------------------------------

    async def _acquire(self, *, fresh: bool) -> tuple[UpstreamConnection, bool]:
        if self._closed:
            raise UpstreamUnavailable("the pool is closed")
        deadline = self.loop.time() + self._connect_timeout
        while True:
            if not fresh:
                conn = self._take_idle()
                if conn is not None:
                    return conn, True
            elif self._open >= self._max and self._idle:
                # Make room for the fresh connection by closing the coldest idle one.
                self._discard(self._idle.pop(0))
            if self._open < self._max:
                return await self._connect(deadline), False
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            handle = self.loop.call_at(deadline, expire, waiter)
            try:
                await waiter
            except TimeoutError:
                raise UpstreamUnavailable(
                    f"all {self._max} connections to the backend are busy"
                ) from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake()  # the free slot this waiter was given goes to the next one
                raise
            finally:
                handle.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _take_idle(self) -> UpstreamConnection | None:
        """The newest idle connection still open, if any (closed ones are counted out)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._open -= 1
        return None

    async def _connect(self, deadline: float) -> UpstreamConnection:
        self._open += 1
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self.loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                )
        except (OSError, TimeoutError) as exc:
            self._open -= 1
            self._wake()
            raise UpstreamUnavailable(f"cannot connect to {self.host_header}: {exc!r}") from exc
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if self._closed or not conn.reusable:
            self._discard(conn)
            return
        conn.in_flight = False
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)
        self._wake()

    def _discard(self, conn: UpstreamConnection) -> None:
        conn.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self.loop.time() - self._keepalive
        # The stack is LIFO, so the oldest idle connections sit at the bottom.
        while self._idle and (self._idle[0].closed or self._idle[0].idle_since <= cutoff):
            self._discard(self._idle.pop(0))
        if self._idle:
            delay = self._idle[0].idle_since + self._keepalive - self.loop.time()
            self._sweeper = self.loop.call_later(max(delay, 0.1), self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._discard(self._idle.pop())
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamUnavailable("the pool is closed"))
        self._waiters.clear()


async def _send_body(
    conn: UpstreamConnection, body: AsyncIterable[bytes], chunked: bool, timeout: float
) -> None:
    async for chunk in body:
        if not chunk:
            continue
        if chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            conn.write(chunk)
        try:
            # A backend that stops reading the body would otherwise hold the request (and
            # its connection) for ever: the answer's own timeout starts only after it.
            await conn.drain(timeout)
        except TimeoutError:
            raise UpstreamTimeout("the backend stopped reading the request body") from None
    if chunked:
        conn.write(b"0\r\n\r\n")
