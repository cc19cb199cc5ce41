"""The upstream pool against real misbehaving backends: raw asyncio servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.upstream import (
    BodyCut,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Backend:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    def pool(self, **kw: float) -> UpstreamPool:
        options: dict[str, float] = {
            "max_connections": 4,
            "connect_timeout": 1.0,
            "read_timeout": 1.0,
        }
        options.update(kw)
        return UpstreamPool(
            f"http://127.0.0.1:{self.port}",
            max_connections=int(options.pop("max_connections")),
            **options,
        )

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head


@pytest.fixture
async def backend() -> AsyncIterator[Callable[[Handler], Awaitable[Backend]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Backend:
        state = Backend()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _get(pool: UpstreamPool, path: str = "/x", method: str = "GET") -> bytes:
    resp = await pool.request(method, path, b"")
    try:
        return await resp.read_all()
    finally:
        resp.release()


def _answer_then_wait(answer: bytes) -> Handler:
    """A backend that reads one request head, sends these bytes, and waits for the client
    to hang up."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await reader.read()

    return handler


def _answer_then_close(answer: bytes) -> Handler:
    """A backend that reads one request head, sends these bytes, and closes the connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    return handler


def _keep_alive(backend_state: list[Backend], answer: bytes = OK) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await backend_state[0].head(reader)
            writer.write(answer)
            await writer.drain()

    return handler


async def _keep_alive_backend(
    backend: Callable[[Handler], Awaitable[Backend]], answer: bytes = OK
) -> Backend:
    """A started backend that answers every request on a connection with `answer` and
    records the request heads."""
    ref: list[Backend] = []
    state = await backend(_keep_alive(ref, answer))
    ref.append(state)
    return state


async def test_keep_alive_connections_are_reused_and_the_head_is_well_formed(backend) -> None:
    state = await _keep_alive_backend(backend)
    pool = state.pool()
    headers = b"X-Request-Id: 1\r\nAccept: text/csv\r\n"
    for _ in range(5):
        resp = await pool.request("GET", "/signals?a=1", headers)
        assert (resp.status, await resp.read_all()) == (200, b"ok")
        resp.release()
    await pool.close()
    assert state.connections == 1
    assert (
        state.requests[0]
        == (
            f"GET /signals?a=1 HTTP/1.1\r\nHost: 127.0.0.1:{state.port}\r\n"
            "X-Request-Id: 1\r\nAccept: text/csv\r\n\r\n"
        ).encode()
    )


async def test_idle_connection_closed_by_the_backend_is_retried_once_for_get(backend) -> None:
    """The backend closes a kept-alive connection as the next request arrives on it: the
    request cannot have been processed, so a GET goes again on a fresh connection."""
    ref: list[Backend] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ref[0].head(reader)
        if ref[0].connections == 1:
            writer.write(OK)
            await writer.drain()
            await ref[0].head(reader)  # the second request: close without a byte
            return
        writer.write(OK)
        await writer.drain()
        await reader.read()

    state = await backend(handler)
    ref.append(state)
    pool = state.pool()
    assert await _get(pool) == b"ok"
    assert await _get(pool) == b"ok"
    assert state.connections == 2
    await pool.close()


@pytest.mark.parametrize("body", [b"payload", None], ids=["with-body", "without-body"])
async def test_a_post_is_not_retried(body: bytes | None, backend) -> None:
    # Without a body too: the backend may have acted on it before the connection broke.
    ref: list[Backend] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ref[0].head(reader)
        writer.write(OK)
        await writer.drain()
        await ref[0].head(reader)  # then close without answering

    state = await backend(handler)
    ref.append(state)
    pool = state.pool()
    assert await _get(pool) == b"ok"
    with pytest.raises(UpstreamUnavailable):
        await pool.request("POST", "/x", b"", body)
    assert state.connections == 1
    await pool.close()


async def test_a_backend_that_stops_reading_the_body_times_out(backend) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)  # reads none of the body, answers nothing

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(64):  # 16 MiB: far more than the sockets' buffers hold
            yield b"x" * (256 * 1024)

    state = await backend(handler)
    pool = state.pool(read_timeout=0.3)
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout, match="stopped reading the request body"):
        await pool.request("POST", "/x", b"", upload(), length=64 * 256 * 1024)
    assert asyncio.get_running_loop().time() - started < 3
    await pool.close()


async def test_idle_connection_the_backend_closed_is_not_handed_out(backend) -> None:
    # Keep-alive promised, then broken: the backend closes after the answer.
    state = await backend(_answer_then_close(OK))
    pool = state.pool()
    assert await _get(pool) == b"ok"
    await asyncio.sleep(0.05)  # connection_lost has marked it dead
    assert await _get(pool) == b"ok"
    assert state.connections == 2
    await pool.close()


async def test_early_answer_stops_the_upload_and_the_connection_is_dropped(backend) -> None:
    ref: list[Backend] = []
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ref[0].head(reader)
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        while await reader.read(65536):
            pass

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1
            yield b"x" * 1000
            await asyncio.sleep(0.01)

    state = await backend(handler)
    ref.append(state)
    pool = state.pool()
    resp = await asyncio.wait_for(pool.request("PUT", "/u", b"", endless()), 2)
    assert (resp.status, await resp.read_all()) == (413, b"big")
    resp.release()
    stopped_at = sent
    await asyncio.sleep(0.05)
    assert sent == stopped_at
    assert b"Transfer-Encoding: chunked" in state.requests[0]
    assert await _get(pool) == b"big"
    assert state.connections == 2
    await pool.close()


async def test_streamed_chunked_body_is_framed(backend) -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(OK)
        await writer.drain()

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"x" * 16

    state = await backend(handler)
    pool = state.pool()
    resp = await pool.request("POST", "/u", b"", body())
    assert await resp.read_all() == b"ok"
    resp.release()
    assert got == [b"3\r\nabc\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"]
    await pool.close()


@pytest.mark.parametrize("reason", [b" Created", b""], ids=["with-reason", "no-reason"])
async def test_interim_answers_are_skipped(reason: bytes, backend) -> None:
    state = await backend(
        _answer_then_wait(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201" + reason + b"\r\nX-Final: 1\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    pool = state.pool()
    resp = await pool.request("GET", "/x", b"")
    assert resp.status == 201
    assert resp.reason == reason.decode().strip()  # never the interim's "Early Hints"
    assert list(resp.headers) == ["X-Final", "Content-Length"]
    assert await resp.read_all() == b"ok"
    resp.release()
    await pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
    ],
    ids=[
        "cl-and-te",
        "duplicate-cl",
        "signed-cl",
        "te-not-chunked",
        "chunked-not-final",
        "coding-before-chunked",  # re-framed for the client, the gzip would be lost
        "bare-lf",
        "obs-fold",
        "field-too-long",
        "upgrade",
        "garbage",
    ],
)
async def test_ambiguous_or_malformed_answers_are_refused(answer: bytes, backend) -> None:
    state = await backend(_answer_then_wait(answer))
    pool = state.pool()
    with pytest.raises(UpstreamUnavailable):
        await pool.request("GET", "/x", b"")
    await pool.close()


async def test_a_head_over_the_size_limit_is_refused(backend) -> None:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(20_000))
    state = await backend(_answer_then_wait(b"HTTP/1.1 200 OK\r\n" + fields))
    pool = state.pool()
    with pytest.raises(UpstreamUnavailable):
        await pool.request("GET", "/x", b"")
    await pool.close()


async def test_an_answer_of_many_tiny_chunks_arrives_whole(backend) -> None:
    # A token-by-token stream: 600 KB of framing for 100 KB of body, read in large reads.
    chunks = b"1\r\na\r\n" * 100_000 + b"0\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    state = await backend(_answer_then_wait(answer))
    pool = state.pool()
    assert await _get(pool) == b"a" * 100_000
    await pool.close()


async def test_a_trailer_field_that_never_ends_cuts_the_body(backend) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
        for _ in range(200):  # 1.6 MB of one field; the gateway gives up at 64 KiB
            writer.write(b"a" * 8192)
            await writer.drain()

    state = await backend(handler)
    pool = state.pool()
    resp = await pool.request("GET", "/x", b"")
    async with asyncio.timeout(5):
        with pytest.raises(BodyCut, match="trailer too large"):
            await resp.read_all()
    resp.release()
    await pool.close()


async def test_an_http_1_0_answer_ends_its_connection(backend) -> None:
    # Even with keep-alive: with Transfer-Encoding (RFC 9112 6.1) its framing is suspect.
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    state = await _keep_alive_backend(backend, answer + b"2\r\nok\r\n0\r\n\r\n")
    pool = state.pool()
    assert await _get(pool) == b"ok"
    assert await _get(pool) == b"ok"
    assert state.connections == 2
    await pool.close()


async def test_a_bad_chunk_cuts_the_body_and_the_connection_is_dropped(backend) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n")
            await writer.drain()

    state = await backend(handler)
    pool = state.pool()
    resp = await pool.request("GET", "/x", b"")
    with pytest.raises(BodyCut):
        await resp.read_all()
    resp.release()
    resp = await pool.request("GET", "/x", b"")
    resp.release()
    assert state.connections == 2
    await pool.close()


async def test_stalls_before_the_head_and_inside_the_body_time_out(backend) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /body"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
        await asyncio.sleep(5)

    state = await backend(handler)
    pool = state.pool(read_timeout=0.2)
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/head", b"")
    resp = await pool.request("GET", "/body", b"")
    assert await resp.read() == b"abc"
    with pytest.raises(BodyCut):
        await resp.read()
    resp.release()
    await pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_connection_close_and_http_1_0_are_not_reused(answer: bytes, backend) -> None:
    state = await _keep_alive_backend(backend, answer)
    pool = state.pool()
    assert await _get(pool) == b"ok"
    assert await _get(pool) == b"ok"
    assert state.connections == 2
    await pool.close()


async def test_a_body_delimited_by_the_end_of_the_connection(backend) -> None:
    state = await backend(_answer_then_close(b"HTTP/1.0 200 OK\r\n\r\nuntil the end"))
    pool = state.pool()
    assert await _get(pool) == b"until the end"
    await pool.close()


async def test_head_and_no_content_answers_have_no_body(backend) -> None:
    ref: list[Backend] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await ref[0].head(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    state = await backend(handler)
    ref.append(state)
    pool = state.pool()
    resp = await pool.request("HEAD", "/x", b"")
    assert (resp.status, resp.content_length, await resp.read_all()) == (200, 1234, b"")
    resp.release()
    for _ in range(2):
        resp = await pool.request("GET", "/x", b"")
        assert (resp.status, await resp.read_all()) == (204, b"")
        resp.release()
    # HEAD's connection is dropped (llhttp would wait for 1234 body bytes); 204's is reused.
    assert state.connections == 2
    await pool.close()


async def test_the_pool_is_bounded_and_waits_for_a_free_connection(backend) -> None:
    state = await _keep_alive_backend(backend)
    pool = state.pool(max_connections=1, connect_timeout=0.2)
    held = await pool.request("GET", "/x", b"")
    with pytest.raises(UpstreamUnavailable, match="busy"):
        await pool.request("GET", "/x", b"")

    async def release_soon(resp: UpstreamResponse) -> None:
        await asyncio.sleep(0.05)
        await resp.read_all()
        resp.release()

    releaser = asyncio.create_task(release_soon(held))
    assert await _get(pool) == b"ok"
    await releaser
    assert state.connections == 1
    await pool.close()


async def test_idle_connections_are_closed_after_the_keepalive(backend) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        assert await reader.read() == b""
        closed.set()

    state = await backend(handler)
    pool = state.pool(keepalive=0.1)
    assert await _get(pool) == b"ok"
    await asyncio.wait_for(closed.wait(), 2)
    await pool.close()


async def test_refused_connection_is_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = UpstreamPool(
        f"http://127.0.0.1:{port}", max_connections=1, connect_timeout=1, read_timeout=1
    )
    with pytest.raises(UpstreamUnavailable, match="cannot connect"):
        await pool.request("GET", "/x", b"")
    await pool.close()


async def test_a_second_answer_to_one_request_drops_the_connection(backend) -> None:
    state = await _keep_alive_backend(
        backend, OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge"
    )
    pool = state.pool()
    assert await _get(pool) == b"ok"
    assert await _get(pool) == b"ok"
    assert state.connections == 2
    await pool.close()
