"""The gateway's HTTP/1.1 server: an asyncio protocol on httptools (llhttp).

aiohttp's server spent about half of the gateway's CPU per request in the benchmark
(request objects, its payload writer, a task and a timer per request); this one parses
with the same llhttp, builds one small request object and writes each answer with one
``write``. It serves one handler, ``Callable[[Request], Awaitable[None]]``, which answers
through the request: ``respond`` for a whole answer, ``start``/``write``/``end`` to stream.

What it keeps of aiohttp's strictness, and how:
- llhttp runs without leniencies: Content-Length with Transfer-Encoding, two
  Content-Lengths, a Transfer-Encoding not ending in chunked, bad chunk sizes, obs-fold,
  bare CR or LF and whitespace before a colon are all refused with 400 and a close.
- A request line over ``limits.max_line_bytes`` is 414, a header field over
  ``limits.max_header_bytes`` or a head over ``max_line_bytes + 32 * max_header_bytes``
  (or more than 100 fields) is 431; the connection closes after each.
- An answer sent before the request's body was wholly received says
  ``Connection: close`` and closes: the unread rest is never parsed as a next request.
- Requests on one connection are answered in order; pipelined ones wait their turn.
- A head that does not arrive within ``limits.client_body_timeout_seconds`` is answered
  408; an idle keep-alive connection closes after ``keepalive_timeout`` seconds.
- An Upgrade (or CONNECT) request is answered like any other, then the connection closes:
  the gateway tunnels no other protocol.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any, Final, cast

import httptools
from multidict import CIMultiDict

from config.model import Limits
from gateway.errors import ClientGone, error_body
from gateway.headers import http_date

log = logging.getLogger(__name__)
access_log = logging.getLogger("metergate.access")

Handler = Callable[["Request"], Awaitable[None]]
# A handler's fast path, tried as a request's turn comes, before a task is made for it: True
# when it took the request, whose answering it then starts with Request.proceed (once a
# charge it sent to Redis is decided, say); False, and the handler runs in a task as usual.
# A request waiting there is "deferred": it holds its connection's turn like one being
# answered, and a shutdown past its deadline abandons it (Request.abandoned).
Admit = Callable[["Request"], bool]
# An encoded header block (``Name: value\\r\\n`` lines, from gateway.headers), or a mapping.
Headers = bytes | CIMultiDict[str] | dict[str, str]

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_MAX_FIELDS = 100
_HEAD_FIELDS_CAP = 32  # the head as a whole: request line + this many maximal fields
# A request body buffered beyond this pauses reading from the client until it is consumed.
_BODY_HIGH = 256 * 1024
_PIPELINE_MAX = 16
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEAD_TOO_LARGE = "the request head is too large"
_FIELD_TOO_LARGE = "a header field is too large"
_TRAILER_TOO_LARGE = "the trailer is too large"
# Requests parsed ahead of their turn: reading pauses at _PIPELINE_MAX, and a client that
# packs more than _PIPELINE_LIMIT into what was already read is refused.
_PIPELINE_LIMIT = 64
# The headers the gateway itself reads, noted as they are parsed (by length first: cheap).
_NOTED = frozenset({b"authorization", b"content-length", b"expect", b"host", b"transfer-encoding"})
_NOTED_LENGTHS = frozenset(len(n) for n in _NOTED)
_JSON = "application/json"
_VERSIONS = frozenset({"1.0", "1.1"})
# host[":" port] as a forwarded host: an IP literal (a zone too), or a name (IPv4 included)
# of DNS characters, with no comma a backend would split X-Forwarded-Host at; may be empty.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+(%25[A-Za-z0-9._~-]+)?\]|[A-Za-z0-9._-]*)(:[0-9]{1,5})?")
# Short Host values already checked (FrontServer.good_hosts): clients send the same few, and
# the check is a regex.
_GOOD_HOSTS_MAX = 1024
_GOOD_HOST_LENGTH = 260


class _HeadError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# What a lost connection keeps as its parser: one that calls nothing back.
_SPENT_PARSER: Final = httptools.HttpRequestParser(object())


class Request:
    """One request on a connection: its head, its streamed body, and its answer."""

    __slots__ = (
        "_body",
        "_broken",
        "_buffered",
        "_chunked_out",
        "_complete",
        "_conn",
        "_continued",
        "_headers",
        "_waiter",
        "abandoned",
        "authorization",
        "body_exists",
        "close",
        "content_length",
        "expect",
        "finished",
        "host",
        "keep_alive",
        "method",
        "raw_headers",
        "raw_path",
        "received",
        "remote",
        "scheme",
        "sent",
        "started",
        "status",
        "version",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        target: str,
        version: str,
        raw_headers: list[tuple[bytes, bytes]],
        noted: dict[bytes, list[bytes]],
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = target
        self.version = version
        self.raw_headers = raw_headers  # as parsed: what is forwarded, without re-encoding
        self._headers: CIMultiDict[str] | None = None
        self.keep_alive = keep_alive
        self.remote = conn.peer
        self.scheme = "http"
        host = noted.get(b"host")
        self.host = _text(host[0]) if host else None
        # Every Authorization line: more than one is refused by the proxy.
        self.authorization = [_text(v) for v in noted.get(b"authorization", ())]
        expect = noted.get(b"expect")
        # All of them: "100-continue" and another must not pass as the first alone.
        self.expect = _text(b", ".join(expect)) if expect else None
        length = noted.get(b"content-length")
        # llhttp has refused a malformed, repeated or Transfer-Encoding-paired length.
        self.content_length = int(length[0]) if length else None
        self.body_exists = bool(self.content_length) or b"transfer-encoding" in noted
        if version == "1.0" and b"transfer-encoding" in noted:
            self.keep_alive = False  # RFC 9112 6.1: close after such a message
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._broken = False
        self._waiter: asyncio.Future[None] | None = None
        self._continued = False
        self._chunked_out = False
        self.close = False  # the connection closes after this answer
        self.started = False
        self.finished = False
        self.status = 0
        self.sent = 0
        self.received = 0.0  # when its turn came (perf_counter), for the access log
        # Deferred, then given up by a shutdown past its deadline: nothing may start it.
        self.abandoned = False

    @property
    def headers(self) -> CIMultiDict[str]:
        """All the request's headers as text, built on first use (the proxy needs none)."""
        if self._headers is None:
            self._headers = CIMultiDict([(_text(n), _text(v)) for n, v in self.raw_headers])
        return self._headers

    # -- the request body -----------------------------------------------------------------

    async def readany(self) -> bytes:
        """The next piece of the body, b"" at its end; ClientGone if the client left."""
        while not self._body:
            if self._complete:
                return b""
            if self._broken:
                raise ClientGone("the request body is malformed")
            if self._conn.lost:
                raise ClientGone("the client closed the connection mid-body")
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = self._body.popleft()
        self._buffered -= len(chunk)
        self._conn.body_consumed()
        return chunk

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def send_continue(self) -> None:
        """Invite the body of an ``Expect: 100-continue`` request (once, HTTP/1.1 only)."""
        if self._continued or self._complete or self.version != "1.1":
            return
        expect = self.expect
        if expect is not None and expect.lower() == "100-continue":
            self._continued = True
            self._conn.send(_CONTINUE)

    def _feed(self, chunk: bytes) -> None:
        self._body.append(chunk)
        self._buffered += len(chunk)
        self._wake()

    def _end_body(self) -> None:
        self._complete = True
        self._wake()

    def _break(self) -> None:
        self._broken = True
        self.close = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def proceed(self, work: Awaitable[None]) -> None:
        """Start answering a request the server's ``admit`` took: ``work`` runs in a task as
        the handler would have. Ignored once a shutdown abandoned the request."""
        if self.abandoned:
            if asyncio.iscoroutine(work):
                work.close()  # never to run: no "never awaited" warning
            return
        self._conn.start(self, work)

    # -- the answer -----------------------------------------------------------------------

    def respond(
        self, status: int, headers: Headers, body: bytes = b"", *, reason: str | None = None
    ) -> None:
        """Send a whole answer in one write."""
        head = self._head(status, reason, headers, len(body))
        self.finished = True
        if self.method == "HEAD" or status in (204, 304):
            self._conn.send(head)
        else:
            self.sent = len(body)
            self._conn.send(head + body)

    def error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        """Answer with the gateway's JSON error body (see gateway.errors)."""
        out = {"Content-Type": _JSON}
        if headers:
            out.update(headers)
        self.respond(status, out, error_body(code, message, details))

    async def start(
        self,
        status: int,
        headers: Headers,
        *,
        length: int | None = None,
        reason: str | None = None,
    ) -> None:
        """Send the head of a streamed answer; without ``length`` its body is chunked."""
        head = self._head(status, reason, headers, length)
        if self.method == "HEAD" or status in (204, 304):
            self.finished = True
        await self._conn.write(head)

    async def write(self, chunk: bytes) -> None:
        if not chunk or self.finished:
            return  # a HEAD, 204 or 304 answer has no body, whatever the handler sends
        self.sent += len(chunk)
        if self._chunked_out:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        await self._conn.write(chunk)

    async def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._chunked_out:
            await self._conn.write(b"0\r\n\r\n")

    def hang_up(self) -> None:
        """Close the connection once this answer is out; call before answering."""
        self.close = True

    def abort(self) -> None:
        """Drop the connection now, unsent data included (a client that stopped reading)."""
        self.close = True
        self._conn.abort()

    def _head(self, status: int, reason: str | None, headers: Headers, length: int | None) -> bytes:
        if self.started:
            raise RuntimeError("the answer has already started")
        conn = self._conn
        # An answer before the whole body arrived: the rest of it must not be read as the
        # next request, so the connection ends with this answer.
        if not self._complete or conn.closing or not self.keep_alive:
            self.close = True
        # A bytes block comes from gateway.headers: checked values, and a Date.
        block = headers if isinstance(headers, bytes) else _encode_headers(headers)
        if status == 204 or status == 304 or status < 200:
            framing = b""
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif self.method == "HEAD":
            framing = b""
        elif self.version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
            self._chunked_out = True
        else:
            framing = b""
            self.close = True  # an HTTP/1.0 body without a length ends at the close
        if self.close:
            framing += b"Connection: close\r\n"
        elif self.version == "1.0":
            framing += b"Connection: keep-alive\r\n"
        phrase = reason or _REASONS.get(status, "Unknown")
        self.started = True  # only now: a head that failed to build can still become a 500
        self.status = status
        return b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (
            status,
            phrase.encode("utf-8", "surrogateescape"),
            block,
            framing,
        )


