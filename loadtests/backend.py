"""The benchmark's backend: a fixed small JSON answer on a raw asyncio protocol.

It is deliberately as cheap as a Python server can be (no framework, keep-alive, uvloop),
so the figures measure the proxy in front of it, not the backend. It counts the requests
it served per path, so the benchmark can check that every charge matches a served request;
``GET /__bench/stats`` answers those counts and is not counted itself.

Run: ``python -m loadtests.backend PORT``. Requests with a body must use Content-Length.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter
from typing import cast

STATS_PATH = b"/__bench/stats"
_BODY = b'{"signals":[{"symbol":"AAPL","price":187.3,"signal":"hold"}]}'
_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(_BODY),
    _BODY,
)
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _HttpProtocol(asyncio.Protocol):
    __slots__ = ("_buffer", "_counts", "_skip", "_transport")

    def __init__(self, counts: Counter[bytes]) -> None:
        self._counts = counts
        self._buffer = b""
        self._skip = 0  # request body bytes still to discard
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        transport = self._transport
        assert transport is not None
        out = []
        close = False
        while True:
            if self._skip:
                taken = min(self._skip, len(buffer))
                self._skip -= taken
                buffer = buffer[taken:]
                if self._skip:
                    break
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head, buffer = buffer[:end], buffer[end + 4 :]
            line_end = head.find(b"\r\n")
            request_line = head if line_end < 0 else head[:line_end]
            parts = request_line.split(b" ")
            if len(parts) != 3:
                out.append(_BAD)
                close = True
                break
            lower = head.lower()
            if b"transfer-encoding:" in lower:
                out.append(_BAD)
                close = True
                break
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                value = lower[at + 17 :].split(b"\r\n", 1)[0]
                self._skip = int(value.strip() or 0)
            path = parts[1].split(b"?", 1)[0]
            if path == STATS_PATH:
                body = json.dumps({k.decode(): v for k, v in self._counts.items()}).encode()
                out.append(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            else:
                self._counts[path] += 1
                out.append(_RESPONSE)
            if b"\r\nconnection: close" in lower:
                close = True
                break
        self._buffer = buffer
        if out:
            transport.write(b"".join(out))
        if close:
            transport.close()


async def serve(port: int, host: str = "127.0.0.1") -> None:
    counts: Counter[bytes] = Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _HttpProtocol(counts), host, port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(port))
        return
    uvloop.run(serve(port))


if __name__ == "__main__":
    main()
