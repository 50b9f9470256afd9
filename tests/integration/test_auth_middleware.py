"""
The C{jwt_auth} and C{basic_auth} middleware end to end: a real C{twistd
harmony} with echo-backed pipelines protected by JWT (HS256 with the
secret from the environment; RS256 with a public key file and a scope
rule) and by Basic authentication (an htpasswd file with bcrypt and
C{{SHA}} users).

The types are loaded with C{[middleware_types.<type>] module = ...} (the
third-party form), so these tests do not depend on the built-in registry
listing them; once it does, those two tables are redundant but harmless.
"""

import base64
import hashlib
import hmac
import json
import time

import bcrypt
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harmonytest import base_config, free_port, request, run_twistd, start_harmony, write_config

HS_SECRET = "integration-test-secret-0123456789abcdef"
AUDIENCE = "harmony-it"
ISSUER = "https://idp.harmony.test"

TYPES = """
[middleware_types.jwt_auth]
module = "harmony.middleware.jwt_auth:MIDDLEWARE_TYPE"

[middleware_types.basic_auth]
module = "harmony.middleware.basic_auth:MIDDLEWARE_TYPE"
"""

PIPELINES = """
[middleware.hs_auth]
type = "jwtauth"
[middleware.hs_auth.options]
algorithm = "HS256"
secret_env = "HARMONY_IT_JWT_SECRET"
issuer = "{issuer}"
audience = "{audience}"

[middleware.rs_auth]
type = "jwt_auth"
[middleware.rs_auth.options]
algorithm = "RS256"
public_key_path = "keys/rs256.pem"
audience = ["other", "{audience}"]
realm = "rs"
forward_credentials = false
routes = [{{path_prefix = "/rs", methods = ["POST", "PUT", "PATCH", "DELETE"], scopes = ["write"]}}]

[middleware.basic]
type = "basic_auth"
[middleware.basic.options]
htpasswd_path = "users.htpasswd"
realm = "Harmony IT"

[pipelines.hs]
networks = ["default"]
endpoints = ["hs"]
middleware = ["hs_auth"]
backends = ["echo"]

[pipelines.rs]
networks = ["default"]
endpoints = ["rs"]
middleware = ["rs_auth"]
backends = ["echo"]

[pipelines.basic]
networks = ["default"]
endpoints = ["basic"]
middleware = ["basic"]
backends = ["echo"]

[pipelines.open]
networks = ["default"]
endpoints = ["open"]
backends = ["echo"]

[endpoints.hs]
service = "http"
[endpoints.hs.options]
path_prefix = "/hs"

[endpoints.rs]
service = "http"
[endpoints.rs.options]
path_prefix = "/rs"

[endpoints.basic]
service = "http"
[endpoints.basic.options]
path_prefix = "/basic"

[endpoints.open]
service = "http"
[endpoints.open.options]
path_prefix = "/open"

[backends.echo]
service = "echo"
"""


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims(**extra):
    now = int(time.time())
    data = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    data.update(extra)
    return data


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    directory = tmp_path_factory.mktemp("auth")
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (directory / "keys").mkdir()
    (directory / "keys" / "rs256.pem").write_bytes(public_pem)
    sha1 = base64.b64encode(hashlib.sha1(b"legacy-pw").digest()).decode()
    (directory / "users.htpasswd").write_text(
        "# Harmony integration test users\n"
        "\n"
        f"alice:{bcrypt.hashpw(b'wonderland', bcrypt.gensalt(5)).decode()}\n"
        f"legacy:{{SHA}}{sha1}\n"
    )
    port = free_port()
    config = write_config(
        directory,
        base_config(port),
        {"00-types": TYPES, "10-auth": PIPELINES.format(issuer=ISSUER, audience=AUDIENCE)},
    )
    proc = start_harmony(directory, config, port, env={"HARMONY_IT_JWT_SECRET": HS_SECRET})
    gw = type("Gateway", (), {})()
    gw.port, gw.process, gw.private, gw.public_pem, gw.sent = port, proc, private, public_pem, []
    yield gw
    proc.stop_cleanly()
    out = proc.output()
    for secret in gw.sent:
        assert secret not in out, "a credential reached the log"
    assert "legacy unsalted {SHA} password hashes" in out


