"""
harmony.tls: PEM files read into TLS contexts (errors naming the key),
server and client policies checked by real TLS handshakes over in-memory
connections (twisted.test.iosim, timers on a Clock), the configuration
keys of HTTP listeners, HTTP-like backends, the dicom_scp endpoint and the
dicom_scu backend, per-backend TLS policies in the pooled HTTP agent, and a
C-ECHO over DICOM TLS.

The test PKI is generated at test time (EC P-256 keys: fast): a root CA
with an intermediate that issues the server certificate (so the chain
must be sent), a client certificate from the root, and a second, unrelated
CA for "wrong CA" cases.
"""

import datetime
import ipaddress
import textwrap
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols import tls as tls_protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface.verify import verifyObject

from _fakes import make_request
from harmony import tls
from harmony.config import ConfigError, load_config
from harmony.dimse.association import AssociationAborted
from harmony.dimse.messages import C_MOVE_RQ, VERIFICATION_SOP_CLASS
from harmony.dimse.scp import DicomServerFactory, SCPPolicy
from harmony.dimse.scu import IMPLICIT_VR_LITTLE_ENDIAN, DicomClient, TLSHandshakeFailed
from harmony.gateway import build_gateway
from harmony.http.client import PooledAgent
from harmony.registry import BuildContext, builtin_registry

