# -*- test-case-name: tests.unit.test_request_id -*-
"""
The request id of an HTTP request: the client's C{X-Request-ID} when it
is one value matching C{[A-Za-z0-9._:-]{1,128}}, else a new one (a UUID
version 4 as 32 hex digits).  It is echoed in the response's
C{X-Request-ID}, kept in C{envelope.metadata["request_id"]}, sent to
HTTP-like backends (L{harmony.backends.http.forwarded_headers}) and
written in the access line.
"""

import random
import re

HEADER = b"x-request-id"

_VALID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


#: The version (4) and variant (RFC 4122) bits of a UUID, as an int.
_UUID4_MASK = ~(0xF << 76) & ~(0x3 << 62)
_UUID4_BITS = (4 << 76) | (0x2 << 62)


def generate(getrandbits=random.getrandbits):
    """
    A new request id: a random (version 4) UUID as 32 lower-case hex
    digits, like C{uuid.uuid4().hex} at an eighth of the cost: the bits come
    from C{random} (seeded from the system's entropy, and again in a forked
    worker), not a system call per request; a request id is a correlation
    handle, not a secret.
    """
    return "%032x" % (getrandbits(128) & _UUID4_MASK | _UUID4_BITS)


def accept(values):
    """
    The request id for the values of the C{X-Request-ID} headers a client
    sent (C{None}: none): the one value when it is valid, else a new id.

    @param values: a list of C{bytes} (or C{str}), or C{None}.
    @return: C{str}
    """
    if values is not None and len(values) == 1:
        value = values[0]
        if isinstance(value, str):
            value = value.encode("latin-1", "replace")
        if _VALID.fullmatch(value):
            return value.decode("ascii")
    return generate()


def for_request(request):
    """
    The request id of a C{twisted.web} request, decided once (kept on the
    request) and set on its response headers.
    """
    rid = getattr(request, "harmony_request_id", None)
    if rid is None:
        rid = accept(request.requestHeaders.getRawHeaders(HEADER))
        request.harmony_request_id = rid
        request.responseHeaders.setRawHeaders(HEADER, [rid.encode("ascii")])
    return rid
