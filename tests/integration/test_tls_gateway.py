"""
TLS everywhere, through a real twistd process on 127.0.0.1, with a test PKI
generated at test time (RSA keys: what DCMTK's BCP 195 profile expects):

  - HTTPS listeners: a client certificate required / optional, accepted and
    refused, a client trusting another CA refused, TLS 1.2 minimum;
  - HTTPS upstreams of an http backend: a private CA and a client
    certificate (mutual TLS), the system trust store (refused), no
    verification (warned at startup);
  - DICOM TLS both ways with DCMTK: echoscu/storescu +tls -> Harmony's
    dicom_scp with TLS -> Harmony's dicom_scu with use_tls -> storescp +tls,
    and HTTP -> dicom_scu (C-ECHO, C-STORE) -> storescp +tls; a wrong CA is
    refused on either side;
  - DICOM TLS with Orthanc (DicomTlsEnabled): Harmony's dicom_scu -> Orthanc
    (C-ECHO, C-STORE) and Orthanc's C-ECHO -> Harmony's dicom_scp.
"""

import datetime
import http.client
import ipaddress
import json
import shutil
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from peers import build_bind_shim, dcmtk, require
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from harmonytest import (
    Process,
    base_config,
    children,
    connection_owners,
    free_port,
    request,
    run_twistd,
    start_harmony,
    write_config,
)

# -- the test PKI ------------------------------------------------------------------


def _issue(cn, issuer=None, ca=False, san=()):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    if san:
        names = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in san]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(directory, name, *certs, key=None):
    path = directory / name
    if key is not None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    else:
        path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    root = _issue("Harmony IT Root", ca=True)
    inter = _issue("Harmony IT Intermediate", issuer=root, ca=True)
    server = _issue("localhost", issuer=inter, san=("localhost", "127.0.0.1"))
    client = _issue("harmony-it-client", issuer=root)
    other = _issue("Other IT Root", ca=True)
    other_client = _issue("other-client", issuer=other)
    other_server = _issue("localhost", issuer=other, san=("localhost", "127.0.0.1"))
    return SimpleNamespace(
        dir=d,
        ca=_write(d, "ca.pem", root[0]),
        other_ca=_write(d, "other-ca.pem", other[0]),
        server=_write(d, "server.pem", server[0], inter[0]),
        server_key=_write(d, "server.key", key=server[1]),
        client=_write(d, "client.pem", client[0]),
        client_key=_write(d, "client.key", key=client[1]),
        other_client=_write(d, "other-client.pem", other_client[0]),
        other_client_key=_write(d, "other-client.key", key=other_client[1]),
        other_server=_write(d, "other-server.pem", other_server[0]),
        other_server_key=_write(d, "other-server.key", key=other_server[1]),
    )


