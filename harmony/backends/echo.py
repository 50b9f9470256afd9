# -*- test-case-name: tests.unit.test_backends -*-
"""
The C{echo} backend: answers with the request it received, as JSON.
"""

import base64

from twisted.internet import defer
from zope.interface import implementer

from harmony.config.schema import Bool, Field, Schema
from harmony.envelope import ResponseEnvelope
from harmony.interfaces import IBackend
from harmony.streams import Stream, collect

OPTIONS = Schema(
    {
        "parse_body": Field(
            Bool(), False, "parse the request body by Content-Type and echo its normalized view"
        ),
    },
    legacy={"path_prefix": "the echo backend has no prefix"},
)

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

    With the option C{parse_body}, the backend parses the body itself
    (L{harmony.envelope.RequestEnvelope.parse_body}, under the gateway's
    content limits: malformed bodies are 400s, oversized ones 413s) and
    always echoes C{normalized}; a body larger than L{MAX_ECHO_BODY} is
    then read through and only its size echoed (C{body} and
    C{body_encoding} are C{null}) instead of being refused.
    """

    service_type = "echo"

    def __init__(self, name, options=None, context=None):
        self.name = name
        self.parse_body = bool((options or {}).get("parse_body", False))

    def handle(self, envelope):
        return defer.Deferred.fromCoroutine(self._handle(envelope))

    async def _handle(self, envelope):
        d = envelope.details
        if self.parse_body:
            await envelope.parse_body()
            data, size = await _read_capped(envelope.body, MAX_ECHO_BODY)
        else:
            data = await collect(envelope.body, MAX_ECHO_BODY)
            size = len(data)
        if data is None:
            body = encoding = None
        else:
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
            "body_size": size,
        }
        if envelope.parsed:
            echo["normalized"] = envelope.normalized
        if envelope.metadata:
            echo["metadata"] = dict(envelope.metadata)
        return ResponseEnvelope.json(200, echo)

    def close(self):
        return defer.succeed(None)


async def _read_capped(body, cap):
    """
    C{(data, size)} of a body: C{data} is C{None} when it is larger than
    C{cap} bytes (a stream is then read through, counting, not kept).
    """
    if body is None:
        return b"", 0
    if not isinstance(body, Stream):
        return (bytes(body) if len(body) <= cap else None), len(body)
    chunks, size = [], 0
    async for chunk in body:
        size += len(chunk)
        if size > cap:
            chunks = None
        elif chunks is not None:
            chunks.append(chunk)
    return (None if chunks is None else b"".join(chunks)), size
