"""
Tests for L{harmony.middleware.basic_auth}: good, bad and missing
credentials for every accepted hash (bcrypt C{$2y$/$2b$/$2a$}, SHA-crypt
C{$5$/$6$}, C{{SHA}}), htpasswd parsing, the unknown-user path (a dummy
check of the same cost), the verified-credentials cache on a
C{task.Clock}, header values, configuration errors naming their key, and
whole requests through a gateway built from TOML.
"""

import base64
import hashlib
import json
import types
import warnings

import bcrypt
import pytest
from _deferreds import has_fired, result_of
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from _fakes import make_request
from harmony.config import ConfigError, load_config
from harmony.config.schema import Where
from harmony.errors import HarmonyError, Unauthorized
from harmony.gateway import build_gateway
from harmony.interfaces import IMiddleware, IMiddlewareType
from harmony.middleware.basic_auth import (
    MIDDLEWARE_TYPE,
    OPTIONS,
    BasicAuth,
    parse_hash,
    parse_htpasswd,
    sha_crypt,
)
from harmony.registry import BuildContext, builtin_registry

WHERE = ("middleware", "auth", "options")
CHALLENGE = 'Basic realm="harmony", charset="UTF-8"'


def bcrypt_hash(password, prefix="$2b$", cost=4):
    value = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(cost)).decode("ascii")
    return prefix + value[4:]


def sha1_hash(password):
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode("utf-8")).digest()).decode("ascii")


#: SHA-crypt vectors from U. Drepper's specification ("Hello world!").
SHA256_VECTOR = "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"
SHA512_VECTOR = (
    "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
)
SHA512_ROUNDS_VECTOR = (
    "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/"
    "YTBmSK6H9qs/y3RnOaw5v."
)
SHA256_ROUNDS_VECTOR = "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"


