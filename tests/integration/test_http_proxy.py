"""
The C{http} backend as a reverse proxy, end to end: a real C{twistd harmony}
in front of a real twisted.web upstream (upstream_server.py).

Pipelines (conftest.proxy_pipelines): C{/api} -> the upstream (timeout
1 s), C{/based} -> the upstream under C{/mount/point/}, C{/down} -> a port
nobody listens on, C{/echo} -> the echo backend.
"""

import base64
import gzip
import hashlib
import http.client
import json
import os
import random
import threading
import time

import pytest

from harmonytest import BACKEND_TIMEOUT, request


def pseudo_random(n, seed=1):
    # Same bytes as upstream_server.pseudo_random.
    return random.Random(seed).randbytes(n)


def upstream_saw(resp):
    """
    The request as the upstream's echo route saw it.
    """
    assert resp.status == 200, resp
    assert resp.header("X-Upstream") == "echo", resp
    data = resp.json()
    data["body"] = base64.b64decode(data["body_b64"])
    return data


def header_values(data, name):
    return [v for k, v in data["headers"] if k == name.lower()]


def assert_healthy(port):
    """
    Harmony still proxies a normal request.
    """
    resp = request(port, "GET", "/api/echo/health?check=1")
    data = upstream_saw(resp)
    assert data["uri"] == "/echo/health?check=1"


@pytest.fixture(scope="module")
def port(proxy_gateway):
    return proxy_gateway.port


# -- methods, paths, query strings ---------------------------------------------


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
def test_bodyless_methods(port, method):
    data = upstream_saw(request(port, method, "/api/echo/things/7"))
    assert data["method"] == method
    assert data["path"] == "/echo/things/7"
    assert data["body"] == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_methods_with_body(port, method):
    body = b'{"resourceType": "Observation", "status": "final"}'
    data = upstream_saw(
        request(port, method, "/api/echo/Observation", body=body, headers=[("Content-Type", "application/fhir+json")])
    )
    assert data["method"] == method
    assert data["path"] == "/echo/Observation"
    assert data["body"] == body
    assert header_values(data, "content-type") == ["application/fhir+json"]
    assert header_values(data, "content-length") == [str(len(body))]


def test_head_keeps_upstream_length(port):
    get = request(port, "GET", "/api/binary/5000")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        head = request(port, "HEAD", "/api/binary/5000", connection=conn)
        assert head.status == 200
        assert head.body == b""
        assert head.header("Content-Type") == "image/png"
        assert head.header("Content-Length") == get.header("Content-Length") == "5000"
        # The connection is still in sync (no body bytes after the HEAD answer).
        assert upstream_saw(request(port, "GET", "/api/echo/after-head", connection=conn))["path"] == "/echo/after-head"
    finally:
        conn.close()


def test_prefix_is_stripped_and_base_path_prepended(port):
    assert upstream_saw(request(port, "GET", "/api"))["path"] == "/"
    assert upstream_saw(request(port, "GET", "/api/"))["uri"] == "/"
    data = upstream_saw(request(port, "GET", "/based/echo/x?y=1"))
    assert data["uri"] == "/mount/point/echo/x?y=1"


def test_encoded_path_is_forwarded_byte_exact(port):
    path = "/echo/a%20b/c%2Fd/%C3%A9t%C3%A9/x+y;p=1"
    data = upstream_saw(request(port, "GET", "/api" + path))
    assert data["path"] == path


@pytest.mark.parametrize(
    "query",
    [
        "a=1&a=2&a=3",
        "name=Jos%C3%A9%20Mu%C3%B1oz&x=%2B%26%3D%25&plus=a+b",
        "flag&empty=&=nokey&a=1&a=1",
        "PatientID=12345&StudyDate=20200101-20201231&includefield=00100010&includefield=0020000D",
        "q=%E2%9C%93&%7E=~&slash=/a/b?c",
    ],
)
def test_query_string_is_forwarded_byte_exact(port, query):
    data = upstream_saw(request(port, "GET", "/api/echo/q?" + query))
    assert data["query"] == query
    assert data["uri"] == "/echo/q?" + query


