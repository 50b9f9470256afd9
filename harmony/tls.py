# -*- test-case-name: tests.unit.test_tls -*-
"""
TLS for every transport Harmony speaks: HTTPS listeners, outbound HTTPS,
and DICOM TLS (PS3.15 B.9, the BCP 195 profiles) for the DICOM SCP
listener and the DICOM SCU.

Everything is built once at startup from PEM files named in the
configuration; a missing, unreadable or invalid file, or a private key that
does not match its certificate, is a L{ConfigError} naming the key
(C{network.main.http.cert_path: cannot read "server.pem": No such file or
directory}).

Policy:

  - TLS 1.2 is the minimum everywhere (TLS 1.3 is used when both sides
    have it; its cipher suites are OpenSSL's defaults, all AEAD).
  - Harmony's listeners offer only ECDHE key exchange with AEAD ciphers for
    TLS 1.2 (L{SERVER_CIPHERS}): the suites of BCP 195 and of DICOM's
    "BCP 195 Non-Downgrading" profile (DCMTK's default C{+py}).
  - Outbound connections (HTTPS upstreams, PACS) accept Twisted's default
    TLS 1.2 suites, which also include AES-CBC ones: Harmony does not
    choose its peers, and an older PACS may still speak DICOM's retired AES
    profile (C{TLS_RSA_WITH_AES_128_CBC_SHA}).
  - A client certificate is verified against the configured CA bundle
    only; an upstream is verified against the configured CA bundle or, by
    default, the system's trust store (C{SSL_CERT_FILE} is honoured).
"""

import os

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
)
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from harmony.config.errors import ConfigError
from harmony.config.schema import REQUIRED, Bool, Field, Schema, Str
from harmony.logs import logger

log = logger("harmony.tls")

#: The lowest protocol version Harmony speaks, in both directions.
MINIMUM_VERSION = TLSVersion.TLSv1_2

#: TLS 1.2 suites of Harmony's listeners: ECDHE key exchange, AEAD ciphers
#: (OpenSSL cipher-string syntax; TLS 1.3 suites are configured apart).
SERVER_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
)

_SERVER_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS)


# -- where options come from -------------------------------------------------


@attr.s(frozen=True)
class Place:
    """
    Where a set of TLS options sits in the configuration: for error messages
    and for relative paths.

    @ivar file: the file that defined the table (or C{None}).
    @ivar keypath: the key path of the table holding the options
        (C{("backends", "pacs", "options")}).
    @ivar base_dir: relative paths are resolved against it (C{None}: the
        current directory).
    """

    file = attr.ib(default=None)
    keypath = attr.ib(default=(), converter=tuple)
    base_dir = attr.ib(default=None)

    def error(self, key, message):
        return ConfigError(message, self.file, self.keypath + (key,))

    def resolve(self, path):
        path = os.path.expanduser(path)
        if self.base_dir is not None:
            return os.path.normpath(os.path.join(self.base_dir, path))
        return os.path.abspath(path)


def place(config, table, name, *keypath):
    """
    The L{Place} of C{[<table>.<name>.<keypath>]} in a loaded configuration.

    @param config: a L{harmony.config.HarmonyConfig}, or C{None} (unit
        tests: paths relative to the current directory, no file named).
    @param table: C{"endpoints"}, C{"backends"} or C{"network"}.
    @param name: the entry's name; a backend target's C{"name/target"}
        names its backend.
    """
    if table == "backends":
        name = name.split("/", 1)[0]
    entries = getattr(config, table, None) or {}
    entry = entries.get(name) if hasattr(entries, "get") else None
    return Place(getattr(entry, "file", None), (table, name) + keypath, getattr(config, "base_dir", None))


# -- reading PEM files ---------------------------------------------------------


