# -*- test-case-name: tests.unit.test_jwt_auth -*-
"""
C{jwt_auth} (alias C{jwtauth}): Bearer JSON Web Token authentication.

Tokens are verified with PyJWT, pinned to the one configured algorithm
(C{alg=none} and HS/RS confusion are rejected), against a PEM public key
file, a JWKS URL (cached, refreshed on an unknown C{kid}) or an HMAC secret.
The time claims (C{exp}, always required; C{nbf}; C{iat}) are checked
against the injected reactor clock with C{leeway_secs}; C{iss}, C{aud},
required claims, scopes and roles (globally and per route) are checked too.

Failures answer as RFC 6750 says: C{401} with C{WWW-Authenticate: Bearer
realm="..."} when there is no token, C{401 error="invalid_token"} for a
token that does not verify, C{400 error="invalid_request"} for a malformed
C{Authorization} header, C{403 error="insufficient_scope"} for missing
scopes or roles, C{503} when JWKS keys cannot be fetched.

What later middleware and backends can read (all C{str}, in
C{envelope.metadata}):

  - C{jwt.claims}: every claim of the verified token as compact JSON (read
    it with L{claims_of});
  - C{jwt.sub}, C{jwt.iss}: the subject and issuer, when the token has them;
  - C{auth.method} = C{"jwt"} and C{auth.user} = the subject (when any).

Tokens are never logged.
"""

import base64
import binascii
import json
import os
import re
from urllib.parse import unquote, urlsplit

import jwt
import treq
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer
from zope.interface import implementer

from harmony.config.errors import ConfigError
from harmony.config.schema import Bool, Field, Int, Kind, ListOf, Schema, Str, Table
from harmony.errors import BadRequest, Forbidden, ServiceUnavailable, Unauthorized
from harmony.http.routing import ALL_METHODS, check_prefix, normalize_prefix
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.registry import MiddlewareType

log = logger("harmony.middleware.jwt_auth")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256")
EC_ALGORITHMS = {"ES256": "secp256r1", "ES384": "secp384r1"}
ALGORITHMS = RSA_ALGORITHMS + tuple(EC_ALGORITHMS) + HMAC_ALGORITHMS

#: RFC 7518 3.2: an HMAC key at least as long as the hash output.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_RSA_BITS = 2048

#: Longer tokens are refused before any parsing.
MAX_TOKEN_LENGTH = 16384
#: Larger JWKS documents are refused.
MAX_JWKS_BYTES = 1024 * 1024

METADATA_CLAIMS = "jwt.claims"
METADATA_SUB = "jwt.sub"
METADATA_ISS = "jwt.iss"

_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*={0,2}\Z")
_SLASHES = re.compile(r"/{2,}")


#: Verified tokens are remembered this long (seconds) by their exact text,
#: so that a client sending the same token again costs a dictionary lookup
#: instead of a signature check (exp/nbf are checked on every request; a
#: key withdrawn from a JWKS stops being trusted within this delay).
VERIFIED_CACHE_SECS = 30.0
#: At most this many verified tokens are remembered (then forgotten all at
#: once: the cache cannot grow with the number of clients).
VERIFIED_CACHE_SIZE = 4096


def claims_of(envelope):
    """
    The claims of the token a C{jwt_auth} middleware verified for this
    request.

    @param envelope: a L{harmony.envelope.RequestEnvelope}.
    @return: a C{dict}, or C{None} when no token was verified.
    """
    data = envelope.metadata.get(METADATA_CLAIMS)
    return None if data is None else json.loads(data)


# -- options -------------------------------------------------------------------


def _check_http_token(value):
    if not _TOKEN_CHARS.match(value):
        return f'must be an HTTP token (letters, digits, "-" ...), got "{value}"'
    return None


def _check_quotable(value):
    if any(c in '"\\' or not (0x20 <= ord(c) < 0x7F) for c in value):
        return 'must be printable ASCII without " or \\'
    return None


def _check_scope(value):
    if not value or any(c.isspace() or c in '"\\' for c in value) or not value.isprintable():
        return f"must be one scope token (no spaces or quotes), got {value!r}"
    return None