class SyncThreads:
    """
    Runs "threaded" checks synchronously and records them.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        self.calls.append(f)
        return defer.maybeDeferred(f, *args)


class HeldThreads:
    """
    Holds threaded checks until L{release}.
    """

    def __init__(self):
        self.pending = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.pending.append((d, f, args))
        return d

    def release(self):
        pending, self.pending = self.pending, []
        for d, f, args in pending:
            d.callback(f(*args))


def validate(data):
    return OPTIONS.validate(data, Where("test.toml", WHERE))


def config_error(data):
    with pytest.raises(ConfigError) as info:
        validate(data)
    return info.value


class FakeConfig:
    def __init__(self, base_dir):
        self.base_dir = str(base_dir)
        self.middleware = {"auth": types.SimpleNamespace(file="pipelines/auth.toml")}

    def resolve_path(self, path):
        import os

        return os.path.normpath(os.path.join(self.base_dir, path))


def make(data, clock=None, threads=None, config=None):
    clock = clock or Clock()
    threads = threads if threads is not None else SyncThreads()
    context = BuildContext(reactor=clock, config=config)
    return BasicAuth("auth", validate(data), context, run_in_thread=threads)


def basic(user, password, headers=()):
    raw = user.encode("utf-8") + b":" + password.encode("utf-8")
    return make_request(headers=[("Authorization", "Basic " + base64.b64encode(raw).decode("ascii")), *headers])


def run(mw, envelope):
    try:
        result = mw.request(envelope)
    except HarmonyError as e:
        return e
    if isinstance(result, defer.Deferred):
        box = []
        result.addBoth(box.append)
        assert box, "the request hook has not finished"
        value = getattr(box[0], "value", box[0])
        if isinstance(value, HarmonyError):
            return value
        if hasattr(box[0], "raiseException"):
            box[0].raiseException()
        return value
    return result


def rejected(error, message="Invalid credentials"):
    assert isinstance(error, Unauthorized), error
    assert error.status == 401
    assert dict(error.headers)["WWW-Authenticate"] == CHALLENGE
    assert error.message == message
    return error


@pytest.fixture(scope="module")
def hashes():
    return {
        "bcrypt_b": bcrypt_hash("pw-b"),
        "bcrypt_y": bcrypt_hash("pw-y", "$2y$"),
        "bcrypt_a": bcrypt_hash("pw-a", "$2a$"),
        "sha1": sha1_hash("pw-sha1"),
    }


# -- hashes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, password",
    [
        (SHA256_VECTOR, b"Hello world!"),
        (SHA512_VECTOR, b"Hello world!"),
        (SHA256_ROUNDS_VECTOR, b"Hello world!"),
        (SHA512_ROUNDS_VECTOR, b"Hello world!"),
    ],
)
def test_sha_crypt_vectors(value, password):
    parsed = parse_hash(value)
    assert parsed.kind == "sha-crypt"
    assert parsed.verify(password)
    assert not parsed.verify(password + b"!")
    assert not parsed.verify(b"")


def test_sha_crypt_matches_the_crypt_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        crypt = pytest.importorskip("crypt")
    for variant in "56":
        for password in ("", "a", "x" * 33, "y" * 65, "pässwörd", "z" * 200):
            for salt in ("", "ab", "0123456789abcdef"):
                for rounds in (None, 1000, 1234):
                    setting = f"${variant}$" + (f"rounds={rounds}$" if rounds else "") + salt
                    expected = crypt.crypt(password, setting)
                    assert parse_hash(expected).verify(password.encode("utf-8")), expected


def test_sha_crypt_function():
    assert sha_crypt(b"Hello world!", b"saltstring", 5000, "5") == SHA256_VECTOR.rsplit("$", 1)[1]


@pytest.mark.parametrize("key", ["bcrypt_b", "bcrypt_y", "bcrypt_a"])
def test_bcrypt_variants(hashes, key):
    parsed = parse_hash(hashes[key])
    assert parsed.kind == "bcrypt"
    assert parsed.slow
    assert parsed.verify(("pw-" + key[-1]).encode())
    assert not parsed.verify(b"wrong")


def test_bcrypt_uses_first_72_bytes():
    password = "p" * 72
    parsed = parse_hash(bcrypt_hash(password))
    assert parsed.verify(password.encode() + b"ignored")


def test_sha1(hashes):
    parsed = parse_hash(hashes["sha1"])
    assert parsed.kind == "sha1"
    assert not parsed.slow
    assert parsed.verify(b"pw-sha1")
    assert not parsed.verify(b"pw-sha2")


@pytest.mark.parametrize(
    "value, message",
    [
        ("secret", "plaintext or unrecognised"),
        ("abJnggxhB/yWI", "plaintext or unrecognised"),  # DES crypt
        ("$apr1$salt$abcdefghijklmnopqrstuv", "Apache MD5"),
        ("$1$salt$abcdefghijklmnopqrstuv", "MD5-crypt"),
        ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", "argon2"),
        ("$y$j9T$salt$hash", "yescrypt"),
        ("$2b$04$tooshort", "malformed bcrypt"),
        ("$2b$99$" + "a" * 53, "cost 99 is out of range"),
        ("$5$salt$tooshort", "malformed $5$ hash"),
        ("$6$rounds=5000000$salt$" + "a" * 86, "rounds=5000000 is above"),
        ("{SHA}notbase64!!", "malformed {SHA}"),
        ("{SHA}" + base64.b64encode(b"short").decode(), "malformed {SHA}"),
        ("", "empty"),
    ],
)
def test_refused_hashes(value, message):
    with pytest.raises(ValueError) as info:
        parse_hash(value)
    assert message in str(info.value)
    if value and len(value) > 8:
        assert value not in str(info.value), "the value is never echoed"


# -- requests -------------------------------------------------------------------


@pytest.fixture
def users(hashes):
    return {
        "alice": hashes["bcrypt_b"],
        "yves": hashes["bcrypt_y"],
        "anna": hashes["bcrypt_a"],
        "sam": hashes["sha1"],
        "sha5": SHA256_VECTOR,
        "sha6": SHA512_VECTOR,
    }


@pytest.mark.parametrize(
    "user, password",
    [
        ("alice", "pw-b"),
        ("yves", "pw-y"),
        ("anna", "pw-a"),
        ("sam", "pw-sha1"),
        ("sha5", "Hello world!"),
        ("sha6", "Hello world!"),
    ],
)
def test_good_credentials(users, user, password):
    mw = make({"users": users})
    envelope = basic(user, password, headers=[("X-Other", "1")])
    assert run(mw, envelope) is None
    assert envelope.metadata["basic.user"] == user
    assert envelope.metadata["auth.user"] == user
    assert envelope.metadata["auth.method"] == "basic"
    # The gateway's credentials are not passed on by default.
    assert "Authorization" not in envelope.details.headers
    assert envelope.details.headers.get("X-Other") == "1"


@pytest.mark.parametrize("user", ["alice", "yves", "anna", "sam", "sha5", "sha6"])
def test_bad_password(users, user):
    mw = make({"users": users})
    envelope = basic(user, "wrong")
    rejected(run(mw, envelope))
    assert "basic.user" not in envelope.metadata


def test_forward_credentials(users):
    mw = make({"users": users, "forward_credentials": True})
    envelope = basic("alice", "pw-b")
    assert run(mw, envelope) is None
    assert envelope.details.headers.get("Authorization").startswith("Basic ")


def test_provides_interfaces(users):
    verifyObject(IMiddlewareType, MIDDLEWARE_TYPE)
    assert MIDDLEWARE_TYPE.name == "basic_auth"
    verifyObject(IMiddleware, make({"users": users}))


def test_missing_credentials(users):
    mw = make({"users": users})
    error = rejected(run(mw, make_request()), "Authentication required")
    assert dict(error.headers) == {"WWW-Authenticate": CHALLENGE}


def test_other_scheme_is_missing_credentials(users):
    mw = make({"users": users})
    rejected(run(mw, make_request(headers=[("Authorization", "Bearer a.b.c")])), "Authentication required")


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "Basic !!!notbase64")],
        [("Authorization", "Basic " + base64.b64encode(b"no-colon").decode())],
        [("Authorization", "Basic")],
        [("Authorization", "Basic " + base64.b64encode(b"alice:pw-b").decode())] * 2,
    ],
)
def test_malformed_credentials(users, headers):
    mw = make({"users": users})
    rejected(run(mw, make_request(headers=headers)))


def test_scheme_case_and_utf8(hashes):
    mw = make({"users": {"zoë": bcrypt_hash("pässwörd")}})
    raw = base64.b64encode("zoë:pässwörd".encode("utf-8")).decode()
    envelope = make_request(headers=[("authorization", f"bAsIc  {raw} ")])
    assert run(mw, envelope) is None
    assert envelope.metadata["basic.user"] == "zoë"


def test_password_with_colons(hashes):
    mw = make({"users": {"u": bcrypt_hash("a:b:c")}})
    assert run(mw, basic("u", "a:b:c")) is None


def test_custom_realm(users):
    mw = make({"users": users, "realm": "PACS gateway"})
    error = run(mw, make_request())
    assert dict(error.headers)["WWW-Authenticate"] == 'Basic realm="PACS gateway", charset="UTF-8"'


def test_unknown_user_runs_a_dummy_check_of_the_highest_cost():
    fast = bcrypt_hash("a", cost=4)
    slow = bcrypt_hash("b", cost=5)
    threads = SyncThreads()
    mw = make({"users": {"fast": fast, "slow": slow, "legacy": sha1_hash("c")}}, threads=threads)
    assert mw._dummy.value == slow
    rejected(run(mw, basic("nobody", "b")))
    # The check ran (in the thread pool) against the dummy, and failed even
    # though the password is the dummy user's.
    assert threads.calls == [mw._dummy.verify]
    rejected(run(mw, basic("nobody", "x")))
    assert len(threads.calls) == 2


def test_unknown_user_with_bad_utf8_runs_the_dummy_check(users):
    threads = SyncThreads()
    mw = make({"users": users}, threads=threads)
    raw = base64.b64encode(b"\xff\xfe:pw").decode()
    rejected(run(mw, make_request(headers=[("Authorization", "Basic " + raw)])))
    assert len(threads.calls) == 1


def test_known_and_unknown_users_take_the_same_path():
    threads = HeldThreads()
    mw = make({"users": {"alice": bcrypt_hash("pw")}}, threads=threads)
    d_known = mw.request(basic("alice", "wrong"))
    d_unknown = mw.request(basic("mallory", "wrong"))
    assert not has_fired(d_known) and not has_fired(d_unknown), "both wait for a hash check"
    assert len(threads.pending) == 2
    threads.release()
    box = []
    d_known.addErrback(box.append)
    d_unknown.addErrback(box.append)
    assert [f.value.message for f in box] == ["Invalid credentials", "Invalid credentials"]


def test_sha1_checks_stay_on_the_reactor_thread(hashes):
    threads = SyncThreads()
    mw = make({"users": {"sam": hashes["sha1"]}}, threads=threads)
    assert mw.request(basic("sam", "pw-sha1")) is None
    rejected(run(mw, basic("nobody", "x")))
    assert threads.calls == []


def test_verified_credentials_are_cached():
    clock = Clock()
    threads = SyncThreads()
    mw = make({"users": {"alice": bcrypt_hash("pw")}, "cache_secs": 60}, clock=clock, threads=threads)
    assert run(mw, basic("alice", "pw")) is None
    assert len(threads.calls) == 1
    envelope = basic("alice", "pw")
    assert mw.request(envelope) is None, "answered from the cache, synchronously"
    assert envelope.metadata["basic.user"] == "alice"
    assert len(threads.calls) == 1
    # A wrong password is never answered from the cache.
    rejected(run(mw, basic("alice", "pw2")))
    assert len(threads.calls) == 2
    clock.advance(60)
    assert run(mw, basic("alice", "pw")) is None
    assert len(threads.calls) == 3
    # The cache holds no password or user name in clear.
    assert all(b"pw" not in k and b"alice" not in k for k in mw._cache)


def test_cache_disabled():
    threads = SyncThreads()
    mw = make({"users": {"alice": bcrypt_hash("pw")}, "cache_secs": 0}, threads=threads)
    run(mw, basic("alice", "pw"))
    run(mw, basic("alice", "pw"))
    assert len(threads.calls) == 2
    assert mw._cache == {}


def test_cache_is_bounded(monkeypatch):
    from harmony.middleware import basic_auth

    monkeypatch.setattr(basic_auth, "CACHE_SIZE", 3)
    users = {f"u{i}": sha1_hash(f"p{i}") for i in range(5)}
    mw = make({"users": users})
    for i in range(5):
        assert run(mw, basic(f"u{i}", f"p{i}")) is None
    assert len(mw._cache) == 3


def test_default_runner_uses_the_reactor_thread_pool(users):
    class ReactorWithPool(Clock):
        def __init__(self):
            super().__init__()
            self.pool = types.SimpleNamespace(calls=[])
            self.pool.callInThreadWithCallback = lambda cb, f, *a, **kw: self.pool.calls.append((cb, f, a))

        def getThreadPool(self):
            return self.pool

        def callFromThread(self, f, *args, **kwargs):
            f(*args, **kwargs)

    reactor = ReactorWithPool()
    mw = BasicAuth("auth", validate({"users": users}), BuildContext(reactor=reactor))
    d = mw.request(basic("alice", "pw-b"))
    assert len(reactor.pool.calls) == 1
    callback, f, args = reactor.pool.calls[0]
    callback(True, f(*args))
    assert result_of(d) is None


def test_failures_never_log_credentials(users):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        mw = make({"users": users})
        run(mw, basic("alice", "hunter2-secret"))
        run(mw, basic("hunter3-in-user-field", "x"))
        run(mw, make_request(headers=[("Authorization", "Basic !!!hunter4")]))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events
    text = " ".join(formatEvent(e) + repr(e) for e in events)
    for secret in ("hunter2", "hunter3", "hunter4", "alice"):
        assert secret not in text


# -- htpasswd files -----------------------------------------------------------------


def test_parse_htpasswd(hashes):
    text = (
        "# users of the gateway\n"
        "\n"
        f"alice:{hashes['bcrypt_b']}\n"
        "   # indented comment\n"
        f"sam:{hashes['sha1']}:a trailing comment\r\n"
        f"sha6:{SHA512_VECTOR}\n"
        "   \n"
    )
    entries = parse_htpasswd(text)
    assert [(n, u, h.kind) for n, u, h in entries] == [(3, "alice", "bcrypt"), (5, "sam", "sha1"), (6, "sha6", "sha-crypt")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("# c\nalice\n", "line 2: expected user:hash"),
        ("\n\n:$2b$04$" + "a" * 53 + "\n", "line 3: empty user name"),
        ("bob:plaintext\n", "line 1: user 'bob': plaintext or unrecognised password hash"),
        ("bob:$apr1$x$y\n", "line 1: user 'bob': unsupported password hash scheme Apache MD5"),
        ("a:{SHA}" + "A" * 27 + "=\n#\na:{SHA}" + "A" * 27 + "=\n", "line 3: user 'a' is already defined on line 1"),
    ],
)
def test_bad_htpasswd_lines(text, message):
    with pytest.raises(ValueError) as info:
        parse_htpasswd(text)
    assert str(info.value).startswith(message), str(info.value)
    assert "plaintext\n" not in str(info.value)


def test_htpasswd_file(tmp_path, hashes):
    (tmp_path / "users.htpasswd").write_text(f"# gateway users\nalice:{hashes['bcrypt_y']}\n\nsam:{hashes['sha1']}\n")
    mw = make({"htpasswd_path": "users.htpasswd", "users": {"cfg": hashes["bcrypt_b"]}}, config=FakeConfig(tmp_path))
    assert sorted(mw.users) == ["alice", "cfg", "sam"]
    assert run(mw, basic("alice", "pw-y")) is None
    assert run(mw, basic("cfg", "pw-b")) is None
    rejected(run(mw, basic("alice", "pw-b")))


def build_error(tmp_path, content, data=None):
    if content is not None:
        (tmp_path / "users.htpasswd").write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ConfigError) as info:
        make(data or {"htpasswd_path": "users.htpasswd"}, config=FakeConfig(tmp_path))
    error = info.value
    assert error.file == "pipelines/auth.toml"
    assert error.key == "middleware.auth.options.htpasswd_path"
    return error.message


def test_htpasswd_errors_name_the_line(tmp_path, hashes):
    message = build_error(tmp_path, f"# c\nalice:{hashes['bcrypt_b']}\nbob:letmein\n")
    assert message == (
        "'users.htpasswd' line 3: user 'bob': plaintext or unrecognised password hash; "
        "use bcrypt (htpasswd -nB user)"
    )
    assert "letmein" not in message


def test_htpasswd_missing_file(tmp_path):
    assert build_error(tmp_path, None).startswith("cannot read 'users.htpasswd'")


def test_htpasswd_not_utf8(tmp_path, hashes):
    assert build_error(tmp_path, f"alice:{hashes['bcrypt_b']}\n".encode() + b"\xff:x\n") == (
        "'users.htpasswd' line 2: not UTF-8"
    )


def test_htpasswd_empty(tmp_path):
    assert build_error(tmp_path, "# nobody yet\n") == "'users.htpasswd' defines no users"


def test_htpasswd_user_also_in_config(tmp_path, hashes):
    message = build_error(
        tmp_path,
        f"alice:{hashes['bcrypt_b']}\n",
        {"htpasswd_path": "users.htpasswd", "users": {"alice": hashes["sha1"]}},
    )
    assert message == "'users.htpasswd' line 1: user 'alice' is also defined in users"


def test_sha1_users_warn_at_startup(hashes):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        make({"users": {"sam": hashes["sha1"], "alice": hashes["bcrypt_b"]}})
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events if e.get("log_namespace") == "harmony.middleware.basic_auth"]
    assert any("1 user(s) have legacy unsalted {SHA} password hashes" in t for t in texts), texts


# -- configuration ------------------------------------------------------------------


def test_defaults(hashes):
    options = validate({"users": {"a": hashes["bcrypt_b"]}})
    assert options.realm == "harmony"
    assert options.cache_secs == 60
    assert options.forward_credentials is False
    assert options.htpasswd_path is None


@pytest.mark.parametrize(
    "data, key, message",
    [
        ({}, "users", "no users"),
        ({"users": {}}, "users", "no users"),
        ({"users": {"bob": "letmein"}}, "users.bob", "plaintext or unrecognised"),
        ({"users": {"bob": "$apr1$a$b"}}, "users.bob", "Apache MD5"),
        ({"users": {"bob": 5}}, "users.bob", "expected string"),
        ({"users": {"a:b": "{SHA}" + "A" * 27 + "="}}, "users.a:b", "cannot contain ':'"),
        ({"users": "bob"}, "users", "expected table"),
        ({"username": "u1", "password": "p1"}, "password", "plaintext passwords are not accepted"),
        ({"username": "u1"}, "username", "use users"),
        ({"htpasswd_path": ""}, "htpasswd_path", "must not be empty"),
        ({"htpasswd_path": "x", "realm": 'a"b'}, "realm", "without"),
        ({"htpasswd_path": "x", "cache_secs": -1}, "cache_secs", "at least 0"),
        ({"htpasswd_path": "x", "user": {}}, "user", 'did you mean "users"'),
    ],
)
def test_option_errors_name_the_key(data, key, message):
    error = config_error(data)
    assert error.key == ".".join(WHERE + (key,)), str(error)
    assert message in error.message, str(error)
    assert "letmein" not in str(error)


def test_legacy_token_path_warns():
    where = Where("test.toml", WHERE)
    OPTIONS.validate({"htpasswd_path": "x", "token_path": ""}, where)
    assert any("token_path: deprecated legacy key" in w for w in where.warnings)


# -- through a gateway built from TOML -------------------------------------------------


GATEWAY_TOML = """
[proxy]
id = "unit"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 8080

