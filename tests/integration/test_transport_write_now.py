"""
harmony.transport.write_now on a real TCP connection on 127.0.0.1: sent
to the socket at once when nothing waits in the transport's buffer,
queued behind it otherwise (the bytes arrive in order either way).
"""

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, threads

from harmony.transport import buffered, write_now


class Sender(protocol.Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)


@pytest.fixture
def connection():
    factory = protocol.ServerFactory.forProtocol(Sender)
    factory.connected = defer.Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    yield factory.connected, client
    client.close()
    port.stopListening()


def _receive(sock, count):
    data = b""
    while len(data) < count:
        more = sock.recv(1 << 20)
        if not more:
            break
        data += more
    return data


@pytest_twisted.inlineCallbacks
def test_sent_at_once_when_nothing_waits(connection):
    connected, client = connection
    sender = yield connected
    transport = sender.transport
    assert buffered(transport) == 0
    write_now(transport, b"C-STORE-RSP")
    assert buffered(transport) == 0  # on the socket already, not in the buffer
    got = yield threads.deferToThread(_receive, client, 11)
    assert got == b"C-STORE-RSP"


@pytest_twisted.inlineCallbacks
def test_queued_behind_what_waits(connection):
    connected, client = connection
    sender = yield connected
    transport = sender.transport
    big = os.urandom(8 * 1024 * 1024)
    transport.write(big)
    assert buffered(transport) == len(big)
    write_now(transport, b"after")
    assert buffered(transport) == len(big) + 5
    got = yield threads.deferToThread(_receive, client, len(big) + 5)
    assert got == big + b"after"


@pytest_twisted.inlineCallbacks
def test_a_list_goes_in_one_call_and_what_does_not_fit_is_queued(connection):
    connected, client = connection
    sender = yield connected
    transport = sender.transport
    pieces = [os.urandom(512 * 1024) for _ in range(40)]  # more than the socket takes at once
    write_now(transport, pieces)
    queued = buffered(transport)
    assert 0 < queued < sum(map(len, pieces))  # part sent at once, the rest queued in order
    write_now(transport, [b"after", b"wards"])
    got = yield threads.deferToThread(_receive, client, sum(map(len, pieces)) + 10)
    assert got == b"".join(pieces) + b"afterwards"
