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


_SKIP_RAW = frozenset(n.encode("ascii") for n in HOP_BY_HOP | {"content-length"})


def end_to_end_raw(pairs, drop=frozenset()):
    """
    L{end_to_end} over C{(name, value)} byte pairs; C{drop} holds lower-case
    byte names.
    """
    skip = _SKIP_RAW | drop
    named = [v for k, v in pairs if k.lower() == b"connection"]
    if named:
        skip = skip | {t.strip().lower() for v in named for t in v.split(b",") if t.strip()}
    return [(k, v) for k, v in pairs if k.lower() not in skip]


def end_to_end(headers, drop=()):
    """
    A copy of C{headers} without hop-by-hop headers, without the headers
    named in C{Connection}, without C{Content-Length} (recomputed by whoever
    sends the body) and without the names in C{drop}.
    """
    drop = frozenset(d.lower().encode("latin-1") for d in drop)
    return Headers.from_raw(end_to_end_raw(headers.raw(), drop))


def json_error_body(error):
    """
    The JSON error object of Harmony's HTTP endpoints.
    """
    return {"error": error.error, "message": error.message}