[middleware_types.basic_auth]
module = "harmony.middleware.basic_auth:MIDDLEWARE_TYPE"

[middleware.auth]
type = "basic_auth"
[middleware.auth.options]
htpasswd_path = "users.htpasswd"
realm = "unit"

[pipelines.echo]
networks = ["default"]
endpoints = ["echo"]
middleware = ["auth"]
backends = ["echo"]

[endpoints.echo]
service = "echo"
[endpoints.echo.options]
path_prefix = "/echo"

[backends.echo]
service = "echo"
"""


def test_whole_requests_through_a_gateway(tmp_path, hashes):
    (tmp_path / "harmony.toml").write_text(GATEWAY_TOML)
    (tmp_path / "users.htpasswd").write_text(f"alice:{hashes['bcrypt_b']}\n")
    registry = builtin_registry()
    config = load_config(str(tmp_path / "harmony.toml"), registry, environ={})
    # A Clock has no thread pool: checks run inline.
    gateway = build_gateway(config, registry, BuildContext(reactor=Clock(), config=config))
    stub = StubTreq(gateway.apps["default"].resource())

    def get(headers):
        d = stub.request("GET", "http://gw.test/echo/x", headers=headers)
        stub.flush()
        response = result_of(d)
        body = stub.content(response)
        stub.flush()
        return response, json.loads(result_of(body))

    response, body = get({})
    assert response.code == 401
    assert response.headers.getRawHeaders("WWW-Authenticate") == ['Basic realm="unit", charset="UTF-8"']
    assert body == {"error": "unauthorized", "message": "Authentication required"}
    bad = base64.b64encode(b"alice:nope").decode()
    response, body = get({"Authorization": f"Basic {bad}"})
    assert response.code == 401
    assert body["message"] == "Invalid credentials"
    good = base64.b64encode(b"alice:pw-b").decode()
    response, body = get({"Authorization": f"Basic {good}"})
    assert response.code == 200
    assert body["metadata"]["basic.user"] == "alice"
    assert "authorization" not in body["headers"]


def test_bad_htpasswd_is_a_startup_error(tmp_path):
    (tmp_path / "harmony.toml").write_text(GATEWAY_TOML)
    (tmp_path / "users.htpasswd").write_text("# users\nalice:secret\n")
    registry = builtin_registry()
    config = load_config(str(tmp_path / "harmony.toml"), registry, environ={})
    with pytest.raises(ConfigError) as info:
        build_gateway(config, registry, BuildContext(reactor=Clock(), config=config))
    assert str(info.value) == (
        "harmony.toml: middleware.auth.options.htpasswd_path: 'users.htpasswd' line 2: user 'alice': "
        "plaintext or unrecognised password hash; use bcrypt (htpasswd -nB user)"
    )
