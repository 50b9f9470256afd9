# -*- test-case-name: tests.unit.test_http_adapter -*-
"""
Header hygiene for proxying (RFC 9110 7.6.1): hop-by-hop headers, and
headers the transport recomputes, are never forwarded.
"""

from harmony.envelope import Headers

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


def end_to_end(headers, drop=()):
    """
    A copy of C{headers} without hop-by-hop headers, without the headers
    named in C{Connection}, without C{Content-Length} (recomputed by whoever
    sends the body) and without the names in C{drop}.
    """
    named = set()
    for value in headers.get_all("connection"):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    skip = HOP_BY_HOP | named | {"content-length"} | {d.lower() for d in drop}
    return Headers([(k, v) for k, v in headers if k.lower() not in skip])


def json_error_body(error):
    """
    The JSON error object of Harmony's HTTP endpoints.
    """
    return {"error": error.error, "message": error.message}