def _check_url(value):
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f'must be an http(s) URL, got "{value}"'
    return None


def _check_method(value):
    if value.upper() not in ALL_METHODS:
        return f"expected one of {', '.join(sorted(ALL_METHODS))}, got {value!r}"
    return None


class StrOrList(Kind):
    """
    A non-empty string or a non-empty array of non-empty strings
    (C{audience}, C{issuer}); the clean value is a tuple.
    """

    label = "string or array of strings"

    def validate(self, value, where):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.expected(value, where)
        if not items:
            raise where.error("must not be empty")
        item = Str(nonempty=True)
        return tuple(item.validate(v, where.child(i)) for i, v in enumerate(items))


def _check_route(options, where):
    if options.anonymous and (options.scopes or options.roles):
        raise where.child("anonymous").error("an anonymous route cannot also require scopes or roles")


ROUTE = Schema(
    {
        "path_prefix": Field(Str(check=check_prefix), doc="full request path prefix this rule applies to"),
        "methods": Field(
            ListOf(Str(check=_check_method), unique=True), (), doc="methods (empty: all; GET also covers HEAD)"
        ),
        "scopes": Field(ListOf(Str(check=_check_scope), unique=True), (), doc="scopes required (all of them)"),
        "roles": Field(ListOf(Str(nonempty=True), unique=True), (), doc="roles accepted (any one of them)"),
        "anonymous": Field(Bool(), False, doc="requests without a token are let through (no claims)"),
    },
    check=_check_route,
)


def _algorithm(options):
    """
    The pinned algorithm: C{algorithm}, else (configurations written for
    the Rust Harmony) C{HS256} with C{use_hs256 = true}, else C{RS256}.
    """
    if options.algorithm is not None:
        return options.algorithm
    return "HS256" if options.use_hs256 else "RS256"


def _check_options(options, where):
    for key in ("use_hs256", "hs256_secret"):
        if key in options and options[key] not in (None, False):
            alternative = "algorithm" if key == "use_hs256" else "secret"
            where.child(key).warn(f"deprecated Rust Harmony key, use {alternative} instead")
    alg = _algorithm(options)
    if options.algorithm is not None and options.use_hs256 and alg not in HMAC_ALGORITHMS:
        raise where.child("use_hs256").error(f"use_hs256 = true contradicts algorithm {alg}")
    secrets = [k for k in ("secret", "hs256_secret", "secret_env", "secret_path") if options[k] is not None]
    public_key_path = options.public_key_path or None
    if alg in HMAC_ALGORITHMS:
        for key in ("public_key_path", "jwks_url"):
            if (options[key] or None) is not None:
                raise where.child(key).error(f"{key} is for asymmetric algorithms; {alg} uses secret")
        if not secrets:
            raise where.child("secret").error(
                f"required for {alg} (or secret_env / secret_path); there is no default secret"
            )
        if len(secrets) > 1:
            raise where.child(secrets[1]).error(f"give only one of {', '.join(secrets)}")
    else:
        if secrets:
            raise where.child(secrets[0]).error(f"{secrets[0]} is for HS* algorithms; {alg} uses a public key")
        if public_key_path is None and options.jwks_url is None:
            raise where.child("public_key_path").error(f"required for {alg} (or jwks_url): a PEM public key file")
        if public_key_path is not None and options.jwks_url is not None:
            raise where.child("jwks_url").error("give either public_key_path or jwks_url, not both")
        if options.jwks_url is not None and not options.jwks_allow_http:
            parts = urlsplit(options.jwks_url)
            if parts.scheme != "https" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
                raise where.child("jwks_url").error(
                    "must be https (keys fetched over plain http can be forged); set jwks_allow_http = true "
                    "to allow it on a trusted network"
                )
    seen = {}
    for i, route in enumerate(options.routes):
        methods = {m.upper() for m in route.methods} or {"*"}
        for method in methods:
            key = (normalize_prefix(route.path_prefix), method)
            if key in seen:
                raise where.child("routes").child(i).error(
                    f"overlaps routes.{seen[key]} (same path_prefix and method {method})"
                )
            seen[key] = i