# -- a test PKI ------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(cn, issuer=None, ca=False, san=(), client=False, not_before=None, not_after=None):
    """
    A (certificate, key) pair; self-signed without C{issuer}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        names = [
            x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in san
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _pem(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key, password=None):
    encryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """
    PEM files of the test PKI (paths as strings) in a temporary directory.
    """
    d = tmp_path_factory.mktemp("pki")
    root = _issue("Harmony Test Root", ca=True)
    inter = _issue("Harmony Test Intermediate", issuer=root, ca=True)
    server = _issue("localhost", issuer=inter, san=("localhost", "127.0.0.1"))
    client = _issue("test-client", issuer=root, client=True)
    other = _issue("Other Root", ca=True)
    other_server = _issue("localhost", issuer=other, san=("localhost", "127.0.0.1"))
    other_client = _issue("other-client", issuer=other, client=True)
    expired = _issue("localhost", issuer=root, san=("localhost",), not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    files = {
        "ca": _pem(root[0]),
        "other_ca": _pem(other[0]),
        "both_cas": _pem(root[0], other[0]),
        "server_chain": _pem(server[0], inter[0]),
        "server_key": _key_pem(server[1]),
        "server_leaf_only": _pem(server[0]),
        "client": _pem(client[0]),
        "client_key": _key_pem(client[1]),
        "other_server": _pem(other_server[0]),
        "other_server_key": _key_pem(other_server[1]),
        "other_client": _pem(other_client[0]),
        "other_client_key": _key_pem(other_client[1]),
        "expired": _pem(expired[0]),
        "expired_key": _key_pem(expired[1]),
        "encrypted_key": _key_pem(server[1], b"secret"),
        "garbage_cert": b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    }
    paths = {}
    for name, data in files.items():
        path = d / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = str(path)
    return SimpleNamespace(dir=d, **paths)


WHERE = tls.Place("pipelines/b.toml", ("backends", "b", "options"))


def _server(pki, ca=None, require=True, chain=None, key=None):
    return tls.server_options(WHERE, chain or pki.server_chain, key or pki.server_key, ca or "", require)


def _client(pki, ca="ca", cert=None, key=None, verify=True, verify_hostname=True):
    return tls.client_tls(
        WHERE,
        ca_path=getattr(pki, ca) if ca else "",
        verify=verify,
        cert_path=getattr(pki, cert) if cert else "",
        key_path=getattr(pki, key) if key else "",
        verify_hostname=verify_hostname,
    )


# -- in-memory handshakes -----------------------------------------------------------


class Peer(Protocol):
    """
    Records what it receives; the server side answers C{pong}.
    """

    def __init__(self, answer=None):
        self.received = b""
        self.reason = None
        self.answer = answer

    def dataReceived(self, data):
        self.received += data
        if self.answer:
            self.transport.write(self.answer)

    def connectionLost(self, reason):
        self.reason = reason


def handshake(monkeypatch, server_creator, client_creator, listen=None):
    """
    Connect a TLS client and server in memory; the client sends C{ping}.

    @param listen: C{(reactor, factory) -> TLS server factory} (default: a
        plain C{TLSMemoryBIOFactory} over C{server_creator}).
    @return: (client app protocol, server app protocol)
    """
    clock = MemoryReactorClock()
    monkeypatch.setattr(tls_protocol, "_get_default_clock", lambda: clock)
    addr = IPv4Address("TCP", "127.0.0.1", 4433)
    server_app, client_app = Peer(b"pong"), Peer()
    if listen is None:
        server_factory = TLSMemoryBIOFactory(server_creator, False, Factory.forProtocol(lambda: server_app), clock)
    else:
        server_factory = listen(clock, Factory.forProtocol(lambda: server_app))
    client_factory = TLSMemoryBIOFactory(client_creator, True, Factory.forProtocol(lambda: client_app), clock)
    sp = server_factory.buildProtocol(addr)
    cp = client_factory.buildProtocol(addr)
    pump = iosim.connect(sp, iosim.makeFakeServer(sp), cp, iosim.makeFakeClient(cp), greet=False, clock=clock)
    client_app.transport.write(b"ping")
    for _ in range(30):
        pump.pump()
        clock.advance(0)
    return client_app, server_app


def ok(client, server):
    return server.received == b"ping" and client.received == b"pong"


def refused(client, server):
    return server.received == b"" and client.received == b"" and client.reason is not None


def test_server_and_client_with_a_private_ca(pki, monkeypatch):
    client, server = handshake(monkeypatch, _server(pki), _client(pki).creatorForNetloc(b"localhost", 443))
    assert ok(client, server)


def test_server_sends_its_intermediate(pki, monkeypatch):
    # The client trusts the root only: the chain file's intermediate is needed.
    leaf_only = _server(pki, chain=pki.server_leaf_only)
    client, server = handshake(monkeypatch, leaf_only, _client(pki).creatorForNetloc("localhost", 443))
    assert refused(client, server)


def test_client_with_the_wrong_ca_refuses_the_server(pki, monkeypatch):
    client, server = handshake(monkeypatch, _server(pki), _client(pki, ca="other_ca").creatorForNetloc("localhost", 443))
    assert refused(client, server)


def test_host_name_checked_unless_disabled(pki, monkeypatch):
    client, server = handshake(monkeypatch, _server(pki), _client(pki).creatorForNetloc("wrong.example", 443))
    assert refused(client, server)
    # The certificate names 127.0.0.1 too.
    client, server = handshake(monkeypatch, _server(pki), _client(pki).creatorForNetloc("127.0.0.1", 443))
    assert ok(client, server)
    # DICOM peers: chain verified, name not checked.
    dicom = _client(pki, verify_hostname=False)
    client, server = handshake(monkeypatch, _server(pki), dicom.creatorForNetloc("10.1.2.3", 104))
    assert ok(client, server)
    client, server = handshake(monkeypatch, _server(pki), _client(pki, ca="other_ca", verify_hostname=False)
                               .creatorForNetloc("10.1.2.3", 104))
    assert refused(client, server)


def test_no_verification(pki, monkeypatch):
    unverified = _client(pki, ca=None, verify=False)
    assert not unverified.verify and not unverified.verify_hostname
    client, server = handshake(monkeypatch, _server(pki), unverified.creatorForNetloc("wrong.example", 443))
    assert ok(client, server)


def test_client_certificate_required(pki, monkeypatch):
    server_options = _server(pki, ca=pki.ca)
    with_cert = _client(pki, cert="client", key="client_key").creatorForNetloc("localhost", 443)
    assert ok(*handshake(monkeypatch, server_options, with_cert))
    without = _client(pki).creatorForNetloc("localhost", 443)
    assert refused(*handshake(monkeypatch, server_options, without))
    wrong = _client(pki, cert="other_client", key="other_client_key").creatorForNetloc("localhost", 443)
    assert refused(*handshake(monkeypatch, server_options, wrong))


def test_client_certificate_optional(pki, monkeypatch):
    server_options = _server(pki, ca=pki.ca, require=False)
    assert ok(*handshake(monkeypatch, server_options, _client(pki).creatorForNetloc("localhost", 443)))
    with_cert = _client(pki, cert="client", key="client_key").creatorForNetloc("localhost", 443)
    assert ok(*handshake(monkeypatch, server_options, with_cert))
    # A certificate that does not verify is still refused.
    wrong = _client(pki, cert="other_client", key="other_client_key").creatorForNetloc("localhost", 443)
    assert refused(*handshake(monkeypatch, server_options, wrong))


def test_server_tls_update(pki, monkeypatch):
    server = tls.ServerTLS(_server(pki))
    other_trust = _client(pki, ca="other_ca").creatorForNetloc("localhost", 443)
    assert refused(*handshake(monkeypatch, server, other_trust))
    server.update(tls.server_options(WHERE, pki.other_server, pki.other_server_key))
    assert ok(*handshake(monkeypatch, server, other_trust))
    server.update(tls.ServerTLS(_server(pki)))
    assert refused(*handshake(monkeypatch, server, other_trust))


# -- contexts ------------------------------------------------------------------------


def _options_of(context):
    return context.set_options(0)


def test_server_policy(pki):
    options = _server(pki, ca=pki.both_cas)
    context = options.getContext()
    flags = _options_of(context)
    assert flags & SSL.OP_NO_TLSv1 and flags & SSL.OP_NO_TLSv1_1 and flags & SSL.OP_NO_SSLv3
    connection = SSL.Connection(context)
    connection.set_accept_state()
    tls12 = [c for c in connection.get_cipher_list() if not c.startswith("TLS_")]
    assert tls12 and set(tls12) <= set(tls.SERVER_CIPHERS.split(":"))
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in tls12)
    # Clients are told which issuers are accepted.
    names = [n.rfc4514_string() for n in connection.get_client_ca_list(as_cryptography=True)]
    assert names == ["CN=Harmony Test Root", "CN=Other Root"]
    assert context.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE
    assert _server(pki, ca=pki.ca, require=False).getContext().get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT == 0
    assert _server(pki).getContext().get_verify_mode() == SSL.VERIFY_NONE


def test_client_policy_is_https_policy(pki):
    policy = _client(pki)
    assert verifyObject(IPolicyForHTTPS, policy)
    # One creator per host name.
    assert policy.creatorForNetloc(b"a.example", 443) is policy.creatorForNetloc("a.example", 8443)
    assert policy.creatorForNetloc(b"b.example", 443) is not policy.creatorForNetloc("a.example", 443)


# -- file errors ----------------------------------------------------------------------


def _error(call, *args, **kw):
    with pytest.raises(ConfigError) as info:
        call(*args, **kw)
    return info.value


def test_missing_file_names_file_and_key(pki):
    e = _error(tls.client_tls, WHERE, ca_path=str(pki.dir / "nope.pem"))
    assert e.file == "pipelines/b.toml"
    assert e.key == "backends.b.options.tls_ca_path"
    assert "No such file or directory" in e.message and "nope.pem" in e.message


def test_not_a_certificate(pki):
    e = _error(tls.client_tls, WHERE, ca_path=pki.client_key)
    assert e.key == "backends.b.options.tls_ca_path"
    assert "no PEM certificate" in e.message
    e = _error(tls.client_tls, WHERE, ca_path=pki.garbage_cert)
    assert "invalid PEM certificate" in e.message


def test_not_a_key(pki):
    e = _error(tls.server_options, WHERE, pki.server_chain, pki.ca)
    assert e.key == "backends.b.options.key_path"
    assert "no PEM private key" in e.message


def test_encrypted_key_refused(pki):
    e = _error(tls.server_options, WHERE, pki.server_chain, pki.encrypted_key)
    assert e.key == "backends.b.options.key_path"
    assert "encrypted" in e.message


def test_key_of_another_certificate(pki):
    e = _error(tls.server_options, WHERE, pki.server_chain, pki.client_key)
    assert e.key == "backends.b.options.key_path"
    assert "is not the private key of the first certificate" in e.message
    e = _error(tls.client_tls, WHERE, cert_path=pki.client, key_path=pki.server_key)
    assert e.key == "backends.b.options.tls_key_path"


def test_client_ca_errors_name_the_listener_key(pki):
    e = _error(tls.server_options, WHERE, pki.server_chain, pki.server_key, str(pki.dir / "none.pem"))
    assert e.key == "backends.b.options.ca_path"


def test_relative_paths_against_base_dir(pki):
    where = tls.Place(None, ("network", "main", "http"), str(pki.dir))
    options = tls.server_options(where, "server_chain.pem", "server_key.pem")
    assert options.certificate.subject.rfc4514_string() == "CN=localhost"
    assert tls.Place().resolve("x.pem").startswith("/")


def test_expired_certificate_warns(pki):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        tls.server_options(WHERE, pki.expired, pki.expired_key)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == "harmony.tls"]
    assert event["key"] == "backends.b.options.cert_path"
    assert "expired" in event["log_format"]


# -- configuration: HTTP listeners -------------------------------------------------------


BASE = """
[proxy]
id = "tls-test"

