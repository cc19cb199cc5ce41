"""gateway.balance's Balancer on real sockets: who gets each connection, and the counts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from config.model import Limits
from gateway import balance
from gateway.balance import _NOTE, Balancer, Receiver
from gateway.front import FrontServer, Request
from gateway.server import ListenError, bind

_opened: list[socket.socket] = []


@pytest.fixture
def balancer() -> Iterator[Balancer]:
    """A balancer; every socket the test made through the helpers is closed after it."""
    balancer = Balancer(bind("127.0.0.1", 0))
    yield balancer
    balancer.close()
    while _opened:
        _opened.pop().close()


def _kept(sock: socket.socket) -> socket.socket:
    _opened.append(sock)
    return sock


def _connect(balancer: Balancer, count: int) -> list[socket.socket]:
    port = balancer.listeners[0].getsockname()[1]
    return [_kept(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in range(count)]


def _until(balancer: Balancer, done: Callable[[], bool]) -> None:
    for _ in range(100):
        if done():
            return
        balancer.poll(0.05)
    raise AssertionError(f"not reached; connections {balancer.connections()}")


def _note(channel: socket.socket, ended: int) -> None:
    """What a worker tells: the connections it has seen end in all (0: it is ready)."""
    channel.send(_NOTE.pack(ended))


def _handed(channel: socket.socket) -> list[socket.socket]:
    """The connections handed over on a worker's channel so far."""
    channel.setblocking(False)
    out: list[socket.socket] = []
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(channel, 16, 64)
        except BlockingIOError:
            return out
        out += [_kept(socket.socket(fileno=fd)) for fd in fds]


def test_each_connection_goes_to_the_worker_holding_the_fewest(balancer: Balancer) -> None:
    first, second = _kept(balancer.channel(0)), _kept(balancer.channel(1))
    _note(first, 0)
    _note(second, 0)
    clients = _connect(balancer, 6)
    _until(balancer, lambda: sum(balancer.connections().values()) == 6)
    assert balancer.connections() == {0: 3, 1: 3}
    to_first, to_second = _handed(first), _handed(second)
    assert (len(to_first), len(to_second)) == (3, 3)
    # What was handed over is the server's end of the clients' connections.
    clients[0].sendall(b"ping")
    assert [s.recv(4, socket.MSG_DONTWAIT) for s in to_first + to_second if _ready(s)] == [b"ping"]

    # The first worker says two of its connections ended: the next two are its own.
    for conn in to_first[:2]:
        conn.close()
    _note(first, 1)
    _note(first, 2)  # each note is the total: a lost one costs nothing
    _until(balancer, lambda: balancer.connections()[0] == 1)
    clients += _connect(balancer, 2)
    _until(balancer, lambda: sum(balancer.connections().values()) == 6)
    assert balancer.connections() == {0: 3, 1: 3}
    assert len(_handed(first)) == 2 and not _handed(second)

    # A worker that exits (its end closed) gets none, and is reported lost; a restarted
    # one starts from zero, once it says it is ready.
    second.close()
    _until(balancer, lambda: 1 not in balancer.connections())
    assert balancer.lost() == {1} and balancer.lost() == set()
    clients += _connect(balancer, 1)
    _until(balancer, lambda: balancer.connections() == {0: 4})
    again = _kept(balancer.channel(1))
    clients += _connect(balancer, 1)
    _until(balancer, lambda: balancer.connections() == {0: 5, 1: 0})
    _note(again, 0)
    _until(balancer, lambda: balancer.ready() == {0, 1})
    clients += _connect(balancer, 2)
    _until(balancer, lambda: balancer.connections() == {0: 5, 1: 2})
    assert len(_handed(again)) == 2


def _ready(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def test_at_start_connections_wait_in_the_backlog_until_every_worker_is_ready(
    balancer: Balancer,
) -> None:
    first, second = _kept(balancer.channel(0)), _kept(balancer.channel(1))
    clients = _connect(balancer, 2)
    _note(first, 0)  # one of two ready: still waiting, or the first would get them all
    for _ in range(3):
        balancer.poll(0.05)
    assert balancer.connections() == {0: 0, 1: 0} and not _handed(first)
    _note(second, 0)
    _until(balancer, lambda: balancer.connections() == {0: 1, 1: 1})
    (conn,) = _handed(first)
    (other,) = _handed(second)
    clients[0].sendall(b"ping")
    assert b"ping" in (conn.recv(4, socket.MSG_DONTWAIT) if _ready(conn) else other.recv(4))


def test_bind_names_the_address_it_cannot_listen_on() -> None:
    (taken,) = bind("127.0.0.1", 0)
    with taken:
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"127.0.0.1:{port}: address already in use"):
            bind("127.0.0.1", port)