def _encode_headers(headers: CIMultiDict[str] | dict[str, str]) -> bytes:
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    if "Date" not in headers:
        lines.append(f"Date: {http_date()}\r\n")
    text = "".join(lines)
    # The gateway's own answers quote the request in places: a line break in a value
    # would split the answer, so line ends are counted, not trusted.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("a response header contains a line break")
    return text.encode("utf-8", "surrogateescape")


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_active",
        "_closed_at",
        "_drain",
        "_eof",
        "_field_bytes",
        "_fields",
        "_framing",
        "_head_bytes",
        "_head_size",
        "_headers",
        "_in_body",
        "_last",
        "_noted",
        "_out",
        "_parser",
        "_pending_error",
        "_progress",
        "_queue",
        "_read_paused",
        "_refused",
        "_server",
        "_target",
        "_target_size",
        "_transport",
        "_write_paused_at",
        "closing",
        "head_started",
        "idle_since",
        "loop",
        "lost",
        "parsing",
        "peer",
    )

    def __init__(self, server: FrontServer) -> None:
        self._server = server
        self.loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._out: bytes | None = None  # answers sent in this pass of the loop, not written
        self._eof = False  # the client shut its sending side
        self._headers: list[tuple[bytes, bytes]] = []
        self._noted: dict[bytes, list[bytes]] = {}  # the few headers the gateway reads
        self._target: list[bytes] = []
        self._target_size = 0
        self._head_size = 0  # the current head's line and fields, as parsed
        self._head_bytes = 0  # bytes of reads that fell wholly inside the current head
        self._field_bytes = 0  # ... of those reads since a header field last ended
        self._fields = 0  # header and trailer fields parsed on this connection
        self._in_body = False  # between a head and its message's end: fields are trailers
        self._progress = 0  # body pieces and message ends the read being fed gave
        self._framing = 0  # bytes of the reads since the last of those
        self._closed_at: float | None = None
        self._last: Request | None = None  # the request whose head was parsed last
        self.parsing: Request | None = None  # the request whose body is being received
        self._active: Request | None = None  # the request being answered
        self._queue: collections.deque[Request] = collections.deque()
        self._pending_error: _HeadError | None = None
        self._refused: _HeadError | None = None  # what a parser callback raised last
        self._read_paused = False
        self._write_paused_at: float | None = None  # since when the client is not reading
        self._drain: asyncio.Future[None] | None = None
        self.peer: str | None = None
        self.lost = False
        self.closing = False
        self.head_started: float | None = None
        self.idle_since: float | None = None

    # -- transport events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.idle_since = self.loop.time()
        self._server.connections.add(self)
        if self._server.closing:
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._out = None
        # The parser holds this connection's methods, and its requests point back at it:
        # cycles that only the cyclic collector frees, one per connection, at about
        # 8,000 instructions a request under a connection per request
        # (loadtests.instructions --new-connections). Nothing is parsed after this, nor a
        # queued request started, nor a pending error sent.
        self._parser = _SPENT_PARSER
        self._last = None
        self._queue.clear()
        self._pending_error = None  # its traceback holds this connection's frames
        self._server.connections.discard(self)
        release = self._server.on_release
        if release is not None:
            release()
        for request in (self._active, self.parsing):
            if request is not None:
                request._wake()
        self.parsing = None  # its reader sees the connection lost (Request.readany)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ClientGone("the client closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self._pending_error is not None:
            return
        in_head = self.head_started is not None
        fields = self._fields
        self._progress = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The upgrading request was delivered whole; what follows is another protocol,
            # so it is answered as a plain request and the connection ends there.
            self._stop_reading()
            if self._last is not None:
                self._last.close = True
        except httptools.HttpParserCallbackError:
            refused, self._refused = self._refused, None
            if refused is not None:
                self._fail(refused)
            else:  # pragma: no cover - the callbacks raise nothing else
                log.exception("HTTP parser callback failed")
                self._fail(_HeadError(400, "bad_request", "malformed request"))
        except httptools.HttpParserError as exc:
            self._fail(_HeadError(400, "bad_request", _parser_message(exc)))
        else:
            if in_head and self.head_started is not None:
                # A whole read inside one head: httptools buffers a field until it ends,
                # so a field that never ends is bounded here, not in on_header: by the
                # reads since a field last ended, and by all the head's reads.
                self._head_bytes += len(data)
                self._field_bytes = self._field_bytes + len(data) if fields == self._fields else 0
                if self._field_bytes > self._server.max_field:
                    self._fail(_HeadError(431, "request_head_too_large", _FIELD_TOO_LARGE))
                elif self._head_bytes > self._server.max_head:
                    self._fail(_HeadError(431, "request_head_too_large", _HEAD_TOO_LARGE))
            elif self._in_body:
                # A chunked body's framing (chunk sizes, their extensions, trailer fields)
                # is buffered by httptools until its line ends, reaching neither on_body
                # nor on_header: a field that never ends is bounded by the reads that
                # brought no piece of body (many tiny chunks always bring some).
                self._framing = 0 if self._progress else self._framing + len(data)
                if self._framing > self._server.max_head:
                    self._fail(_HeadError(431, "request_head_too_large", _TRAILER_TOO_LARGE))

    def eof_received(self) -> bool:
        # The client shut its side after its requests (`nc -N`, some health checkers): they
        # are still answered, then the connection closes. A body it cut short is broken off
        # (its handler sees ClientGone, so the request is refunded); a partial head is dropped.
        self._eof = True
        request = self.parsing
        if request is not None:
            self.parsing = None
            if request is self._active:
                request._break()
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)
        if self._active is not None or self._queue or self._pending_error is not None:
            return True  # keep the transport open to write the answers
        self.flush()
        return False  # the transport closes, after writing what it holds

    def pause_writing(self) -> None:
        # The client is not reading its answers: read no more of its requests either, or
        # a pipelining client that never reads would pile answers up in memory.
        self._write_paused_at = self.loop.time()
        self._stop_reading()

    def resume_writing(self) -> None:
        self._write_paused_at = None
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self._active is None and self._closed_at is None:
            self._next()

    # -- the parser's callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.head_started = self.loop.time()
        self.idle_since = None
        self._in_body = False
        self._headers = []
        self._noted = {}
        self._head_size = 0
        self._head_bytes = 0
        self._field_bytes = 0
        self._target_size = 0

    def _refuse(self, status: int, code: str, message: str) -> _HeadError:
        """The error a parser callback raises, kept for data_received to answer.

        Kept, not read back from the parser error's ``__context__``: raising replaces that
        with any exception being handled at the time, and compiled code (gateway/compiled.py)
        can be inside one.
        """
        self._refused = error = _HeadError(status, code, message)
        return error

    def on_url(self, piece: bytes) -> None:
        self._target.append(piece)
        self._target_size += len(piece)
        self._head_size += len(piece)
        if self._target_size > self._server.max_line:
            raise self._refuse(414, "uri_too_long", "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._in_body:
            # A trailer of a chunked body: never forwarded (the body is re-framed without
            # them) and never taken for a header of the next request; only bounded.
            self._head_size += len(name) + len(value) + 4
            if self._head_size > self._server.max_head:
                raise self._refuse(431, "request_head_too_large", _TRAILER_TOO_LARGE)
            return
        if len(name) + len(value) > self._server.max_field:
            raise self._refuse(431, "request_head_too_large", _FIELD_TOO_LARGE)
        headers = self._headers
        headers.append((name, value))
        if len(name) in _NOTED_LENGTHS:
            lower = name.lower()
            if lower in _NOTED:
                self._noted.setdefault(lower, []).append(value)
        if len(headers) > _MAX_FIELDS:
            raise self._refuse(431, "request_head_too_large", "too many header fields")
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._server.max_head:
            raise self._refuse(431, "request_head_too_large", _HEAD_TOO_LARGE)

    def on_headers_complete(self) -> None:
        self.head_started = None
        self._in_body = True
        self._head_size = 0  # from here on: the trailer's
        self._framing = 0
        self._progress += 1
        parser = self._parser
        raw, self._headers = self._headers, []
        noted, self._noted = self._noted, {}
        target = b"".join(self._target)
        self._target.clear()
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            target.decode("utf-8", "surrogateescape"),
            parser.get_http_version(),
            raw,
            noted,
            parser.should_keep_alive(),
        )
        if request.version not in _VERSIONS:
            # HTTP/0.9 has no headers to check, HTTP/2+ is not spoken on this port.
            message = f"HTTP/{request.version} is not supported"
            raise self._refuse(505, "http_version_not_supported", message)
        hosts = noted.get(b"host", ())
        if len(hosts) > 1 or (not hosts and request.version == "1.1"):
            # RFC 9112 3.2: exactly one Host in HTTP/1.1, at most one in 1.0; two would let
            # the gateway and the backend each believe another.
            raise self._refuse(400, "bad_request", "a request needs exactly one Host header")
        good_hosts = self._server.good_hosts
        if hosts and hosts[0] not in good_hosts:
            # Forwarded as X-Forwarded-Host: only a host[:port] as RFC 3986 writes it.
            host = _HOST.fullmatch(hosts[0])
            if host is None or (host[3] is not None and int(host[3][1:]) > 65535):
                raise self._refuse(400, "bad_request", "the Host header is not a host[:port]")
            if len(hosts[0]) <= _GOOD_HOST_LENGTH:
                if len(good_hosts) >= _GOOD_HOSTS_MAX:
                    good_hosts.clear()
                good_hosts.add(hosts[0])
        codings = noted.get(b"transfer-encoding")
        if codings and (len(codings) > 1 or codings[0].strip().lower() != b"chunked"):
            # llhttp has refused one not ending in chunked; one before it (gzip, chunked)
            # would be lost when the body is re-framed for the backend (RFC 9112 6.1: 501).
            message = "only Transfer-Encoding: chunked is supported"
            raise self._refuse(501, "unsupported_transfer_coding", message)
        if parser.should_upgrade() and request.body_exists:
            # llhttp hands what follows an upgrade's head to the other protocol: the body
            # would silently go missing, and the request be forwarded (and paid) without.
            raise self._refuse(400, "bad_request", "an Upgrade or CONNECT request with a body")
        if len(self._queue) >= _PIPELINE_LIMIT:
            # Reading pauses at _PIPELINE_MAX, but one read may hold many more requests.
            raise self._refuse(400, "bad_request", "too many pipelined requests")
        self.parsing = request
        self._last = request
        if self._active is None and self._write_paused_at is None:
            self._dispatch(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= _PIPELINE_MAX:
                self._stop_reading()

    def on_body(self, chunk: bytes) -> None:
        self._progress += 1
        request = self.parsing
        if request is not None:
            request._feed(chunk)
            if request._buffered > _BODY_HIGH:
                self._stop_reading()

    def on_message_complete(self) -> None:
        self._in_body = False
        request, self.parsing = self.parsing, None
        if request is not None:
            request._end_body()

    # -- answering ------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self._active = request
        server = self._server
        if server.access_log:
            request.received = time.perf_counter()
        admit = server.admit
        if admit is not None and request.expect is None:
            deferred = server.deferred
            deferred.add(request)
            failed: Exception | None = None
            try:
                if admit(request):
                    return  # admit starts it (Request.proceed), maybe already has
            except Exception as exc:
                failed = exc
            if request not in deferred:
                return  # started already, then admit failed: the task answers
            deferred.discard(request)
            if failed is not None:
                # Whatever admit set going (a charge) sees the request abandoned; it is
                # answered 500 in a task, as a handler's failure would be.
                request.abandoned = True
                self.start(request, _fail(failed))
                return
        self.start(request, None)

    def start(self, request: Request, work: Awaitable[None] | None) -> None:
        """Answer ``request`` in a task: ``work``, or the server's handler when None."""
        server = self._server
        deferred = server.deferred
        if work is not None and request in deferred:
            deferred.remove(request)
        elif work is not None and not request.abandoned:
            # Proceeding twice, or without admit having taken it: a second answer.
            log.error("request %s %s proceeded twice", request.method, request.raw_path)
            if asyncio.iscoroutine(work):
                work.close()
            return
        task = self.loop.create_task(self._run(request, work))
        tasks = server.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, request: Request, work: Awaitable[None] | None) -> None:
        server = self._server
        try:
            expect = request.expect
            if work is not None:
                await work
            elif expect is not None and expect.lower() != "100-continue":
                # RFC 9110 10.1.1: an expectation the server cannot meet.
                request.hang_up()
                request.error(417, "expectation_failed", f"cannot meet Expect: {expect}")
            else:
                await server.handler(request)
            if not request.started:
                raise RuntimeError("the handler returned without answering")
        except Exception:
            log.exception("request %s %s failed", request.method, request.raw_path)
            if not request.started and not self.lost:
                request.error(500, "internal_error", "internal error")
            else:
                request.close = True
        finally:
            # Also when cancelled (a shutdown past its timeout): the connection is settled.
            if not request.finished:
                request.close = True  # a streamed answer that did not end cannot be framed
            if server.access_log:
                _log_access(request, time.perf_counter() - request.received)
            self._answered(request)

    def _answered(self, request: Request) -> None:
        self._active = None
        if (
            request.close
            or self.lost
            or self.closing
            or (self._eof and not self._queue and self._pending_error is None)
        ):
            self.close()
            return
        self._next()

    def _next(self) -> None:
        """Go on with the connection: the next queued request, a pending error, or idle."""
        if self._active is not None or self.lost:
            return
        if self._queue:
            self.flush()  # a client that stopped reading says so (pause_writing) at once
        if self._write_paused_at is not None:
            return  # resume_writing calls again
        if self._queue:
            self._dispatch(self._queue.popleft())
            self._maybe_resume()
        elif self._pending_error is not None:
            self._send_error(self._pending_error)
        else:
            self.idle_since = self.loop.time()
            self._maybe_resume()

    def body_consumed(self) -> None:
        if self._read_paused:
            self._maybe_resume()

    def send(self, data: bytes) -> None:
        """Send at the end of this pass of the event loop, with the pass's other answers.

        Written back to back, the answers of a pass wake a client once rather than once
        each; on loopback and in VMs that wakeup is the dearest part of a write (the
        benchmark's CPU per request fell by 11% with it, its throughput rose by 19%).
        Whatever else goes out on this connection (write, close) flushes it first."""
        transport = self._transport
        if transport is not None and not self.lost and not transport.is_closing():
            if self._out is None:
                self._out = data
                self._server.hold(self)
            else:
                self._out += data

    def flush(self) -> None:
        """Write the answers held for the end of this pass now (none held: nothing)."""
        out = self._out
        if out is not None:
            self._out = None
            transport = self._transport
            if transport is not None and not self.lost and not transport.is_closing():
                transport.write(out)

    async def write(self, data: bytes) -> None:
        transport = self._transport
        if self.lost or transport is None or transport.is_closing():
            raise ClientGone("the client closed the connection")
        self.flush()
        transport.write(data)
        if self._write_paused_at is not None:
            drain = self._drain
            if drain is None or drain.done():  # done: cancelled by a writer's timeout
                drain = self._drain = self.loop.create_future()
            await drain

    def close(self) -> None:
        self.flush()
        if self._transport is not None:
            self._transport.close()  # sends what is buffered first; expire() bounds that
            if self._closed_at is None:
                self._closed_at = self.loop.time()

    def abort(self) -> None:
        self._out = None
        if self._transport is not None:
            self._transport.abort()

    # -- errors, flow control, shutdown ---------------------------------------------------

    def _fail(self, error: _HeadError) -> None:
        self._stop_reading()
        if self.parsing is not None and self.parsing is not self._active:
            # A request whose body broke: drop it, it was never answered.
            with contextlib.suppress(ValueError):
                self._queue.remove(self.parsing)
        if self._active is not None or self._queue:
            if self.parsing is self._active and self._active is not None:
                # Its body broke off in error: its handler sees ClientGone, and the
                # connection closes after its answer.
                self._active._break()
            # Answered after the requests before it, in order (see _next).
            self.parsing = None
            self._pending_error = error
            return
        self.parsing = None
        self._send_error(error)

    def _send_error(self, error: _HeadError) -> None:
        self._pending_error = None
        if self.lost:
            return
        body = error_body(error.code, str(error))
        lines = (
            f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}\r\n"
            f"Content-Type: {_JSON}\r\nContent-Length: {len(body)}\r\n"
            f"Date: {http_date()}\r\nConnection: close\r\n\r\n"
        )
        self.send(lines.encode("ascii") + body)
        self.close()
        if self._server.access_log:
            access_log.info('%s "-" %d %d -', self.peer or "-", error.status, len(body))

    def _stop_reading(self) -> None:
        if not self._read_paused and self._transport is not None and not self.lost:
            self._read_paused = True
            self._transport.pause_reading()

    def _maybe_resume(self) -> None:
        if not self._read_paused or self.lost or self._eof or self._pending_error is not None:
            return
        if self._write_paused_at is not None:
            return  # resume_writing comes back here
        parsing = self.parsing
        if len(self._queue) >= _PIPELINE_MAX or (
            parsing is not None and parsing._buffered > _BODY_HIGH
        ):
            return
        if parsing is not None and parsing.close and parsing is self._active:
            return
        self._read_paused = False
        assert self._transport is not None
        self._transport.resume_reading()

    def shutdown(self) -> None:
        """Close when idle; a request in flight is answered first, with Connection: close."""
        self.closing = True
        if self._active is None and self.head_started is None:
            self.close()

    def expire(self, now: float) -> None:
        """Close an idle keep-alive connection, answer 408 to a head that stalled, and
        drop a connection whose client does not read what is left to send (closed, or
        with answers waiting on it)."""
        server = self._server
        stalled = self._write_paused_at
        if stalled is not None and now - stalled > server.head_timeout:
            self.abort()
        elif self._closed_at is not None:
            if now - self._closed_at > server.head_timeout:
                self.abort()
        elif self.head_started is not None:
            if now - self.head_started > server.head_timeout and self._active is None:
                self._fail(_HeadError(408, "request_timeout", "the request head did not arrive"))
        elif self.idle_since is not None and now - self.idle_since > server.keepalive_timeout:
            self.close()