[network.main.http]
bind_address = "127.0.0.1"
bind_port = 0
{listener}

[pipelines.p]
networks = ["main"]
endpoints = ["api"]
backends = ["up"]

[endpoints.api]
service = "http"
[endpoints.api.options]
path_prefix = "/api"

[backends.up]
service = "{service}"
[backends.up.options]
base_url = "https://upstream.example:8443"
{backend}
"""


def write(tmp_path, listener="", backend="", service="http"):
    path = tmp_path / "harmony.toml"
    path.write_text(
        BASE.format(listener=textwrap.dedent(listener), backend=textwrap.dedent(backend), service=service)
    )
    return str(path)


def load(tmp_path, **kw):
    return load_config(write(tmp_path, **kw), registry=builtin_registry(), environ={})


def load_error(tmp_path, **kw):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **kw)
    return info.value


def build(config):
    reactor = MemoryReactorClock()
    agent = PooledAgent(reactor)
    return build_gateway(config, builtin_registry(), BuildContext(reactor=reactor, agent=agent, config=config))


def test_listener_defaults(tmp_path):
    http = load(tmp_path).networks["main"].http
    assert (http.cert_path, http.key_path, http.client_ca_path, http.require_client_cert) == ("", "", "", True)
    assert tls.listener_scheme(http) == "http"
    assert tls.listener_tls(http) is None
    assert tls.listener_settings(http) == ("127.0.0.1", 0, False)


@pytest.mark.parametrize(
    "listener, key, message",
    [
        ('cert_path = "s.pem"', "key_path", "required with cert_path"),
        ('key_path = "s.key"', "cert_path", "required with key_path"),
        ('client_ca_path = "ca.pem"', "client_ca_path", "client certificates need HTTPS"),
        ("require_client_cert = 1", "require_client_cert", "expected boolean"),
        ('cert_paths = "s.pem"', "cert_paths", 'did you mean "cert_path"'),
    ],
)
def test_listener_schema_errors(tmp_path, listener, key, message):
    e = load_error(tmp_path, listener=listener)
    assert e.key == f"network.main.http.{key}"
    assert message in e.message


def test_listener_files_read_at_startup(tmp_path, pki):
    config = load(tmp_path, listener=f'cert_path = "{pki.server_chain}"\nkey_path = "missing.key"')
    e = _error(tls.check_listeners, config)
    assert e.key == "network.main.http.key_path"
    assert '"missing.key"' in e.message and "No such file" in e.message
    config = load(
        tmp_path,
        listener=f'cert_path = "{pki.server_chain}"\nkey_path = "{pki.server_key}"\nclient_ca_path = "none.pem"',
    )
    assert _error(tls.check_listeners, config).key == "network.main.http.client_ca_path"


def test_listener_endpoint(tmp_path, pki):
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "s.pem").write_bytes(open(pki.server_chain, "rb").read())
    (tmp_path / "tls" / "s.key").write_bytes(open(pki.server_key, "rb").read())
    config = load(tmp_path, listener='cert_path = "tls/s.pem"\nkey_path = "tls/s.key"')
    http = config.networks["main"].http
    assert tls.listener_scheme(http) == "https"
    assert tls.listener_settings(http) == ("127.0.0.1", 0, True)
    [(name, server)] = tls.check_listeners(config).items()
    assert name == "main" and isinstance(server, tls.ServerTLS)
    reactor = MemoryReactorClock()
    endpoint = tls.listener_endpoint(reactor, http, config, "main")
    assert isinstance(endpoint, tls.TLSServerEndpoint)
    assert isinstance(endpoint.tls, tls.ServerTLS) and endpoint.label == "network main"
    endpoint = tls.listener_endpoint(reactor, http, tls=server, network="main")
    assert endpoint.tls is server
    endpoint.listen(Factory.forProtocol(Protocol))
    port, factory, backlog, interface = reactor.tcpServers[-1]
    assert (port, interface) == (0, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory) and factory._clock is reactor
    plain = tls.listener_endpoint(reactor, load(tmp_path).networks["main"].http)
    assert isinstance(plain, endpoints.TCP4ServerEndpoint)


def test_server_endpoint_ipv6(pki):
    reactor = MemoryReactorClock()
    tls.server_endpoint(reactor, "::1", 104).listen(Factory.forProtocol(Protocol))
    assert reactor.tcpServers[-1][3] == "::1"
    tls.server_endpoint(reactor, "::1", 2762, _server(pki)).listen(Factory.forProtocol(Protocol))
    assert reactor.tcpServers[-1][3] == "::1"
    assert isinstance(reactor.tcpServers[-1][1], TLSMemoryBIOFactory)


def test_failed_handshake_is_logged(pki, monkeypatch):
    events = []
    globalLogPublisher.addObserver(events.append)

    def listen(reactor, factory):
        tls.server_endpoint(reactor, "127.0.0.1", 443, _server(pki, ca=pki.ca), label="network main").listen(factory)
        return reactor.tcpServers[-1][1]

    try:
        without = _client(pki).creatorForNetloc("localhost", 443)
        assert refused(*handshake(monkeypatch, None, without, listen=listen))
        with_cert = _client(pki, cert="client", key="client_key").creatorForNetloc("localhost", 443)
        assert ok(*handshake(monkeypatch, None, with_cert, listen=listen))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == "harmony.tls"]
    assert event["listener"] == "network main"
    assert "certificate" in event["reason"]
    assert event["peer"]


# -- configuration: HTTP-like backends --------------------------------------------------


@pytest.mark.parametrize("service", ["http", "fhir", "dicomweb"])
def test_backend_defaults_use_the_agents_policy(tmp_path, service):
    config = load(tmp_path, service=service)
    options = config.backends["up"].options
    assert (options.tls_ca_path, options.tls_verify, options.tls_cert_path, options.tls_key_path) == ("", True, "", "")
    assert build(config).backends["up"]._tls is None


@pytest.mark.parametrize("service", ["http", "fhir", "dicomweb"])
def test_backend_with_ca_and_client_certificate(tmp_path, pki, service):
    backend_opts = f'tls_ca_path = "{pki.ca}"\ntls_cert_path = "{pki.client}"\ntls_key_path = "{pki.client_key}"'
    config = load(tmp_path, service=service, backend=backend_opts)
    policy = build(config).backends["up"]._tls
    assert isinstance(policy, tls.ClientTLS)
    assert policy.verify and policy.verify_hostname


def test_backend_file_errors_at_build(tmp_path):
    config = load(tmp_path, backend='tls_ca_path = "ca/missing.pem"')
    e = _error(build, config)
    assert (e.file, e.key) == ("harmony.toml", "backends.up.options.tls_ca_path")
    assert '"ca/missing.pem"' in e.message


def test_backend_no_verification_is_warned(tmp_path):
    config = load(tmp_path, backend="tls_verify = false")
    [warning] = [w for w in config.warnings if "tls_verify" in w]
    assert warning.startswith("harmony.toml: backends.up.options.tls_verify: the upstream's TLS certificate is not")
    policy = build(config).backends["up"]._tls
    assert policy.verify is False


@pytest.mark.parametrize(
    "backend, key, message",
    [
        ('tls_verify = false\ntls_ca_path = "ca.pem"', "tls_ca_path", "tls_verify = true"),
        ('tls_cert_path = "c.pem"', "tls_key_path", "required with tls_cert_path"),
        ('tls_key_path = "c.key"', "tls_cert_path", "required with tls_key_path"),
        ('tls_verify = "no"', "tls_verify", "expected boolean"),
    ],
)
def test_backend_schema_errors(tmp_path, backend, key, message):
    e = load_error(tmp_path, backend=backend)
    assert e.key == f"backends.up.options.{key}"
    assert message in e.message


class RecordingPooledAgent(PooledAgent):
    def __init__(self, reactor):
        PooledAgent.__init__(self, reactor)
        self.calls = []

    def request(self, *args):
        self.calls.append(args)
        return PooledAgent.request(self, *args)


def test_backend_requests_carry_its_policy(tmp_path, pki):
    config = load(tmp_path, backend=f'tls_ca_path = "{pki.ca}"')
    reactor = MemoryReactorClock()
    agent = RecordingPooledAgent(reactor)
    gateway = build_gateway(config, builtin_registry(), BuildContext(reactor=reactor, agent=agent, config=config))
    backend = gateway.backends["up"]
    backend.handle(make_request("GET", "x"))
    [call] = agent.calls
    assert call[1] == b"https://upstream.example:8443/x"
    assert call[5] is backend._tls
    # The connection is opened with the backend's policy.
    [key] = agent._endpoints
    assert key[0] == (b"https", b"upstream.example", 8443, backend._tls)


# -- the pooled agent: a policy per request -------------------------------------------------


class RecordingPolicy:
    def __init__(self, creator):
        self.creator = creator
        self.asked = []

    def creatorForNetloc(self, hostname, port):
        self.asked.append((hostname, port))
        return self.creator


class IdleConnection:
    lost = False
    idle_since = 0.0
    reused = False

    def __init__(self):
        self.sent = []

    def send(self, *args):
        self.sent.append(args)
        from twisted.internet import defer

        return defer.Deferred()


def test_agent_pools_connections_per_policy(pki):
    reactor = MemoryReactorClock()
    default = RecordingPolicy(_client(pki).creatorForNetloc("x", 443))
    agent = PooledAgent(reactor, tls_policy=default)
    a = RecordingPolicy(default.creator)
    b = RecordingPolicy(default.creator)
    agent.request(b"GET", b"https://secure.test/1", tls=a)
    agent.request(b"GET", b"https://secure.test/2", tls=b)
    agent.request(b"GET", b"https://secure.test/3")
    agent.request(b"GET", b"https://secure.test/4", tls=a)
    assert len(reactor.tcpClients) == 4
    assert (a.asked, b.asked, default.asked) == ([(b"secure.test", 443)], [(b"secure.test", 443)], [(b"secure.test", 443)])
    # An idle connection opened with policy a serves only policy a.
    conn = IdleConnection()
    agent._idle[(b"https", b"secure.test", 443, a)] = [conn]
    agent.request(b"GET", b"https://secure.test/5", tls=b)
    agent.request(b"GET", b"https://secure.test/6")
    assert conn.sent == [] and len(reactor.tcpClients) == 6
    agent.request(b"GET", b"https://secure.test/7", tls=a)
    assert len(conn.sent) == 1 and len(reactor.tcpClients) == 6
    # Plain HTTP ignores a policy: one pool per origin.
    plain = IdleConnection()
    agent._idle[(b"http", b"plain.test", 80)] = [plain]
    agent.request(b"GET", b"http://plain.test/", tls=a)
    assert len(plain.sent) == 1


# -- configuration: dicom_scp -------------------------------------------------------------


SCP = """
[proxy]
id = "tls-test"

