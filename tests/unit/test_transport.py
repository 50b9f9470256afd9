"""
harmony.transport on transports that are not Twisted's TCP connections:
no buffer to read, writes go through C{transport.write}.
"""

from twisted.internet.testing import StringTransport

from harmony.transport import buffered, write_now


def test_other_transports_have_no_readable_buffer():
    assert buffered(StringTransport()) is None
    assert buffered(object()) is None


def test_other_transports_get_the_usual_write():
    transport = StringTransport()
    write_now(transport, b"abc")
    write_now(transport, bytearray(b"def"))
    assert transport.value() == b"abcdef"


def test_a_list_is_written_in_order():
    transport = StringTransport()
    write_now(transport, [b"ab", bytearray(b"cd"), memoryview(b"ef")])
    assert transport.value() == b"abcdef"