# -- headers ----------------------------------------------------------------------


def test_end_to_end_headers_forwarded(port):
    data = upstream_saw(
        request(
            port,
            "GET",
            "/api/echo/h",
            headers=[
                ("X-Custom", "custom value"),
                ("X-Multi", "first"),
                ("X-Multi", "second"),
                ("Authorization", "Bearer abc.def.ghi"),
                ("Accept", "application/dicom+json"),
                ("Cookie", "client=mine"),
            ],
        )
    )
    assert header_values(data, "x-custom") == ["custom value"]
    assert header_values(data, "x-multi") == ["first", "second"]
    assert header_values(data, "authorization") == ["Bearer abc.def.ghi"]
    assert header_values(data, "accept") == ["application/dicom+json"]
    assert header_values(data, "cookie") == ["client=mine"]


def test_hop_by_hop_headers_not_forwarded(port):
    data = upstream_saw(
        request(
            port,
            "GET",
            "/api/echo/hop",
            headers=[
                ("Connection", "keep-alive, X-Hop-Secret"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "websocket"),
                ("Proxy-Authorization", "Basic c2VjcmV0"),
                ("X-Hop-Secret", "named in Connection"),
                ("X-Kept", "yes"),
            ],
        )
    )
    names = {k for k, _ in data["headers"]}
    for hop in ("keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "x-hop-secret"):
        assert hop not in names, data["headers"]
    # Harmony's own connection to the upstream may say what it wants, but
    # never the client's tokens.
    for value in header_values(data, "connection"):
        assert "x-hop-secret" not in value.lower()
    assert header_values(data, "x-kept") == ["yes"]


def test_forwarding_headers(port, upstream):
    data = upstream_saw(request(port, "GET", "/api/echo/fwd"))
    assert header_values(data, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(data, "x-forwarded-proto") == ["http"]
    assert header_values(data, "x-forwarded-host") == [f"127.0.0.1:{port}"]
    assert header_values(data, "forwarded") == [f'for=127.0.0.1;host="127.0.0.1:{port}";proto=http']
    # The upstream gets its own Host, not the client's.
    assert header_values(data, "host") == [f"127.0.0.1:{upstream.port}"]


def test_x_forwarded_for_is_appended(port):
    data = upstream_saw(request(port, "GET", "/api/echo/fwd", headers=[("X-Forwarded-For", "203.0.113.9")]))
    assert header_values(data, "x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]


def test_expect_continue_upload(port):
    body = os.urandom(100_000)
    data = upstream_saw(request(port, "PUT", "/api/echo/e", body=body, headers=[("Expect", "100-continue")]))
    assert data["body"] == body
    assert header_values(data, "expect") == []


def test_response_headers_passed_back(port):
    resp = request(port, "GET", "/api/echo/r")
    assert resp.header("X-Upstream") == "echo"
    assert resp.header("Content-Type") == "application/json"
    assert int(resp.header("Content-Length")) == len(resp.body)
    # Date and Server are single-valued: the upstream's replace twisted.web's.
    assert len(resp.all("Date")) == 1, resp.headers
    assert len(resp.all("Server")) == 1, resp.headers


# -- upstream statuses --------------------------------------------------------------


@pytest.mark.parametrize("code", [404, 500, 201, 503, 401])
def test_upstream_status_preserved(port, code):
    resp = request(port, "POST" if code == 201 else "GET", f"/api/status/{code}", body=b"{}" if code == 201 else None)
    assert resp.status == code
    assert resp.body == f"upstream says {code}".encode()
    assert resp.header("X-Upstream-Status") == str(code)
    assert resp.all("X-Multi") == ["one", "two"]
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    if code == 201:
        assert resp.header("Location") == "/things/42"
    assert_healthy(port)


def test_no_content_has_no_body(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        resp = request(port, "DELETE", "/api/nocontent", connection=conn)
        assert resp.status == 204
        assert resp.body == b""
        assert resp.header("X-Upstream") == "nocontent"
        assert upstream_saw(request(port, "GET", "/api/echo/after-204", connection=conn))["path"] == "/echo/after-204"
    finally:
        conn.close()


def test_redirect_is_not_followed(port):
    resp = request(port, "GET", "/api/redirect")
    assert resp.status == 302
    assert resp.header("Location") == "/elsewhere"
    assert resp.body == b"moved"


def test_compressed_body_is_not_decoded(port):
    resp = request(port, "GET", "/api/gzip", headers=[("Accept-Encoding", "gzip")])
    assert resp.status == 200
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.body == gzip.compress(b"hello compressed world\n" * 100, mtime=0)


# -- bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 1000, 65_536, 65_537, 300_000])
def test_binary_response_byte_exact(port, size):
    resp = request(port, "GET", f"/api/binary/{size}")
    assert resp.status == 200
    assert resp.header("Content-Type") == "image/png"
    assert resp.body == pseudo_random(size)
    assert resp.header("Content-Length") == str(size)


def test_binary_request_body_byte_exact(port):
    body = bytes(range(256)) * 40 + b"\r\n\x00\xff"
    resp = request(port, "POST", "/api/upload", body=body, headers=[("Content-Type", "application/dicom")])
    assert resp.status == 200
    assert resp.body == body
    assert resp.header("X-Sha256") == hashlib.sha256(body).hexdigest()


def test_five_megabytes_both_ways(port):
    body = os.urandom(5 * 1024 * 1024)
    digest = hashlib.sha256(body).hexdigest()
    resp = request(port, "POST", "/api/upload", body=body, headers=[("Content-Type", "application/octet-stream")])
    assert resp.status == 200
    assert resp.header("X-Length") == str(len(body))
    assert resp.header("X-Sha256") == digest  # what the upstream received
    assert hashlib.sha256(resp.body).hexdigest() == digest  # what came back
    assert resp.header("Content-Length") == str(len(body))


def test_chunked_request_body(port):
    """
    A client upload without Content-Length (chunked) reaches the upstream whole.
    """
    body = os.urandom(700_000)
    chunks = [body[i : i + 100_000] for i in range(0, len(body), 100_000)]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    resp = request(port, "PUT", "/api/upload", body=encoded, headers=[("Transfer-Encoding", "chunked")])
    assert resp.status == 200
    assert resp.header("X-Sha256") == hashlib.sha256(body).hexdigest()
    assert resp.body == body


def test_streamed_upstream_response(port):
    """
    A chunked upstream answer (no Content-Length) of a few MB passes intact.
    """
    size = 3 * 1024 * 1024 + 123
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        resp = request(port, "GET", f"/api/stream/{size}", connection=conn)
        assert resp.status == 200
        assert resp.header("Content-Type") == "application/octet-stream"
        assert len(resp.body) == size
        assert resp.body == pseudo_random(size, seed=2)
        # The connection is reusable after a streamed answer.
        assert upstream_saw(request(port, "GET", "/api/echo/after-stream", connection=conn))["path"] == "/echo/after-stream"
    finally:
        conn.close()


def test_truncated_upstream_body_aborts_client_connection(port):
    """
    An upstream that dies mid-body must not produce a short "complete"
    response: the client sees the connection break.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/api/truncate")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            resp.read()
    finally:
        conn.close()
    assert_healthy(port)


def test_concurrent_large_transfers(port):
    """
    Several uploads and downloads at once, each intact.
    """
    results = {}

    def upload(i):
        body = random.Random(100 + i).randbytes(1_000_000 + i)
        resp = request(port, "POST", "/api/upload", body=body)
        results[("up", i)] = resp.status == 200 and resp.body == body

    def download(i):
        resp = request(port, "GET", f"/api/stream/{800_000 + i}")
        results[("down", i)] = resp.status == 200 and resp.body == pseudo_random(800_000 + i, seed=2)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(4) for f in (upload, download)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and all(results.values()), results


# -- errors -------------------------------------------------------------------------


def assert_json_error(resp, status, error):
    assert resp.status == status, resp
    assert resp.header("Content-Type") == "application/json"
    data = resp.json()
    assert set(data) == {"error", "message"}, data
    assert data["error"] == error
    assert isinstance(data["message"], str) and data["message"]
    return data


def test_upstream_down_is_502(port):
    for method, body in (("GET", None), ("POST", b"payload")):
        assert_json_error(request(port, method, "/down/anything", body=body), 502, "bad_gateway")
        assert_healthy(port)


def test_upstream_slow_is_504(port):
    start = time.monotonic()
    resp = request(port, "GET", f"/api/sleep/{BACKEND_TIMEOUT + 3}")
    elapsed = time.monotonic() - start
    assert_json_error(resp, 504, "gateway_timeout")
    assert BACKEND_TIMEOUT * 0.9 <= elapsed < BACKEND_TIMEOUT + 2, elapsed
    assert_healthy(port)


def test_slow_upstream_does_not_block_others(port):
    slow = {}

    def call():
        slow["resp"] = request(port, "GET", f"/api/sleep/{BACKEND_TIMEOUT * 0.8}")

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.1)
    start = time.monotonic()
    assert_healthy(port)
    assert request(port, "GET", "/echo/x").status == 200
    assert time.monotonic() - start < BACKEND_TIMEOUT * 0.5
    t.join(10)
    assert slow["resp"].status == 200
    assert slow["resp"].body == b"slept"


def test_unknown_path_is_404(port):
    assert_json_error(request(port, "GET", "/not-configured/x"), 404, "not_found")
    assert_json_error(request(port, "GET", "/apiary"), 404, "not_found")
    assert_healthy(port)


def test_wrong_method_is_405(port):
    resp = request(port, "PROPFIND", "/api/echo/x")
    assert_json_error(resp, 405, "method_not_allowed")
    assert "GET" in resp.header("Allow")
    assert_healthy(port)


def test_dot_segments_are_400(port):
    assert_json_error(request(port, "GET", "/api/echo/../../secret"), 400, "bad_request")
    assert_json_error(request(port, "GET", "/api/%2E%2E/secret"), 400, "bad_request")
    assert_healthy(port)


def test_malformed_request_line_does_not_kill_server(port):
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        answer = s.recv(1024)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert_healthy(port)


def test_body_over_limit_is_413(port):
    """
    [proxy.content_limits].max_body_size (default 10 MiB) applies to
    proxied request bodies.
    """
    # Answered from the headers alone: a client that keeps sending the body
    # sees the connection close (curl and browsers read the 413 first).
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (10 * 1024 * 1024 + 1))
        s.sendall(b"\0" * 65536)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer
    assert json.loads(body)["error"] == "payload_too_large"
    # At the limit exactly: accepted.
    resp = request(port, "POST", "/api/echo", body=b"\0" * (10 * 1024 * 1024))
    assert resp.status == 200
    assert_healthy(port)


# -- cookies --------------------------------------------------------------------------


def test_set_cookie_passed_to_client_not_replayed(port):
    resp = request(port, "GET", "/api/cookie")
    assert resp.status == 200
    assert resp.all("Set-Cookie") == ["session=s3cr3t; Path=/; HttpOnly", "theme=dark; Path=/"]
    # Another client (new connection, no Cookie header) must not get them.
    data = upstream_saw(request(port, "GET", "/api/echo/next"))
    assert header_values(data, "cookie") == []
    data = upstream_saw(request(port, "GET", "/based/echo/next"))
    assert header_values(data, "cookie") == []


# -- echo next to proxies -------------------------------------------------------------


def test_echo_pipeline_on_same_network(port):
    resp = request(port, "PATCH", "/echo/p?k=v", body=b"patch")
    data = resp.json()
    assert (data["method"], data["path"], data["query"], data["body"]) == ("PATCH", "p", {"k": ["v"]}, "patch")


def test_no_phi_in_gateway_log(proxy_gateway, port):
    marker = "PATIENT-7788-XYZ"
    request(port, "GET", f"/api/echo/x?PatientName={marker}")
    request(port, "GET", f"/down/x?PatientName={marker}")
    request(port, "POST", "/api/upload", body=marker.encode())
    assert marker not in proxy_gateway.process.output()
