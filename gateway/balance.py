"""Exact connection balance across workers (``gateway.balance = "exact"``).

With SO_REUSEPORT the kernel picks a worker for each new connection by a hash of its
addresses: over thousands of short connections that evens out, over a few long-lived ones
(a load balancer's keep-alive pool, a benchmark's 64) it does not, and the worker that
drew more serves each of them more slowly. Here, as with Envoy's ``exact_balance``, the
process that starts the workers accepts every connection itself and hands it (its file
descriptor, over a Unix socket) to the ready worker holding the fewest.

Each worker's notes back are one number, the connections it has seen end so far: a note
lost or late (the channel full) is made good by the next. The first note says the worker
is ready. At start, connections wait in the listen backlog until every worker is (or
STARTUP_WAIT_S has passed), so the first ones are not all handed to the quickest; later
a restarted worker gets connections once it is ready.

Only accepting goes through the starting process: requests go straight between the
client and its worker. The cost is paid per connection, not per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.front import FrontServer

log = logging.getLogger(__name__)

# Connections accepted per wake-up before the workers' notes are read again.
_ACCEPT_BURST = 64
# A worker's note: the connections it has seen end, in total.
_NOTE = struct.Struct("!Q")
# Accept errors that concern one connection (it went away before it was accepted).
_PASSING = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
# After any other (out of file descriptors, say), accepting pauses this long, rather than
# spinning on a listener that stays readable.
_ACCEPT_PAUSE_S = 0.1
# At start, how long to wait for every worker before serving with those that are ready.
STARTUP_WAIT_S = 15.0


@dataclass
class _Worker:
    channel: socket.socket  # the starting process's end
    handed: int = 0
    ended: int = 0
    ready: bool = False

    @property
    def connections(self) -> int:
        return max(0, self.handed - self.ended)


class Balancer:
    """In the process that starts the workers: accepts on ``listeners`` and hands each
    connection to the ready worker with the fewest, in turn among equals."""

    def __init__(self, listeners: list[socket.socket]) -> None:
        for listener in listeners:
            listener.setblocking(False)
        self.listeners = listeners
        self._selector = selectors.DefaultSelector()
        self._listening = False
        self._paused_until = 0.0
        self._workers: dict[int, _Worker] = {}
        self._lost: set[int] = set()
        self._turn = itertools.count()
        self._started = False
        self._start_by = time.monotonic() + STARTUP_WAIT_S

    def channel(self, index: int) -> socket.socket:
        """A new channel for worker ``index`` (started or restarted): the worker's end,
        for the worker to take (and this process to close once it has started)."""
        self.drop(index)
        self._lost.discard(index)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self._workers[index] = _Worker(ours)
        self._selector.register(ours, selectors.EVENT_READ, index)
        return theirs

    def drop(self, index: int) -> None:
        """Forget worker ``index`` (it exited): its connections ended with it."""
        worker = self._workers.pop(index, None)
        if worker is not None:
            self._selector.unregister(worker.channel)
            worker.channel.close()
        self._listen()

    def lost(self) -> set[int]:
        """Workers whose channel failed or closed since the last call: a live one can
        take no more connections and should be restarted."""
        lost, self._lost = self._lost, set()
        return lost

    def connections(self) -> dict[int, int]:
        """Connections held, by worker index."""
        return {index: w.connections for index, w in sorted(self._workers.items())}

    def ready(self) -> set[int]:
        """The workers that said they are ready."""
        return {index for index, w in self._workers.items() if w.ready}

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds; accept and hand off what came, read the notes."""
        self._listen()
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._accept(key.fileobj)  # type: ignore[arg-type]
            else:
                self._read(key.data)

    def _listen(self) -> None:
        """Listen while a worker is ready and accepting is not paused; otherwise new
        connections wait in the backlog."""
        now = time.monotonic()
        ready = [w.ready for w in self._workers.values()]
        if not self._started and ready and (all(ready) or now >= self._start_by):
            self._started = True
        want = self._started and any(ready) and now >= self._paused_until
        if want == self._listening or self._selector.get_map() is None:
            return
        for listener in self.listeners:
            if want:
                self._selector.register(listener, selectors.EVENT_READ, None)
            else:
                self._selector.unregister(listener)
        self._listening = want

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PASSING:
                    continue
                log.warning("accepting connections failed, pausing %.1fs: %s", _ACCEPT_PAUSE_S, exc)
                self._paused_until = time.monotonic() + _ACCEPT_PAUSE_S
                self._listen()
                return
            with conn:  # this process's copy: the worker gets its own
                self._hand_off(conn)
            if not self._listening:  # the last ready worker went away
                return

    def _hand_off(self, conn: socket.socket) -> None:
        # The fewest first; among equals in turn, so a burst of new connections is dealt
        # out one each rather than all to the first worker.
        start = next(self._turn)
        ready = [i for i, w in self._workers.items() if w.ready]
        order = sorted(
            ready, key=lambda i: (self._workers[i].connections, (i - start) % len(ready))
        )
        for index in order:
            worker = self._workers[index]
            try:
                socket.send_fds(worker.channel, [b"c"], [conn.fileno()])
            except BlockingIOError:
                continue  # its queue is full (it is stuck): another one takes it
            except OSError as exc:  # gone, or its channel failed: restarted
                log.warning("worker %d cannot take connections: %s", index, exc)
                self._lose(index)
                continue
            worker.handed += 1
            return
        log.warning("no worker could take a connection; closed")

    def _read(self, index: int) -> None:
        worker = self._workers.get(index)
        if worker is None:
            return
        while True:
            try:
                note = worker.channel.recv(_NOTE.size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                note = b""
            if len(note) != _NOTE.size:  # closed (it is stopping or gone), or garbled
                self._lose(index)
                return
            (ended,) = _NOTE.unpack(note)
            worker.ended = max(worker.ended, ended)
            if not worker.ready:
                worker.ready = True
                self._listen()

    def _lose(self, index: int) -> None:
        self.drop(index)
        self._lost.add(index)

    def close(self) -> None:
        for index in list(self._workers):
            self.drop(index)
        if self._listening:
            for listener in self.listeners:
                self._selector.unregister(listener)
        self._selector.close()
        for listener in self.listeners:
            listener.close()


class Receiver:
    """In a worker: takes the connections handed over on ``channel`` and serves them on
    ``front``; tells the balancer when it is ready and how many have ended. When the
    channel closes (the balancer is gone), ``on_closed`` is called."""

    def __init__(
        self,
        front: FrontServer,
        channel: socket.socket,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        channel.setblocking(False)
        self._front = front
        self._channel = channel
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._ended = 0
        self._telling = False
        self._adopting: set[asyncio.Task[None]] = set()
        front.on_release = self._release
        front.sweep()  # the head, keep-alive and write timeouts, as when listening
        self._loop.add_reader(channel.fileno(), self._receive)

    def ready(self) -> None:
        """Say the worker is ready: the balancer hands connections to it from now."""
        self._tell()

    def _receive(self) -> None:
        while True:
            try:
                message, fds, flags, _ = socket.recv_fds(
                    self._channel, 16, 64, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("the connection channel failed: %s", exc)
                self._closed()
                return
            if not message and not fds:  # the balancer is gone: nothing more will come
                self._closed()
                return
            if flags & socket.MSG_CTRUNC:
                # The kernel dropped descriptors that did not fit or could not be
                # installed (this worker out of them, say): the message is not a whole
                # hand-off. Close what came, and count its connection as ended, or the
                # balancer, which counted it handed, holds it against this worker forever.
                log.error("a handed-over connection was cut off in transit")
                for fd in fds:
                    os.close(fd)
                self._release()
                continue
            for fd in fds:
                task = self._loop.create_task(self._adopt(socket.socket(fileno=fd)))
                self._adopting.add(task)
                task.add_done_callback(self._adopting.discard)

    async def _adopt(self, sock: socket.socket) -> None:
        if self._front.closing:
            sock.close()
            self._release()
            return
        try:
            await self._loop.connect_accepted_socket(self._front, sock)
        except OSError as exc:  # the client went away meanwhile, say
            log.debug("a handed-over connection could not be served: %s", exc)
            sock.close()
            self._release()

    def _release(self) -> None:
        self._ended += 1
        if not self._telling:  # one note per loop pass, however many ended in it
            self._telling = True
            self._loop.call_soon(self._tell)

    def _tell(self) -> None:
        self._telling = False
        if self._channel.fileno() < 0:
            return
        # A note that does not fit now (the channel full) is made good by the next: each
        # carries the total.
        with contextlib.suppress(OSError):
            self._channel.send(_NOTE.pack(self._ended))

    def _closed(self) -> None:
        self.close()
        if self._on_closed is not None:
            self._on_closed()

    def close(self) -> None:
        """Take no more connections (at shutdown, or when the balancer is gone)."""
        if self._channel.fileno() >= 0:
            self._loop.remove_reader(self._channel.fileno())
            self._channel.close()
