"""gateway.front, the gateway's HTTP/1.1 server, held to what its docstring promises: over
real loopback sockets, first with a small handler of our own, then in front of the gateway
where a request that breaks off must not be paid for."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import pytest
import redis.asyncio as redis
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from prometheus_client import REGISTRY

from config.model import Limits
from gateway import keys
from gateway.errors import ClientGone
from gateway.front import Admit, FrontServer, Handler, Request
from tests.conftest import GatewayServer, auth, load_test_config, replace_section

WAIT = 2.0  # the most any single read may take before the test fails instead of hanging
TEXT = {"Content-Type": "text/plain"}


# -- a client on raw sockets --------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    raw: bytes  # the head as received, for framing assertions


def _request(
    method: str = "GET",
    path: str = "/",
    *,
    version: str = "1.1",
    headers: Iterable[str] = (),
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}"]
    if version == "1.1":
        lines.append("Host: front.test")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            while await reader.readline() != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        assert await reader.readexactly(2) == b"\r\n"


async def _read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> Answer:
    """One answer, its body framed as its head says (a HEAD's answer has none)."""

    async def read() -> Answer:
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *fields = raw[:-4].decode("latin-1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), raw
        status = int(status_line.split(" ")[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for field in fields:
            name, _, value = field.partition(":")
            headers.add(name, value.strip())
        if head_only or status in (204, 304) or status < 200:
            body = b""
        elif "Content-Length" in headers:
            body = await reader.readexactly(int(headers["Content-Length"]))
        elif headers.get("Transfer-Encoding") == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.read()
        return Answer(status, headers, body, raw)

    return await asyncio.wait_for(read(), WAIT)


async def _closed(reader: asyncio.StreamReader) -> bool:
    """True when the server closed the connection with nothing more to say."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT) == b""
    except ConnectionResetError:
        return True


async def _still_open(reader: asyncio.StreamReader, seconds: float = 0.05) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    return False


def _error_code(answer: Answer) -> str:
    assert answer.headers["Content-Type"] == "application/json"
    return str(json.loads(answer.body)["error"]["code"])


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def _connect(port: int, sock: socket.socket | None = None) -> AsyncIterator[Conn]:
    if sock is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


# -- the server under test, with handlers of our own --------------------------------------


@dataclass
class Front:
    server: FrontServer
    port: int


Serve = Callable[..., Awaitable[Front]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start FrontServers on loopback ports; each is shut down after the test."""
    fronts: list[FrontServer] = []

    async def start(
        handler: Handler,
        limits: Limits | None = None,
        *,
        keepalive_timeout: float = 75.0,
        admit: Admit | None = None,
        access_log: bool = False,
    ) -> Front:
        front = FrontServer(
            handler,
            limits or Limits(),
            keepalive_timeout=keepalive_timeout,
            admit=admit,
            access_log=access_log,
        )
        fronts.append(front)
        listening = await front.listen("127.0.0.1", 0)
        return Front(front, listening.sockets[0].getsockname()[1])

    try:
        yield start
    finally:
        for front in fronts:
            await front.shutdown(1.0)


class Recorder:
    """Reads the whole body and answers with what it saw; remembers every request."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, request: Request) -> None:
        self.seen.append(f"{request.method} {request.raw_path}")
        body = await request.read()
        text = f"{request.method} {request.raw_path} {len(body)}"
        request.respond(200, TEXT, text.encode())


# -- connections: keep-alive, pipelining, HTTP/1.0 ----------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection(serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    async with _connect(front.port) as (reader, writer):
        for i in range(3):
            await _send(writer, _request("POST", f"/r{i}", headers=["Content-Length: 2"]) + b"ok")
            answer = await _read_answer(reader)
            assert (answer.status, answer.body) == (200, f"POST /r{i} 2".encode())
            assert "Connection" not in answer.headers
        assert await _still_open(reader)
    assert recorder.seen == ["POST /r0", "POST /r1", "POST /r2"]


async def test_pipelined_requests_are_answered_in_order(serve: Serve) -> None:
    events: list[str] = []

    async def handler(request: Request) -> None:
        events.append(f"start {request.raw_path}")
        # The first is the slowest: answering as they finish would reverse the order.
        await asyncio.sleep({"/a": 0.06, "/b": 0.03}.get(request.raw_path, 0))
        events.append(f"end {request.raw_path}")
        request.respond(200, TEXT, request.raw_path.encode())

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, b"".join(_request("GET", p) for p in ("/a", "/b", "/c")))
        bodies = [(await _read_answer(reader)).body for _ in range(3)]
    assert bodies == [b"/a", b"/b", b"/c"]
    # Pipelined requests wait their turn: one handler at a time, in arrival order.
    assert events == ["start /a", "end /a", "start /b", "end /b", "start /c", "end /c"]


async def test_an_answer_held_for_the_end_of_the_pass_stays_before_what_follows(
    serve: Serve,
) -> None:
    # An answer waits for the end of the loop's pass to be written; a streamed answer, a
    # close or an error that follows it on the connection must still come after it.
    async def handler(request: Request) -> None:
        if request.raw_path == "/stream":
            await _stream(request)
        else:
            request.respond(200, TEXT, request.raw_path.encode())

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        pipelined = [_request("GET", "/a"), _request("GET", "/stream"), _request("GET", "/b")]
        await _send(writer, b"".join(pipelined) + b"GARBAGE\r\n\r\n")
        answers = [await _read_answer(reader) for _ in range(4)]
        assert await _closed(reader)
    assert [a.body for a in answers[:3]] == [b"/a", b"hello world", b"/b"]
    assert (answers[3].status, _error_code(answers[3])) == (400, "bad_request")


@pytest.mark.parametrize("delay", [0.0, 0.05], ids=["at-once", "after-a-wait"])
async def test_a_client_that_shuts_its_side_after_its_requests_gets_their_answers(
    serve: Serve, delay: float
) -> None:
    # As `printf 'GET ...' | nc -N` does: the requests, then the sending side shut.
    async def handler(request: Request) -> None:
        await asyncio.sleep(delay)
        request.respond(200, TEXT, request.raw_path.encode())

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/a") + _request("GET", "/b"))
        writer.write_eof()
        bodies = [(await _read_answer(reader)).body for _ in range(2)]
        assert await _closed(reader)
    assert bodies == [b"/a", b"/b"]


async def test_a_body_cut_short_by_a_half_close_is_broken_off(serve: Serve) -> None:
    outcome: list[str] = []

    async def handler(request: Request) -> None:
        try:
            await request.read()
        except ClientGone:  # as the proxy does: refunded, and answered 400
            outcome.append("client gone")
            request.respond(400, TEXT, b"the body broke off")
        else:
            request.respond(200, TEXT, b"read")

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("POST", "/upload", headers=["Content-Length: 10"]) + b"12")
        writer.write_eof()
        answer = await _read_answer(reader)
        assert await _closed(reader)
    assert outcome == ["client gone"]
    assert (answer.status, answer.body) == (400, b"the body broke off")


_BIG = b"x" * (16 * 1024 * 1024)  # more than loopback's socket buffers hold


async def test_a_client_that_stops_reading_gets_no_further_request_answered(
    serve: Serve,
) -> None:
    seen: list[str] = []

    async def handler(request: Request) -> None:
        seen.append(request.raw_path)
        request.respond(200, TEXT, _BIG if request.raw_path == "/big" else b"small")

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/big") + _request("GET", "/small"))
        await asyncio.sleep(0.3)  # not reading: the first answer fills every buffer
        assert seen == ["/big"]  # so the next request waits, not forwarded nor charged
        assert len((await _read_answer(reader)).body) == len(_BIG)
        assert (await _read_answer(reader)).body == b"small"
    assert seen == ["/big", "/small"]


async def test_a_client_that_never_reads_its_answer_is_dropped(serve: Serve) -> None:
    async def handler(request: Request) -> None:
        request.respond(200, TEXT, _BIG)

    front = await serve(handler, Limits(client_body_timeout_seconds=0.3))
    async with _connect(front.port) as (_, writer):
        await _send(writer, _request("GET", "/big") + _request("GET", "/big"))
        deadline = time.monotonic() + 3
        while front.server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not front.server.connections  # aborted, not held open forever


async def test_a_bad_request_pipelined_after_a_good_one_is_answered_after_it(
    serve: Serve,
) -> None:
    async def handler(request: Request) -> None:
        await asyncio.sleep(0.05)  # the broken one has been parsed by the time this answers
        request.respond(200, TEXT, b"first")

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/a") + b"GARBAGE\r\n\r\n")
        first = await _read_answer(reader)
        second = await _read_answer(reader)
        assert await _closed(reader)
    assert (first.status, first.body) == (200, b"first")
    assert (second.status, _error_code(second)) == (400, "bad_request")
    assert second.headers["Connection"] == "close"


async def test_http10_without_keep_alive_closes_after_the_answer(serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/old", version="1.0"))
        answer = await _read_answer(reader)
        assert (answer.status, answer.body) == (200, b"GET /old 0")
        assert answer.headers["Connection"] == "close"
        assert await _closed(reader)


async def test_http10_with_keep_alive_stays_open_and_says_so(serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    async with _connect(front.port) as (reader, writer):
        for path in ("/one", "/two"):
            request = _request("GET", path, version="1.0", headers=["Connection: keep-alive"])
            await _send(writer, request)
            answer = await _read_answer(reader)
            assert answer.body == f"GET {path} 0".encode()
            assert answer.headers["Connection"] == "keep-alive"
        assert await _still_open(reader)
    assert recorder.seen == ["GET /one", "GET /two"]


# -- timeouts -----------------------------------------------------------------------------


async def test_an_idle_keep_alive_connection_closes_after_the_timeout(serve: Serve) -> None:
    front = await serve(Recorder(), keepalive_timeout=0.3)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/first"))
        await _read_answer(reader)
        # A request within the timeout is served, and the idle time counts from its answer.
        await asyncio.sleep(0.15)
        await _send(writer, _request("GET", "/second"))
        assert (await _read_answer(reader)).body == b"GET /second 0"
        answered = time.monotonic()
        assert await _closed(reader)
        idle = time.monotonic() - answered
    assert 0.25 <= idle < 0.8


async def test_a_head_that_stalls_gets_408(serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder, Limits(client_body_timeout_seconds=0.3))
    async with _connect(front.port) as (reader, writer):
        began = time.monotonic()
        await _send(writer, b"GET /slow HTTP/1.1\r\nHost: front.test\r\nX-Half")
        answer = await _read_answer(reader)
        waited = time.monotonic() - began
        assert await _closed(reader)
    assert (answer.status, _error_code(answer)) == (408, "request_timeout")
    assert answer.headers["Connection"] == "close"
    assert 0.25 <= waited < 0.8
    assert recorder.seen == []


# -- limits on the head -------------------------------------------------------------------

SMALL = Limits(max_line_bytes=100, max_header_bytes=100)  # a whole head: 100 + 32 * 100


async def _exchange(port: int, *writes: bytes) -> tuple[Answer, bool]:
    """The first answer to these writes, and whether it said Connection: close and closed."""
    async with _connect(port) as (reader, writer):
        for data in writes:
            with contextlib.suppress(ConnectionError):
                await _send(writer, data)
            await asyncio.sleep(0.01)
        answer = await _read_answer(reader)
        said_close = answer.headers.get("Connection") == "close"
        return answer, said_close and await _closed(reader)


@pytest.mark.parametrize(("fields", "status"), [(100, 200), (101, 431)])
async def test_more_than_100_header_fields_is_431(fields: int, status: int, serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    # Host is one of them.
    request = _request("GET", "/", headers=[f"X-F{i}: v" for i in range(fields - 1)])
    answer, closed = await _exchange(front.port, request)
    assert answer.status == status
    if status == 431:
        assert _error_code(answer) == "request_head_too_large"
        assert closed
        assert recorder.seen == []


@pytest.mark.parametrize(("length", "status"), [(100, 200), (101, 431)])
async def test_a_header_field_over_max_header_bytes_is_431(
    length: int, status: int, serve: Serve
) -> None:
    recorder = Recorder()
    front = await serve(recorder, SMALL)
    # What counts is the name and the value: "X-Long" and the rest of the length in "a".
    request = _request("GET", "/", headers=["X-Long: " + "a" * (length - len("X-Long"))])
    answer, closed = await _exchange(front.port, request)
    assert answer.status == status
    if status == 431:
        assert _error_code(answer) == "request_head_too_large"
        assert closed
        assert recorder.seen == []


def _big_head() -> bytes:
    # 40 fields of 90 bytes, each under the 100-byte limit: about 3,700 bytes of head
    # against a bound of 100 + 32 * 100 = 3,300.
    fields = [f"X-F{i:02}: " + "a" * 84 for i in range(40)]
    return _request("GET", "/", headers=fields)


@pytest.mark.parametrize("ended", [False, True], ids=["before-it-ends", "in-one-read"])
async def test_a_head_over_its_total_limit_is_431(ended: bool, serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder, SMALL)
    head = _big_head()
    # Without the blank line that ends it, the server must not wait for the end; with it,
    # a head that ends in the read that carries it is measured all the same.
    answer, closed = await _exchange(front.port, head if ended else head[:-2])
    assert (answer.status, _error_code(answer)) == (431, "request_head_too_large")
    assert closed
    assert recorder.seen == []


async def test_the_body_before_a_pipelined_head_does_not_count_towards_it(
    serve: Serve,
) -> None:
    recorder = Recorder()
    front = await serve(recorder, SMALL)
    first = _request("POST", "/a", headers=["Content-Length: 4000"], body=b"x" * 4000)
    second = _request("GET", "/b")
    async with _connect(front.port) as (reader, writer):
        # One read holds the first request whole and the second's head but its last line.
        await _send(writer, first + second[:-2])
        await asyncio.sleep(0.05)
        await _send(writer, second[-2:])
        answers = [await _read_answer(reader) for _ in range(2)]
    assert [a.status for a in answers] == [200, 200]
    assert recorder.seen == ["POST /a", "GET /b"]


@pytest.mark.parametrize(("length", "status"), [(100, 200), (101, 414)])
async def test_a_target_over_max_line_bytes_is_414(length: int, status: int, serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder, SMALL)
    target = "/" + "t" * (length - 1)
    answer, closed = await _exchange(front.port, _request("GET", target))
    assert answer.status == status
    if status == 414:
        assert _error_code(answer) == "uri_too_long"
        assert closed
        assert recorder.seen == []
    else:
        assert recorder.seen == [f"GET {target}"]


# -- what ends a connection ---------------------------------------------------------------

SMUGGLED = _request("GET", "/smuggled")


async def test_a_closed_connection_is_freed_without_the_cyclic_collector(serve: Serve) -> None:
    # Each connection left as a reference cycle costs a collection's work under load.
    async def read_then_answer(request: Request) -> None:
        # Not raising: a logged traceback would keep the request alive, hiding a cycle.
        with contextlib.suppress(ClientGone):
            await request.read()
        request.respond(200, TEXT, b"")

    front = await serve(read_then_answer)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds goes to gc.garbage
    try:
        for ending in ("Connection: close", "Connection: keep-alive"):
            async with _connect(front.port) as (reader, writer):
                # Two requests at once: the second is queued when the first's answer
                # closes the connection (or, kept alive, when the client hangs up).
                await _send(writer, _request(headers=[ending]) + _request(headers=[ending]))
                assert (await _read_answer(reader)).status == 200
        # A client gone mid-body (reset, not shut: no EOF first), its handler reading it.
        async with _connect(front.port) as (reader, writer):
            await _send(writer, _request("POST", headers=["Content-Length: 100"]) + b"part")
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for _ in range(100):
            if not front.server.connections and not front.server.tasks:
                break
            await asyncio.sleep(0.01)
        assert not front.server.connections and not front.server.tasks
        gc.collect()
        left = [type(o).__qualname__ for o in gc.garbage if type(o).__module__ == "gateway.front"]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


UPGRADES = [
    _request(
        "GET",
        "/ws",
        headers=[
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ],
    ),
    b"CONNECT backend.test:443 HTTP/1.1\r\nHost: backend.test:443\r\n\r\n",
]


@pytest.mark.parametrize("follower", ["same-write", "after-the-answer"])
@pytest.mark.parametrize("head", UPGRADES, ids=["websocket", "connect"])
async def test_an_upgrade_is_answered_then_the_connection_closes(
    head: bytes, follower: str, serve: Serve
) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    async with _connect(front.port) as (reader, writer):
        # What follows the upgrade belongs to another protocol: never a request of ours.
        await _send(writer, head + SMUGGLED if follower == "same-write" else head)
        answer = await _read_answer(reader)
        assert answer.status == 200
        assert answer.headers.get("Connection") == "close"
        if follower == "after-the-answer":
            with contextlib.suppress(ConnectionError):
                await _send(writer, SMUGGLED)
        assert await _closed(reader)
    assert len(recorder.seen) == 1
    assert "/smuggled" not in recorder.seen[0]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_answer_before_the_body_arrived_closes_the_connection(
    framing: str, serve: Serve
) -> None:
    seen: list[str] = []

    async def handler(request: Request) -> None:
        seen.append(request.raw_path)
        request.respond(403, TEXT, b"not you")  # without reading the body

    front = await serve(handler)
    if framing == "content-length":
        head = _request("POST", "/upload", headers=[f"Content-Length: {len(SMUGGLED)}"])
        body = SMUGGLED
    else:
        head = _request("POST", "/upload", headers=["Transfer-Encoding: chunked"])
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, head)
        answer = await _read_answer(reader)
        assert (answer.status, answer.body) == (403, b"not you")
        assert answer.headers["Connection"] == "close"
        with contextlib.suppress(ConnectionError):
            await _send(writer, body)  # the body, which looks like a request, comes late
        assert await _closed(reader)
    assert seen == ["/upload"]


# -- answers ------------------------------------------------------------------------------


async def _stream(request: Request) -> None:
    await request.start(200, TEXT)
    await request.write(b"hello")
    await request.write(b" world")
    await request.end()


async def test_a_streamed_answer_without_length_is_chunked_on_http11(serve: Serve) -> None:
    front = await serve(_stream)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/stream"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert b"\r\nTransfer-Encoding: chunked\r\n" in head
        assert b"Content-Length" not in head and b"Connection" not in head
        expected = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        assert await asyncio.wait_for(reader.readexactly(len(expected)), WAIT) == expected
        # The chunked framing ended the answer: the connection serves another.
        await _send(writer, _request("GET", "/again"))
        assert (await _read_answer(reader)).body == b"hello world"


@pytest.mark.parametrize("keep_alive", [False, True], ids=["plain", "keep-alive"])
async def test_a_streamed_answer_without_length_is_close_delimited_on_http10(
    keep_alive: bool, serve: Serve
) -> None:
    front = await serve(_stream)
    headers = ["Connection: keep-alive"] if keep_alive else []
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/stream", version="1.0", headers=headers))
        answer = await _read_answer(reader)
    # HTTP/1.0 has no chunked coding: the body ends where the connection does.
    assert "Transfer-Encoding" not in answer.headers
    assert "Content-Length" not in answer.headers
    assert answer.headers["Connection"] == "close"
    assert answer.body == b"hello world"


async def _respond_hello(request: Request) -> None:
    request.respond(200, TEXT, b"hello")


async def _stream_hello(request: Request) -> None:
    # A handler that does not look at the method: the server keeps a HEAD's answer bodiless.
    await request.start(200, TEXT, length=5)
    await request.write(b"hello")
    await request.end()


@pytest.mark.parametrize(
    "handler",
    [
        _respond_hello,
        _stream_hello,
    ],
    ids=["respond", "stream"],
)
async def test_head_gets_no_body(handler: Handler, serve: Serve) -> None:
    async def either(request: Request) -> None:
        if request.raw_path == "/after":
            request.respond(200, TEXT, b"after")
        else:
            await handler(request)

    front = await serve(either)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("HEAD", "/hello"))
        answer = await _read_answer(reader, head_only=True)
        assert (answer.status, answer.headers["Content-Length"]) == (200, "5")
        # Had any body been sent, it would stand where the next answer's status line is.
        await _send(writer, _request("GET", "/after"))
        after = await _read_answer(reader)
    assert (after.status, after.body) == (200, b"after")


async def _raises(request: Request) -> None:
    raise RuntimeError("the handler broke")


async def _silent(request: Request) -> None:
    await request.read()


@pytest.mark.parametrize("handler", [_raises, _silent], ids=["raises", "returns-unanswered"])
async def test_a_handler_that_fails_to_answer_gets_500(handler: Handler, serve: Serve) -> None:
    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/broken"))
        answer = await _read_answer(reader)
    assert answer.status == 500
    assert json.loads(answer.body) == {
        "error": {"code": "internal_error", "message": "internal error"}
    }
    assert answer.headers["Content-Type"] == "application/json"


async def test_a_stream_that_breaks_off_ends_the_connection(serve: Serve) -> None:
    async def handler(request: Request) -> None:
        await request.start(200, TEXT)
        await request.write(b"half")
        raise RuntimeError("the source of the stream died")

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/stream"))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        rest = await asyncio.wait_for(reader.read(), WAIT)
    # No terminating chunk: the client must see the answer cut, not whole.
    assert rest == b"4\r\nhalf\r\n"


@pytest.mark.parametrize("kind", ["respond", "stream", "500", "431", "408"])
async def test_every_answer_has_a_date(kind: str, serve: Serve) -> None:
    async def handler(request: Request) -> None:
        if kind == "stream":
            await _stream(request)
        elif kind == "respond":
            request.respond(200, TEXT, b"ok")
        else:
            raise RuntimeError("a 500")

    front = await serve(handler, Limits(client_body_timeout_seconds=0.1))
    data = {
        "431": _request("GET", "/", headers=["X-Big: " + "a" * 9000]),
        "408": b"GET / HTTP/1.1\r\n",
    }.get(kind, _request("GET", "/"))
    answer, _ = await _exchange(front.port, data)
    assert {"408": 408, "431": 431, "500": 500}.get(kind, 200) == answer.status
    assert len(answer.headers.getall("Date")) == 1
    date = parsedate_to_datetime(answer.headers["Date"])
    assert abs(date.timestamp() - time.time()) < 3


# -- shutdown -----------------------------------------------------------------------------


async def test_shutdown_finishes_requests_in_flight_and_closes_idle_connections(
    serve: Serve,
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> None:
        if request.raw_path == "/slow":
            arrived.set()
            await release.wait()
        request.respond(200, TEXT, request.raw_path.encode())

    front = await serve(handler)
    async with _connect(front.port) as (idle, idle_w), _connect(front.port) as (busy, busy_w):
        await _send(idle_w, _request("GET", "/fast"))
        assert "Connection" not in (await _read_answer(idle)).headers
        await _send(busy_w, _request("GET", "/slow"))
        await asyncio.wait_for(arrived.wait(), WAIT)

        stopping = asyncio.create_task(front.server.shutdown(WAIT))
        assert await _closed(idle)
        with pytest.raises(OSError):  # no longer listening
            await asyncio.open_connection("127.0.0.1", front.port)
        assert not stopping.done()

        release.set()
        answer = await _read_answer(busy)
        assert (answer.status, answer.body) == (200, b"/slow")
        assert answer.headers["Connection"] == "close"
        assert await _closed(busy)
        await asyncio.wait_for(stopping, WAIT)
    assert not front.server.connections


# -- admit: a handler's fast path ---------------------------------------------------------


class Taker:
    """An ``admit`` that takes the requests to /deferred and starts none until told to."""

    def __init__(self) -> None:
        self.taken: list[Request] = []
        self.arrived = asyncio.Event()

    def __call__(self, request: Request) -> bool:
        if not request.raw_path.startswith("/deferred"):
            return False
        self.taken.append(request)
        self.arrived.set()
        return True

    async def next(self) -> Request:
        await asyncio.wait_for(self.arrived.wait(), WAIT)
        self.arrived.clear()
        return self.taken[-1]


async def _answer_with(request: Request, text: str) -> None:
    body = await request.read()
    request.respond(200, TEXT, f"{text} {len(body)}".encode())


async def test_a_request_admit_takes_holds_its_turn_until_it_proceeds(serve: Serve) -> None:
    recorder, taker = Recorder(), Taker()
    front = await serve(recorder, admit=taker)
    async with _connect(front.port) as (reader, writer):
        # Pipelined: the second waits behind the first, which no task answers yet.
        await _send(
            writer,
            _request("POST", "/deferred", headers=["Content-Length: 2"])
            + b"ok"
            + _request("GET", "/next"),
        )
        request = await taker.next()
        assert await _still_open(reader)  # nothing answered
        assert request in front.server.deferred and not front.server.tasks
        assert recorder.seen == []

        request.proceed(_answer_with(request, "proceeded"))
        assert request not in front.server.deferred
        first, second = await _read_answer(reader), await _read_answer(reader)
        assert (first.status, first.body) == (200, b"proceeded 2")  # its body, read in the task
        assert (second.status, second.body) == (200, b"GET /next 0")
    assert recorder.seen == ["GET /next"]  # the handler never saw the one admit took


async def test_admit_is_not_asked_about_a_request_with_an_expectation(serve: Serve) -> None:
    # The server answers an unmet Expect itself (417), in the task admit would skip.
    taker = Taker()
    front = await serve(Recorder(), admit=taker)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/deferred", headers=["Expect: something"]))
        assert (await _read_answer(reader)).status == 417
    assert taker.taken == []


async def test_a_failure_in_proceeded_work_is_a_500_like_the_handlers(serve: Serve) -> None:
    taker = Taker()
    front = await serve(Recorder(), admit=taker)

    async def broken() -> None:
        raise RuntimeError("boom")

    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/deferred"))
        (await taker.next()).proceed(broken())
        answer = await _read_answer(reader)
        assert answer.status == 500 and json.loads(answer.body)["error"]["code"] == "internal_error"
        assert await _still_open(reader)  # nothing was sent yet: the connection goes on


async def test_admit_may_start_the_request_before_it_returns(serve: Serve) -> None:
    recorder = Recorder()

    def at_once(request: Request) -> bool:
        request.proceed(_answer_with(request, "at once"))  # as a charge failing at once
        return True

    front = await serve(recorder, admit=at_once)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/a") + _request("GET", "/b"))
        for _ in range(2):
            assert (await _read_answer(reader)).body == b"at once 0"
        assert await _still_open(reader)  # one answer each, nothing more
    assert not front.server.deferred and recorder.seen == []


async def test_a_request_proceeds_once(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    taker = Taker()
    front = await serve(Recorder(), admit=taker)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/deferred"))
        request = await taker.next()
        request.proceed(_answer_with(request, "first"))
        request.proceed(_answer_with(request, "second"))
        assert (await _read_answer(reader)).body == b"first 0"
        assert await _still_open(reader)
    assert "proceeded twice" in caplog.text


async def test_admit_failing_is_a_500_and_the_connection_goes_on(serve: Serve) -> None:
    def broken(request: Request) -> bool:
        if request.raw_path == "/broken":
            raise RuntimeError("admit broke")
        return False

    recorder = Recorder()
    front = await serve(recorder, admit=broken)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/broken") + _request("GET", "/next"))
        first, second = await _read_answer(reader), await _read_answer(reader)
        assert first.status == 500 and json.loads(first.body)["error"]["code"] == "internal_error"
        assert (second.status, second.body) == (200, b"GET /next 0")
    assert recorder.seen == ["GET /next"] and not front.server.deferred


async def test_shutdown_waits_for_a_deferred_request_then_abandons_it(serve: Serve) -> None:
    taker = Taker()
    front = await serve(Recorder(), admit=taker)
    started = asyncio.Event()

    async def work() -> None:
        started.set()

    async with _connect(front.port) as (_, writer):
        await _send(writer, _request("GET", "/deferred"))
        request = await taker.next()
        # The client is gone too (reset): only the deferred request is left to wait for.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    await asyncio.sleep(0.05)
    assert not front.server.connections
    stopping = asyncio.create_task(front.server.shutdown(0.3))
    await asyncio.sleep(0.1)
    assert not stopping.done()  # it is waited for, as a task would be
    await asyncio.wait_for(stopping, WAIT)
    assert request.abandoned and not front.server.deferred
    request.proceed(work())  # as a charge decided late would: never started
    await asyncio.sleep(0.05)
    assert not started.is_set() and not front.server.tasks


async def test_a_deferred_request_a_shutdown_abandons_has_its_access_log_line(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="metergate.access")
    taker = Taker()
    front = await serve(Recorder(), admit=taker, access_log=True)
    async with _connect(front.port) as (_, writer):
        await _send(writer, _request("GET", "/deferred?q=1"))
        await taker.next()
        await front.server.shutdown(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "metergate.access"]
    assert len(lines) == 1
    assert re.fullmatch(r'127\.0\.0\.1 "GET /deferred\?q=1 HTTP/1\.1" 0 0 0\.\d+', lines[0])


async def test_shutdown_lets_a_deferred_request_that_proceeds_in_time_finish(
    serve: Serve,
) -> None:
    taker = Taker()
    front = await serve(Recorder(), admit=taker)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/deferred"))
        request = await taker.next()
        stopping = asyncio.create_task(front.server.shutdown(WAIT))
        await asyncio.sleep(0.1)
        request.proceed(_answer_with(request, "late"))
        answer = await _read_answer(reader)
        assert (answer.status, answer.body) == (200, b"late 0")
        assert answer.headers["Connection"] == "close"
        await asyncio.wait_for(stopping, WAIT)
    assert not request.abandoned


# -- request bodies -----------------------------------------------------------------------


async def test_a_large_body_reaches_a_slow_handler_whole_with_backpressure(serve: Serve) -> None:
    body = os.urandom(5 * 1024 * 1024)
    go = asyncio.Event()

    async def handler(request: Request) -> None:
        await go.wait()
        digest, size = hashlib.sha256(), 0
        while chunk := await request.readany():
            digest.update(chunk)
            size += len(chunk)
            await asyncio.sleep(0.001)  # a slow consumer
        request.respond(200, TEXT, f"{size} {digest.hexdigest()}".encode())

    front = await serve(handler)
    # Small kernel buffers on both sides, so what the server does not read stays with us.
    for listening in front.server.sockets:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # type: ignore[attr-defined]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", front.port))
    async with _connect(front.port, sock) as (reader, writer):
        writer.write(_request("POST", "/big", headers=[f"Content-Length: {len(body)}"]) + body)
        await asyncio.sleep(0.2)
        # The handler has read nothing: the server stopped reading at about 256 KiB rather
        # than take in all 5 MiB.
        assert writer.transport.get_write_buffer_size() > 3 * 1024 * 1024
        go.set()
        await asyncio.wait_for(writer.drain(), WAIT)
        answer = await _read_answer(reader)
    assert answer.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def _expecting(length: int) -> bytes:
    return _request(
        "POST", "/upload", headers=[f"Content-Length: {length}", "Expect: 100-continue"]
    )


async def test_100_continue_is_sent_when_the_handler_asks_for_the_body(serve: Serve) -> None:
    ask = asyncio.Event()

    async def handler(request: Request) -> None:
        await ask.wait()
        request.send_continue()
        request.send_continue()  # once only
        body = await request.read()
        request.respond(200, TEXT, body)

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _expecting(5))
        assert await _still_open(reader, 0.1)  # nothing yet: the handler has not asked
        ask.set()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await _send(writer, b"hello")
        answer = await _read_answer(reader)
    assert (answer.status, answer.body) == (200, b"hello")


async def test_no_100_continue_when_the_handler_answers_without_the_body(serve: Serve) -> None:
    async def handler(request: Request) -> None:
        request.respond(401, TEXT, b"who are you")

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _expecting(1000))
        answer = await _read_answer(reader)
        # The client never sends the body: the connection cannot be reused.
        assert answer.headers["Connection"] == "close"
        assert await _closed(reader)
    assert (answer.status, answer.body) == (401, b"who are you")


# -- through the gateway: a request that breaks off is not paid for ------------------------

UPLOAD = """
[[routes]]
path = "/upload"
methods = ["POST"]
cost = 4
"""
COST = 4

StartGateway = Callable[..., Awaitable[GatewayServer]]
StartUpstream = Callable[..., Awaitable[TestServer]]


async def _upload_gateway(
    start_upstream: StartUpstream,
    start_gateway: StartGateway,
    received: list[int],
    **limits: float,
) -> GatewayServer:
    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        received.append(len(body))
        return web.json_response({"bytes": len(body)})

    upstream = await start_upstream({"/upload": upload})
    config = load_test_config(str(upstream.make_url("")), extra=UPLOAD)
    if limits:
        config = replace_section(config, limits=limits)
    return await start_gateway(config)


async def _usage(client: redis.Redis, account: str) -> int:
    return int(await client.hget(keys.usage_key(account), "used") or 0)


async def _usage_becomes(client: redis.Redis, account: str, units: int) -> None:
    async def poll() -> None:
        while await _usage(client, account) != units:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT)


def _refunded() -> float:
    return REGISTRY.get_sample_value("metergate_units_refunded_total", {"route": "/upload"}) or 0.0


def _upload_head(account: str, framing: str) -> bytes:
    token = auth(account)["Authorization"]
    return _request("POST", "/upload", headers=[f"Authorization: {token}", framing])


async def test_a_chunked_upload_whose_framing_breaks_is_refunded_and_closed(
    start_upstream: StartUpstream, start_gateway: StartGateway, redis_client: redis.Redis
) -> None:
    received: list[int] = []
    gateway = await _upload_gateway(start_upstream, start_gateway, received)
    account = "acct-broken-chunk"
    before = _refunded()
    async with _connect(gateway.port) as (reader, writer):
        await _send(
            writer,
            _upload_head(account, "Transfer-Encoding: chunked")
            + b"400\r\n"
            + b"x" * 1024
            + b"\r\n",
        )
        await _usage_becomes(redis_client, account, COST)  # charged, the upload under way
        await _send(writer, b"zz\r\n")  # not a chunk size
        answer = await _read_answer(reader)
        assert await _closed(reader)
    assert (answer.status, _error_code(answer)) == (400, "bad_request")
    assert answer.headers["Connection"] == "close"
    assert await _usage(redis_client, account) == 0
    assert _refunded() - before == COST
    assert received == []  # the backend never got a whole upload


@pytest.mark.parametrize(
    ("framing", "partial"),
    [
        ("Content-Length: 10000", b"x" * 4000),  # small: read whole before forwarding
        ("Content-Length: 1000000", b"x" * 100_000),  # large: streamed to the backend
        ("Transfer-Encoding: chunked", b"1000\r\n" + b"x" * 4096 + b"\r\n"),
    ],
    ids=["small", "large", "chunked"],
)
async def test_a_client_that_leaves_mid_upload_is_refunded(
    framing: str,
    partial: bytes,
    start_upstream: StartUpstream,
    start_gateway: StartGateway,
    redis_client: redis.Redis,
) -> None:
    received: list[int] = []
    gateway = await _upload_gateway(start_upstream, start_gateway, received)
    account = "acct-gone"
    before = _refunded()
    async with _connect(gateway.port) as (_, writer):
        await _send(writer, _upload_head(account, framing) + partial)
        await _usage_becomes(redis_client, account, COST)
    await _usage_becomes(redis_client, account, 0)
    assert _refunded() - before == COST
    assert received == []


async def test_an_upload_that_stalls_gets_408_and_is_refunded(
    start_upstream: StartUpstream, start_gateway: StartGateway, redis_client: redis.Redis
) -> None:
    received: list[int] = []
    gateway = await _upload_gateway(
        start_upstream, start_gateway, received, client_body_timeout_seconds=0.3
    )
    account = "acct-stalled"
    async with _connect(gateway.port) as (reader, writer):
        await _send(writer, _upload_head(account, "Content-Length: 10000") + b"x" * 4000)
        await _usage_becomes(redis_client, account, COST)
        answer = await _read_answer(reader)
        assert await _closed(reader)
    assert (answer.status, _error_code(answer)) == (408, "request_timeout")
    assert answer.headers["Connection"] == "close"
    assert await _usage(redis_client, account) == 0
    assert received == []


# -- what the audit found: a client that does not read, trailers, odd requests ------------


async def test_a_pipelining_client_that_never_reads_is_not_buffered_without_bound(
    serve: Serve,
) -> None:
    big = b"x" * (256 * 1024)

    async def handler(request: Request) -> None:
        request.respond(200, TEXT, big)

    front = await serve(handler)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", front.port))
    async with _connect(front.port, sock) as (_, writer):
        request = _request("GET", "/big")
        for _ in range(400):  # 100 MiB of answers asked for, none read
            writer.write(request)
        await asyncio.sleep(0.5)
        (conn,) = front.server.connections
        buffered = conn._transport.get_write_buffer_size()  # type: ignore[union-attr]
        # Reading stopped once the answers backed up: a few answers held, not hundreds.
        assert buffered < 8 * len(big)


async def test_trailers_never_become_headers_of_the_next_request(serve: Serve) -> None:
    seen: list[tuple[str | None, list[str]]] = []

    async def handler(request: Request) -> None:
        await request.read()
        seen.append((request.host, request.authorization))
        request.respond(200, TEXT, b"ok")

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(
            writer,
            _request("POST", "/a", headers=["Transfer-Encoding: chunked"])
            + b"3\r\nabc\r\n0\r\nHost: evil.example\r\nAuthorization: Bearer stolen\r\n\r\n"
            + _request("GET", "/b"),
        )
        assert (await _read_answer(reader)).status == 200
        assert (await _read_answer(reader)).status == 200
    assert seen == [("front.test", []), ("front.test", [])]


async def test_an_upgrade_with_a_body_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    head = _request(
        "POST",
        "/up",
        headers=["Connection: upgrade", "Upgrade: foo", "Content-Length: 5"],
        body=b"hello",
    )
    answer, closed = await _exchange(front.port, head)
    assert (answer.status, _error_code(answer), closed) == (400, "bad_request", True)
    assert recorder.seen == []


async def test_too_many_requests_pipelined_in_one_read_are_refused_after_the_first(
    serve: Serve,
) -> None:
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(request: Request) -> None:
        await release.wait()
        handled.append(request.raw_path)
        request.respond(200, TEXT, b"ok")

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, b"".join(_request("GET", f"/{i}") for i in range(200)))
        await asyncio.sleep(0.1)
        release.set()
        statuses = []
        while True:
            answer = await _read_answer(reader)
            statuses.append(answer.status)
            if answer.status != 200:
                assert _error_code(answer) == "bad_request"
                break
        assert await _closed(reader)
    # The first, the 64 queued behind it, then the refusal: never all 200 held in memory.
    assert statuses == [200] * 65 + [400]
    assert handled == [f"/{i}" for i in range(65)]


async def test_a_closed_connection_whose_client_does_not_read_is_dropped(
    serve: Serve,
) -> None:
    async def handler(request: Request) -> None:
        request.hang_up()
        request.respond(200, TEXT, b"x" * (8 * 1024 * 1024))

    front = await serve(handler, Limits(client_body_timeout_seconds=0.3))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", front.port))
    async with _connect(front.port, sock) as (_, writer):
        await _send(writer, _request("GET", "/x"))
        await asyncio.sleep(0.2)
        assert len(front.server.connections) == 1
        deadline = time.monotonic() + WAIT
        while front.server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not front.server.connections


async def test_shutdown_returns_once_a_streamed_answer_ends_and_cancels_stragglers(
    serve: Serve,
) -> None:
    streaming, finish = asyncio.Event(), asyncio.Event()
    cancelled: list[str] = []

    async def handler(request: Request) -> None:
        try:
            await request.start(200, TEXT)
            streaming.set()
            await finish.wait()
            await request.write(b"done")
            await request.end()
            if request.raw_path == "/never":
                await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(request.raw_path)
            raise

    front = await serve(handler)
    async with _connect(front.port) as (reader, writer):
        await _send(writer, _request("GET", "/stream"))
        await asyncio.wait_for(streaming.wait(), WAIT)
        started = time.monotonic()
        stopping = asyncio.create_task(front.server.shutdown(WAIT))
        await asyncio.sleep(0.1)
        finish.set()
        answer = await _read_answer(reader)
        assert answer.body == b"done"
        assert await _closed(reader)
        await asyncio.wait_for(stopping, WAIT)
    assert time.monotonic() - started < 1.0  # not the whole timeout

    streaming.clear()
    finish.clear()
    front2 = await serve(handler)
    async with _connect(front2.port) as (reader, writer):
        await _send(writer, _request("GET", "/never"))
        await asyncio.wait_for(streaming.wait(), WAIT)
        finish.set()
        await front2.server.shutdown(0.3)
    assert cancelled == ["/never"]
    assert not front2.server.tasks


@pytest.mark.parametrize(
    "expect", [["Expect: teapot"], ["Expect: 100-continue", "Expect: teapot"]], ids=["one", "two"]
)
async def test_an_expectation_other_than_100_continue_is_417(
    expect: list[str], serve: Serve
) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    answer, closed = await _exchange(front.port, _request("GET", "/", headers=expect))
    assert (answer.status, _error_code(answer), closed) == (417, "expectation_failed", True)
    assert recorder.seen == []


async def test_http10_with_a_chunked_body_closes_after_the_answer(serve: Serve) -> None:
    front = await serve(Recorder())
    head = _request(
        "POST",
        "/c",
        version="1.0",
        headers=["Connection: keep-alive", "Transfer-Encoding: chunked"],
        body=b"3\r\nabc\r\n0\r\n\r\n",
    )
    answer, closed = await _exchange(front.port, head)
    assert (answer.status, answer.body, closed) == (200, b"POST /c 3", True)


async def test_a_header_value_with_a_line_break_from_a_handler_is_a_500(serve: Serve) -> None:
    async def handler(request: Request) -> None:
        request.respond(200, {"X-Bad": "a\r\nInjected: 1"}, b"no")

    front = await serve(handler)
    answer, _ = await _exchange(front.port, _request("GET", "/"))
    assert (answer.status, _error_code(answer)) == (500, "internal_error")
    assert "Injected" not in answer.headers


async def test_a_header_field_that_never_ends_is_431_near_its_own_limit(serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder, Limits(max_header_bytes=1000))
    async with _connect(front.port) as (reader, writer):
        await _send(writer, b"GET / HTTP/1.1\r\nHost: front.test\r\nX-Long: ")
        for _ in range(2):  # 1,200 bytes of one value, far under the head's 32 x 1000
            await asyncio.sleep(0.02)
            await _send(writer, b"a" * 600)
        answer = await _read_answer(reader)
    assert (answer.status, _error_code(answer)) == (431, "request_head_too_large")
    assert recorder.seen == []


async def test_an_upload_of_many_tiny_chunks_is_not_taken_for_framing(serve: Serve) -> None:
    async def handler(request: Request) -> None:
        body = await request.read()
        request.respond(200, TEXT, str(len(body)).encode())

    # The head limit is about 132 KB here; the upload carries 600 KB of chunk framing,
    # and arrives in reads of up to 256 KiB with a little body in each.
    front = await serve(handler, Limits(max_header_bytes=4096))
    chunks = b"1\r\na\r\n" * 100_000 + b"0\r\n\r\n"
    head = _request("POST", "/tiny", headers=["Transfer-Encoding: chunked"])
    answer, _ = await _exchange(front.port, head + chunks)
    assert (answer.status, answer.body) == (200, b"100000")


async def test_a_trailer_field_that_never_ends_breaks_the_body_off(serve: Serve) -> None:
    broke: list[str] = []

    async def handler(request: Request) -> None:
        try:
            await request.read()
        except ClientGone:
            broke.append(request.raw_path)
            request.error(400, "bad_request", "the request body broke off")
            return
        request.respond(200, TEXT, b"ok")

    front = await serve(handler, Limits(max_header_bytes=1000))
    async with _connect(front.port) as (reader, writer):
        head = _request("POST", "/t", headers=["Transfer-Encoding: chunked"])
        await _send(writer, head + b"3\r\nabc\r\n0\r\nX-Trailer: ")
        closed = False
        try:
            for _ in range(400):  # 240 KB of one field, far over the head's 32 x 1000
                await _send(writer, b"a" * 600)
                await asyncio.sleep(0)
            async with asyncio.timeout(5):
                closed = not await reader.read()  # answered, then closed (it ends here) ...
        except ConnectionError:
            closed = True  # ... or reset: the gateway closed with the rest unread
    assert closed
    assert broke == ["/t"]  # the handler saw its body break off (the gateway refunds it)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
    ],
    ids=["two-hosts", "no-host-1.1", "two-hosts-1.0", "no-host-1.0", "one-host"],
)
async def test_a_request_has_exactly_one_host(head: bytes, status: int, serve: Serve) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    answer, _ = await _exchange(front.port, head)
    assert answer.status == status
    if status == 400:
        assert _error_code(answer) == "bad_request"
        assert recorder.seen == []


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (b"GET /\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET / HTTP/1.1\r\nHost: a b@c\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", 400, "bad_request"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "unsupported_transfer_coding",
        ),
        (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", 200, ""),
        (b"GET / HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n\r\n", 200, ""),
        (b"GET / HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n", 200, ""),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 200, ""),
    ],
    ids=[
        "http-0.9",
        "http-2.0",
        "host-space",
        "host-slash",
        "host-comma",
        "port-too-big",
        "gzip-chunked",
        "ipv6",
        "ipv6-zone",
        "port",
        "empty",
    ],
)
async def test_what_is_forwarded_is_http_1_with_a_plain_host_and_chunked_only(
    head: bytes, status: int, code: str, serve: Serve
) -> None:
    recorder = Recorder()
    front = await serve(recorder)
    answer, _ = await _exchange(front.port, head)
    assert answer.status == status
    if code:
        assert _error_code(answer) == code
        assert recorder.seen == []
