"""A 50 MB export passes through the gateway without being held in memory."""

from __future__ import annotations

import hashlib
import tracemalloc

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp import web

from gateway import keys
from tests.conftest import auth, load_test_config

SIZE = 50 * 1024 * 1024
CHUNK = 64 * 1024
# Everything (client, gateway, backend) runs in this process; buffering the export
# anywhere would show as ~50 MB. Socket buffers and aiohttp's read-ahead stay far below.
MAX_GROWTH = 15 * 1024 * 1024


def _block(index: int) -> bytes:
    return index.to_bytes(4, "big") * (CHUNK // 4)


async def _export(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/csv"})
    if request.query.get("framing") != "chunked":
        resp.content_length = SIZE
    await resp.prepare(request)
    for index in range(SIZE // CHUNK):
        await resp.write(_block(index))
    await resp.write_eof()
    return resp


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_50_mb_export_streams_with_flat_memory(
    framing: str, start_upstream, start_gateway, redis_client: redis.Redis
) -> None:
    upstream = await start_upstream({"/{tail:.*}": _export})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    expected = hashlib.sha256()
    for index in range(SIZE // CHUNK):
        expected.update(_block(index))

    received = 0
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        async with aiohttp.ClientSession() as session:
            url = gateway.make_url(f"/export/csv?framing={framing}")
            async with session.get(url, headers=auth("acct-big")) as resp:
                assert resp.status == 200
                if framing == "content-length":
                    assert resp.headers["Content-Length"] == str(SIZE)
                else:
                    assert resp.headers["Transfer-Encoding"] == "chunked"
                async for chunk in resp.content.iter_chunked(CHUNK):
                    received += len(chunk)
                    digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert received == SIZE
    assert digest.hexdigest() == expected.hexdigest()
    assert peak - baseline < MAX_GROWTH, f"grew by {(peak - baseline) / 2**20:.1f} MiB"
    assert int(await redis_client.hget(keys.usage_key("acct-big"), "used")) == 3