# -- peers: an HTTPS upstream and DCMTK's storescp with TLS ---------------------------------------


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self):
        peer = self.connection.getpeercert() or {}
        subject = dict(x[0] for x in peer.get("subject", ()))
        body = json.dumps({"path": self.path, "client": subject.get("commonName")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def https_upstream(pki):
    """
    An HTTPS server (in a thread of the test process) that requires a
    client certificate from the test CA and echoes its common name.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server, pki.server_key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def storescp_tls(pki, tmp_path_factory):
    """
    DCMTK's storescp with TLS (BCP 195 profile), requiring a client
    certificate from the test CA.
    """
    directory = tmp_path_factory.mktemp("storescp-tls")
    (directory / "in").mkdir()
    port = free_port()
    shim = build_bind_shim(directory)
    process = Process(
        [
            require("storescp"), "+tls", pki.server_key, pki.server, "+cf", pki.ca, "-pw",
            "-aet", "STORESCP", "-od", directory / "in", port,
        ],
        directory,
        "storescp",
        env={"TCP_NODELAY": "1", "LD_PRELOAD": str(shim)},
    )
    process.wait_for_port(port)
    yield SimpleNamespace(port=port, received=directory / "in", process=process)
    process.stop()


@pytest.fixture(scope="module")
def orthanc_tls(pki, tmp_path_factory):
    """
    An Orthanc whose DICOM port speaks TLS only, requiring a client
    certificate from the test CA (and presenting the test server
    certificate, also as a client).
    """
    from peers import Orthanc

    server = Orthanc(tmp_path_factory.mktemp("orthanc-tls"))
    config = json.loads(server.config_path.read_text())
    config.update(
        DicomTlsEnabled=True,
        DicomTlsCertificate=str(pki.server),
        DicomTlsPrivateKey=str(pki.server_key),
        DicomTlsTrustedCertificates=str(pki.ca),
        DicomTlsRemoteCertificateRequired=True,
        Plugins=[],
    )
    server.config_path.write_text(json.dumps(config, indent=2))
    server.start()
    yield server
    server.stop()


# -- the gateway --------------------------------------------------------------------------------

BASE = """
[proxy]
id = "tls-it"
[storage.options]
path = "./store"

[network.plain.http]
bind_address = "127.0.0.1"
bind_port = {plain}

[network.mtls.http]
bind_address = "127.0.0.1"
bind_port = {mtls}
cert_path = "{pki.server}"
key_path = "{pki.server_key}"
client_ca_path = "{pki.ca}"

[network.https.http]                # relative paths: against this file's directory
bind_address = "127.0.0.1"
bind_port = {https}
cert_path = "tls/server.pem"
key_path = "tls/server.key"

[network.optional.http]
bind_address = "127.0.0.1"
bind_port = {optional}
cert_path = "{pki.server}"
key_path = "{pki.server_key}"
client_ca_path = "{pki.ca}"
require_client_cert = false
"""

PIPELINES = """
[pipelines.echo]
networks = ["mtls", "https", "optional"]
endpoints = ["api"]
backends = ["echo"]
[endpoints.api]
service = "http"
options.path_prefix = "/api"
[backends.echo]
service = "echo"

[pipelines.up_mtls]
networks = ["plain"]
endpoints = ["up_mtls"]
backends = ["up_mtls"]
[endpoints.up_mtls]
service = "http"
options.path_prefix = "/up-mtls"
[backends.up_mtls]
service = "http"
[backends.up_mtls.options]
base_url = "https://localhost:{upstream}"
tls_ca_path = "{pki.ca}"
tls_cert_path = "{pki.client}"
tls_key_path = "{pki.client_key}"

[pipelines.up_system]
networks = ["plain"]
endpoints = ["up_system"]
backends = ["up_system"]
[endpoints.up_system]
service = "http"
options.path_prefix = "/up-system"
[backends.up_system]
service = "http"
[backends.up_system.options]
base_url = "https://localhost:{upstream}"

[pipelines.up_nocert]
networks = ["plain"]
endpoints = ["up_nocert"]
backends = ["up_nocert"]
[endpoints.up_nocert]
service = "http"
options.path_prefix = "/up-nocert"
[backends.up_nocert]
service = "http"
[backends.up_nocert.options]
base_url = "https://localhost:{upstream}"
tls_ca_path = "{pki.ca}"

[pipelines.up_noverify]
networks = ["plain"]
endpoints = ["up_noverify"]
backends = ["up_noverify"]
[endpoints.up_noverify]
service = "http"
options.path_prefix = "/up-noverify"
[backends.up_noverify]
service = "http"
[backends.up_noverify.options]
base_url = "https://127.0.0.1:{upstream}"
tls_verify = false
tls_cert_path = "{pki.client}"
tls_key_path = "{pki.client_key}"

[pipelines.http_to_pacs]
networks = ["plain"]
endpoints = ["pacs_api"]
backends = ["pacs"]
[endpoints.pacs_api]
service = "http"
options.path_prefix = "/pacs"

[pipelines.http_to_pacs_wrong_ca]
networks = ["plain"]
endpoints = ["pacs_wrong_api"]
backends = ["pacs_wrong_ca"]
[endpoints.pacs_wrong_api]
service = "http"
options.path_prefix = "/pacs-wrong-ca"

[pipelines.forward]
endpoints = ["scp"]
backends = ["pacs_forward"]
[endpoints.scp]
service = "dicom"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp}
enable_store = true
[endpoints.scp.options.tls]
cert_path = "{pki.server}"
key_path = "{pki.server_key}"
ca_path = "{pki.ca}"

[backends.pacs]
service = "dicom"
[backends.pacs.options]
aet = "STORESCP"
host = "127.0.0.1"
port = {storescp}
use_tls = true
tls_ca_path = "{pki.ca}"
tls_cert_path = "{pki.client}"
tls_key_path = "{pki.client_key}"

[backends.pacs_forward]
service = "dicom_scu"
[backends.pacs_forward.options]
aet = "STORESCP"
host = "127.0.0.1"
port = {storescp}
use_tls = true
tls_ca_path = "{pki.ca}"
tls_cert_path = "{pki.client}"
tls_key_path = "{pki.client_key}"
tls_verify_hostname = true

[pipelines.http_to_orthanc]
networks = ["plain"]
endpoints = ["orthanc_api"]
backends = ["orthanc"]
[endpoints.orthanc_api]
service = "http"
options.path_prefix = "/orthanc"

[backends.orthanc]
service = "dicom"
[backends.orthanc.options]
aet = "ORTHANC"
host = "127.0.0.1"
port = {orthanc}
use_tls = true
tls_ca_path = "{pki.ca}"
tls_cert_path = "{pki.client}"
tls_key_path = "{pki.client_key}"

[backends.pacs_wrong_ca]
service = "dicom"
[backends.pacs_wrong_ca.options]
aet = "STORESCP"
host = "127.0.0.1"
port = {storescp}
use_tls = true
tls_ca_path = "{pki.other_ca}"
tls_cert_path = "{pki.client}"
tls_key_path = "{pki.client_key}"
connect_timeout_secs = 5
"""


@pytest.fixture(scope="module")
def gateway(pki, https_upstream, storescp_tls, orthanc_tls, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls-gateway")
    (directory / "tls").mkdir()
    shutil.copy(pki.server, directory / "tls" / "server.pem")
    shutil.copy(pki.server_key, directory / "tls" / "server.key")
    ports = {name: free_port() for name in ("plain", "mtls", "https", "optional", "scp")}
    config = write_config(
        directory,
        BASE.format(pki=pki, **ports),
        {
            "tls": PIPELINES.format(
                pki=pki, upstream=https_upstream, storescp=storescp_tls.port, orthanc=orthanc_tls.dicom_port, **ports
            )
        },
    )
    process = start_harmony(directory, config, ports["plain"])
    for name in ("mtls", "https", "optional", "scp"):
        process.wait_for_port(ports[name])
    yield SimpleNamespace(process=process, directory=directory, **ports)
    process.stop_cleanly()


def _context(pki, ca="ca", cert=None, key=None):
    context = ssl.create_default_context(cafile=str(getattr(pki, ca)))
    if cert:
        context.load_cert_chain(getattr(pki, cert), getattr(pki, key))
    return context


def https_get(port, context, path="/api/hello", host="localhost"):
    """
    GET over HTTPS with C{context}: (status, JSON body, TLS version, cipher).
    """
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body), conn.sock.version(), conn.sock.cipher()[0]
    finally:
        conn.close()


def refused(port, context, host="localhost"):
    """
    The TLS handshake (or the first exchange after it, where TLS 1.3 reports
    a refused client certificate) fails.
    """
    try:
        https_get(port, context, host=host)
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected):
        return True
    return False


# -- HTTPS listeners ------------------------------------------------------------------------------


def test_https_with_client_certificate(gateway, pki):
    status, body, version, _ = https_get(gateway.mtls, _context(pki, cert="client", key="client_key"))
    assert status == 200
    assert body["method"] == "GET" and body["path"] == "hello"
    assert version in ("TLSv1.2", "TLSv1.3")


def test_https_client_certificate_required(gateway, pki):
    assert refused(gateway.mtls, _context(pki))
    assert refused(gateway.mtls, _context(pki, cert="other_client", key="other_client_key"))
    # Refusals are logged (the peer address and OpenSSL's reason, nothing else).
    out = gateway.process.output()
    assert "TLS handshake from 127.0.0.1:" in out and "on network mtls failed" in out


def test_https_client_certificate_optional(gateway, pki):
    assert https_get(gateway.optional, _context(pki))[0] == 200
    assert https_get(gateway.optional, _context(pki, cert="client", key="client_key"))[0] == 200
    assert refused(gateway.optional, _context(pki, cert="other_client", key="other_client_key"))


def test_https_server_verified_by_the_client(gateway, pki):
    # The chain (with its intermediate) leads to the test CA and names
    # localhost and 127.0.0.1.
    assert https_get(gateway.https, _context(pki), host="127.0.0.1")[0] == 200
    assert refused(gateway.https, _context(pki, ca="other_ca"))
    # Plain HTTP on an HTTPS listener gets no answer.
    with socket.create_connection(("127.0.0.1", gateway.https), timeout=5) as s:
        s.sendall(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not s.recv(100).startswith(b"HTTP/1.1 200")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_https_protocol_versions_and_ciphers(gateway, pki):
    old = _context(pki)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    assert refused(gateway.https, old)
    tls12 = _context(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    status, _, version, cipher = https_get(gateway.https, tls12)
    assert (status, version) == (200, "TLSv1.2")
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    cbc = _context(pki)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("AES128-SHA:ECDHE-RSA-AES128-SHA")
    assert refused(gateway.https, cbc)


# -- HTTPS upstreams -------------------------------------------------------------------------------


def test_upstream_with_private_ca_and_client_certificate(gateway):
    response = request(gateway.plain, "GET", "/up-mtls/some/path")
    assert response.status == 200, response
    assert response.json() == {"path": "/some/path", "client": "harmony-it-client"}
    # Again: the pooled connection (kept for this backend's policy) serves it.
    assert request(gateway.plain, "GET", "/up-mtls/again").json()["path"] == "/again"


def test_upstream_not_trusted_by_the_system(gateway):
    response = request(gateway.plain, "GET", "/up-system/x")
    assert response.status == 502
    assert "Backend up_system: upstream TLS failed: certificate verify failed" in gateway.process.output()


def test_upstream_requires_our_certificate(gateway):
    assert request(gateway.plain, "GET", "/up-nocert/x").status == 502
    assert "Backend up_nocert: upstream TLS failed: tlsv13 alert certificate required" in gateway.process.output()
    # Another backend's pooled connection (with a certificate) is not reused.
    assert request(gateway.plain, "GET", "/up-mtls/x").status == 200
    assert request(gateway.plain, "GET", "/up-nocert/x").status == 502


def test_upstream_without_verification(gateway):
    # Nothing is checked (not even the chain): the startup log says so.
    response = request(gateway.plain, "GET", "/up-noverify/y")
    assert response.status == 200
    assert response.json()["client"] == "harmony-it-client"
    out = gateway.process.output()
    assert "backends.up_noverify.options.tls_verify: the upstream's TLS certificate is not verified" in out


# -- DICOM TLS -------------------------------------------------------------------------------------


def _instance(directory, name):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def _tls_args(pki, key="client_key", cert="client", ca="ca"):
    return ["+tls", getattr(pki, key), getattr(pki, cert), "+cf", getattr(pki, ca), "-pw"]


def _received(storescp, sop_instance_uid):
    return [p for p in storescp.received.iterdir() if sop_instance_uid in p.name]


def test_echoscu_tls_to_harmony(gateway, pki):
    result = dcmtk("echoscu", "-v", *_tls_args(pki), "-aec", "HARMONY", "127.0.0.1", gateway.scp, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_echoscu_tls_refused(gateway, pki):
    # Harmony's certificate is not from the CA echoscu trusts.
    result = dcmtk("echoscu", *_tls_args(pki, ca="other_ca"), "-aec", "HARMONY", "127.0.0.1", gateway.scp, timeout=30)
    assert result.returncode != 0
    # echoscu's certificate is not from the CA Harmony trusts.
    result = dcmtk(
        "echoscu", *_tls_args(pki, key="other_client_key", cert="other_client"),
        "-aec", "HARMONY", "127.0.0.1", gateway.scp, timeout=30,
    )
    assert result.returncode != 0
    # Without TLS.
    result = dcmtk("echoscu", "-aec", "HARMONY", "127.0.0.1", gateway.scp, timeout=30)
    assert result.returncode != 0
    assert "on endpoint scp failed" in gateway.process.output()


def test_storescu_tls_through_harmony_to_storescp_tls(gateway, pki, storescp_tls, tmp_path):
    ds, path = _instance(tmp_path, "forward")
    result = dcmtk("storescu", "-v", *_tls_args(pki), "-aec", "HARMONY", "127.0.0.1", gateway.scp, path, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Received Store Response (Success)" in out
    [stored] = _received(storescp_tls, ds.SOPInstanceUID)
    assert pydicom.dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID


def test_http_to_storescp_over_tls(gateway, storescp_tls, tmp_path):
    response = request(gateway.plain, "POST", "/pacs/echo", b"")
    assert response.status == 200, response
    assert response.json()["success"] is True
    ds, path = _instance(tmp_path, "http")
    response = request(
        gateway.plain, "POST", "/pacs/store", path.read_bytes(), headers=[("Content-Type", "application/dicom")]
    )
    assert response.status == 200, response
    [result] = response.json()["results"]
    assert result["success"] is True and result["sop_instance_uid"] == ds.SOPInstanceUID
    assert _received(storescp_tls, ds.SOPInstanceUID)


def test_harmony_scu_refuses_an_untrusted_pacs(gateway):
    response = request(gateway.plain, "POST", "/pacs-wrong-ca/echo", b"")
    assert response.status == 502
    assert response.json()["success"] is False
    out = gateway.process.output()
    assert "Backend pacs_wrong_ca: TLS with STORESCP at 127.0.0.1:" in out
    assert "certificate verify failed" in out
    # Still serving.
    assert request(gateway.plain, "POST", "/pacs/echo", b"").status == 200


def test_no_patient_data_in_the_log(gateway):
    out = gateway.process.output()
    assert "CompressedSamples" not in out  # CT_small.dcm's PatientName
    assert "Traceback" not in out


def test_harmony_scu_to_orthanc_tls(gateway, orthanc_tls, tmp_path):
    response = request(gateway.plain, "POST", "/orthanc/echo", b"")
    assert response.status == 200, response
    assert response.json()["success"] is True
    ds, path = _instance(tmp_path, "orthanc")
    response = request(
        gateway.plain, "POST", "/orthanc/store", path.read_bytes(), headers=[("Content-Type", "application/dicom")]
    )
    assert response.status == 200, response
    assert response.json()["results"][0]["success"] is True
    stored = orthanc_tls.get_json("/instances?expand")
    assert ds.SOPInstanceUID in {i["MainDicomTags"]["SOPInstanceUID"] for i in stored}


def _orthanc_post(orthanc, path, body):
    req = urllib.request.Request(
        orthanc.url + path, data=json.dumps(body).encode(), method="POST" if path.endswith("echo") else "PUT",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_orthanc_tls_echo_to_harmony(gateway, orthanc_tls):
    modality = {"AET": "HARMONY", "Host": "127.0.0.1", "Port": gateway.scp, "UseDicomTls": True}
    assert _orthanc_post(orthanc_tls, "/modalities/harmony", modality) == 200
    assert _orthanc_post(orthanc_tls, "/modalities/harmony/echo", {"Timeout": 10}) == 200
    # Without TLS, Harmony's TLS listener does not answer.
    modality["UseDicomTls"] = False
    assert _orthanc_post(orthanc_tls, "/modalities/plain", modality) == 200
    assert _orthanc_post(orthanc_tls, "/modalities/plain/echo", {"Timeout": 5}) != 200


# -- startup and reload ---------------------------------------------------------------------------


def test_unusable_tls_file_is_a_startup_error(pki, tmp_path):
    listener = f'cert_path = "{pki.server}"\nkey_path = "tls/missing.key"\n'
    pipeline = """
[pipelines.p]
networks = ["default"]
endpoints = ["api"]
backends = ["echo"]
[endpoints.api]
service = "http"
options.path_prefix = "/api"
[backends.echo]
service = "echo"
"""
    config = write_config(tmp_path, base_config(free_port(), extra=listener), {"p": pipeline})
    result = run_twistd(tmp_path, config)
    assert result.returncode != 0
    assert (
        'harmony: configuration error: network.default.http.key_path: cannot read "tls/missing.key": '
        "No such file or directory"
    ) in result.stderr, result.stderr + result.stdout


def _reload(gateway, expected):
    before = gateway.process.output().count(expected)
    gateway.process.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while gateway.process.output().count(expected) == before:
        assert time.monotonic() < deadline, gateway.process.output()
        time.sleep(0.05)


def test_reload_renews_the_certificate(gateway, pki):
    # Last in this module: the gateway's https listener gets another CA's
    # certificate.
    tls_dir = gateway.directory / "tls"
    shutil.copy(pki.other_server, tls_dir / "server.pem.new")
    shutil.copy(pki.other_server_key, tls_dir / "server.key.new")
    (tls_dir / "server.pem.new").rename(tls_dir / "server.pem")
    (tls_dir / "server.key.new").rename(tls_dir / "server.key")
    _reload(gateway, "Reloaded:")
    assert https_get(gateway.https, _context(pki, ca="other_ca"))[0] == 200
    assert refused(gateway.https, _context(pki))
    # The other listeners kept theirs.
    assert https_get(gateway.mtls, _context(pki, cert="client", key="client_key"))[0] == 200
    # A key that does not go with the certificate: the reload is refused.
    shutil.copy(pki.server_key, tls_dir / "server.key")
    _reload(gateway, "Reload refused")
    assert "network.https.http.key_path:" in gateway.process.output()
    assert https_get(gateway.https, _context(pki, ca="other_ca"))[0] == 200


def test_https_listener_served_by_several_workers(pki, tmp_path):
    """
    With C{[proxy] workers = 2}, every worker speaks TLS on its socket of
    the HTTPS listener, with the listener's certificate.
    """
    port = free_port()
    base = base_config(port).replace('log_level = "info"', 'log_level = "info"\nworkers = 2\nshutdown_grace_secs = 5')
    base = base.replace(f"bind_port = {port}\n", f'bind_port = {port}\ncert_path = "{pki.server}"\nkey_path = "{pki.server_key}"\n')
    pipeline = """
[pipelines.echo]
networks = ["default"]
endpoints = ["echo_in"]
backends = ["echo_out"]
[endpoints.echo_in]
service = "http"
[endpoints.echo_in.options]
path_prefix = "/echo"
[backends.echo_out]
service = "echo"
"""
    config = write_config(tmp_path, base, {"echo": pipeline})
    runtime = tmp_path / "run"
    runtime.mkdir()
    proc = start_harmony(tmp_path, config, port, env={"RUNTIME_DIRECTORY": str(runtime)})
    conns = []
    try:
        deadline = time.monotonic() + 15
        while "Worker 1 serving" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        [worker] = children(proc.popen.pid)
        context = ssl.create_default_context(cafile=str(pki.ca))
        for _ in range(24):
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            conns.append(conn)
            conn.request("GET", "/echo/x")
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["method"] == "GET"
        assert set(connection_owners([proc.popen.pid, worker], port).values()) == {proc.popen.pid, worker}
    finally:
        for conn in conns:
            conn.close()
        proc.stop_cleanly()