OPTIONS = Schema(
    {
        "algorithm": Field(Str(choices=ALGORITHMS), None, doc="the one accepted algorithm (default RS256)"),
        "public_key_path": Field(Str(), None, doc="PEM public key(s) or certificate(s) (RS*/PS*/ES*)"),
        "jwks_url": Field(Str(check=_check_url), None, doc="JWKS document URL (RS*/PS*/ES*)"),
        "jwks_cache_secs": Field(Int(min=1), 3600, doc="how long fetched keys are used before a refresh"),
        "jwks_min_refresh_secs": Field(Int(min=0), 60, doc="at most one fetch per this many seconds"),
        "jwks_timeout_secs": Field(Int(min=1), 10, doc="JWKS fetch timeout"),
        "jwks_allow_http": Field(Bool(), False, doc="accept an http:// jwks_url on a non-loopback host"),
        "secret": Field(Str(nonempty=True), None, doc="HMAC secret (HS*); use ${ENV}"),
        "secret_env": Field(Str(nonempty=True), None, doc="environment variable holding the HMAC secret"),
        "secret_path": Field(Str(nonempty=True), None, doc="file holding the HMAC secret"),
        "secret_encoding": Field(Str(choices=("utf-8", "base64")), "utf-8", doc="how the secret is written"),
        "issuer": Field(StrOrList(), None, doc="accepted iss value(s); when set, iss is required"),
        "audience": Field(StrOrList(), None, doc="accepted aud value(s); when unset, tokens with aud fail"),
        "leeway_secs": Field(Int(min=0, max=3600), 60, doc="clock skew allowed for exp/nbf/iat"),
        "required_claims": Field(ListOf(Str(nonempty=True), unique=True), (), doc="claims that must be present"),
        "scope_claim": Field(Str(nonempty=True), "scope", doc="claim with scopes (string or array; a.b = nested)"),
        "roles_claim": Field(Str(nonempty=True), "roles", doc="claim with roles (string or array; a.b = nested)"),
        "required_scopes": Field(ListOf(Str(check=_check_scope), unique=True), (), doc="scopes every request needs"),
        "routes": Field(ListOf(Table(ROUTE)), (), doc="per-path rules; the longest matching path_prefix wins"),
        "header": Field(Str(check=_check_http_token), "Authorization", doc="header carrying the token"),
        "scheme": Field(Str(check=lambda v: v and _check_http_token(v)), "Bearer", doc='"" = the header is the token'),
        "realm": Field(Str(check=_check_quotable), "harmony", doc="realm in WWW-Authenticate"),
        "forward_credentials": Field(Bool(), True, doc="pass the token header on to the backend"),
        # Rust Harmony keys.
        "use_hs256": Field(Bool(), False, doc="deprecated: algorithm = HS256"),
        "hs256_secret": Field(Str(nonempty=True), None, doc="deprecated: secret"),
    },
    legacy={},
    check=_check_options,
)


# -- keys ----------------------------------------------------------------------


class _Reject(Exception):
    """
    A token that does not verify: C{description} is client-safe.
    """

    def __init__(self, description):
        super().__init__(description)
        self.description = description


class _KeysUnavailable(Exception):
    pass


def _check_public_key(key, alg):
    """
    @return: a problem, or C{None} when C{key} suits C{alg}.
    """
    if alg in RSA_ALGORITHMS:
        if not isinstance(key, rsa.RSAPublicKey):
            return f"{alg} needs an RSA public key, got {_key_kind(key)}"
        if key.key_size < MIN_RSA_BITS:
            return f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required"
        return None
    curve = EC_ALGORITHMS[alg]
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return f"{alg} needs an EC public key on {curve}, got {_key_kind(key)}"
    if key.curve.name != curve:
        return f"{alg} needs an EC key on {curve}, got {key.curve.name}"
    return None


def _key_kind(key):
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC key on {key.curve.name}"
    return type(key).__name__


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)