def _read(where, key, path):
    try:
        with open(where.resolve(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise where.error(key, f'cannot read "{path}": {e.strerror}') from None


def read_certificates(where, key, path):
    """
    The certificates of a PEM file (a chain or a CA bundle), in order.

    @rtype: C{list} of C{cryptography.x509.Certificate}
    @raise ConfigError: unreadable, or no valid certificate in it.
    """
    data = _read(where, key, path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise where.error(key, f'"{path}" holds no PEM certificate (-----BEGIN CERTIFICATE-----)')
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise where.error(key, f'"{path}": invalid PEM certificate ({e})') from None
    return certs


def read_private_key(where, key, path):
    """
    The private key of a PEM file (PKCS#8, PKCS#1 or SEC1; not encrypted).

    @rtype: a C{cryptography} private key (RSA, EC, Ed25519 or Ed448)
    @raise ConfigError: unreadable, encrypted or invalid.
    """
    data = _read(where, key, path)
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise where.error(key, f'"{path}" holds no PEM private key (-----BEGIN PRIVATE KEY-----)')
    if b"ENCRYPTED" in data:
        raise where.error(
            key, f'"{path}" is encrypted: Harmony reads unencrypted keys (protect the file with its permissions)'
        )
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise where.error(key, f'"{path}": invalid PEM private key ({e})') from None
    try:
        crypto.PKey.from_cryptography_key(private)
    except TypeError as e:
        raise where.error(key, f'"{path}": unsupported private key type ({e})') from None
    return private


@attr.s(frozen=True)
class Identity:
    """
    A certificate chain (leaf first) and its private key.
    """

    certificate = attr.ib()
    chain = attr.ib(converter=list)
    private_key = attr.ib()

    def options(self):
        """
        C{CertificateOptions} keyword arguments presenting this identity.
        """
        return {"privateKey": self.private_key, "certificate": self.certificate, "extraCertChain": self.chain}


def read_identity(where, cert_key, cert_path, key_key, key_path):
    """
    A certificate chain file and its private key file.

    @raise ConfigError: either file is unusable, or the key is not the
        certificate's.
    """
    certs = read_certificates(where, cert_key, cert_path)
    private_key = read_private_key(where, key_key, key_path)
    leaf = certs[0].public_key()
    ours = private_key.public_key()
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_bytes(serialization.Encoding.DER, fmt) != ours.public_bytes(serialization.Encoding.DER, fmt):
        raise where.error(
            key_key,
            f'"{key_path}" is not the private key of the first certificate in "{cert_path}"'
            " (the chain must start with the server's own certificate)",
        )
    _warn_validity(where, cert_key, cert_path, certs[0])
    return Identity(certs[0], certs[1:], private_key)


def _warn_validity(where, key, path, cert):
    # At startup only: an expired certificate is the operator's problem to
    # fix, not a reason to refuse to start (peers will say so).
    import datetime

    parsed = cert
    now = datetime.datetime.now(datetime.timezone.utc)
    if parsed.not_valid_after_utc < now:
        log.warn(
            "TLS: {key}: the certificate in {path} expired on {date}",
            key=".".join(where.keypath + (key,)), path=path, date=parsed.not_valid_after_utc.isoformat(),
        )
    elif parsed.not_valid_before_utc > now:
        log.warn(
            "TLS: {key}: the certificate in {path} is not valid before {date}",
            key=".".join(where.keypath + (key,)), path=path, date=parsed.not_valid_before_utc.isoformat(),
        )


# -- servers -------------------------------------------------------------------


def server_options(where, cert_path, key_path, ca_path="", require_client_cert=True,
                   names=("cert_path", "key_path", "ca_path")):
    """
    The TLS options of a listener.

    @param where: the L{Place} of the options (errors name its keys).
    @param cert_path: PEM certificate chain, the listener's own first.
    @param key_path: PEM private key of that certificate.
    @param ca_path: PEM CA bundle; when given, clients are asked for a
        certificate issued by one of these CAs.
    @param require_client_cert: with C{ca_path}: refuse clients that send
        none (a certificate that does not verify is always refused).
    @param names: the configuration keys of the three paths (for errors).
    @return: a C{CertificateOptions} (an C{IOpenSSLServerConnectionCreator}),
        its context already built and checked.
    @raise ConfigError: a file is unusable.
    """
    cert_key, key_key, ca_key = names
    identity = read_identity(where, cert_key, cert_path, key_key, key_path)
    cas = read_certificates(where, ca_key, ca_path) if ca_path else None
    try:
        options = CertificateOptions(
            verify=bool(cas),
            caCerts=[crypto.X509.from_cryptography(c) for c in cas] if cas else None,
            requireCertificate=bool(cas) and require_client_cert,
            acceptableCiphers=_SERVER_CIPHERS,
            raiseMinimumTo=MINIMUM_VERSION,
            **identity.options(),
        )
        context = options.getContext()
    except (SSL.Error, ValueError) as e:
        raise where.error(cert_key, f'"{cert_path}" cannot be used: {ssl_error_text(e)}') from None
    for ca in cas or ():
        # Tell clients which issuers are accepted (OpenSSL sends none
        # otherwise); the context is cached: every connection uses it.
        context.add_client_ca(ca)
    return options


def server_endpoint(reactor, address, port, tls=None, backlog=50, label=""):
    """
    An C{IStreamServerEndpoint} listening on C{address:port} (IPv4 or
    IPv6), with TLS when C{tls} is given.

    @param tls: L{server_options}' or L{listener_tls}' result, or C{None}
        for plain TCP.
    @param label: names the listener in the log line of a failed handshake
        (C{"network main"}, C{"endpoint scp"}).
    """
    description = f"tcp:port={port}:backlog={backlog}:interface={endpoints.quoteStringArgument(address)}"
    tcp = endpoints.serverFromString(reactor, description)
    if tls is None:
        return tcp
    return TLSServerEndpoint(reactor, tcp, tls, label)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    TLS over a TCP server endpoint, with a log line for each connection
    whose handshake fails (no certificate, a certificate that does not
    verify, no common protocol version or cipher).

    @ivar tls: the C{IOpenSSLServerConnectionCreator}.
    """

    def __init__(self, reactor, tcp, tls, label=""):
        self._reactor = reactor
        self._tcp = tcp
        self.tls = tls
        self.label = label

    def listen(self, factory):
        wrapped = TLSMemoryBIOFactory(self.tls, False, factory, self._reactor)
        wrapped.protocol = _ServerTLSProtocol
        wrapped.label = self.label
        return self._tcp.listen(wrapped)


class _ServerTLSProtocol(BufferingTLSTransport):
    """
    Logs why a client's TLS handshake failed.
    """

    def connectionLost(self, reason):
        failure = getattr(self, "_reason", None) or reason
        if not getattr(self, "_handshakeDone", True) and failure is not None and failure.check(SSL.Error):
            peer = self.getPeer()
            log.info(
                "TLS handshake from {peer} on {listener} failed: {reason}",
                peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
                listener=getattr(self.factory, "label", "") or "a listener",
                reason=ssl_error_text(failure.value),
            )
        BufferingTLSTransport.connectionLost(self, reason)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    A listener's TLS settings that can be replaced while it listens (new
    certificate files on reload): connections accepted afterwards use the
    new ones, established ones keep theirs.

    @ivar options: the current L{server_options} result.
    """

    def __init__(self, options):
        self.options = options

    def update(self, options):
        """
        Use C{options} (a L{ServerTLS} or L{server_options}' result) for
        the next connections.
        """
        self.options = getattr(options, "options", options)

    def serverConnectionForTLS(self, protocol):
        return self.options.serverConnectionForTLS(protocol)


#: [network.<name>.http] keys read by L{listener_tls}.
LISTENER_KEYS = ("cert_path", "key_path", "client_ca_path")


def listener_tls(http, config=None, network=""):
    """
    The TLS settings of a network's HTTP listener, read from its files, or
    C{None} (plain HTTP) without C{cert_path}.

    @param http: the validated C{[network.<name>.http]} table.
    @param config: the L{harmony.config.HarmonyConfig} (relative paths are
        resolved against its directory).
    @rtype: L{ServerTLS} or C{None}
    @raise ConfigError: a file is unusable (names the key).
    """
    if not http.cert_path:
        return None
    where = Place(None, ("network", network, "http"), getattr(config, "base_dir", None))
    return ServerTLS(
        server_options(
            where, http.cert_path, http.key_path, http.client_ca_path, http.require_client_cert, names=LISTENER_KEYS
        )
    )


def listener_endpoint(reactor, http, config=None, network="", tls=None):
    """
    The C{IStreamServerEndpoint} of a network's HTTP listener: HTTPS with
    C{cert_path} and C{key_path}, else plain HTTP.

    @param http: the validated C{[network.<name>.http]} table.
    @param tls: L{listener_tls}' result when the caller keeps it (to
        L{ServerTLS.update} it on reload); else read here.
    @raise ConfigError: a TLS file is unusable (names the key).
    """
    if tls is None:
        tls = listener_tls(http, config, network)
    return server_endpoint(reactor, http.bind_address, http.bind_port, tls, label=f"network {network}")


def listener_settings(http):
    """
    What a running listener must be bound again for when it changes on
    reload (address, port and whether it speaks TLS); new certificate
    files for the same listener only need L{ServerTLS.update}.
    """
    return (http.bind_address, http.bind_port, bool(http.cert_path))


def listener_scheme(http):
    """
    C{"https"} or C{"http"}: what a network's listener speaks.
    """
    return "https" if http.cert_path else "http"


def check_listeners(config):
    """
    Read every HTTP listener's TLS files (at startup before twistd
    daemonises, on reload before switching, and in C{check-config}).

    @return: network name -> L{ServerTLS} (C{None}: plain HTTP).
    @raise ConfigError: a file is unusable.
    """
    out = {}
    for name, network in sorted(config.networks.items()):
        if network.http is not None:
            out[name] = listener_tls(network.http, config, name)
    return out


# -- clients -------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _ServerNameCreator:
    """
    Client connections from C{CertificateOptions} (certificate chain
    verified or not, no host name check) that send the server name
    (SNI) when it is a DNS name.
    """

    def __init__(self, options, hostname):
        self._options = options
        self._name = None if isIPAddress(hostname) or isIPv6Address(hostname) else hostname.encode("idna")

    def clientConnectionForTLS(self, protocol):
        connection = self._options.clientConnectionForTLS(protocol)
        if self._name:
            connection.set_tlsext_host_name(self._name)
        return connection


@implementer(IPolicyForHTTPS)
class ClientTLS:
    """
    How Harmony connects to one peer over TLS: an C{IPolicyForHTTPS} (for
    L{harmony.http.client.PooledAgent}) that also serves the DICOM SCU.

    @param trust: an C{IOpenSSLTrustRoot}; C{None} with C{verify}: the
        system's trust store.
    @param verify: verify the peer's certificate chain.
    @param verify_hostname: also check that the certificate names the host
        connected to (HTTPS: always; DICOM: often addressed by IP).
    @param identity: an L{Identity} presented to peers that ask for a
        client certificate, or C{None}.
    """

    def __init__(self, trust=None, verify=True, verify_hostname=True, identity=None):
        self.verify = verify
        self.verify_hostname = verify and verify_hostname
        self._trust = (trust or platformTrust()) if verify else None
        self._identity = identity
        self._creators = {}
        self._plain = None

    def _extra(self):
        extra = {"raiseMinimumTo": MINIMUM_VERSION}
        if self._identity is not None:
            extra.update(self._identity.options())
        return extra

    def creatorForNetloc(self, hostname, port):
        """
        C{IPolicyForHTTPS.creatorForNetloc}: a client connection creator
        for C{hostname} (C{bytes} or C{str}); cached per host name.
        """
        if isinstance(hostname, bytes):
            hostname = hostname.decode("ascii")
        creator = self._creators.get(hostname)
        if creator is None:
            if self.verify_hostname:
                creator = optionsForClientTLS(hostname, self._trust, extraCertificateOptions=self._extra())
            else:
                if self._plain is None:
                    self._plain = CertificateOptions(trustRoot=self._trust, **self._extra())
                creator = _ServerNameCreator(self._plain, hostname)
            if len(self._creators) >= 1024:
                self._creators.clear()
            self._creators[hostname] = creator
        return creator

    def check(self):
        """
        Build a client context once (startup): an unusable identity or
        trust store fails here rather than on the first connection.

        @raise OpenSSL.SSL.Error: OpenSSL refused the settings.
        """
        CertificateOptions(trustRoot=self._trust, **self._extra()).getContext()


def client_tls(where, ca_path="", verify=True, cert_path="", key_path="", verify_hostname=True,
               names=("tls_ca_path", "tls_cert_path", "tls_key_path")):
    """
    A L{ClientTLS} from configuration options.

    @param where: the L{Place} of the options (errors name its keys).
    @param ca_path: PEM CA bundle the peer's chain must lead to (default:
        the system's trust store).
    @param verify: C{False}: no verification at all.
    @param cert_path: our certificate chain (mutual TLS), with C{key_path}.
    @param names: the configuration keys of the three paths (for errors).
    @raise ConfigError: a file is unusable.
    """
    ca_key, cert_key, key_key = names
    trust = None
    if ca_path:
        from twisted.internet._sslverify import OpenSSLCertificateAuthorities

        cas = read_certificates(where, ca_key, ca_path)
        trust = OpenSSLCertificateAuthorities([crypto.X509.from_cryptography(c) for c in cas])
    identity = read_identity(where, cert_key, cert_path, key_key, key_path) if cert_path else None
    policy = ClientTLS(trust, verify, verify_hostname, identity)
    try:
        policy.check()
    except (SSL.Error, ValueError) as e:
        raise where.error(cert_key if cert_path else ca_key, f"cannot be used: {ssl_error_text(e)}") from None
    return policy


def tls_failure_reason(failure):
    """
    Why a connection or request failed at the TLS layer (OpenSSL's reasons),
    or C{None} when TLS is not the cause.

    @param failure: a C{Failure}, possibly wrapping others (the
        C{reasons} of C{twisted.web} client errors).
    """
    seen = 0
    pending = [failure]
    while pending and seen < 16:
        seen += 1
        current = pending.pop(0)
        value = getattr(current, "value", current)
        if isinstance(value, SSL.Error):
            return ssl_error_text(value)
        pending.extend(getattr(value, "reasons", None) or ())
    return None


def ssl_error_text(error):
    """
    A short text for an OpenSSL error: its reasons (C{"certificate verify
    failed"}, C{"tlsv1 alert unknown ca"}), not the whole tuple.
    """
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        reasons = [r[-1] for r in error.args[0] if isinstance(r, tuple) and r]
        if reasons:
            return "; ".join(str(r) for r in reasons)
    return str(error) or type(error).__name__


# -- option schemas and checks -------------------------------------------------


def check_pair(options, where, cert_key, key_key):
    """
    A schema check: a certificate and its key come together.
    """
    if options[cert_key] and not options[key_key]:
        raise where.child(key_key).error(f"required with {cert_key}")
    if options[key_key] and not options[cert_key]:
        raise where.child(cert_key).error(f"required with {key_key}")


def warn_once(where, message):
    """
    C{where.warn(message)} unless the same warning is already there (a
    backend's options are validated once per target).
    """
    text = str(ConfigError(message, where.file, where.keypath))
    if text not in where.warnings:
        where.warnings.append(text)


#: C{[endpoints.<name>.options.tls]} of a C{dicom_scp} endpoint.
DICOM_SERVER_TLS = Schema(
    {
        "cert_path": Field(Str(nonempty=True), REQUIRED, "PEM certificate chain of the SCP (its own first)"),
        "key_path": Field(Str(nonempty=True), REQUIRED, "PEM private key of that certificate (not encrypted)"),
        "ca_path": Field(Str(), "", "PEM CA bundle: ask callers for a certificate issued by one of these"),
        "require_client_cert": Field(Bool(), True, "with ca_path: refuse callers without a certificate"),
        "move_destinations_tls": Field(
            Bool(), False,
            "C-MOVE: associate with the move destinations over TLS too (this certificate as ours; destinations "
            "verified against ca_path, or the system's trust store)",
        ),
    }
)
