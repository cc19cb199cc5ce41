"""RESP2 request encoding: Redis commands as the bytes a pipelined write sends."""

from __future__ import annotations

Arg = bytes | str | int


def bulk(value: Arg) -> bytes:
    """One bulk string; ints and strings encoded as redis-py encodes them (decimal, UTF-8)."""
    if isinstance(value, int):
        data = str(value).encode()
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = value
    return b"$%d\r\n%b\r\n" % (len(data), data)


def header(count: int) -> bytes:
    """The start of a command of ``count`` arguments (the command name included)."""
    return b"*%d\r\n" % count


def command(*args: Arg) -> bytes:
    return header(len(args)) + b"".join(bulk(a) for a in args)
