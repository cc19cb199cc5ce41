"""One keep-alive HTTP/1.1 connection to a backend: an asyncio Protocol parsed by llhttp.

The protocol only moves bytes and parser events into futures; the pool in
``gateway.upstream`` decides what to send and whether a connection may be reused. llhttp
runs strict (no leniencies): a response with both Content-Length and Transfer-Encoding, a
duplicate or malformed Content-Length, bare LF line ends, obsolete line folding or a bad
chunk is a parse error, and a connection that saw one is never used again.
"""

from __future__ import annotations

import asyncio
import collections
from typing import cast

import httptools

# Beyond this much unread body the socket stops being read: a 50 MB export moves through
# the gateway at the client's pace instead of piling up in memory.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# aiohttp's client limits: a status line or header field over 8190 bytes is refused.
MAX_FIELD = 8190
MAX_HEAD = 64 * 1024


class ResponseError(Exception):
    """The backend sent something that is not a well-formed HTTP/1.1 response."""


class ConnectionLost(Exception):
    """The backend closed the connection; ``partial`` says whether any response byte came."""

    def __init__(self, message: str, *, partial: bool) -> None:
        super().__init__(message)
        self.partial = partial


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        # Per exchange:
        self.in_flight = False
        self.head_only = False
        self.got_bytes = False
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.keep_alive = False
        self.complete = False
        self.error: BaseException | None = None
        self._refused: ResponseError | None = None  # what a parser callback raised last
        self._head_bytes = 0
        self._progress = 0  # body pieces and heads the read being fed gave
        self._framing = 0  # bytes of the reads since the last of those
        self._te: bytes | None = None
        self._has_length = False
        self._headers_done = False
        self._headers_waiter: asyncio.Future[None] | None = None
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- the pool's side ------------------------------------------------------------------

    def begin(self, *, head_only: bool) -> asyncio.Future[None]:
        """Start an exchange; the future resolves when the final response's head is in."""
        self.in_flight = True
        self.head_only = head_only
        self.got_bytes = False
        self.status = 0
        self.reason = ""
        self.raw_headers = []
        self.content_length = None
        self.complete = False
        self._head_bytes = 0
        self._framing = 0
        self._te = None
        self._headers_done = False
        self._body.clear()
        self._buffered = 0
        waiter = self._loop.create_future()
        self._headers_waiter = waiter
        if self.error is not None:
            waiter.set_exception(self.error)
        elif self.closed:
            waiter.set_exception(ConnectionLost("backend closed the connection", partial=False))
        return waiter

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait while the backend does not take what was written; TimeoutError past
        ``timeout`` seconds of that."""
        if self.closed:
            raise ConnectionLost("connection closed while sending", partial=self.got_bytes)
        if not self._writing_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiter = waiter
        timer = self._loop.call_later(timeout, expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    def read_ready(self) -> asyncio.Future[None] | None:
        """None when body bytes, the end or an error are ready; else a future to wait on."""
        if self._body or self.complete or self.error is not None:
            return None
        waiter = self._loop.create_future()
        self._body_waiter = waiter
        return waiter

    def take_body(self) -> bytes:
        """Everything buffered so far (b"" at the end); raises what broke the body."""
        if self._body:
            data = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
            self._body.clear()
            self._buffered = 0
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            return data
        if self.complete:
            return b""
        assert self.error is not None
        raise self.error

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and not self.head_only
            and self.error is None
            and not self.closed
            and not self._body
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self._fail(
                ConnectionLost(f"backend closed the connection: {exc}", partial=self.got_bytes)
            )
        self._wake_drain(exc)

    def eof_received(self) -> bool:
        self.closed = True
        # A body delimited by the end of the connection (no length, not chunked): llhttp
        # cannot be told about the end, so it is recognised here.
        if (
            self.in_flight
            and self._headers_done
            and not self.complete
            and self._te is None
            and not self._has_length
            and self.error is None
        ):
            self._on_complete()
        return False

    def data_received(self, data: bytes) -> None:
        if not self.in_flight or self.error is not None:
            # Bytes nobody asked for: the connection is out of step and must not be reused.
            self._fail(ResponseError("unexpected data from the backend"))
            self.close()
            return
        self.got_bytes = True
        self._progress = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ResponseError("the backend switched protocols"))
            self.close()
        except httptools.HttpParserError as exc:
            # A callback's own refusal comes wrapped ("User callback error"): say which.
            refused, self._refused = self._refused, None
            self._fail(refused or ResponseError(f"malformed response: {exc}"))
            self.close()
        except ResponseError as exc:
            self._fail(exc)
            self.close()
        else:
            if not self._headers_done:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._fail(ResponseError("response head too large"))
                    self.close()
            elif not self.complete:
                # Chunk sizes, their extensions and trailer fields are buffered by llhttp
                # until their line ends: bound the reads that brought no piece of body
                # (an answer of many tiny chunks always brings some).
                self._framing = 0 if self._progress else self._framing + len(data)
                if self._framing > MAX_HEAD:
                    self._fail(ResponseError("response trailer too large"))
                    self.close()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain(None)

    # -- llhttp callbacks -----------------------------------------------------------------

    def _refuse(self, message: str) -> ResponseError:
        # Kept for data_received (see gateway.front's _Connection._refuse for why).
        self._refused = error = ResponseError(message)
        return error

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request (in the same read as the first): the backend is
            # out of step. The first answer stands; the connection goes.
            raise self._refuse("data after the response")
        self.raw_headers = []
        self.content_length = None
        self.reason = ""  # not an interim answer's ("200 Early Hints")
        self._te = None
        self._has_length = False

    def on_status(self, status: bytes) -> None:
        if len(status) > MAX_FIELD:
            raise self._refuse("status line too long")
        self.reason = status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
            raise self._refuse("response header field too long")
        if self._headers_done:
            return  # a trailer field: dropped (the answer is re-framed), bounded as framing
        lower = name.lower()
        if lower == b"transfer-encoding":
            self._te = value if self._te is None else self._te + b"," + value
        elif lower == b"content-length":
            # llhttp has refused a malformed or conflicting length.
            self._has_length = True
            self.content_length = int(value)
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # Interim answers (100 Continue, 103 Early Hints) are skipped: the client gets
            # the final one only. 101 cannot come: the gateway never asks to upgrade.
            self.raw_headers = []
            self.content_length = None
            return
        if self._te is not None and self._te.strip().lower() != b"chunked":
            # RFC 9112 6.1: chunked must be the final coding; anything else would leave the
            # length to the end of the connection, the ambiguity smuggling lives on. Other
            # codings before it (gzip, chunked) are refused too: the answer is re-framed
            # for the client, and a coding dropped on the way would corrupt its body.
            raise self._refuse("a Transfer-Encoding other than chunked")
        self.status = status
        self._progress += 1  # the read that ends the head is not framing
        # HTTP/1.0 answers end their connection (RFC 9112 6.1: one with Transfer-Encoding
        # MUST; the keep-alive extension is not worth the doubt).
        self.keep_alive = (
            bool(self._parser.should_keep_alive()) and self._parser.get_http_version() == "1.1"
        )
        self._headers_done = True
        if self.head_only:
            # The answer to HEAD has no body whatever its Content-Length says; llhttp cannot
            # be told, so the connection is finished here and not reused.
            self.complete = True
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._progress += 1
        if self.head_only:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._headers_done:
            self._on_complete()

    # -- internals ------------------------------------------------------------------------

    def _on_complete(self) -> None:
        self.complete = True
        self.in_flight = False
        self._wake_body()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._wake_body()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wake_drain(self, exc: Exception | None) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                if exc is None and not self.closed:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(
                        ConnectionLost("connection closed while sending", partial=self.got_bytes)
                    )


def expire(waiter: asyncio.Future[None]) -> None:
    """A deadline's timer callback: the waiter, if still waiting, gets TimeoutError."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())