def load_public_keys(data, alg):
    """
    The public keys in PEM data (C{PUBLIC KEY}, C{RSA PUBLIC KEY} or
    C{CERTIFICATE} blocks; several blocks = several accepted keys, for key
    rotation).

    @raise ValueError: no key, a private key, a key unfit for C{alg}.
    """
    keys = []
    for match in _PEM_BLOCK.finditer(data):
        label = match.group(1).decode("ascii")
        block = match.group(0)
        if "PRIVATE" in label:
            raise ValueError("the file holds a private key; give the public key only")
        try:
            if label == "CERTIFICATE":
                key = x509.load_pem_x509_certificate(block).public_key()
            elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                key = serialization.load_pem_public_key(block)
            else:
                raise ValueError(f"unexpected PEM block {label!r}")
        except ValueError as e:
            raise ValueError(f"PEM block {len(keys) + 1} is not a valid public key or certificate ({e})") from None
        problem = _check_public_key(key, alg)
        if problem:
            raise ValueError(problem)
        keys.append(key)
    if not keys:
        raise ValueError("no PEM public key or certificate found")
    return keys


class StaticKeys:
    """
    Keys known at startup (a PEM file or an HMAC secret).
    """

    def __init__(self, keys):
        self._keys = list(keys)

    def lookup(self, kid):
        return self._keys