def test_at_start_a_worker_that_never_comes_is_not_waited_for_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(balance, "STARTUP_WAIT_S", 0.2)
    balancer = Balancer(bind("127.0.0.1", 0))
    try:
        first, _never = _kept(balancer.channel(0)), _kept(balancer.channel(1))
        _note(first, 0)
        _connect(balancer, 1)
        _until(balancer, lambda: balancer.connections() == {0: 1, 1: 0})
    finally:
        balancer.close()
        while _opened:
            _opened.pop().close()


# -- full channels, accept errors, cut-off messages -----------------------------------------


def _narrow(channel: socket.socket) -> None:
    """The smallest send buffer the kernel allows: a few messages fill it."""
    channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)


def _peers(conns: list[socket.socket]) -> set[tuple[str, int]]:
    return {conn.getpeername() for conn in conns}


def _names(clients: list[socket.socket]) -> set[tuple[str, int]]:
    return {client.getsockname() for client in clients}


def test_a_worker_whose_channel_is_full_is_passed_over_not_lost(balancer: Balancer) -> None:
    first, second = _kept(balancer.channel(0)), _kept(balancer.channel(1))
    _note(first, 0)
    _note(second, 0)
    _narrow(balancer._workers[0].channel)  # the first worker is stuck: it reads nothing
    clients = _connect(balancer, 20)
    _until(balancer, lambda: sum(balancer.connections().values()) == 20)
    held = balancer.connections()
    assert 0 < held[0] < 10 and held[1] == 20 - held[0]
    assert balancer.lost() == set()
    # Every connection reached a worker: what did not fit went to the other.
    to_first, to_second = _handed(first), _handed(second)
    assert (len(to_first), len(to_second)) == (held[0], held[1])
    assert _peers(to_first + to_second) == _names(clients)

    # Its channel read, the first worker takes connections again: it holds the fewest.
    clients += _connect(balancer, 2)
    _until(balancer, lambda: balancer.connections() == {0: held[0] + 2, 1: held[1]})
    assert _peers(_handed(first)) == _names(clients[-2:])


def test_a_connection_no_worker_can_take_is_closed(
    balancer: Balancer, caplog: pytest.LogCaptureFixture
) -> None:
    first = _kept(balancer.channel(0))
    _note(first, 0)
    _narrow(balancer._workers[0].channel)
    clients = _connect(balancer, 10)

    def closed() -> int:
        return caplog.text.count("no worker could take a connection; closed")

    _until(balancer, lambda: balancer.connections()[0] + closed() == 10)
    handed = _handed(first)
    assert 0 < len(handed) == balancer.connections()[0] < 10
    assert balancer.lost() == set() and balancer.ready() == {0}
    # The rest were closed: their clients see the end, and the taken ones still work.
    turned_away = [c for c in clients if c.getsockname() not in _peers(handed)]
    assert len(turned_away) == closed() == 10 - len(handed)
    assert [c.recv(1) for c in turned_away] == [b""] * len(turned_away)
    taken = next(c for c in clients if c not in turned_away)
    taken.sendall(b"ping")
    (conn,) = [s for s in handed if s.getpeername() == taken.getsockname()]
    conn.settimeout(5)
    assert conn.recv(4) == b"ping"


@contextlib.contextmanager
def _out_of_fds() -> Iterator[None]:
    """This process at its open-files limit (RLIMIT_NOFILE lowered, the gaps below it
    filled), until the block ends: an accept fails with EMFILE, as when a worker's
    connections and a load spike use every descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        with pytest.raises(OSError) as full:
            for _ in range(highest + 1):
                fillers.append(os.dup(2))
        assert full.value.errno == errno.EMFILE
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_accepting_pauses_after_running_out_of_fds_and_the_connection_waits(
    balancer: Balancer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(balance, "_ACCEPT_PAUSE_S", 0.5)  # room to see the pause
    first = _kept(balancer.channel(0))
    _note(first, 0)
    _until(balancer, lambda: balancer.ready() == {0})
    client = _kept(socket.socket())  # its descriptor taken before there are none
    client.settimeout(5)
    before = time.monotonic()
    with _out_of_fds():
        client.connect(balancer.listeners[0].getsockname())
        for _ in range(20):
            balancer.poll(0.05)
            if "accepting connections failed" in caplog.text:
                break
    assert "accepting connections failed, pausing 0.5s: [Errno 24]" in caplog.text
    assert balancer.connections() == {0: 0}
    # Descriptors are free again, but accepting waits out the pause rather than spinning
    # on the listener; the connection waits in the backlog meanwhile, and is not lost.
    _until(balancer, lambda: balancer.connections() == {0: 1})
    assert time.monotonic() - before >= 0.5
    assert caplog.text.count("accepting connections failed") == 1
    (conn,) = _handed(first)
    client.sendall(b"ping")
    conn.settimeout(5)
    assert conn.recv(4) == b"ping"


# -- a worker's end (Receiver) ----------------------------------------------------------------


async def _unanswered(request: Request) -> None:
    raise AssertionError("no request is sent in these tests")


async def _serving(balancer: Balancer, done: Callable[[], bool]) -> None:
    """As _until, with the worker's loop running between polls."""
    for _ in range(300):
        if done():
            return
        balancer.poll(0)
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached; connections {balancer.connections()}")


