"""loadtests.wrk: the script wrk runs sends what the benchmark says it sends."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from loadtests import wrk

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)"
)


class _Counting(asyncio.Protocol):
    """A minimal HTTP/1.1 server counting connections, requests, their Connection headers,
    and requests that came on a connection which had already carried one."""

    seen: dict[str, int]

    # A stream server's transports are Transports (uvloop's do not subclass asyncio's).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport, self.buffer, self.carried = transport, b"", 0
        self.seen["connections"] += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.seen["requests"] += 1
            self.seen["reused"] += self.carried > 0
            self.carried += 1
            close = b"\r\nconnection: close" in head.lower()
            self.seen["close"] += close
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\n{}"
            )
            if close:
                self.transport.close()
                return


async def _drive(tmp_path: Path, *, close: bool) -> dict[str, int]:
    seen = {"connections": 0, "requests": 0, "close": 0, "reused": 0}
    protocol = type("Counting", (_Counting,), {"seen": seen})
    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    script = tmp_path / "load.lua"
    wrk.write_script(script, ["/a", "/b"], ["t1", "t2"], close=close)
    wrk_bin = shutil.which("wrk")
    assert wrk_bin is not None
    async with server:
        result = await asyncio.to_thread(
            wrk.run, wrk_bin, f"http://127.0.0.1:{port}", script,
            seconds=1, connections=2, threads=1,
        )  # fmt: skip
    assert result.requests > 0 and not any(result.errors.values())
    return seen


@needs_wrk
async def test_with_close_every_request_comes_on_a_new_connection(tmp_path: Path) -> None:
    seen = await _drive(tmp_path, close=True)
    assert seen["requests"] > 10
    assert seen["close"] == seen["requests"]
    # No connection carried a second request. (wrk opens some connections it sends
    # nothing on, three in one CI run, so the two counts are not compared.)
    assert seen["reused"] == 0


@needs_wrk
async def test_by_default_connections_are_kept_alive(tmp_path: Path) -> None:
    seen = await _drive(tmp_path, close=False)
    assert seen["close"] == 0
    # Connections carried many requests each.
    assert seen["requests"] > 10 * seen["connections"]
