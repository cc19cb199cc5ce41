"""Exact connection balance across workers (``gateway.balance = "exact"``).

With SO_REUSEPORT the kernel picks a worker for each new connection by a hash of its
addresses: over thousands of short connections that evens out, over a few long-lived ones
(a load balancer's keep-alive pool, a benchmark's 64) it does not, and the worker that
drew more serves each of them more slowly. Here, as in Envoy's ``exact_balance`` or Node's
cluster module, the process that starts the workers accepts every connection itself and
hands it (its file descriptor, over a Unix socket) to the worker holding the fewest;
each worker tells it when one of its connections ends.

Only accepting goes through the starting process: requests go straight between the
client and its worker. The cost is paid per connection, not per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import selectors
import socket
from dataclasses import dataclass

from gateway.front import FrontServer

log = logging.getLogger(__name__)

# Connections accepted per wake-up before the workers' notes are read again.
_ACCEPT_BURST = 64
# A worker's notes that connections ended: one byte each, in one message per loop pass.
_ENDED = b"-"


@dataclass
class _Worker:
    channel: socket.socket  # the starting process's end
    connections: int = 0


class Balancer:
    """In the process that starts the workers: accepts on ``listener`` and hands each
    connection to the worker with the fewest, in turn among equals."""

    def __init__(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.listener = listener
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._workers: dict[int, _Worker] = {}
        self._turn = itertools.count()

    def channel(self, index: int) -> socket.socket:
        """A new channel for worker ``index`` (started or restarted): the worker's end,
        for the worker to take (and this process to close once it has started)."""
        self.drop(index)
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

    def connections(self) -> dict[int, int]:
        """Connections held, by worker index."""
        return {index: w.connections for index, w in sorted(self._workers.items())}

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds; accept and hand off what came, count what ended."""
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._accept()
            else:
                self._read(key.data)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: the next poll tries again
                log.warning("accepting a connection failed: %s", exc)
                return
            with conn:  # this process's copy: the worker gets its own
                self._hand_off(conn)

    def _hand_off(self, conn: socket.socket) -> None:
        # The fewest first; among equals in turn, so a burst of new connections is dealt
        # out one each rather than all to the first worker.
        start = next(self._turn)
        order = sorted(
            self._workers,
            key=lambda i: (self._workers[i].connections, (i - start) % len(self._workers)),
        )
        for index in order:
            worker = self._workers[index]
            try:
                socket.send_fds(worker.channel, [b"c"], [conn.fileno()])
            except BlockingIOError:
                continue  # its queue is full (it is stuck): another one takes it
            except OSError:  # it exited; the supervisor restarts it
                self.drop(index)
                continue
            worker.connections += 1
            return
        log.warning("no worker could take a connection; closed")

    def _read(self, index: int) -> None:
        worker = self._workers.get(index)
        if worker is None:
            return
        while True:
            try:
                note = worker.channel.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                note = b""
            if not note:  # the worker closed its end: it is stopping or gone
                self.drop(index)
                return
            worker.connections = max(0, worker.connections - len(note))

    def close(self) -> None:
        for index in list(self._workers):
            self.drop(index)
        self._selector.unregister(self.listener)
        self._selector.close()
        self.listener.close()


class Receiver:
    """In a worker: takes the connections handed over on ``channel`` and serves them on
    ``front``; tells the balancer when each one ends."""

    def __init__(self, front: FrontServer, channel: socket.socket) -> None:
        channel.setblocking(False)
        self._front = front
        self._channel = channel
        self._loop = asyncio.get_running_loop()
        self._ended = 0
        self._adopting: set[asyncio.Task[None]] = set()
        front.on_release = self._release
        self._loop.add_reader(channel.fileno(), self._receive)

    def _receive(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._channel, 16, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("the connection channel failed: %s", exc)
                self.close()
                return
            if not message and not fds:  # the balancer is gone: nothing more will come
                self.close()
                return
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
            sock.setblocking(False)
            await self._loop.connect_accepted_socket(self._front, sock)
        except OSError as exc:  # the client went away meanwhile, say
            log.debug("a handed-over connection could not be served: %s", exc)
            sock.close()
            self._release()

    def _release(self) -> None:
        if not self._ended:
            self._loop.call_soon(self._tell)
        self._ended += 1

    def _tell(self) -> None:
        ended, self._ended = self._ended, 0
        if self._channel.fileno() < 0:
            return
        with contextlib.suppress(OSError):  # the balancer is gone (stopping)
            self._channel.send(_ENDED * ended)

    def close(self) -> None:
        """Take no more connections (at shutdown, or when the balancer is gone)."""
        if self._channel.fileno() >= 0:
            self._loop.remove_reader(self._channel.fileno())
            self._channel.close()
