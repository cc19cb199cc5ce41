"""gateway.balance's Balancer on real sockets: who gets each connection, and the counts."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from gateway import balance
from gateway.balance import _NOTE, Balancer
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