async def _fail(error: Exception) -> None:
    raise error


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _parser_message(exc: Exception) -> str:
    return str(exc.args[0]) if exc.args else "malformed request"


def _log_access(request: Request, elapsed: float) -> None:
    access_log.info(
        '%s "%s %s HTTP/%s" %d %d %.6f',
        request.remote or "-",
        request.method,
        request.raw_path,
        request.version,
        request.status,
        request.sent,
        elapsed,
    )


class FrontServer:
    """The listening side: a protocol factory, its connections, their timers and shutdown."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        *,
        admit: Admit | None = None,
        keepalive_timeout: float = 75.0,
        access_log: bool = False,
    ) -> None:
        self.handler = handler
        self.admit = admit
        self.loop = asyncio.get_running_loop()
        self.max_line = limits.max_line_bytes
        self.max_field = limits.max_header_bytes
        self.max_head = limits.max_line_bytes + _HEAD_FIELDS_CAP * limits.max_header_bytes
        self.head_timeout = limits.client_body_timeout_seconds
        self.keepalive_timeout = keepalive_timeout
        self.access_log = access_log
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # requests being answered
        self.deferred: set[Request] = set()  # requests admit took, not yet started
        self._held: list[_Connection] = []  # connections with answers sent this pass
        self.good_hosts: set[bytes] = set()  # Host values that passed the check
        self.closing = False
        # Called as each connection ends, when a balancer hands this worker its
        # connections (gateway.balance): it counts them.
        self.on_release: Callable[[], None] | None = None
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> _Connection:
        return _Connection(self)

    def hold(self, conn: _Connection) -> None:
        if not self._held:
            self.loop.call_soon(self._flush_held)
        self._held.append(conn)

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for conn in held:
            try:
                conn.flush()  # a no-op for one a write or close flushed already
            except Exception:  # one connection's failure must not hold back the others
                log.exception("writing an answer failed")
                conn.abort()

    async def listen(
        self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024
    ) -> asyncio.Server:
        server = await self.loop.create_server(
            self, host, port, reuse_port=reuse_port or None, backlog=backlog
        )
        self._servers.append(server)
        self.sweep()
        return server

    def sweep(self) -> None:
        """Start the timer that enforces the head, keep-alive and write timeouts: when
        listening, or when connections come from a balancer (gateway.balance)."""
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    @property
    def sockets(self) -> Iterable[object]:
        # Read untyped: uvloop's is a list where typeshed says tuple, and compiled code
        # (gateway/compiled.py) checks declared types.
        servers: list[Any] = self._servers
        for server in servers:
            yield from server.sockets

    async def _sweep(self) -> None:
        # One timer for all connections, not one per request: the deadlines are coarse.
        period = max(0.05, min(1.0, self.head_timeout / 4, self.keepalive_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.expire(now)

    async def shutdown(self, timeout: float) -> None:
        """Stop listening, let requests in flight finish for up to ``timeout`` seconds."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + timeout
        while (self.connections or self.tasks or self.deferred) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        # Requests still deferred never start: whoever took them (the proxy's charges) sees
        # them abandoned, as a task's awaited future would be cancelled. Each still gets its
        # access-log line (status 0, as a cancelled task's unanswered request).
        now = time.perf_counter()
        for request in self.deferred:
            request.abandoned = True
            if self.access_log:
                _log_access(request, now - request.received)
        self.deferred.clear()
        for conn in list(self.connections):
            conn.abort()
        # A task made in this pass (a charge settled by its timer) takes its first step
        # before it is cancelled, so its answer's bookkeeping runs.
        await asyncio.sleep(0)
        # Handlers past the deadline are cancelled, so none outlives the resources (Redis,
        # backend pools) that the app closes next.
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
