# -*- test-case-name: tests.unit.test_basic_auth -*-
"""
C{basic_auth}: HTTP Basic authentication (RFC 7617) against hashed
passwords.

Users come from C{users = {name = "<hash>"}} and/or an htpasswd-style file
(C{htpasswd_path}: C{user:hash} lines, C{#} comments, blank lines; an
optional C{:comment} after the hash).  Accepted hashes:

  - bcrypt C{$2y$}, C{$2b$}, C{$2a$} (C{htpasswd -B}): recommended;
  - SHA-crypt C{$5$} (SHA-256) and C{$6$} (SHA-512) as in C{/etc/shadow}
    (a pure-Python implementation; no C{crypt} module needed);
  - C{{SHA}} base64 SHA-1 (C{htpasswd -s}): legacy and unsalted, accepted
    with a startup warning.

Plaintext and other schemes (C{$apr1$}, C{$1$}, DES crypt, argon2,
yescrypt) are startup errors.  Hash checks run in the reactor's thread
pool (bcrypt and SHA-crypt are slow on purpose), compare in constant time,
and a request naming an unknown user runs the same check against a dummy
hash so timing does not reveal which users exist.  Successful checks are
remembered for C{cache_secs} (keyed by an HMAC of the credentials under a
per-process random key), so a client sending the same credentials does not
pay for bcrypt on every request.

Failures answer C{401} with C{WWW-Authenticate: Basic realm="...",
charset="UTF-8"}.  On success, later middleware and backends read (in
C{envelope.metadata}): C{basic.user} and C{auth.user} (the user name) and
C{auth.method} = C{"basic"}.  The C{Authorization} header is removed before
the backend unless C{forward_credentials = true}.

Passwords, hashes and (on failure) user names are never logged.
"""

import base64
import binascii
import hashlib
import hmac
import os
import re
import time

import attr
import bcrypt
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from harmony.config.errors import ConfigError
from harmony.config.schema import Bool, Field, Int, MapOf, Schema, Str
from harmony.errors import Unauthorized
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.registry import MiddlewareType

log = logger("harmony.middleware.basic_auth")

METADATA_USER = "basic.user"

#: bcrypt uses the first 72 bytes of a password (htpasswd truncates too).
BCRYPT_MAX_PASSWORD = 72
#: SHA-crypt rounds above this are refused (each check would take seconds).
MAX_SHA_CRYPT_ROUNDS = 1_000_000
#: At most this many verified credentials are remembered.
CACHE_SIZE = 1024


# -- hashes --------------------------------------------------------------------

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

_SHA256_ORDER = (
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
    (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29),
)  # fmt: skip
_SHA512_ORDER = (
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26), (6, 27, 48),
    (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32), (12, 33, 54),
    (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60),
    (40, 61, 19), (62, 20, 41),
)  # fmt: skip


def _b64_24(b2, b1, b0, n):
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_ITOA64[w & 0x3F])
        w >>= 6
    return "".join(out)


