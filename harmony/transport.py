# -*- test-case-name: tests.integration.test_transport_write_now -*-
"""
Helpers over Twisted's TCP transports for the few places where Harmony
goes under twisted's write buffer: knowing whether it is empty, and
sending a small latency-critical message at once instead of on the
reactor's next turn.

Both apply to C{twisted.internet.tcp.Connection} (plain TCP, client or
server side) only; any other transport (TLS, test transports) gets
C{None} / the usual C{write}.
"""

from twisted.internet import tcp


def buffered(transport):
    """
    Bytes waiting in the write buffer of a plain TCP C{transport}, or
    C{None} when it is not one (or not one this helper knows how to read).
    """
    if not isinstance(transport, tcp.Connection):
        return None
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:
        return None


#: Buffers handed to one sendmsg(2) at most (well under IOV_MAX).
_MAX_PIECES = 64


def write_now(transport, data):
    """
    Write C{data} (bytes-like, or a list of them: one sendmsg) on
    C{transport}: straight to the socket when nothing is waiting in the
    transport's buffer (a message the peer waits for goes out now, not
    after another turn of the reactor); whatever the socket does not take,
    or everything on any other transport, through C{transport.write}.
    """
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    if buffered(transport) == 0 and transport.connected and not transport.disconnecting:
        try:
            if len(pieces) == 1:
                sent = transport.socket.send(pieces[0])
            else:
                sent = transport.socket.sendmsg(pieces[:_MAX_PIECES])
        except OSError:
            # Full (EAGAIN), interrupted, or broken: the transport's own
            # write retries, or finds the error and closes.
            sent = 0
        while pieces and sent >= len(pieces[0]):
            sent -= len(pieces.pop(0))
        if pieces and sent:
            pieces[0] = memoryview(pieces[0])[sent:]
    for piece in pieces:
        transport.write(bytes(piece))
