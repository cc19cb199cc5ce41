"""No path trick reaches an expensive route cheaper: the backend gets exactly the priced path.

aiohttp's client normalizes paths before sending, so the end-to-end cases write the request
line to a raw socket.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as redis
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import keys
from gateway.errors import BadPath
from gateway.routing import canonicalize
from tests.conftest import echo, load_test_config, make_token

Start = Callable[..., Awaitable[TestServer]]


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/signals", "/signals", ""),
        ("/signals?symbol=AAPL&x=1", "/signals", "symbol=AAPL&x=1"),
        ("/signals?", "/signals", ""),
        ("/%65xport/pdf", "/export/pdf", ""),
        ("/export/%70%64%66", "/export/pdf", ""),
        ("/signals/history/%41%41PL", "/signals/history/AAPL", ""),
        ("/signals/history/%7e%2D%5F", "/signals/history/~-_", ""),
        # Reserved or non-ASCII bytes stay encoded, hex upper-cased: one spelling per path.
        ("/signals/history/%c3%a9", "/signals/history/%C3%A9", ""),
        ("/signals/history/A%3fB", "/signals/history/A%3FB", ""),
        ("/signals/history/...", "/signals/history/...", ""),
        ("/signals/", "/signals/", ""),
        ("/", "/", ""),
        # The query is not routed: it passes untouched.
        ("/signals?next=/../export/pdf", "/signals", "next=/../export/pdf"),
    ],
)
def test_canonical_paths(target: str, path: str, query: str) -> None:
    assert canonicalize(target) == (path, query)


@pytest.mark.parametrize(
    "target",
    [
        "",
        "*",
        "export/pdf",
        "http://evil/export/pdf",
        "//export/pdf",
        "/export//pdf",
        "/signals/../export/pdf",
        "/signals/./history/X",
        "/signals/history/..",
        "/signals/history/.",
        "/signals/history/%2e%2e/%2e%2e/export/pdf",
        "/signals/history/%2E%2e",
        "/signals/%2e/history/X",
        "/signals/history/..%2Fexport%2Fpdf",
        "/export%2fpdf",
        "/signals/history/A%5c..%5cexport",
        "/signals/history/A\\..\\export",
        "/signals/history/..;/..;/export/pdf",
        "/signals;x=1",
        "/signals/history/A%3bB",
        "/export/pdf%00",
        "/export/pdf%0a",
        "/export/pdf%7F",
        "/signals/history/%252e%252e",
        "/signals/history/%2",
        "/signals/history/%zz",
        "/signals/history/%",
        "/export/pdf#frag",
        "/signals/history/é",
        "/export/pdf\x00",
        "/export/pdf ",
        "/signals?a=\x00",
        "/signals?é",
    ],
)
def test_ambiguous_paths_are_refused(target: str) -> None:
    with pytest.raises(BadPath):
        canonicalize(target)


# End to end over a raw socket. Each case: the request target as bytes, then the path the
# backend must see and the units charged, or None for "refused and never forwarded".
FORWARDED = {
    "encoded_e": (b"/%65xport/pdf", "/export/pdf", 5),
    "encoded_pdf": (b"/export/%70%64%66", "/export/pdf", 5),
    "encoded_symbol": (b"/signals/history/%41APL", "/signals/history/AAPL", 2),
    "non_ascii_encoded": (b"/signals/history/%c3%a9", "/signals/history/%C3%A9", 2),
    "query_dots": (b"/signals?next=/../export/pdf", "/signals?next=/../export/pdf", 1),
}
REFUSED = {
    "encoded_slash_dots": (b"/signals/history/..%2Fexport%2Fpdf", 400),
    "encoded_dots": (b"/signals/history/%2e%2e/%2e%2e/export/pdf", 400),
    "dot_dot": (b"/signals/../export/pdf", 400),
    "dot": (b"/signals/./history/X", 400),
    "leading_double_slash": (b"//export/pdf", 400),
    "inner_double_slash": (b"/export//pdf", 400),
    "tomcat_dot_dot_semicolon": (b"/signals/history/..;/..;/export/pdf", 400),
    "matrix_parameter": (b"/signals;x=1", 400),
    "encoded_nul": (b"/export/pdf%00", 400),
    "double_encoded_dots": (b"/signals/history/%252e%252e", 400),
    "upper_case": (b"/SIGNALS", 404),
    "mixed_case": (b"/Export/PDF", 404),
    "encoded_backslash": (b"/signals/history/A%5c..%5cexport", 400),
    "raw_backslash": (b"/signals/history/A\\..\\..\\export", 400),
    "absolute_form": (b"http://evil/export/pdf", 400),
    "absolute_form_same_path": (b"http://127.0.0.1/signals", 400),
    "trailing_slash": (b"/export/pdf/", 404),
    "trailing_dot": (b"/export/pdf/.", 400),
    "fragment": (b"/export/pdf#x", 400),
    "encoded_slash": (b"/export%2Fpdf", 400),
    # These never reach the gateway's code: aiohttp's request parser answers 400 itself.
    "non_ascii_bytes": (b"/signals/history/\xc3\xa9", 400),
    "latin1_byte": (b"/export/pd\xe6", 400),
    "raw_nul": (b"/export/pdf\x00", 400),
    "raw_tab": (b"/export/pdf\t", 400),
    "asterisk": (b"*", 400),
}
# llhttp refuses these before the gateway sees a request: 400 bad_request, still JSON.
PARSER_ANSWERS = {"non_ascii_bytes", "latin1_byte", "raw_nul", "raw_tab"}


async def _raw_get(port: int, target: bytes, token: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET " + target + b" HTTP/1.1\r\nHost: gateway.test\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nConnection: close\r\n\r\n"
        )
        data = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
async def gateway(start_upstream: Start, start_gateway: Start) -> tuple[TestServer, list[str]]:
    seen: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": record})
    return await start_gateway(load_test_config(str(upstream.make_url("")))), seen


async def _used(client: redis.Redis, account: str) -> int:
    return int(await client.hget(keys.usage_key(account), "used") or 0)


@pytest.mark.parametrize("case", sorted(FORWARDED))
async def test_trick_is_forwarded_only_as_the_priced_path(
    case: str, gateway: tuple[TestServer, list[str]], redis_client: redis.Redis
) -> None:
    server, seen = gateway
    target, path, cost = FORWARDED[case]
    status, body = await _raw_get(server.port, target, make_token("acct-path"))
    assert status == 200
    assert seen == [path]
    assert json.loads(body)["path"] == path
    assert await _used(redis_client, "acct-path") == cost


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_trick_is_refused_and_never_forwarded(
    case: str, gateway: tuple[TestServer, list[str]], redis_client: redis.Redis
) -> None:
    server, seen = gateway
    target, expected = REFUSED[case]
    status, body = await _raw_get(server.port, target, make_token("acct-path"))
    assert status == expected
    assert seen == []
    assert await _used(redis_client, "acct-path") == 0
    code = json.loads(body)["error"]["code"]
    if case in PARSER_ANSWERS:
        assert code == "bad_request"
    else:
        assert code == ("bad_path" if expected == 400 else "route_not_found")


async def test_pipelined_tricks_on_one_keepalive_connection(
    gateway: tuple[TestServer, list[str]], redis_client: redis.Redis
) -> None:
    # Keep-alive: a refused request must not desynchronize the next one on the connection.
    server, seen = gateway
    token = make_token("acct-keepalive").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    targets = [b"/signals/../export/pdf", b"//export/pdf", b"/%65xport/pdf"]
    try:
        for target in targets:
            writer.write(
                b"GET "
                + target
                + b" HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
                + token
                + b"\r\n\r\n"
            )
        writer.write(b"GET /signals HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [400, 400, 200, 401]
    assert seen == ["/export/pdf"]
    assert await _used(redis_client, "acct-keepalive") == 5
