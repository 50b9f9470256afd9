"""
Body parsing and [proxy.content_limits] through a real C{twistd -n harmony}:
an C{echo} backend with C{parse_body = true} answers with the normalized
view of what it received.  Oversized uploads (100 MB, Content-Length and
chunked, streamed from a raw socket) are refused with 413 while Harmony's
peak RSS stays put; XML/CSV/form/multipart/binary bodies are parsed end to
end; malformed bodies and limit breaches are 400 JSON errors, and the
server keeps serving.
"""

import hashlib
import json
import random
import socket
import threading

import pytest

from harmonytest import base_config, free_port, request, start_harmony, write_config

LIMITS = """
[proxy.content_limits]
max_csv_rows = 5
max_xml_depth = 10
max_multipart_files = 2
max_form_fields = 5
"""

PIPELINES = {
    "parse": """
[pipelines.parse]
networks = ["default"]
endpoints = ["parse"]
backends = ["echo_parse"]

[endpoints.parse]
service = "http"
[endpoints.parse.options]
path_prefix = "/parse"

[backends.echo_parse]
service = "echo"
[backends.echo_parse.options]
parse_body = true
""",
    "raw": """
[pipelines.raw]
networks = ["default"]
endpoints = ["raw"]
backends = ["echo_raw"]

[endpoints.raw]
service = "http"
[endpoints.raw.options]
path_prefix = "/raw"

[backends.echo_raw]
service = "echo"
""",
    "small": """
[pipelines.small]
networks = ["default"]
endpoints = ["small"]
backends = ["echo_small"]

[endpoints.small]
service = "http"
[endpoints.small.options]
path_prefix = "/small"
max_body_size = 100

[backends.echo_small]
service = "echo"
""",
    "big": """
[pipelines.big]
networks = ["default"]
endpoints = ["big"]
backends = ["echo_big"]

[endpoints.big]
service = "http"
[endpoints.big.options]
path_prefix = "/big"
max_body_size = 20971520

[backends.echo_big]
service = "echo"
[backends.echo_big.options]
parse_body = true
""",
    "fhir": """
[pipelines.fhir]
networks = ["default"]
endpoints = ["fhir"]
backends = ["echo_fhir"]

[endpoints.fhir]
service = "fhir"
[endpoints.fhir.options]
path_prefix = "/fhir"
max_body_size = 100

[backends.echo_fhir]
service = "echo"
""",
}

MB = 1024 * 1024
BOUNDARY = "harmony-it-boundary-0123"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bodies")
    port = free_port()
    config = write_config(directory, base_config(port, extra=LIMITS), PIPELINES)
    proc = start_harmony(directory, config, port)
    yield proc, port
    proc.stop_cleanly()


@pytest.fixture(scope="module")
def port(gateway):
    return gateway[1]