def sha_crypt(password, salt, rounds, variant):
    """
    The SHA-crypt digest (U. Drepper, "Unix crypt using SHA-256 and
    SHA-512"), as the text after the last C{$} of a C{$5$}/C{$6$} hash.

    @param password: C{bytes}.
    @param salt: C{bytes} (at most 16 are used).
    @param rounds: the rounds (clamped to 1000..999999999).
    @param variant: C{"5"} (SHA-256) or C{"6"} (SHA-512).
    """
    new = hashlib.sha256 if variant == "5" else hashlib.sha512
    size = 32 if variant == "5" else 64
    rounds = max(1000, min(999_999_999, rounds))
    salt = salt[:16]
    plen = len(password)

    b = new(password + salt + password).digest()
    a = new(password + salt)
    i = plen
    while i > size:
        a.update(b)
        i -= size
    a.update(b[:i])
    i = plen
    while i > 0:
        a.update(b if i & 1 else password)
        i >>= 1
    da = a.digest()

    dp = new(password * plen).digest()
    p = (dp * (plen // size + 1))[:plen]
    ds = new(salt * (16 + da[0])).digest()
    s = (ds * (len(salt) // size + 1))[: len(salt)]

    c = da
    for r in range(rounds):
        h = new(p if r & 1 else c)
        if r % 3:
            h.update(s)
        if r % 7:
            h.update(p)
        h.update(c if r & 1 else p)
        c = h.digest()

    if variant == "5":
        out = [_b64_24(c[x], c[y], c[z], 4) for x, y, z in _SHA256_ORDER]
        out.append(_b64_24(0, c[31], c[30], 3))
    else:
        out = [_b64_24(c[x], c[y], c[z], 4) for x, y, z in _SHA512_ORDER]
        out.append(_b64_24(0, 0, c[63], 2))
    return "".join(out)


_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}\Z")
_SHA_CRYPT = re.compile(r"\$([56])\$(?:rounds=([0-9]+)\$)?([^$:\n]{0,16})\$([./A-Za-z0-9]+)\Z")
_UNSUPPORTED = (
    ("$apr1$", "Apache MD5 ($apr1$)"),
    ("$1$", "MD5-crypt ($1$)"),
    ("$argon2", "argon2"),
    ("$y$", "yescrypt ($y$)"),
    ("$7$", "scrypt ($7$)"),
    ("$md5", "Sun MD5"),
    ("$sha1$", "NetBSD SHA-1 crypt"),
)


@attr.s(frozen=True, repr=False)
class PasswordHash:
    """
    A parsed password hash.

    @ivar kind: C{"bcrypt"}, C{"sha-crypt"} or C{"sha1"}.
    @ivar cost: a rough relative cost (to pick the dummy hash).
    @ivar slow: whether a check belongs in a thread.
    """

    kind = attr.ib()
    value = attr.ib()
    cost = attr.ib()
    slow = attr.ib()
    _parts = attr.ib(default=())

    def __repr__(self):
        return f"<PasswordHash {self.kind}>"

    def verify(self, password):
        """
        @param password: C{bytes}.
        @return: whether C{password} matches (constant-time comparison).
        """
        if self.kind == "bcrypt":
            return bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD], self.value.encode("ascii"))
        if self.kind == "sha-crypt":
            variant, salt, rounds, digest = self._parts
            computed = sha_crypt(password, salt, rounds, variant)
            return hmac.compare_digest(computed.encode("ascii"), digest.encode("ascii"))
        computed = base64.b64encode(hashlib.sha1(password).digest())
        return hmac.compare_digest(computed, self._parts[0])


def parse_hash(value):
    """
    Parse a stored password hash.

    @raise ValueError: unsupported scheme or plaintext; the message never
        contains the value.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("empty password hash")
    m = _BCRYPT.match(value)
    if m:
        cost = int(m.group(1))
        if not 4 <= cost <= 31:
            raise ValueError(f"bcrypt cost {cost} is out of range (4..31)")
        return PasswordHash("bcrypt", value, 1000 + cost, True)
    if value.startswith("$2"):
        raise ValueError("malformed bcrypt hash")
    m = _SHA_CRYPT.match(value)
    if m:
        variant, rounds, salt, digest = m.groups()
        if len(digest) != (43 if variant == "5" else 86):
            raise ValueError(f"malformed ${variant}$ hash (digest length)")
        rounds = 5000 if rounds is None else int(rounds)
        if rounds > MAX_SHA_CRYPT_ROUNDS:
            raise ValueError(f"${variant}$ rounds={rounds} is above {MAX_SHA_CRYPT_ROUNDS}; use bcrypt")
        return PasswordHash("sha-crypt", value, rounds / 1000, True, (variant, salt.encode("ascii"), rounds, digest))
    if value.startswith(("$5$", "$6$")):
        raise ValueError(f"malformed {value[:3]} hash")
    if value.startswith("{SHA}"):
        try:
            raw = base64.b64decode(value[5:], validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 20:
            raise ValueError("malformed {SHA} hash (expected base64 of 20 bytes)")
        return PasswordHash("sha1", value, 0, False, (value[5:].encode("ascii"),))
    for prefix, label in _UNSUPPORTED:
        if value.startswith(prefix):
            raise ValueError(f"unsupported password hash scheme {label}; use bcrypt (htpasswd -B)")
    raise ValueError("plaintext or unrecognised password hash; use bcrypt (htpasswd -nB user)")


def parse_htpasswd(text):
    """
    Parse htpasswd-style text.

    @return: a list of C{(line_number, user, PasswordHash)}.
    @raise ValueError: with the line number of the first bad line.
    """
    entries = []
    seen = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        user, sep, rest = stripped.partition(":")
        if not sep:
            raise ValueError(f"line {number}: expected user:hash")
        problem = _check_user(user)
        if problem:
            raise ValueError(f"line {number}: {problem}")
        if user in seen:
            raise ValueError(f"line {number}: user {user!r} is already defined on line {seen[user]}")
        try:
            parsed = parse_hash(rest.split(":", 1)[0])
        except ValueError as e:
            raise ValueError(f"line {number}: user {user!r}: {e}") from None
        seen[user] = number
        entries.append((number, user, parsed))
    return entries


def _check_user(user):
    if not user:
        return "empty user name"
    if ":" in user:
        return "a user name cannot contain ':'"
    if not user.isprintable():
        return "a user name cannot contain control characters"
    return None


# -- options -------------------------------------------------------------------


def _check_hash(value):
    try:
        parse_hash(value)
    except ValueError as e:
        return str(e)
    return None


def _check_options(options, where):
    for user in options.users:
        problem = _check_user(user)
        if problem:
            raise where.child("users").child(user).error(problem)
    if options.password is not None:
        raise where.child("password").error(
            "plaintext passwords are not accepted; put a bcrypt hash in users = {name = \"$2y$...\"} "
            "(htpasswd -nB name) or use htpasswd_path"
        )
    if options.username is not None:
        raise where.child("username").error(
            "use users = {name = \"<bcrypt hash>\"} (htpasswd -nB name) or htpasswd_path"
        )
    if not options.users and not options.htpasswd_path:
        raise where.child("users").error("no users: set users = {name = \"<hash>\"} or htpasswd_path")


def _check_realm(value):
    if any(c in '"\\' or not (0x20 <= ord(c) < 0x7F) for c in value):
        return 'must be printable ASCII without " or \\'
    return None


OPTIONS = Schema(
    {
        "users": Field(MapOf(Str(check=_check_hash)), {}, doc="user name -> password hash"),
        "htpasswd_path": Field(Str(nonempty=True), None, doc="htpasswd-style file (user:hash lines)"),
        "realm": Field(Str(check=_check_realm), "harmony", doc="realm in WWW-Authenticate"),
        "cache_secs": Field(Int(min=0, max=86400), 60, doc="remember verified credentials (0: never)"),
        "forward_credentials": Field(Bool(), False, doc="pass the Authorization header on to the backend"),
        # Rust Harmony keys (plaintext): refused with a hint.
        "username": Field(Str(), None, doc="refused: use users"),
        "password": Field(Str(), None, doc="refused: plaintext"),
    },
    legacy={"token_path": "unused by basic_auth"},
    check=_check_options,
)


# -- the middleware ------------------------------------------------------------


@implementer(IMiddleware)
class BasicAuth:
    """
    The C{basic_auth} middleware; see the module docstring.

    @param context: a L{harmony.registry.BuildContext} (C{reactor}: its
        thread pool runs hash checks and its clock times the cache;
        C{config} resolves C{htpasswd_path}).
    @param run_in_thread: C{f(function, *args) -> Deferred} running slow
        hash checks (default: the reactor's thread pool; tests pass a
        synchronous runner).
    @raise ConfigError: an unreadable or bad htpasswd file (naming the line).
    """

    def __init__(self, name, options, context=None, run_in_thread=None):
        self.name = name
        self._context = context
        reactor = getattr(context, "reactor", None)
        self._seconds = reactor.seconds if reactor is not None else time.time
        if run_in_thread is None:
            if reactor is not None and hasattr(reactor, "getThreadPool"):

                def run_in_thread(f, *args):
                    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

            else:

                def run_in_thread(f, *args):
                    return defer.maybeDeferred(f, *args)

        self._run_in_thread = run_in_thread
        self._realm = options.realm
        self._cache_secs = options.cache_secs
        self._forward = options.forward_credentials
        self._cache = {}
        self._cache_key = os.urandom(32)
        users = {user: parse_hash(value) for user, value in options.users.items()}
        if options.htpasswd_path:
            users.update(self._load_htpasswd(options.htpasswd_path, users))
        if not users:
            raise self._error("htpasswd_path", f"{options.htpasswd_path!r} defines no users")
        self.users = users
        legacy = sorted(u for u, h in users.items() if h.kind == "sha1")
        if legacy:
            log.warn(
                "basic_auth {middleware}: {count} user(s) have legacy unsalted {{SHA}} password hashes; "
                "re-create them with bcrypt (htpasswd -B)",
                middleware=name,
                count=len(legacy),
            )
        # Unknown users are checked against the most expensive hash.
        self._dummy = max(users.values(), key=lambda h: h.cost)

    def _error(self, key, message):
        config = getattr(self._context, "config", None)
        entry = config.middleware.get(self.name) if config is not None else None
        return ConfigError(message, getattr(entry, "file", None), ("middleware", self.name, "options", key))

    def _load_htpasswd(self, path, known):
        config = getattr(self._context, "config", None)
        full = config.resolve_path(path) if config is not None else os.path.abspath(path)
        try:
            with open(full, "rb") as f:
                data = f.read()
        except OSError as e:
            raise self._error("htpasswd_path", f"cannot read {path!r}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise self._error("htpasswd_path", f"{path!r} line {line}: not UTF-8") from None
        try:
            entries = parse_htpasswd(text)
        except ValueError as e:
            raise self._error("htpasswd_path", f"{path!r} {e}") from None
        out = {}
        for number, user, parsed in entries:
            if user in known:
                raise self._error(
                    "htpasswd_path", f"{path!r} line {number}: user {user!r} is also defined in users"
                )
            out[user] = parsed
        return out

    # -- IMiddleware -----------------------------------------------------------

    def request(self, envelope):
        headers = envelope.details.headers
        user_bytes, password = self._credentials(headers)
        try:
            user = user_bytes.decode("utf-8")
        except UnicodeDecodeError:
            user = None
        stored = self.users.get(user) if user is not None else None
        cache_key = None
        if stored is not None and self._cache_secs:
            cache_key = hmac.new(self._cache_key, user_bytes + b"\0" + password, hashlib.sha256).digest()
            expires = self._cache.get(cache_key)
            if expires is not None:
                if expires > self._seconds():
                    return self._accept(envelope, user)
                del self._cache[cache_key]
        target = stored if stored is not None else self._dummy
        if target.slow:
            d = self._run_in_thread(target.verify, password)
            return d.addCallback(self._checked, envelope, user, stored is not None, cache_key)
        return self._checked(target.verify(password), envelope, user, stored is not None, cache_key)

    def response(self, envelope, response):
        return None

    # -- steps -----------------------------------------------------------------

    def _challenge(self):
        return [("WWW-Authenticate", f'Basic realm="{self._realm}", charset="UTF-8"')]

    def _reject(self, message, reason):
        log.info("basic_auth {middleware}: authentication failed: {reason}", middleware=self.name, reason=reason)
        return Unauthorized(message, headers=self._challenge())

    def _credentials(self, headers):
        values = headers.get_all("Authorization")
        if not values:
            raise Unauthorized("Authentication required", headers=self._challenge())
        if len(values) > 1:
            raise self._reject("Invalid credentials", "more than one Authorization header")
        scheme, _, encoded = values[0].strip().partition(" ")
        if scheme.lower() != "basic":
            raise Unauthorized("Authentication required", headers=self._challenge())
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise self._reject("Invalid credentials", "malformed Basic credentials") from None
        user, sep, password = decoded.partition(b":")
        if not sep:
            raise self._reject("Invalid credentials", "malformed Basic credentials")
        return user, password

    def _checked(self, ok, envelope, user, known, cache_key):
        if not (ok and known):
            raise self._reject("Invalid credentials", "bad user name or password")
        if cache_key is not None:
            if len(self._cache) >= CACHE_SIZE:
                now = self._seconds()
                for key in [k for k, exp in self._cache.items() if exp <= now]:
                    del self._cache[key]
                while len(self._cache) >= CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]
            self._cache[cache_key] = self._seconds() + self._cache_secs
        return self._accept(envelope, user)

    def _accept(self, envelope, user):
        metadata = envelope.metadata
        metadata[METADATA_USER] = user
        metadata["auth.user"] = user
        metadata["auth.method"] = "basic"
        if not self._forward:
            envelope.details.headers.remove("Authorization")
        return None


#: The C{basic_auth} middleware type (registered as a built-in; also
#: loadable as C{[middleware_types.basic_auth] module =
#: "harmony.middleware.basic_auth:MIDDLEWARE_TYPE"}).
MIDDLEWARE_TYPE = MiddlewareType("basic_auth", BasicAuth, options=OPTIONS)