class JwksKeys:
    """
    Keys from a JWKS URL, fetched on first use and cached for
    C{cache_secs}.  A token whose C{kid} is unknown triggers a refresh
    (key rotation), at most one fetch per C{min_refresh_secs}.  When a
    refresh fails, the keys fetched before stay in use.  Concurrent
    requests share one fetch.

    @param http_client: a C{treq.client.HTTPClient} (or C{StubTreq}).
    @param clock: an C{IReactorTime}.
    """

    def __init__(self, name, url, http_client, clock, alg, cache_secs, min_refresh_secs, timeout_secs):
        self.name = name
        self.url = url
        self._http = http_client
        self._clock = clock
        self._alg = alg
        self._cache_secs = cache_secs
        self._min_refresh = min_refresh_secs
        self._timeout = timeout_secs
        #: kid (or None) -> [keys]; None until a fetch succeeded.
        self._keys = None
        self._all = []
        self._expires = 0.0
        self._last_attempt = None
        self._waiters = None
        self.fetches = 0

    # -- lookup ----------------------------------------------------------------

    def lookup(self, kid):
        """
        @return: the candidate keys for C{kid}, or a Deferred firing with
            them after a fetch.
        @raise _Reject: unknown C{kid} (and no refresh allowed yet).
        @raise _KeysUnavailable: no keys could be fetched.
        """
        now = self._clock.seconds()
        if self._keys is not None and now < self._expires:
            found = self._find(kid)
            if found:
                return found
        if self._waiters is None and not self._may_fetch(now):
            # Fetched (or tried) too recently to fetch again.
            if self._keys is None:
                raise _KeysUnavailable()
            # Stale keys stay in use while the JWKS URL is failing.
            return self._found_or_reject(kid)
        # Fetch, or wait for the fetch under way.
        return self._refresh().addCallback(lambda _: self._found_or_reject(kid))

    def _may_fetch(self, now):
        return self._last_attempt is None or now - self._last_attempt >= self._min_refresh

    def _find(self, kid):
        if kid is None:
            return self._all
        return self._keys.get(kid)

    def _found_or_reject(self, kid):
        if self._keys is None:
            raise _KeysUnavailable()
        found = self._find(kid)
        if not found:
            raise _Reject("The token is signed with an unknown key")
        return found

    # -- fetching --------------------------------------------------------------

    def _refresh(self):
        """
        A Deferred firing with C{None} once a fetch (this one or one under
        way) has ended, successfully or not.
        """
        d = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        self._waiters = [d]
        self._last_attempt = self._clock.seconds()
        self.fetches += 1
        fetch = defer.Deferred.fromCoroutine(self._fetch())
        fetch.addTimeout(self._timeout, self._clock)
        fetch.addCallbacks(self._fetched, self._fetch_failed)
        fetch.addBoth(self._wake)
        return d

    async def _fetch(self):
        if self._http is None:
            raise RuntimeError("no HTTP client")
        response = await self._http.get(self.url, headers={"Accept": "application/json"})
        if response.code != 200:
            raise ValueError(f"HTTP status {response.code}")
        chunks = []
        size = 0

        def collect(data):
            nonlocal size
            size += len(data)
            if size > MAX_JWKS_BYTES:
                raise ValueError(f"JWKS document larger than {MAX_JWKS_BYTES} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        try:
            document = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("the JWKS document is not JSON") from None
        return self._parse(document)

    def _parse(self, document):
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('the JWKS document has no "keys" array')
        by_kid = {}
        every = []
        skipped = 0
        for entry in document["keys"]:
            key = self._usable(entry)
            if key is None:
                skipped += 1
                continue
            every.append(key)
            kid = entry.get("kid")
            if isinstance(kid, str):
                by_kid.setdefault(kid, []).append(key)
        if not every:
            raise ValueError(f"no usable {self._alg} signing key in the JWKS document ({skipped} skipped)")
        return by_kid, every, skipped

    def _usable(self, entry):
        if not isinstance(entry, dict):
            return None
        if entry.get("use", "sig") != "sig" or entry.get("alg", self._alg) != self._alg:
            return None
        ops = entry.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            return None
        if any(p in entry for p in ("d", "p", "q", "k")):
            return None  # private or symmetric key material: never used
        try:
            key = jwt.PyJWK(entry, algorithm=self._alg).key
        except Exception:
            return None
        if _check_public_key(key, self._alg) is not None:
            return None
        return key

    def _fetched(self, parsed):
        by_kid, every, skipped = parsed
        self._keys = by_kid
        self._all = every
        self._expires = self._clock.seconds() + self._cache_secs
        log.info(
            "jwt_auth {middleware}: fetched {count} JWKS signing key(s) ({skipped} not usable)",
            middleware=self.name,
            count=len(every),
            skipped=skipped,
        )

    def _fetch_failed(self, failure):
        reason = "timed out" if failure.check(defer.TimeoutError, defer.CancelledError) else str(failure.value)
        log.warn(
            "jwt_auth {middleware}: fetching the JWKS failed: {reason}{stale}",
            middleware=self.name,
            reason=reason,
            stale="; keeping the keys fetched before" if self._keys is not None else "",
        )

    def _wake(self, _):
        waiters, self._waiters = self._waiters, None
        for d in waiters:
            d.callback(None)


# -- the middleware ------------------------------------------------------------


class _Rule:
    def __init__(self, route):
        self.prefix = normalize_prefix(route.path_prefix)
        self.methods = frozenset(m.upper() for m in route.methods)
        self.scopes = tuple(route.scopes)
        self.roles = tuple(route.roles)
        self.anonymous = route.anonymous

    def matches(self, method, path):
        if self.methods and method not in self.methods and not (method == "HEAD" and "GET" in self.methods):
            return False
        return self.prefix == "/" or path == self.prefix or path.startswith(self.prefix + "/")


class _WallClock:
    @staticmethod
    def seconds():
        import time

        return time.time()


def _quoted(text):
    """
    C{text} made safe for an RFC 6750 C{error_description} quoted string.
    """
    return "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "?" for c in text)


def _claim(claims, name):
    if name in claims:
        return claims[name]
    value = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _as_set(value):
    if isinstance(value, str):
        return set(value.split())
    if isinstance(value, list):
        return {v for v in value if isinstance(v, str)}
    return set()


@implementer(IMiddleware)
class JwtAuth:
    """
    The C{jwt_auth} middleware; see the module docstring.

    @param context: a L{harmony.registry.BuildContext} (C{reactor} is the
        clock for token times and JWKS caching; C{http_client} fetches
        JWKS; C{config} resolves relative paths).
    @param environ: the environment for C{secret_env} (default
        C{os.environ}).
    @raise ConfigError: key material that cannot be loaded (naming the key).
    """

    def __init__(self, name, options, context=None, environ=None):
        self.name = name
        self.algorithm = _algorithm(options)
        self._context = context
        reactor = getattr(context, "reactor", None)
        self._clock = reactor if reactor is not None else _WallClock()
        self._issuer = None if options.issuer is None else list(options.issuer)
        self._audience = None if options.audience is None else list(options.audience)
        self._leeway = options.leeway_secs
        self._require = ["exp"] + [c for c in options.required_claims if c != "exp"]
        self._scope_claim = options.scope_claim
        self._roles_claim = options.roles_claim
        self._required_scopes = tuple(options.required_scopes)
        rules = [_Rule(r) for r in options.routes]
        # Longest prefix first; at one prefix, rules naming methods first.
        self._rules = sorted(rules, key=lambda r: (-len(r.prefix), not r.methods))
        self._header = options.header
        self._scheme = options.scheme.lower()
        self._scheme_shown = options.scheme or "Bearer"
        self._realm = options.realm
        self._forward = options.forward_credentials
        self._cache = {}  # token -> (claims, claims JSON, verified at)
        self._jwt = jwt.PyJWT(
            options={
                "verify_signature": True,
                # Time claims are checked against the injected clock below.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": True,
                "verify_iss": True,
                "require": self._require,
            }
        )
        if self.algorithm in HMAC_ALGORITHMS:
            self.keys = StaticKeys([self._load_secret(options, environ)])
        elif options.public_key_path:
            self.keys = StaticKeys(self._load_public_key_file(options.public_key_path))
        else:
            self.keys = JwksKeys(
                name,
                options.jwks_url,
                getattr(context, "http_client", None),
                self._clock,
                self.algorithm,
                options.jwks_cache_secs,
                options.jwks_min_refresh_secs,
                options.jwks_timeout_secs,
            )

    # -- startup ---------------------------------------------------------------

    def _error(self, key, message):
        config = getattr(self._context, "config", None)
        entry = config.middleware.get(self.name) if config is not None else None
        return ConfigError(message, getattr(entry, "file", None), ("middleware", self.name, "options", key))

    def _path(self, path):
        config = getattr(self._context, "config", None)
        return config.resolve_path(path) if config is not None else os.path.abspath(path)

    def _read(self, key, path):
        try:
            with open(self._path(path), "rb") as f:
                return f.read()
        except OSError as e:
            raise self._error(key, f"cannot read {path!r}: {e.strerror}") from None

    def _load_public_key_file(self, path):
        data = self._read("public_key_path", path)
        try:
            return load_public_keys(data, self.algorithm)
        except ValueError as e:
            raise self._error("public_key_path", f"{path!r}: {e}") from None

    def _load_secret(self, options, environ):
        if options.secret is not None:
            key, raw = "secret", options.secret.encode("utf-8")
        elif options.hs256_secret is not None:
            key, raw = "hs256_secret", options.hs256_secret.encode("utf-8")
        elif options.secret_env is not None:
            key = "secret_env"
            environ = os.environ if environ is None else environ
            value = environ.get(options.secret_env)
            if not value:
                raise self._error(key, f"environment variable {options.secret_env} is not set or empty")
            raw = value.encode("utf-8")
        else:
            key = "secret_path"
            raw = self._read(key, options.secret_path).strip()
        if options.secret_encoding == "base64":
            text = raw.strip()
            try:
                if b"-" in text or b"_" in text:
                    secret = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
                else:
                    secret = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise self._error(key, "the secret is not valid base64 (secret_encoding = \"base64\")") from None
        else:
            secret = raw
        if secret.lstrip().startswith((b"-----BEGIN", b"ssh-")):
            raise self._error(key, "the secret looks like a PEM/SSH key; HS* algorithms need a shared secret")
        minimum = MIN_SECRET_BYTES[self.algorithm]
        if len(secret) < minimum:
            raise self._error(
                key, f"the {self.algorithm} secret must be at least {minimum} bytes (RFC 7518), got {len(secret)}"
            )
        return secret

    # -- IMiddleware -----------------------------------------------------------

    def request(self, envelope):
        details = envelope.details
        method = details.method.upper()
        rule = self._rule(method, details.full_path)
        token = self._token(details.headers, anonymous=rule is not None and rule.anonymous)
        if token is None:
            return None
        cached = self._cache.get(token)
        if cached is not None:
            claims, claims_json, verified_at = cached
            if self._clock.seconds() - verified_at < VERIFIED_CACHE_SECS:
                # Signature, issuer and audience were checked moments ago;
                # the times are checked again, the route rules as always.
                try:
                    self._check_times(claims)
                except _Reject as e:
                    del self._cache[token]
                    raise self._invalid_token(e.description) from None
                return self._accept(claims, claims_json, envelope, rule)
            del self._cache[token]
        try:
            kid = self._check_header(token)
            keys = self.keys.lookup(kid)
        except _Reject as e:
            raise self._invalid_token(e.description) from None
        except _KeysUnavailable:
            raise self._unavailable() from None
        if isinstance(keys, defer.Deferred):
            return keys.addCallbacks(
                self._verified, self._lookup_failed, callbackArgs=(token, envelope, rule)
            )
        return self._verified(keys, token, envelope, rule)

    def response(self, envelope, response):
        return None

    # -- steps -----------------------------------------------------------------

    def _rule(self, method, full_path):
        if not self._rules:
            return None
        path = _SLASHES.sub("/", "/" + unquote(full_path or "").lstrip("/"))
        for rule in self._rules:
            if rule.matches(method, path):
                return rule
        return None

    def _challenge(self, error=None, description=None, scope=None):
        value = f'{self._scheme_shown} realm="{self._realm}"'
        if error is not None:
            value += f', error="{error}"'
        if description is not None:
            value += f', error_description="{_quoted(description)}"'
        if scope:
            value += f', scope="{" ".join(scope)}"'
        return [("WWW-Authenticate", value)]

    def _invalid_token(self, description):
        log.info("jwt_auth {middleware}: token rejected: {reason}", middleware=self.name, reason=description)
        return Unauthorized(description, headers=self._challenge("invalid_token", description))

    def _invalid_request(self, description):
        log.info("jwt_auth {middleware}: bad request: {reason}", middleware=self.name, reason=description)
        return BadRequest(description, headers=self._challenge("invalid_request", description))

    def _unavailable(self):
        return ServiceUnavailable(
            "Token verification keys are unavailable",
            headers=[("Retry-After", str(max(1, int(getattr(self.keys, "_min_refresh", 1)))))],
        )

    def _token(self, headers, anonymous=False):
        """
        The token from the configured header, or C{None} for an anonymous
        route without one.
        """
        values = headers.get_all(self._header)
        if not values:
            if anonymous:
                return None
            raise Unauthorized("Authentication required", headers=self._challenge())
        if len(values) > 1:
            raise self._invalid_request(f"More than one {self._header} header")
        value = values[0].strip()
        if self._scheme:
            scheme, _, token = value.partition(" ")
            if scheme.lower() != self._scheme:
                if anonymous:
                    return None
                raise Unauthorized("Authentication required", headers=self._challenge())
            token = token.strip()
            if not token:
                raise self._invalid_request(f"The {self._scheme_shown} token is missing")
        else:
            token = value
        if len(token) > MAX_TOKEN_LENGTH:
            raise self._invalid_token("The token is too long")
        if not _COMPACT_JWS.match(token):
            raise self._invalid_token("The token is malformed")
        return token

    def _check_header(self, token):
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _Reject("The token is malformed") from None
        alg = header.get("alg")
        if alg != self.algorithm:
            raise _Reject("The token algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Reject("The token is malformed")
        return kid

    def _lookup_failed(self, failure):
        if failure.check(_Reject):
            raise self._invalid_token(failure.value.description)
        if failure.check(_KeysUnavailable):
            raise self._unavailable()
        return failure

    def _verified(self, keys, token, envelope, rule):
        try:
            claims = self._decode(token, keys)
            self._check_times(claims)
        except _Reject as e:
            raise self._invalid_token(e.description) from None
        claims_json = json.dumps(claims, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        cache = self._cache
        if len(cache) >= VERIFIED_CACHE_SIZE:
            cache.clear()
        cache[token] = (claims, claims_json, self._clock.seconds())
        return self._accept(claims, claims_json, envelope, rule)

    def _accept(self, claims, claims_json, envelope, rule):
        """
        A verified token: the route's scopes/roles, then the claims for
        later middleware.
        """
        if rule is None or not rule.anonymous:
            self._authorize(claims, rule)
        metadata = envelope.metadata
        metadata[METADATA_CLAIMS] = claims_json
        metadata["auth.method"] = "jwt"
        for key, claim in ((METADATA_SUB, "sub"), (METADATA_ISS, "iss")):
            if isinstance(claims.get(claim), str):
                metadata[key] = claims[claim]
            else:
                metadata.pop(key, None)
        if METADATA_SUB in metadata:
            metadata["auth.user"] = metadata[METADATA_SUB]
        else:
            metadata.pop("auth.user", None)
        if not self._forward:
            envelope.details.headers.remove(self._header)
        return None

    def _decode(self, token, keys):
        last = None
        for key in keys:
            try:
                return self._jwt.decode(
                    token,
                    key,
                    algorithms=[self.algorithm],
                    issuer=self._issuer,
                    audience=self._audience,
                )
            except jwt.InvalidSignatureError as e:
                last = e
                continue
            except jwt.MissingRequiredClaimError as e:
                raise _Reject(f"The token has no {e.claim} claim") from None
            except jwt.InvalidAudienceError:
                raise _Reject("The token audience is not accepted") from None
            except jwt.InvalidIssuerError:
                raise _Reject("The token issuer is not accepted") from None
            except jwt.InvalidAlgorithmError:
                raise _Reject("The token algorithm is not accepted") from None
            except (jwt.exceptions.InvalidSubjectError, jwt.exceptions.InvalidJTIError):
                raise _Reject("The token has an invalid sub or jti claim") from None
            except jwt.DecodeError:
                raise _Reject("The token is malformed") from None
            except jwt.InvalidTokenError:
                raise _Reject("The token is invalid") from None
            except Exception as e:
                log.warn(
                    "jwt_auth {middleware}: token verification error {error}",
                    middleware=self.name,
                    error=type(e).__name__,
                )
                raise _Reject("The token is invalid") from None
        if last is not None or not keys:
            raise _Reject("The token signature is invalid")
        raise _Reject("The token is invalid")  # pragma: no cover

    def _check_times(self, claims):
        now = self._clock.seconds()
        leeway = self._leeway
        values = {}
        for claim in ("exp", "nbf", "iat"):
            if claim in claims:
                value = claims[claim]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise _Reject(f"The token's {claim} claim is not a number")
                values[claim] = value
        if values["exp"] <= now - leeway:
            raise _Reject("The token has expired")
        if "nbf" in values and values["nbf"] > now + leeway:
            raise _Reject("The token is not valid yet")
        if "iat" in values and values["iat"] > now + leeway:
            raise _Reject("The token was issued in the future")

    def _authorize(self, claims, rule):
        granted = _as_set(_claim(claims, self._scope_claim))
        needed = list(self._required_scopes)
        if rule is not None:
            needed += [s for s in rule.scopes if s not in needed]
        missing = [s for s in needed if s not in granted]
        if missing:
            description = "The token lacks the scope(s): " + " ".join(missing)
            raise self._forbidden(description, scope=needed)
        if rule is not None and rule.roles:
            roles = _as_set(_claim(claims, self._roles_claim))
            if not roles.intersection(rule.roles):
                raise self._forbidden("The token has none of the role(s): " + " ".join(rule.roles))

    def _forbidden(self, description, scope=None):
        log.info("jwt_auth {middleware}: forbidden: {reason}", middleware=self.name, reason=description)
        return Forbidden(description, headers=self._challenge("insufficient_scope", description, scope))


#: The C{jwt_auth} middleware type (registered as a built-in; also loadable
#: as C{[middleware_types.jwt_auth] module =
#: "harmony.middleware.jwt_auth:MIDDLEWARE_TYPE"}).
MIDDLEWARE_TYPE = MiddlewareType("jwt_auth", JwtAuth, options=OPTIONS)