def peak_rss_kb(proc):
    """
    The process's peak resident set size (VmHWM) in kB.
    """
    with open(f"/proc/{proc.popen.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def post(port, body, content_type, path="/parse/x"):
    headers = [("Content-Type", content_type)] if content_type else []
    return request(port, "POST", path, body=body, headers=headers)


def parsed(resp):
    assert resp.status == 200, resp
    return resp.json()["normalized"]


def assert_400(resp, message):
    assert resp.status == 400, resp
    assert resp.header("Content-Type") == "application/json"
    data = resp.json()
    assert data["error"] == "bad_request"
    assert message in data["message"], data
    return data["message"]


def assert_serving(port):
    data = parsed(post(port, b'{"still": "up"}', "application/json"))
    assert data == {"still": "up"}


def upload(port, head, chunks, timeout=60):
    """
    Send C{head} and then C{chunks} over a raw socket while a thread reads
    whatever Harmony answers (it may answer and close before the body is
    sent).

    @return: C{(answer bytes, body bytes sent)}.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    answer = bytearray()

    def read():
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            answer.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent = 0
    try:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        # Harmony closed the connection: the rest of the body is not wanted.
        pass
    reader.join(timeout)
    sock.close()
    return bytes(answer), sent


def response_of(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    if headers.get(b"Transfer-Encoding") == b"chunked":
        out, rest = b"", body
        while True:
            size, _, rest = rest.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            out += rest[: int(size, 16)]
            rest = rest[int(size, 16) + 2 :]
        body = out
    return status, json.loads(body)


def chunked(chunks):
    for chunk in chunks:
        yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    yield b"0\r\n\r\n"


def zeros(total, size=64 * 1024):
    block = b"\0" * size
    for _ in range(total // size):
        yield block


# -- 413 without buffering -----------------------------------------------------------


def test_100mb_over_limit_refused_with_bounded_memory(gateway, port):
    proc, _ = gateway
    assert_serving(port)
    before = peak_rss_kb(proc)
    total = 100 * MB

    answer, sent = upload(
        port,
        b"POST /parse/up HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % total,
        zeros(total),
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert response_of(answer)[1]["error"] == "payload_too_large"
    assert sent < total

    answer, sent = upload(
        port,
        b"POST /parse/up HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        chunked(zeros(total)),
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert response_of(answer)[1]["error"] == "payload_too_large"
    assert sent < total

    grown = peak_rss_kb(proc) - before
    assert grown < 20 * 1024, f"peak RSS grew by {grown} kB"
    assert_serving(port)


def test_large_streamed_multipart_hashed_not_kept(gateway, port):
    """
    An 8 MiB file part, sent chunked: parsed while streaming (spooled by
    twisted.web, read through the parser), metadata and SHA-256 only.
    """
    proc, _ = gateway
    before = peak_rss_kb(proc)
    payload = random.Random(3).randbytes(8 * MB)
    head = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"study\"\r\n\r\n1.2.3\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"ct.dcm\"\r\n"
        "Content-Type: application/dicom\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    chunks = [head] + [payload[i : i + 65536] for i in range(0, len(payload), 65536)] + [tail]
    answer, _ = upload(
        port,
        b"POST /parse/stow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=%s\r\nTransfer-Encoding: chunked\r\n\r\n" % BOUNDARY.encode(),
        chunked(chunks),
    )
    status, echo = response_of(answer)
    assert status == 200, echo
    assert echo["normalized"] == {
        "fields": {"study": "1.2.3"},
        "files": [
            {
                "name": "file",
                "filename": "ct.dcm",
                "content_type": "application/dicom",
                "size": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        ],
    }
    # The body was read through, not echoed (over the echo's 1 MiB).
    assert echo["body"] is None
    assert echo["body_size"] == len(head) + len(payload) + len(tail)
    grown = peak_rss_kb(proc) - before
    assert grown < 20 * 1024, f"peak RSS grew by {grown} kB"


# -- formats end to end -------------------------------------------------------------------


def test_json(port):
    body = b'{"resourceType": "Patient", "active": true, "n": [1, 2.5, null]}'
    resp = post(port, body, "application/fhir+json")
    assert parsed(resp) == {"resourceType": "Patient", "active": True, "n": [1, 2.5, None]}
    assert resp.json()["body"] == body.decode()
    assert parsed(post(port, b"[1]", None)) == [1]


def test_xml(port):
    body = (
        b'<?xml version="1.0"?><Bundle xmlns="http://hl7.org/fhir" type="batch">'
        b"<entry><id>1</id></entry><entry><id>2</id></entry><total>2</total></Bundle>"
    )
    resp = post(port, body, "application/fhir+xml")
    assert parsed(resp) == {
        "Bundle": {"@xmlns": "http://hl7.org/fhir", "@type": "batch", "entry": [{"id": "1"}, {"id": "2"}], "total": "2"}
    }
    # The raw bytes are untouched.
    assert resp.json()["body"] == body.decode()


def test_large_xml_streamed(port):
    body = b"<items>" + b"<item n='1'>x</item>" * 100000 + b"</items>"
    assert len(body) > 1 * MB  # spooled by twisted.web: parsed from the stream
    resp = post(port, body, "text/xml")
    assert len(parsed(resp)["items"]["item"]) == 100000
    assert resp.json()["body_size"] == len(body)


def test_csv(port):
    body = b'id,name,formula\r\n1,"Smith, J",=HYPERLINK("http://x")\r\n2,Zo\xc3\xab,-3\r\n'
    assert parsed(post(port, body, "text/csv; charset=utf-8")) == [
        {"id": "1", "name": "Smith, J", "formula": "'=HYPERLINK(\"http://x\")"},
        {"id": "2", "name": "Zoë", "formula": "'-3"},
    ]


def test_form(port):
    body = b"patient=Zo%C3%AB+M&codes[]=a&codes[]=b"
    assert parsed(post(port, body, "application/x-www-form-urlencoded")) == {
        "patient": "Zoë M",
        "codes": ["a", "b"],
    }


def test_multipart(port):
    body = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\n"
        "Content-Type: text/plain\r\n\r\nfile content\r\n"
        f"--{BOUNDARY}--\r\n"
    ).encode()
    assert parsed(post(port, body, f"multipart/form-data; boundary={BOUNDARY}")) == {
        "fields": {"note": "hello"},
        "files": [
            {
                "name": "f",
                "filename": "a.txt",
                "content_type": "text/plain",
                "size": 12,
                "sha256": hashlib.sha256(b"file content").hexdigest(),
            }
        ],
    }


def test_binary(port):
    data = random.Random(9).randbytes(3 * MB)
    resp = post(port, data, "image/png")
    assert parsed(resp) == {"content_type": "image/png", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_unknown_type_untouched(port):
    resp = post(port, b"\x00\x01 not parsed", "application/x-custom")
    assert resp.status == 200
    assert resp.json()["normalized"] is None
    assert resp.json()["body_encoding"] == "utf-8"
    assert resp.json()["body"] == "\x00\x01 not parsed"


def test_passthrough_pipeline_does_not_parse(port):
    resp = post(port, b"<not xml", "text/xml", path="/raw/x")
    assert resp.status == 200
    assert "normalized" not in resp.json()


# -- malformed and over limits: 400 ---------------------------------------------------------


@pytest.mark.parametrize(
    "content_type, body, message",
    [
        ("application/json", b'{"a": }', "Malformed JSON body: Expecting value at line 1 column 7"),
        ("text/xml", b"<a><b></a>", "Malformed XML body: mismatched tag"),
        (
            "application/xml",
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>',
            "DTD",
        ),
        (
            "text/xml",
            b'<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
            b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><l>&c;</l>',
            "DTD",
        ),
        ("text/xml", b"<a>" * 11 + b"</a>" * 11, "XML nested deeper than 10 levels"),
        ("text/csv", b"a\n" + b"1\n" * 6, "CSV body has more than 5 rows"),
        ("text/csv", b'a,b\n"open,1\n', "Malformed CSV body: unterminated quoted field"),
        ("application/x-www-form-urlencoded", b"a=1&b=2&c=3&d=4&e=5&f=6", "Form body has more than 5 fields"),
        ("application/x-www-form-urlencoded", b"a=%ff", "Form body is not valid UTF-8"),
        ("multipart/form-data", b"--x--\r\n", "without a boundary parameter"),
        ("multipart/form-data; boundary=other", b"--x\r\n\r\n--x--\r\n", "boundary of its Content-Type was not found"),
        (
            "multipart/form-data; boundary=b",
            b"".join(
                b'--b\r\nContent-Disposition: form-data; name="f"; filename="%d"\r\n\r\nx\r\n' % i for i in range(3)
            )
            + b"--b--\r\n",
            "Multipart body has more than 2 files",
        ),
    ],
)
def test_bad_bodies_are_400(port, content_type, body, message):
    assert_400(post(port, body, content_type), message)


def test_keeps_serving(gateway, port):
    for _ in range(3):
        assert_400(post(port, b"<a>", "text/xml"), "Malformed XML body")
    assert_serving(port)
    assert "Traceback" not in gateway[0].output()


def test_endpoint_max_body_size_overrides_the_proxy_limit(port):
    """
    An endpoint's C{max_body_size} decides before the body is read: larger
    than [proxy.content_limits] (10 MiB by default) lets a 12 MiB upload
    through, smaller refuses 101 bytes.
    """
    big = b"x" * (12 * MB)
    response = request(port, "POST", "/big/upload", body=big, headers=[("Content-Type", "application/octet-stream")])
    assert response.status == 200, response
    assert response.json()["normalized"]["size"] == len(big)
    head = (b"POST /raw/upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(big))
    answer, sent = upload(port, head, zeros(len(big)))
    status, body = response_of(answer)
    assert (status, body["error"]) == (413, "payload_too_large")
    assert sent < len(big)  # refused from the headers: not read
    response = request(port, "POST", "/small/x", body=b"y" * 101, headers=[("Content-Type", "text/plain")])
    assert response.status == 413, response
    assert response.json()["error"] == "payload_too_large"
    response = request(port, "POST", "/small/x", body=b"y" * 100, headers=[("Content-Type", "text/plain")])
    assert response.status == 200, response


def test_413_in_the_endpoints_protocol(port):
    response = request(
        port, "POST", "/fhir/Patient", body=b"{" + b" " * 200 + b"}",
        headers=[("Content-Type", "application/fhir+json")],
    )
    assert response.status == 413, response
    assert response.header("content-type").startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "too-costly"


def test_errors_before_the_pipeline_in_the_owning_endpoints_protocol(port):
    # Dot segments are refused before a route is chosen: the FHIR endpoint
    # owning the prefix still answers with an OperationOutcome ...
    response = request(port, "GET", "/fhir/Patient/../Observation")
    assert response.status == 400, response
    assert response.header("content-type").startswith("application/fhir+json")
    assert response.json()["resourceType"] == "OperationOutcome"
    # ... an HTTP endpoint with its JSON error, and no endpoint with Harmony's.
    response = request(port, "GET", "/raw/a/../b")
    assert (response.status, response.json()["error"]) == (400, "bad_request")
    response = request(port, "GET", "/nowhere")
    assert (response.status, response.json()["error"]) == (404, "not_found")