def get(gw, path, authorization=None, method="GET", body=None):
    headers = []
    if authorization is not None:
        headers.append(("Authorization", authorization))
        credential = authorization.split(" ", 1)[-1]
        if len(credential) >= 12:
            gw.sent.append(credential)
    return request(gw.port, method, path, body=body, headers=headers)


def echo(resp):
    assert resp.status == 200, resp
    return resp.json()


def assert_challenge(resp, status, expected):
    assert resp.status == status, resp
    assert resp.all("WWW-Authenticate") == [expected], resp
    assert resp.header("Content-Type") == "application/json"
    return resp.json()


# -- jwt_auth, HS256 --------------------------------------------------------------------


def test_hs256_without_token(gateway):
    body = assert_challenge(get(gateway, "/hs/Patient/1"), 401, 'Bearer realm="harmony"')
    assert body == {"error": "unauthorized", "message": "Authentication required"}


def test_hs256_valid_token(gateway):
    token = jwt.encode(claims(scope="patient/*.read"), HS_SECRET, algorithm="HS256")
    data = echo(get(gateway, "/hs/Patient/1", f"Bearer {token}"))
    assert data["path"] == "Patient/1"
    assert data["metadata"]["jwt.sub"] == "alice"
    assert data["metadata"]["jwt.iss"] == ISSUER
    assert data["metadata"]["auth.method"] == "jwt"
    assert json.loads(data["metadata"]["jwt.claims"])["scope"] == "patient/*.read"
    # The token is forwarded by default.
    assert data["headers"]["authorization"] == f"Bearer {token}"


@pytest.mark.parametrize(
    "make_claims, secret, description",
    [
        (lambda: claims(exp=int(time.time()) - 3600), HS_SECRET, "The token has expired"),
        (lambda: claims(nbf=int(time.time()) + 3600), HS_SECRET, "The token is not valid yet"),
        (lambda: claims(iss="https://evil.test"), HS_SECRET, "The token issuer is not accepted"),
        (lambda: claims(aud="someone-else"), HS_SECRET, "The token audience is not accepted"),
        (claims, "another-secret-that-is-long-enough!!", "The token signature is invalid"),
    ],
)
def test_hs256_bad_tokens(gateway, make_claims, secret, description):
    token = jwt.encode(make_claims(), secret, algorithm="HS256")
    body = assert_challenge(
        get(gateway, "/hs/x", f"Bearer {token}"),
        401,
        f'Bearer realm="harmony", error="invalid_token", error_description="{description}"',
    )
    assert body == {"error": "unauthorized", "message": description}


def test_malformed_authorization(gateway):
    assert_challenge(
        get(gateway, "/hs/x", "Bearer"),
        400,
        'Bearer realm="harmony", error="invalid_request", error_description="The Bearer token is missing"',
    )
    assert_challenge(
        get(gateway, "/hs/x", "Bearer not-a-jwt"),
        401,
        'Bearer realm="harmony", error="invalid_token", error_description="The token is malformed"',
    )


def test_alg_none(gateway):
    header = b64url(b'{"alg":"none","typ":"JWT"}')
    unsigned = f"{header}.{b64url(json.dumps(claims()).encode())}."
    assert_challenge(
        get(gateway, "/hs/x", f"Bearer {unsigned}"),
        401,
        'Bearer realm="harmony", error="invalid_token", error_description="The token algorithm is not accepted"',
    )


# -- jwt_auth, RS256 --------------------------------------------------------------------


def test_rs256_valid_token(gateway):
    token = jwt.encode(claims(sub="bob"), gateway.private, algorithm="RS256")
    data = echo(get(gateway, "/rs/Observation", f"Bearer {token}"))
    assert data["metadata"]["jwt.sub"] == "bob"
    # forward_credentials = false: the backend does not see the token.
    assert "authorization" not in data["headers"]


def test_rs256_without_token(gateway):
    assert_challenge(get(gateway, "/rs/Observation"), 401, 'Bearer realm="rs"')