async def _holding(front: FrontServer, count: int) -> None:
    """Up to 1.5 s for the worker to hold ``count`` connections; the caller asserts."""
    for _ in range(300):
        if len(front.connections) == count:
            return
        await asyncio.sleep(0.005)


async def test_a_note_lost_to_a_full_channel_is_made_good_by_the_next(
    balancer: Balancer, caplog: pytest.LogCaptureFixture
) -> None:
    theirs = _kept(balancer.channel(0))
    _narrow(theirs)  # the worker's notes: a few fill the channel while the balancer is busy
    front = FrontServer(_unanswered, Limits())
    receiver = Receiver(front, theirs)
    try:
        receiver.ready()
        await _serving(balancer, lambda: balancer.ready() == {0})
        clients = _connect(balancer, 20)
        await _serving(balancer, lambda: len(front.connections) == 20)
        assert balancer.connections() == {0: 20}
        # 19 end, each in its own loop pass (a note each), while the balancer reads none.
        for ending, client in enumerate(clients[:19], 1):
            client.close()
            await _holding(front, 20 - ending)
            await asyncio.sleep(0)  # the note is sent on the next pass
        balancer.poll(0)
        stale = balancer.connections()[0]
        assert stale > 1  # the notes that did not fit were lost...
        assert balancer.lost() == set()
        clients[19].close()  # ...and the next one, the total, makes them good
        await _serving(balancer, lambda: balancer.connections() == {0: 0})
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        receiver.close()
        await front.shutdown(1.0)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_message_whose_fds_were_cut_off_is_closed_and_counted_as_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    front = FrontServer(_unanswered, Limits())
    receiver = Receiver(front, theirs)
    pairs = [socket.socketpair() for _ in range(65)]  # one more than the worker takes
    try:
        before = _open_fds()
        socket.send_fds(ours, [b"c"], [sent.fileno() for sent, _ in pairs])
        for sent, _ in pairs:
            sent.close()
        ours.settimeout(5)
        # The worker counts the message's connection as ended (the balancer counted it
        # handed), and closes what it received: no peer is left open, no descriptor kept.
        assert _NOTE.unpack(await asyncio.to_thread(ours.recv, _NOTE.size)) == (1,)
        for _, peer in pairs:
            peer.settimeout(5)
            assert await asyncio.to_thread(peer.recv, 1) == b""
        assert _open_fds() == before - len(pairs)
        assert not front.connections
        assert "a handed-over connection was cut off in transit" in caplog.text
        # The worker still takes connections after it.
        sent, peer = socket.socketpair()
        with sent, peer:
            socket.send_fds(ours, [b"c"], [sent.fileno()])
            await _holding(front, 1)
            assert len(front.connections) == 1
    finally:
        receiver.close()
        await front.shutdown(1.0)
        ours.close()
        for sent, peer in pairs:
            sent.close()
            peer.close()


async def test_a_connection_a_worker_out_of_fds_cannot_take_is_counted_as_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    front = FrontServer(_unanswered, Limits())
    receiver = Receiver(front, theirs)
    sent, peer = socket.socketpair()
    try:
        with _out_of_fds():  # the kernel cannot give the worker the handed descriptor
            socket.send_fds(ours, [b"c"], [sent.fileno()])
            note = b""
            for _ in range(300):
                with contextlib.suppress(BlockingIOError):
                    note = ours.recv(_NOTE.size)
                    break
                await asyncio.sleep(0.005)
        # Counted as ended, as the balancer counted it handed: else it would count one
        # connection held by this worker forever.
        assert note, "the worker sent no note"
        assert _NOTE.unpack(note) == (1,)
        assert "a handed-over connection was cut off in transit" in caplog.text
        assert not front.connections
        sent.close()  # the last copy: the client's connection ends, not left half-handed
        peer.settimeout(5)
        assert await asyncio.to_thread(peer.recv, 1) == b""
    finally:
        receiver.close()
        await front.shutdown(1.0)
        ours.close()
        sent.close()
        peer.close()
