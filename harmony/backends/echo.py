# -*- test-case-name: tests.unit.test_backends -*-
"""
The C{echo} backend: answers with the request it received, as JSON.
"""

import base64

from twisted.internet import defer
from zope.interface import implementer

from harmony.config.schema import Schema
from harmony.envelope import ResponseEnvelope
from harmony.interfaces import IBackend
from harmony.streams import collect

OPTIONS = Schema({}, legacy={"path_prefix": "the echo backend has no prefix"})

#: Bodies larger than this are refused with 413 (the echo is for inspection).
MAX_ECHO_BODY = 1024 * 1024


@implementer(IBackend)
class EchoBackend:
    """
    Answers C{200 application/json} with C{method}, C{path} (relative to
    the endpoint prefix), C{full_path}, C{query} (name -> values),
    C{headers} (lower-case name -> value), C{body} (UTF-8 text, or base64
    with C{"body_encoding": "base64"}), and C{normalized} when middleware
    parsed or replaced the body.
    """

    service_type = "echo"

    def __init__(self, name, options=None, context=None):
        self.name = name

    def handle(self, envelope):
        return defer.Deferred.fromCoroutine(self._handle(envelope))

    async def _handle(self, envelope):
        d = envelope.details
        data = await collect(envelope.body, MAX_ECHO_BODY)
        try:
            body, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(data).decode("ascii"), "base64"
        echo = {
            "method": d.method,
            "path": d.path,
            "full_path": d.full_path,
            "query": d.query,
            "headers": d.headers.as_dict(),
            "body": body,
            "body_encoding": encoding,
            "body_size": len(data),
        }
        if envelope.parsed:
            echo["normalized"] = envelope.normalized
        if envelope.metadata:
            echo["metadata"] = dict(envelope.metadata)
        return ResponseEnvelope.json(200, echo)

    def close(self):
        return defer.succeed(None)