[pipelines.dimse]
endpoints = ["scp"]
backends = ["out"]

[backends.out]
service = "echo"

[endpoints.scp]
service = "dicom"
[endpoints.scp.options]
local_aet = "HARMONY"
port = 0
{options}
"""


def load_scp(tmp_path, options=""):
    path = tmp_path / "harmony.toml"
    path.write_text(SCP.format(options=textwrap.dedent(options)))
    return load_config(str(path), registry=builtin_registry(), environ={})


def test_scp_without_tls(tmp_path):
    config = load_scp(tmp_path)
    assert config.endpoints["scp"].options.tls is None
    gateway = build(config)
    assert gateway.endpoints["scp"].tls is None


def test_scp_tls_options(tmp_path, pki):
    config = load_scp(
        tmp_path, f'[endpoints.scp.options.tls]\ncert_path = "{pki.server_chain}"\nkey_path = "{pki.server_key}"'
    )
    options = config.endpoints["scp"].options.tls
    assert (options.ca_path, options.require_client_cert) == ("", True)
    endpoint = build(config).endpoints["scp"]
    assert endpoint.tls.getContext().get_verify_mode() == SSL.VERIFY_NONE
    config = load_scp(
        tmp_path,
        f'[endpoints.scp.options.tls]\ncert_path = "{pki.server_chain}"\nkey_path = "{pki.server_key}"\n'
        f'ca_path = "{pki.ca}"',
    )
    endpoint = build(config).endpoints["scp"]
    assert endpoint.tls.getContext().get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    # The listener speaks TLS.
    reactor = MemoryReactorClock()
    executor = SimpleNamespace(backends=[], request_chain=[], response_chain=[])
    [listener] = endpoint.services(executor, reactor)
    listener.privilegedStartService()
    port, factory, backlog, interface = reactor.tcpServers[-1]
    assert (port, interface) == (0, "0.0.0.0")
    assert isinstance(factory, TLSMemoryBIOFactory) and factory.label == "endpoint scp"


def test_scp_move_destinations_tls(tmp_path, pki):
    tls_table = f'[endpoints.scp.options.tls]\ncert_path = "{pki.server_chain}"\nkey_path = "{pki.server_key}"\n'
    config = load_scp(tmp_path, 'enable_move = true\nmove_destinations = { STORESCP = "127.0.0.1:104" }\n' + tls_table)
    endpoint = build(config).endpoints["scp"]
    assert config.endpoints["scp"].options.tls.move_destinations_tls is False
    assert endpoint.move_tls is None
    config = load_scp(
        tmp_path,
        'enable_move = true\nmove_destinations = { STORESCP = "127.0.0.1:104" }\n'
        + tls_table + f'ca_path = "{pki.ca}"\nmove_destinations_tls = true',
    )
    endpoint = build(config).endpoints["scp"]
    assert isinstance(endpoint.move_tls, tls.ClientTLS)
    assert endpoint.move_tls.verify and not endpoint.move_tls.verify_hostname
    reactor = MemoryReactorClock()
    executor = SimpleNamespace(backends=[], request_chain=[], response_chain=[])
    services = endpoint.services(executor, reactor)
    handler = services[-1].factory.services[C_MOVE_RQ]
    assert handler.client.tls is endpoint.move_tls


@pytest.mark.parametrize(
    "options, key, message",
    [
        ('[endpoints.scp.options.tls]\ncert_path = "s.pem"', "tls.key_path", "required key is missing"),
        ('[endpoints.scp.options.tls]\nkey_path = "s.key"', "tls.cert_path", "required key is missing"),
        ('tls = "yes"', "tls", "expected table"),
        ('[endpoints.scp.options.tls]\ncert_path = "a"\nkey_path = "b"\nverify = true', "tls.verify", "unknown key"),
    ],
)
def test_scp_tls_schema_errors(tmp_path, options, key, message):
    path = tmp_path / "harmony.toml"
    path.write_text(SCP.format(options=options))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), registry=builtin_registry(), environ={})
    assert info.value.key == f"endpoints.scp.options.{key}"
    assert message in info.value.message


def test_scp_tls_file_errors(tmp_path, pki):
    config = load_scp(tmp_path, f'[endpoints.scp.options.tls]\ncert_path = "{pki.server_chain}"\nkey_path = "k.pem"')
    e = _error(build, config)
    assert (e.file, e.key) == ("harmony.toml", "endpoints.scp.options.tls.key_path")


# -- configuration: dicom_scu ---------------------------------------------------------------


SCU = """
[proxy]
id = "tls-test"