def test_rs256_rejects_hs256_token_signed_with_the_public_key(gateway):
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    payload = b64url(json.dumps(claims()).encode())
    signature = hmac.new(gateway.public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{b64url(signature)}"
    assert_challenge(
        get(gateway, "/rs/x", f"Bearer {forged}"),
        401,
        'Bearer realm="rs", error="invalid_token", error_description="The token algorithm is not accepted"',
    )


def test_rs256_rejects_hs256_token(gateway):
    token = jwt.encode(claims(), HS_SECRET, algorithm="HS256")
    resp = get(gateway, "/rs/x", f"Bearer {token}")
    assert resp.status == 401
    assert 'error="invalid_token"' in resp.header("WWW-Authenticate")


def test_rs256_scope_rule(gateway):
    reader = jwt.encode(claims(scope="read"), gateway.private, algorithm="RS256")
    writer = jwt.encode(claims(scope="read write"), gateway.private, algorithm="RS256")
    echo(get(gateway, "/rs/Observation", f"Bearer {reader}"))
    body = assert_challenge(
        get(gateway, "/rs/Observation", f"Bearer {reader}", method="POST", body=b"{}"),
        403,
        'Bearer realm="rs", error="insufficient_scope", '
        'error_description="The token lacks the scope(s): write", scope="write"',
    )
    assert body == {"error": "forbidden", "message": "The token lacks the scope(s): write"}
    data = echo(get(gateway, "/rs/Observation", f"Bearer {writer}", method="POST", body=b"{}"))
    assert data["method"] == "POST"


# -- basic_auth -------------------------------------------------------------------------


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_without_credentials(gateway):
    body = assert_challenge(get(gateway, "/basic/x"), 401, 'Basic realm="Harmony IT", charset="UTF-8"')
    assert body == {"error": "unauthorized", "message": "Authentication required"}


@pytest.mark.parametrize(
    "user, password", [("alice", "wrong"), ("nobody", "wonderland"), ("legacy", "wonderland"), ("", "")]
)
def test_basic_bad_credentials(gateway, user, password):
    body = assert_challenge(
        get(gateway, "/basic/x", basic(user, password)), 401, 'Basic realm="Harmony IT", charset="UTF-8"'
    )
    assert body == {"error": "unauthorized", "message": "Invalid credentials"}


@pytest.mark.parametrize("user, password", [("alice", "wonderland"), ("legacy", "legacy-pw")])
def test_basic_good_credentials(gateway, user, password):
    for _ in range(2):  # the second time from the verified-credentials cache
        data = echo(get(gateway, "/basic/x?y=1", basic(user, password)))
        assert data["metadata"]["basic.user"] == user
        assert data["metadata"]["auth.user"] == user
        assert data["query"] == {"y": ["1"]}
        # The gateway's credentials are not passed on.
        assert "authorization" not in data["headers"]


def test_unprotected_pipeline_still_open(gateway):
    data = echo(get(gateway, "/open/x"))
    assert "jwt.sub" not in data.get("metadata", {})


# -- startup errors ---------------------------------------------------------------------


def _startup_error(tmp_path, middleware):
    pipeline = (
        TYPES
        + middleware
        + """
[pipelines.p]
networks = ["default"]
endpoints = ["p"]
middleware = ["auth"]
backends = ["echo"]

[endpoints.p]
service = "http"
[endpoints.p.options]
path_prefix = "/p"

[backends.echo]
service = "echo"
"""
    )
    config = write_config(tmp_path, base_config(free_port()), {"auth": pipeline})
    result = run_twistd(tmp_path, config)
    assert result.returncode != 0, result
    return result.stdout + result.stderr


def test_jwt_without_key_does_not_start(tmp_path):
    out = _startup_error(tmp_path, '[middleware.auth]\ntype = "jwt_auth"\n[middleware.auth.options]\nalgorithm = "HS256"\n')
    assert "auth.toml: middleware.auth.options.secret: required for HS256" in out, out
    assert "there is no default secret" in out, out


def test_basic_with_plaintext_htpasswd_does_not_start(tmp_path):
    (tmp_path / "users.htpasswd").write_text("# users\nalice:wonderland\n")
    out = _startup_error(
        tmp_path, '[middleware.auth]\ntype = "basic_auth"\n[middleware.auth.options]\nhtpasswd_path = "users.htpasswd"\n'
    )
    assert "middleware.auth.options.htpasswd_path: 'users.htpasswd' line 2: user 'alice'" in out, out
    assert "plaintext" in out
    assert "wonderland" not in out