[network.main.http]
bind_address = "127.0.0.1"
bind_port = 0

[pipelines.p]
networks = ["main"]
endpoints = ["api"]
backends = ["pacs"]

[endpoints.api]
service = "http"
[endpoints.api.options]
path_prefix = "/dicom"

[backends.pacs]
service = "dicom"
[backends.pacs.options]
aet = "PACS"
host = "127.0.0.1"
port = 11112
{options}
"""


def load_scu(tmp_path, options=""):
    path = tmp_path / "harmony.toml"
    path.write_text(SCU.format(options=textwrap.dedent(options)))
    return load_config(str(path), registry=builtin_registry(), environ={})


def test_scu_defaults(tmp_path):
    config = load_scu(tmp_path)
    o = config.backends["pacs"].options
    assert (o.use_tls, o.tls_cert_path, o.tls_key_path, o.tls_ca_path, o.tls_verify_hostname, o.incoming_store_tls) == (
        False, "", "", "", False, False,
    )
    backend = build(config).backends["pacs"]
    assert backend.client.tls is None and backend.incoming_tls is None


def test_scu_use_tls(tmp_path, pki):
    config = load_scu(
        tmp_path,
        f'use_tls = true\ntls_ca_path = "{pki.ca}"\ntls_cert_path = "{pki.client}"\ntls_key_path = "{pki.client_key}"',
    )
    backend = build(config).backends["pacs"]
    policy = backend.client.tls
    assert isinstance(policy, tls.ClientTLS)
    assert policy.verify and not policy.verify_hostname
    assert backend.incoming_tls is None
    config = load_scu(tmp_path, "use_tls = true\ntls_verify_hostname = true")
    assert build(config).backends["pacs"].client.tls.verify_hostname


def test_scu_incoming_store_tls(tmp_path, pki):
    config = load_scu(
        tmp_path,
        f'use_tls = true\nincoming_store_tls = true\ntls_ca_path = "{pki.ca}"\n'
        f'tls_cert_path = "{pki.server_chain}"\ntls_key_path = "{pki.server_key}"',
    )
    backend = build(config).backends["pacs"]
    assert backend.incoming_tls.getContext().get_verify_mode() & SSL.VERIFY_PEER
    listener = backend.retriever._make_listener()
    assert listener.tls is backend.incoming_tls
    listener.reactor = reactor = MemoryReactorClock()
    listener.startService()
    port, factory, backlog, interface = reactor.tcpServers[-1]
    assert (port, interface) == (11123, "0.0.0.0")
    assert isinstance(factory, TLSMemoryBIOFactory) and factory.label == "C-MOVE store SCP HARMONY_SCU"


def test_scu_tls_without_use_tls_is_warned(tmp_path, pki):
    config = load_scu(tmp_path, f'tls_ca_path = "{pki.ca}"')
    [warning] = [w for w in config.warnings if "use_tls" in w]
    assert "backends.pacs.options.use_tls: tls_* options are set but use_tls = false" in warning


@pytest.mark.parametrize(
    "options, key, message",
    [
        ('use_tls = true\ntls_cert_path = "c.pem"', "tls_key_path", "required with tls_cert_path"),
        ("incoming_store_tls = true", "tls_cert_path", "required with incoming_store_tls"),
        ('use_tls = "yes"', "use_tls", "expected boolean"),
    ],
)
def test_scu_schema_errors(tmp_path, options, key, message):
    with pytest.raises(ConfigError) as info:
        load_scu(tmp_path, options)
    assert info.value.key == f"backends.pacs.options.{key}"
    assert message in info.value.message


def test_scu_file_errors(tmp_path):
    e = _error(build, load_scu(tmp_path, 'use_tls = true\ntls_ca_path = "nope.pem"'))
    assert (e.file, e.key) == ("harmony.toml", "backends.pacs.options.tls_ca_path")


# -- C-ECHO over DICOM TLS, in memory -----------------------------------------------------------


ECHO = [(VERIFICATION_SOP_CLASS, [IMPLICIT_VR_LITTLE_ENDIAN])]


def _dicom_echo(monkeypatch, server_options, client_policy):
    reactor = MemoryReactorClock()
    monkeypatch.setattr(tls_protocol, "_get_default_clock", lambda: reactor)
    server = TLSMemoryBIOFactory(
        server_options, False, DicomServerFactory(reactor, SCPPolicy("HARMONY", {VERIFICATION_SOP_CLASS: [IMPLICIT_VR_LITTLE_ENDIAN]})),
        reactor,
    )
    client = DicomClient(reactor, "TESTSCU", tls=client_policy)
    d = client.associate("10.0.0.7", 2762, "HARMONY", ECHO)
    host, port, factory, timeout, bind = reactor.tcpClients[-1]
    addr = IPv4Address("TCP", host, port)
    sp = server.buildProtocol(addr)
    cp = factory.buildProtocol(addr)
    pump = iosim.connect(sp, iosim.makeFakeServer(sp), cp, iosim.makeFakeClient(cp), greet=False, clock=reactor)

    def flush():
        for _ in range(30):
            pump.pump()
            reactor.advance(0)

    flush()
    return d, flush


def test_dicom_echo_over_tls(pki, monkeypatch):
    server_options = _server(pki, ca=pki.ca)
    policy = _client(pki, cert="client", key="client_key", verify_hostname=False)
    d, flush = _dicom_echo(monkeypatch, server_options, policy)
    association = d.result
    status = association.echo()
    flush()
    assert status.result.status == 0x0000
    released = association.release()
    flush()
    assert released.called


def test_dicom_tls_wrong_ca(pki, monkeypatch):
    policy = _client(pki, ca="other_ca", cert="client", key="client_key", verify_hostname=False)
    d, flush = _dicom_echo(monkeypatch, _server(pki, ca=pki.ca), policy)
    failures = []
    d.addErrback(failures.append)
    assert failures, "the association should have failed"
    error = failures[0].value
    assert isinstance(error, TLSHandshakeFailed) and isinstance(error, AssociationAborted)
    assert error.tls_reason == "certificate verify failed"


def test_tls_failure_reason():
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseNeverReceived

    error = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert tls.tls_failure_reason(Failure(ResponseNeverReceived([Failure(error)]))) == "certificate verify failed"
    assert tls.tls_failure_reason(Failure(error)) == "certificate verify failed"
    assert tls.tls_failure_reason(Failure(ResponseNeverReceived([Failure(ValueError("x"))]))) is None
    assert tls.ssl_error_text(SSL.Error("odd")) == "odd"
