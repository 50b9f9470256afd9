"""
Tests for L{harmony.middleware.jwt_auth}: token verification for every
pinned algorithm (keys generated here), time claims against a
C{task.Clock}, issuer/audience/required claims, algorithm confusion
(C{alg=none}, HS256 signed with the RSA public key), JWKS fetching,
caching and key rotation over C{StubTreq}, header parsing, scopes and
per-route rules, C{WWW-Authenticate} values, configuration errors naming
their key, and whole requests through a gateway built from TOML.
"""

import base64
import hashlib
import hmac
import json
import os
import types

import jwt
import pytest
from _deferreds import failure_of, has_fired, result_of
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from _fakes import make_request
from harmony.config import ConfigError, load_config
from harmony.config.schema import Where
from harmony.endpoints.http import render_json_error
from harmony.errors import BadRequest, Forbidden, HarmonyError, ServiceUnavailable, Unauthorized
from harmony.gateway import build_gateway
from harmony.interfaces import IMiddleware, IMiddlewareType
from harmony.middleware import jwt_auth
from harmony.middleware.jwt_auth import (
    MIDDLEWARE_TYPE,
    OPTIONS,
    JwtAuth,
    claims_of,
)
from harmony.registry import BuildContext, Registry, builtin_registry

NOW = 1_700_000_000
SECRET = "s" * 32
JWKS_URL = "https://idp.test/.well-known/jwks.json"


# -- keys and tokens ------------------------------------------------------------


def _pem_public(private):
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def keys():
    return types.SimpleNamespace(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa2=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        p256=ec.generate_private_key(ec.SECP256R1()),
        p384=ec.generate_private_key(ec.SECP384R1()),
    )


def claims(**extra):
    base = {"sub": "user-1", "iat": NOW, "exp": NOW + 300}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def token(key, alg="RS256", headers=None, **extra):
    return jwt.encode(claims(**extra), key, algorithm=alg, headers=headers)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_token(header, payload, signature=b""):
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}.{b64url(signature)}"


def hmac_token(secret_bytes, payload, alg="HS256"):
    header = {"alg": alg, "typ": "JWT"}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    digest = hmac.new(secret_bytes, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(digest)}"


def jwk(private, kid, alg="RS256", **extra):
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    else:
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    data.update({"kid": kid, "use": "sig", "alg": alg})
    data.update(extra)
    return data


# -- building -------------------------------------------------------------------


WHERE = ("middleware", "auth", "options")


def validate(data):
    return OPTIONS.validate(data, Where("test.toml", WHERE))


def config_error(data):
    with pytest.raises(ConfigError) as info:
        validate(data)
    return info.value


class FakeConfig:
    """
    What the factory reads from a L{harmony.config.HarmonyConfig}.
    """

    def __init__(self, base_dir):
        self.base_dir = str(base_dir)
        self.middleware = {"auth": types.SimpleNamespace(file="pipelines/auth.toml")}

    def resolve_path(self, path):
        return os.path.normpath(os.path.join(self.base_dir, path))


def make(data, clock=None, http_client=None, config=None, environ=None):
    clock = clock or new_clock()
    context = BuildContext(reactor=clock, http_client=http_client, config=config)
    return JwtAuth("auth", validate(data), context, environ=environ)


def new_clock():
    clock = Clock()
    clock.advance(NOW)
    return clock


def write_pem(tmp_path, private, name="key.pem"):
    path = tmp_path / name
    path.write_bytes(_pem_public(private))
    return str(path)


def rs256(tmp_path, keys, **options):
    data = {"algorithm": "RS256", "public_key_path": write_pem(tmp_path, keys.rsa)}
    data.update(options)
    return make(data, config=FakeConfig(tmp_path))


def hs256(**options):
    data = {"algorithm": "HS256", "secret": SECRET}
    data.update(options)
    return make(data)


def bearer(value, method="GET", path="/api/x", headers=()):
    return make_request(
        method=method, path=path.lstrip("/"), full_path=path, headers=[("Authorization", f"Bearer {value}"), *headers]
    )


def run(mw, envelope):
    """
    The request hook's outcome: C{None}, or the L{HarmonyError} it raised
    (synchronously or through its Deferred).
    """
    try:
        result = mw.request(envelope)
    except HarmonyError as e:
        return e
    if isinstance(result, defer.Deferred):
        box = []
        result.addBoth(box.append)
        assert box, "the request hook has not finished"
        if isinstance(box[0], Exception) or hasattr(box[0], "value"):
            value = getattr(box[0], "value", box[0])
            if isinstance(value, HarmonyError):
                return value
            box[0].raiseException()
        return box[0]
    return result


def challenge(error):
    return dict(error.headers)["WWW-Authenticate"]


def assert_invalid_token(error, description=None):
    assert isinstance(error, Unauthorized), error
    value = challenge(error)
    assert value.startswith('Bearer realm="harmony", error="invalid_token", error_description="'), value
    if description is not None:
        assert description in value
        assert description in error.message
    return error


# -- valid tokens ---------------------------------------------------------------


def test_provides_interfaces(tmp_path, keys):
    verifyObject(IMiddlewareType, MIDDLEWARE_TYPE)
    assert MIDDLEWARE_TYPE.name == "jwt_auth"
    verifyObject(IMiddleware, rs256(tmp_path, keys))


def test_valid_rs256_sets_metadata(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    envelope = bearer(token(keys.rsa, iss="https://idp", scope="a b", patient={"id": "x"}))
    assert run(mw, envelope) is None
    md = envelope.metadata
    assert md["jwt.sub"] == "user-1"
    assert md["jwt.iss"] == "https://idp"
    assert md["auth.user"] == "user-1"
    assert md["auth.method"] == "jwt"
    assert all(isinstance(v, str) for v in md.values())
    assert claims_of(envelope) == claims(iss="https://idp", scope="a b", patient={"id": "x"})
    # The token is passed on by default.
    assert envelope.details.headers.get("Authorization").startswith("Bearer ")


def test_claims_of_without_token():
    assert claims_of(make_request()) is None


def test_valid_hs256():
    mw = hs256()
    envelope = bearer(token(SECRET, "HS256"))
    assert run(mw, envelope) is None
    assert claims_of(envelope)["sub"] == "user-1"


def test_valid_es256(tmp_path, keys):
    mw = make({"algorithm": "ES256", "public_key_path": write_pem(tmp_path, keys.p256)})
    assert run(mw, bearer(token(keys.p256, "ES256"))) is None


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "HS256", "HS384", "HS512"])
def test_every_algorithm(tmp_path, keys, alg):
    if alg.startswith("HS"):
        secret = "k" * 64
        mw = make({"algorithm": alg, "secret": secret})
        signing = secret
    else:
        private = {"ES256": keys.p256, "ES384": keys.p384}.get(alg, keys.rsa)
        mw = make({"algorithm": alg, "public_key_path": write_pem(tmp_path, private)})
        signing = private
    assert run(mw, bearer(token(signing, alg))) is None
    # Any other algorithm with the same family of key is refused.
    other = "HS512" if alg == "HS256" else "HS256"
    assert_invalid_token(run(mw, bearer(token("k" * 64, other))), "algorithm is not accepted")


def test_certificate_and_several_keys_in_one_pem(tmp_path, keys):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.rsa2.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .sign(keys.rsa2, hashes.SHA256())
    )
    path = tmp_path / "bundle.pem"
    path.write_bytes(_pem_public(keys.rsa) + cert.public_bytes(serialization.Encoding.PEM))
    mw = make({"public_key_path": str(path)})
    assert run(mw, bearer(token(keys.rsa))) is None
    assert run(mw, bearer(token(keys.rsa2))) is None
    third = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_invalid_token(run(mw, bearer(token(third))), "signature is invalid")


# -- time claims ------------------------------------------------------------------


def test_expired(tmp_path, keys):
    mw = rs256(tmp_path, keys, leeway_secs=0)
    error = assert_invalid_token(run(mw, bearer(token(keys.rsa, exp=NOW - 1))), "The token has expired")
    assert error.status == 401
    assert challenge(error) == (
        'Bearer realm="harmony", error="invalid_token", error_description="The token has expired"'
    )


def test_exp_equal_to_now_is_expired(tmp_path, keys):
    mw = rs256(tmp_path, keys, leeway_secs=0)
    assert_invalid_token(run(mw, bearer(token(keys.rsa, exp=NOW))), "expired")


def test_leeway_on_exp(tmp_path, keys):
    mw = rs256(tmp_path, keys, leeway_secs=30)
    assert run(mw, bearer(token(keys.rsa, exp=NOW - 29))) is None
    assert_invalid_token(run(mw, bearer(token(keys.rsa, exp=NOW - 30))), "expired")


def test_default_leeway_is_60(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    assert run(mw, bearer(token(keys.rsa, exp=NOW - 59))) is None
    assert_invalid_token(run(mw, bearer(token(keys.rsa, exp=NOW - 61))), "expired")


def test_clock_moves(tmp_path, keys):
    clock = new_clock()
    mw = make({"public_key_path": write_pem(tmp_path, keys.rsa), "leeway_secs": 0}, clock=clock)
    tok = token(keys.rsa, exp=NOW + 10)
    assert run(mw, bearer(tok)) is None
    clock.advance(10)
    assert_invalid_token(run(mw, bearer(tok)), "expired")


def test_not_yet_valid(tmp_path, keys):
    mw = rs256(tmp_path, keys, leeway_secs=5)
    assert_invalid_token(run(mw, bearer(token(keys.rsa, nbf=NOW + 6))), "The token is not valid yet")
    assert run(mw, bearer(token(keys.rsa, nbf=NOW + 5))) is None


def test_issued_in_the_future(tmp_path, keys):
    mw = rs256(tmp_path, keys, leeway_secs=5)
    assert_invalid_token(run(mw, bearer(token(keys.rsa, iat=NOW + 100))), "issued in the future")
    assert run(mw, bearer(token(keys.rsa, iat=NOW + 5))) is None


def test_exp_is_always_required(tmp_path, keys):
    mw = rs256(tmp_path, keys, required_claims=["sub"])
    assert_invalid_token(run(mw, bearer(token(keys.rsa, exp=None))), "The token has no exp claim")


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_time_claims_must_be_numbers(tmp_path, keys, claim):
    mw = rs256(tmp_path, keys)
    assert_invalid_token(run(mw, bearer(token(keys.rsa, **{claim: "soon"}))), f"{claim} claim is not a number")


# -- issuer, audience, required claims ----------------------------------------------


def test_issuer(tmp_path, keys):
    mw = rs256(tmp_path, keys, issuer="https://idp.test")
    assert run(mw, bearer(token(keys.rsa, iss="https://idp.test"))) is None
    assert_invalid_token(run(mw, bearer(token(keys.rsa, iss="https://evil.test"))), "issuer is not accepted")
    assert_invalid_token(run(mw, bearer(token(keys.rsa))), "The token has no iss claim")


def test_issuer_list(tmp_path, keys):
    mw = rs256(tmp_path, keys, issuer=["https://a", "https://b"])
    assert run(mw, bearer(token(keys.rsa, iss="https://b"))) is None
    assert_invalid_token(run(mw, bearer(token(keys.rsa, iss="https://c"))), "issuer")


def test_audience(tmp_path, keys):
    mw = rs256(tmp_path, keys, audience="harmony")
    assert run(mw, bearer(token(keys.rsa, aud="harmony"))) is None
    assert run(mw, bearer(token(keys.rsa, aud=["other", "harmony"]))) is None
    assert_invalid_token(run(mw, bearer(token(keys.rsa, aud="other"))), "audience is not accepted")
    assert_invalid_token(run(mw, bearer(token(keys.rsa))), "The token has no aud claim")


def test_audience_list(tmp_path, keys):
    mw = rs256(tmp_path, keys, audience=["a", "b"])
    assert run(mw, bearer(token(keys.rsa, aud="b"))) is None
    assert_invalid_token(run(mw, bearer(token(keys.rsa, aud="c"))), "audience")


def test_token_with_audience_needs_configured_audience(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    assert_invalid_token(run(mw, bearer(token(keys.rsa, aud="someone-else"))), "audience is not accepted")


def test_required_claims(tmp_path, keys):
    mw = rs256(tmp_path, keys, required_claims=["tenant", "jti"])
    assert run(mw, bearer(token(keys.rsa, tenant="t1", jti="j1"))) is None
    assert_invalid_token(run(mw, bearer(token(keys.rsa, jti="j1"))), "The token has no tenant claim")


def test_non_string_sub_is_invalid(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    assert_invalid_token(run(mw, bearer(token(keys.rsa, sub=42))), "invalid sub")


# -- algorithm confusion, bad signatures --------------------------------------------


def test_alg_none_is_rejected(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    unsigned = raw_token({"alg": "none", "typ": "JWT"}, claims())
    assert_invalid_token(run(mw, bearer(unsigned)), "algorithm is not accepted")
    for variant in ("None", "NONE"):
        assert_invalid_token(run(mw, bearer(raw_token({"alg": variant}, claims()))), "algorithm")


def test_alg_none_is_rejected_with_hmac_config():
    mw = hs256()
    assert_invalid_token(run(mw, bearer(raw_token({"alg": "none"}, claims()))), "algorithm is not accepted")


def test_hs256_signed_with_rsa_public_key_is_rejected(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    forged = hmac_token(_pem_public(keys.rsa), claims())
    assert_invalid_token(run(mw, bearer(forged)), "algorithm is not accepted")
    # The same forgery with the header claiming RS256 fails the signature.
    header = {"alg": "RS256", "typ": "JWT"}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims()).encode())}"
    sig = hmac.new(_pem_public(keys.rsa), signing_input.encode(), hashlib.sha256).digest()
    assert_invalid_token(run(mw, bearer(f"{signing_input}.{b64url(sig)}")), "signature is invalid")


def test_rs256_token_on_hs256_config():
    from cryptography.hazmat.primitives.asymmetric import rsa as _rsa

    private = _rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_invalid_token(run(hs256(), bearer(token(private, "RS256"))), "algorithm is not accepted")


def test_wrong_key(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    assert_invalid_token(run(mw, bearer(token(keys.rsa2))), "The token signature is invalid")


def test_wrong_secret():
    assert_invalid_token(run(hs256(), bearer(token("x" * 32, "HS256"))), "signature is invalid")


def test_tampered_payload(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    header, _, signature = token(keys.rsa).split(".")
    forged = f"{header}.{b64url(json.dumps(claims(sub='admin')).encode())}.{signature}"
    assert_invalid_token(run(mw, bearer(forged)), "signature is invalid")


def test_unknown_critical_header(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    tok = token(keys.rsa, headers={"crit": ["exp-ext"], "exp-ext": 1})
    assert_invalid_token(run(mw, bearer(tok)), "malformed")


# -- the Authorization header -------------------------------------------------------


def test_no_token_challenge_without_error(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    error = run(mw, make_request(full_path="/api/x"))
    assert isinstance(error, Unauthorized)
    assert challenge(error) == 'Bearer realm="harmony"'
    assert error.message == "Authentication required"


def test_other_scheme_is_no_token(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    error = run(mw, make_request(headers=[("Authorization", "Basic dTpw")]))
    assert isinstance(error, Unauthorized)
    assert challenge(error) == 'Bearer realm="harmony"'


def test_scheme_is_case_insensitive(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    envelope = make_request(headers=[("authorization", f"bEaReR   {token(keys.rsa)}  ")])
    assert run(mw, envelope) is None


@pytest.mark.parametrize(
    "headers, description",
    [
        ([("Authorization", "Bearer")], "The Bearer token is missing"),
        ([("Authorization", "Bearer    ")], "The Bearer token is missing"),
        ([("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")], "More than one Authorization header"),
    ],
)
def test_invalid_request(tmp_path, keys, headers, description):
    mw = rs256(tmp_path, keys)
    error = run(mw, make_request(headers=headers))
    assert isinstance(error, BadRequest)
    assert error.status == 400
    assert challenge(error) == (
        f'Bearer realm="harmony", error="invalid_request", error_description="{description}"'
    )


@pytest.mark.parametrize(
    "value",
    [
        "nope",
        "a.b",
        "a.b.c.d.e",
        "!!!.abc.def",
        "a b.c.d",
        "eyJhbGciOiJSUzI1NiJ9.e30.",
        "aaaa.bbbb.cccc",
        b64url(b"\xff\xfe") + ".e30.abc",
        b64url(b"[1,2]") + ".e30.abc",
    ],
)
def test_malformed_tokens(tmp_path, keys, value):
    mw = rs256(tmp_path, keys)
    error = run(mw, bearer(value))
    assert isinstance(error, Unauthorized), (value, error)
    assert 'error="invalid_token"' in challenge(error)


def test_token_too_long(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    assert_invalid_token(run(mw, bearer(token(keys.rsa, blob="x" * 20000))), "too long")


def test_custom_header_and_raw_token(tmp_path, keys):
    mw = rs256(tmp_path, keys, header="X-Access-Token", scheme="")
    envelope = make_request(headers=[("X-Access-Token", token(keys.rsa))])
    assert run(mw, envelope) is None
    error = run(mw, make_request(headers=[("Authorization", f"Bearer {token(keys.rsa)}")]))
    assert challenge(error) == 'Bearer realm="harmony"'


def test_custom_realm_and_scheme(tmp_path, keys):
    mw = rs256(tmp_path, keys, realm="fhir gateway", scheme="JWT")
    error = run(mw, make_request())
    assert challenge(error) == 'JWT realm="fhir gateway"'
    assert run(mw, make_request(headers=[("Authorization", f"JWT {token(keys.rsa)}")])) is None


def test_forward_credentials_false_removes_header(tmp_path, keys):
    mw = rs256(tmp_path, keys, forward_credentials=False)
    envelope = bearer(token(keys.rsa), headers=[("X-Other", "1")])
    assert run(mw, envelope) is None
    assert "Authorization" not in envelope.details.headers
    assert envelope.details.headers.get("X-Other") == "1"


def test_error_description_is_quoted_safely(tmp_path, keys):
    mw = rs256(tmp_path, keys, required_claims=['we"ird\\claim'])
    error = run(mw, bearer(token(keys.rsa)))
    value = challenge(error)
    assert 'error_description="The token has no we?ird?claim claim"' in value


def test_tokens_are_never_logged(tmp_path, keys):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        mw = rs256(tmp_path, keys)
        secret_tok = token(keys.rsa2, sub="patient-123")
        run(mw, bearer(secret_tok))
        run(mw, bearer(token(keys.rsa, exp=NOW - 1000)))
        run(mw, bearer("garbage.garbage.garbage"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events, "failures are logged"
    text = " ".join(formatEvent(e) + repr(e) for e in events)
    for part in secret_tok.split("."):
        assert part not in text
    assert "patient-123" not in text
    assert "garbage" not in text


def test_rendered_error_carries_the_header(tmp_path, keys):
    mw = rs256(tmp_path, keys)
    response = render_json_error(run(mw, bearer(token(keys.rsa, exp=NOW - 1000))))
    assert response.status == 401
    assert response.headers.get("WWW-Authenticate").startswith('Bearer realm="harmony", error="invalid_token"')
    assert json.loads(response.body) == {"error": "unauthorized", "message": "The token has expired"}


# -- scopes and routes --------------------------------------------------------------


def forbidden(error, description=None, scope=None):
    assert isinstance(error, Forbidden), error
    assert error.status == 403
    value = challenge(error)
    assert value.startswith('Bearer realm="harmony", error="insufficient_scope", error_description="'), value
    if description is not None:
        assert description in value
    if scope is not None:
        assert value.endswith(f', scope="{scope}"'), value
    return value


def test_required_scopes_string_claim(tmp_path, keys):
    mw = rs256(tmp_path, keys, required_scopes=["fhir.read", "fhir.write"])
    assert run(mw, bearer(token(keys.rsa, scope="openid fhir.read fhir.write"))) is None
    value = forbidden(run(mw, bearer(token(keys.rsa, scope="fhir.read"))), "fhir.write", "fhir.read fhir.write")
    assert value == (
        'Bearer realm="harmony", error="insufficient_scope", '
        'error_description="The token lacks the scope(s): fhir.write", scope="fhir.read fhir.write"'
    )
    forbidden(run(mw, bearer(token(keys.rsa))), "fhir.read fhir.write")


def test_scope_claim_list_and_name(tmp_path, keys):
    mw = rs256(tmp_path, keys, scope_claim="scp", required_scopes=["read"])
    assert run(mw, bearer(token(keys.rsa, scp=["read", "write"]))) is None
    forbidden(run(mw, bearer(token(keys.rsa, scope="read"))))
    forbidden(run(mw, bearer(token(keys.rsa, scp={"read": True}))))


def test_nested_roles_claim(tmp_path, keys):
    mw = rs256(
        tmp_path,
        keys,
        roles_claim="realm_access.roles",
        routes=[{"path_prefix": "/api", "roles": ["clinician", "admin"]}],
    )
    assert run(mw, bearer(token(keys.rsa, realm_access={"roles": ["admin"]}))) is None
    value = forbidden(run(mw, bearer(token(keys.rsa, realm_access={"roles": ["patient"]}))), "clinician admin")
    assert "scope=" not in value
    forbidden(run(mw, bearer(token(keys.rsa))))


def test_claim_named_with_dots_wins(tmp_path, keys):
    mw = rs256(
        tmp_path, keys, roles_claim="https://example.org/roles", routes=[{"path_prefix": "/", "roles": ["a"]}]
    )
    assert run(mw, bearer(token(keys.rsa, **{"https://example.org/roles": ["a"]}))) is None


ROUTES = [
    {"path_prefix": "/api", "scopes": ["read"]},
    {"path_prefix": "/api/admin", "roles": ["admin"]},
    {"path_prefix": "/api/records", "methods": ["POST", "put"], "scopes": ["write"]},
    {"path_prefix": "/api/records", "methods": ["GET"], "scopes": ["records.read"]},
    {"path_prefix": "/api/public", "anonymous": True},
]


@pytest.mark.parametrize(
    "method, path, granted, roles, ok",
    [
        ("GET", "/api/x", "read", [], True),
        ("GET", "/api/x", "", [], False),
        ("GET", "/api", "read", [], True),
        ("GET", "/apix", "", [], True),  # no rule: only a valid token needed
        ("GET", "/api/admin/users", "", ["admin"], True),
        ("GET", "/api/admin/users", "read", [], False),
        ("GET", "/api/%61dmin/users", "read", [], False),  # percent-encoding does not bypass
        ("GET", "//api//admin", "read", [], False),
        ("GET", "/api/administrator", "read", [], True),  # segment boundary
        ("POST", "/api/records/1", "write", [], True),
        ("POST", "/api/records/1", "read", [], False),
        ("PUT", "/api/records", "write", [], True),
        ("GET", "/api/records/1", "records.read", [], True),
        ("GET", "/api/records/1", "read", [], False),
        ("HEAD", "/api/records/1", "read", [], False),  # GET rules cover HEAD
        ("HEAD", "/api/records/1", "records.read", [], True),
        ("DELETE", "/api/records/1", "read", [], True),  # falls back to /api
        ("DELETE", "/api/records/1", "write", [], False),
    ],
)
def test_route_rules(tmp_path, keys, method, path, granted, roles, ok):
    mw = rs256(tmp_path, keys, routes=ROUTES)
    result = run(mw, bearer(token(keys.rsa, scope=granted, roles=roles), method=method, path=path))
    if ok:
        assert result is None, result
    else:
        forbidden(result)


def test_route_rules_add_to_required_scopes(tmp_path, keys):
    mw = rs256(tmp_path, keys, required_scopes=["base"], routes=[{"path_prefix": "/api", "scopes": ["extra"]}])
    forbidden(run(mw, bearer(token(keys.rsa, scope="extra"))), "base", "base extra")
    forbidden(run(mw, bearer(token(keys.rsa, scope="base"))), "extra", "base extra")
    assert run(mw, bearer(token(keys.rsa, scope="base extra"))) is None


def test_anonymous_route(tmp_path, keys):
    mw = rs256(tmp_path, keys, required_scopes=["read"], routes=ROUTES)
    envelope = make_request(full_path="/api/public/metadata")
    assert run(mw, envelope) is None
    assert "jwt.claims" not in envelope.metadata
    # Another scheme is no token either.
    assert run(mw, make_request(full_path="/api/public", headers=[("Authorization", "Basic dTpw")])) is None
    # A token is still verified; scopes are not required.
    envelope = bearer(token(keys.rsa), path="/api/public/metadata")
    assert run(mw, envelope) is None
    assert envelope.metadata["jwt.sub"] == "user-1"
    assert_invalid_token(run(mw, bearer(token(keys.rsa2), path="/api/public/x")), "signature")
    # Not anonymous elsewhere.
    assert challenge(run(mw, make_request(full_path="/api/other"))) == 'Bearer realm="harmony"'


# -- JWKS -------------------------------------------------------------------------


class JwksResource(Resource):
    """
    A JWKS endpoint: serves C{document} with C{code}; counts requests.
    With C{hold}, requests wait until L{release}.
    """

    isLeaf = True

    def __init__(self, document, code=200):
        super().__init__()
        self.document = document
        self.code = code
        self.hits = 0
        self.hold = False
        self.held = []

    def render_GET(self, request):
        self.hits += 1
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        body = self.document if isinstance(self.document, bytes) else json.dumps(self.document).encode()
        return body

    def release(self):
        held, self.held = self.held, []
        for request in held:
            request.setResponseCode(self.code)
            request.write(json.dumps(self.document).encode())
            request.finish()


def jwks_setup(keys, document=None, clock=None, **options):
    resource = JwksResource(document if document is not None else {"keys": [jwk(keys.rsa, "k1")]})
    stub = StubTreq(resource)
    clock = clock or new_clock()
    data = {"algorithm": "RS256", "jwks_url": JWKS_URL}
    data.update(options)
    mw = make(data, clock=clock, http_client=stub)
    return types.SimpleNamespace(mw=mw, resource=resource, stub=stub, clock=clock)


def run_jwks(setup, envelope):
    """
    Run the hook, letting the stub deliver the JWKS response.
    """
    try:
        result = setup.mw.request(envelope)
    except HarmonyError as e:
        return e
    if isinstance(result, defer.Deferred):
        setup.stub.flush()
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


def test_jwks_fetched_once_and_cached(keys):
    s = jwks_setup(keys)
    assert s.resource.hits == 0, "nothing is fetched at startup"
    envelope = bearer(token(keys.rsa, headers={"kid": "k1"}))
    assert run_jwks(s, envelope) is None
    assert envelope.metadata["jwt.sub"] == "user-1"
    assert s.resource.hits == 1
    # Cached: answered synchronously, no fetch.
    assert s.mw.request(bearer(token(keys.rsa, headers={"kid": "k1"}))) is None
    assert s.resource.hits == 1


def test_jwks_ttl(keys):
    s = jwks_setup(keys, jwks_cache_secs=100)
    tok = token(keys.rsa, headers={"kid": "k1"}, exp=NOW + 10_000)
    assert run_jwks(s, bearer(tok)) is None
    s.clock.advance(99)
    assert run_jwks(s, bearer(tok)) is None
    assert s.resource.hits == 1
    s.clock.advance(1)
    # A token not seen before (a verified one is remembered for a while).
    assert run_jwks(s, bearer(token(keys.rsa, headers={"kid": "k1"}, exp=NOW + 10_001))) is None
    assert s.resource.hits == 2


def test_jwks_rotation(keys):
    s = jwks_setup(keys, jwks_min_refresh_secs=60)
    assert run_jwks(s, bearer(token(keys.rsa, headers={"kid": "k1"}))) is None
    # The issuer rotates to k2; the first k2 token triggers a refresh.
    s.resource.document = {"keys": [jwk(keys.rsa, "k1"), jwk(keys.rsa2, "k2")]}
    s.clock.advance(60)
    assert run_jwks(s, bearer(token(keys.rsa2, headers={"kid": "k2"}))) is None
    assert s.resource.hits == 2
    assert s.mw.request(bearer(token(keys.rsa2, headers={"kid": "k2"}))) is None
    assert s.mw.request(bearer(token(keys.rsa, headers={"kid": "k1"}))) is None
    assert s.resource.hits == 2


def test_unknown_kid_refreshes_at_most_once_per_interval(keys):
    s = jwks_setup(keys, jwks_min_refresh_secs=60)
    assert run_jwks(s, bearer(token(keys.rsa, headers={"kid": "k1"}))) is None
    s.clock.advance(10)
    error = run_jwks(s, bearer(token(keys.rsa2, headers={"kid": "nope"})))
    assert_invalid_token(error, "unknown key")
    assert s.resource.hits == 1, "too soon after the last fetch"
    s.clock.advance(50)
    assert_invalid_token(run_jwks(s, bearer(token(keys.rsa2, headers={"kid": "nope"}))), "unknown key")
    assert s.resource.hits == 2
    assert_invalid_token(run_jwks(s, bearer(token(keys.rsa2, headers={"kid": "nope"}))), "unknown key")
    assert s.resource.hits == 2


def test_wrong_kid_signature(keys):
    # A token claiming kid k1 but signed by another key.
    s = jwks_setup(keys)
    assert_invalid_token(run_jwks(s, bearer(token(keys.rsa2, headers={"kid": "k1"}))), "signature is invalid")


def test_token_without_kid_tries_every_key(keys):
    s = jwks_setup(keys, document={"keys": [jwk(keys.rsa, "k1"), jwk(keys.rsa2, "k2")]})
    assert run_jwks(s, bearer(token(keys.rsa2))) is None
    assert_invalid_token(
        run_jwks(s, bearer(token(rsa.generate_private_key(public_exponent=65537, key_size=2048)))), "signature"
    )


def test_jwks_es256(keys):
    s = jwks_setup(keys, document={"keys": [jwk(keys.p256, "e1", alg="ES256")]}, algorithm="ES256")
    assert run_jwks(s, bearer(token(keys.p256, "ES256", headers={"kid": "e1"}))) is None


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_jwks_skips_unusable_keys(keys):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.rsa2))
    private_jwk.update({"kid": "priv"})
    document = {
        "keys": [
            jwk(keys.rsa, "enc", use="enc"),
            jwk(keys.rsa, "ps", alg="PS256"),
            jwk(keys.p256, "ec", alg="ES256"),
            jwk(small, "small"),
            jwk(keys.rsa, "ops", key_ops=["encrypt"]),
            private_jwk,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "oct"},
            "not a key",
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            jwk(keys.rsa2, "good"),
        ]
    }
    s = jwks_setup(keys, document=document)
    for kid, private in (("enc", keys.rsa), ("ps", keys.rsa), ("small", small), ("ops", keys.rsa), ("priv", keys.rsa2)):
        s.clock.advance(61)
        assert_invalid_token(run_jwks(s, bearer(token(private, headers={"kid": kid}))), "unknown key")
    assert run_jwks(s, bearer(token(keys.rsa2, headers={"kid": "good"}))) is None


@pytest.mark.parametrize(
    "document, code",
    [
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, 200),
        ({"nokeys": []}, 200),
        (b"<html>not json</html>", 200),
        ({"keys": []}, 500),
    ],
)
def test_jwks_unavailable_is_503(keys, document, code):
    s = jwks_setup(keys, document=document, jwks_min_refresh_secs=30)
    s.resource.code = code
    error = run_jwks(s, bearer(token(keys.rsa, headers={"kid": "k1"})))
    assert isinstance(error, ServiceUnavailable)
    assert dict(error.headers)["Retry-After"] == "30"
    # No new fetch until the interval passed.
    assert isinstance(run_jwks(s, bearer(token(keys.rsa, headers={"kid": "k1"}))), ServiceUnavailable)
    assert s.resource.hits == 1
    s.resource.document, s.resource.code = {"keys": [jwk(keys.rsa, "k1")]}, 200
    s.clock.advance(30)
    assert run_jwks(s, bearer(token(keys.rsa, headers={"kid": "k1"}))) is None
    assert s.resource.hits == 2


def test_jwks_document_too_large(keys, monkeypatch):
    monkeypatch.setattr(jwt_auth, "MAX_JWKS_BYTES", 100)
    s = jwks_setup(keys)
    assert isinstance(run_jwks(s, bearer(token(keys.rsa, headers={"kid": "k1"}))), ServiceUnavailable)


def test_stale_keys_are_used_while_jwks_fails(keys):
    s = jwks_setup(keys, jwks_cache_secs=100, jwks_min_refresh_secs=10)
    tok = token(keys.rsa, headers={"kid": "k1"}, exp=NOW + 10_000)
    assert run_jwks(s, bearer(tok)) is None
    s.resource.code = 503
    s.clock.advance(100)
    assert run_jwks(s, bearer(tok)) is None
    assert s.resource.hits == 2
    # Within the refresh interval the stale keys answer without a fetch.
    assert s.mw.request(bearer(tok)) is None
    assert s.resource.hits == 2



class PendingClient:
    """
    An HTTP client whose requests stay pending until the test answers.
    """

    def __init__(self):
        self.requests = []

    def get(self, url, headers=None):
        d = defer.Deferred()
        self.requests.append((url, headers, d))
        return d


def test_concurrent_requests_share_one_fetch(keys):
    s = jwks_setup(keys)
    s.resource.hold = True
    d1 = s.mw.request(bearer(token(keys.rsa, headers={"kid": "k1"})))
    d2 = s.mw.request(bearer(token(keys.rsa, headers={"kid": "k1"})))
    s.stub.flush()
    assert s.resource.hits == 1
    assert not has_fired(d1) and not has_fired(d2)
    s.resource.release()
    s.stub.flush()
    assert result_of(d1) is None
    assert result_of(d2) is None


def test_jwks_timeout_uses_the_clock(keys):
    client = PendingClient()
    clock = new_clock()
    mw = make(
        {"algorithm": "RS256", "jwks_url": JWKS_URL, "jwks_timeout_secs": 5}, clock=clock, http_client=client
    )
    d = mw.request(bearer(token(keys.rsa, headers={"kid": "k1"})))
    assert len(client.requests) == 1
    url, headers, pending = client.requests[0]
    assert url == JWKS_URL
    assert headers == {"Accept": "application/json"}
    clock.advance(4)
    assert not has_fired(d)
    clock.advance(1)
    failure_of(d, ServiceUnavailable)
    assert pending.called, "the fetch was cancelled"


def test_jwks_without_http_client_is_503(keys):
    mw = make({"algorithm": "RS256", "jwks_url": JWKS_URL})
    assert isinstance(run(mw, bearer(token(keys.rsa))), ServiceUnavailable)


# -- configuration ---------------------------------------------------------------


def test_defaults():
    options = validate({"algorithm": "HS256", "secret": SECRET})
    assert options.leeway_secs == 60
    assert options.header == "Authorization"
    assert options.scheme == "Bearer"
    assert options.scope_claim == "scope"
    assert options.roles_claim == "roles"
    assert options.realm == "harmony"
    assert options.forward_credentials is True
    assert options.jwks_cache_secs == 3600
    assert options.jwks_min_refresh_secs == 60


@pytest.mark.parametrize(
    "data, key, message",
    [
        ({"algorithm": "none", "secret": SECRET}, "algorithm", "expected one of"),
        ({"algorithm": "HS256"}, "secret", "there is no default secret"),
        ({"algorithm": "RS256"}, "public_key_path", "required for RS256"),
        ({}, "public_key_path", "required for RS256"),
        ({"algorithm": "ES256", "jwks_url": "ftp://x/jwks"}, "jwks_url", "http(s) URL"),
        ({"algorithm": "ES256", "jwks_url": "http://idp.example/jwks"}, "jwks_url", "must be https"),
        ({"algorithm": "RS256", "public_key_path": "k.pem", "jwks_url": JWKS_URL}, "jwks_url", "not both"),
        ({"algorithm": "HS256", "secret": SECRET, "secret_env": "X"}, "secret_env", "only one of"),
        ({"algorithm": "HS256", "secret": SECRET, "public_key_path": "k.pem"}, "public_key_path", "asymmetric"),
        ({"algorithm": "HS256", "secret": SECRET, "jwks_url": JWKS_URL}, "jwks_url", "asymmetric"),
        ({"algorithm": "RS256", "public_key_path": "k.pem", "secret": SECRET}, "secret", "HS* algorithms"),
        ({"algorithm": "HS256", "secret": ""}, "secret", "must not be empty"),
        ({"algorithm": "HS256", "secret": SECRET, "audiance": "x"}, "audiance", 'did you mean "audience"'),
        ({"algorithm": "HS256", "secret": SECRET, "audience": []}, "audience", "must not be empty"),
        ({"algorithm": "HS256", "secret": SECRET, "audience": 3}, "audience", "string or array"),
        ({"algorithm": "HS256", "secret": SECRET, "issuer": ["a", ""]}, "issuer.1", "must not be empty"),
        ({"algorithm": "HS256", "secret": SECRET, "leeway_secs": -1}, "leeway_secs", "at least 0"),
        ({"algorithm": "HS256", "secret": SECRET, "required_scopes": ["a b"]}, "required_scopes.0", "one scope"),
        ({"algorithm": "HS256", "secret": SECRET, "realm": 'a"b'}, "realm", "without"),
        ({"algorithm": "HS256", "secret": SECRET, "header": "Bad Header"}, "header", "HTTP token"),
        ({"algorithm": "HS256", "secret": SECRET, "jwks_cache_secs": 0}, "jwks_cache_secs", "at least 1"),
        (
            {"algorithm": "HS256", "secret": SECRET, "routes": [{"scopes": ["a"]}]},
            "routes.0.path_prefix",
            "required key is missing",
        ),
        (
            {"algorithm": "HS256", "secret": SECRET, "routes": [{"path_prefix": "api"}]},
            "routes.0.path_prefix",
            'must start with "/"',
        ),
        (
            {"algorithm": "HS256", "secret": SECRET, "routes": [{"path_prefix": "/a", "methods": ["FETCH"]}]},
            "routes.0.methods.0",
            "expected one of",
        ),
        (
            {"algorithm": "HS256", "secret": SECRET, "routes": [{"path_prefix": "/a", "anonymous": True, "roles": ["x"]}]},
            "routes.0.anonymous",
            "cannot also require",
        ),
        (
            {
                "algorithm": "HS256",
                "secret": SECRET,
                "routes": [{"path_prefix": "/a", "methods": ["GET", "POST"]}, {"path_prefix": "/a/", "methods": ["post"]}],
            },
            "routes.1",
            "overlaps routes.0",
        ),
        (
            {"algorithm": "HS256", "secret": SECRET, "routes": [{"path_prefix": "/a"}, {"path_prefix": "/a"}]},
            "routes.1",
            "overlaps routes.0",
        ),
        ({"algorithm": "RS256", "use_hs256": True, "secret": SECRET}, "use_hs256", "contradicts"),
    ],
)
def test_option_errors_name_the_key(data, key, message):
    error = config_error(data)
    assert error.file == "test.toml"
    assert error.key == ".".join(WHERE + (key,)), str(error)
    assert message in error.message, str(error)


def test_jwks_http_on_loopback_or_when_allowed():
    validate({"algorithm": "RS256", "jwks_url": "http://127.0.0.1:8080/jwks"})
    validate({"algorithm": "RS256", "jwks_url": "http://keycloak:8080/jwks", "jwks_allow_http": True})


def test_same_prefix_different_methods_is_fine():
    validate(
        {
            "algorithm": "HS256",
            "secret": SECRET,
            "routes": [{"path_prefix": "/a", "methods": ["GET"]}, {"path_prefix": "/a", "methods": ["POST"]}],
        }
    )


def build_error(data, tmp_path, environ=None):
    with pytest.raises(ConfigError) as info:
        make(data, config=FakeConfig(tmp_path), environ=environ)
    error = info.value
    assert error.file == "pipelines/auth.toml"
    return error


@pytest.mark.parametrize(
    "secret, message",
    [
        ("short", "at least 32 bytes (RFC 7518), got 5"),
        ("-----BEGIN PUBLIC KEY-----\n" + "A" * 64, "looks like a PEM/SSH key"),
    ],
)
def test_bad_secrets(tmp_path, secret, message):
    error = build_error({"algorithm": "HS256", "secret": secret}, tmp_path)
    assert error.key == "middleware.auth.options.secret"
    assert message in error.message


def test_secret_length_per_algorithm(tmp_path):
    make({"algorithm": "HS512", "secret": "x" * 64})
    error = build_error({"algorithm": "HS512", "secret": "x" * 63}, tmp_path)
    assert "at least 64 bytes" in error.message


def test_secret_env(tmp_path):
    mw = make({"algorithm": "HS256", "secret_env": "JWT_SECRET"}, environ={"JWT_SECRET": SECRET})
    assert run(mw, bearer(token(SECRET, "HS256"))) is None
    error = build_error({"algorithm": "HS256", "secret_env": "JWT_SECRET"}, tmp_path, environ={})
    assert error.key == "middleware.auth.options.secret_env"
    assert "JWT_SECRET is not set" in error.message


def test_secret_path(tmp_path):
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    mw = make({"algorithm": "HS256", "secret_path": "secret.txt"}, config=FakeConfig(tmp_path))
    assert run(mw, bearer(token(SECRET, "HS256"))) is None
    error = build_error({"algorithm": "HS256", "secret_path": "missing.txt"}, tmp_path)
    assert error.key == "middleware.auth.options.secret_path"
    assert "cannot read 'missing.txt'" in error.message


def test_secret_base64(tmp_path):
    raw = os.urandom(32)
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")):
        mw = make({"algorithm": "HS256", "secret": encoded.decode(), "secret_encoding": "base64"})
        assert run(mw, bearer(token(raw, "HS256"))) is None
    error = build_error({"algorithm": "HS256", "secret": "%%%not base64%%%", "secret_encoding": "base64"}, tmp_path)
    assert "not valid base64" in error.message


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read 'key.pem'"),
        (b"hello", "no PEM public key"),
        ("private", "holds a private key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a valid public key"),
        ("small", "at least 2048 are required"),
        ("ec", "RS256 needs an RSA public key"),
    ],
)
def test_bad_public_key_files(tmp_path, keys, content, message):
    path = tmp_path / "key.pem"
    if content == "private":
        content = keys.rsa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    elif content == "small":
        content = _pem_public(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    elif content == "ec":
        content = _pem_public(keys.p256)
    if content is not None:
        path.write_bytes(content)
    error = build_error({"algorithm": "RS256", "public_key_path": "key.pem"}, tmp_path)
    assert error.key == "middleware.auth.options.public_key_path"
    assert message in error.message, error.message


def test_es256_needs_p256(tmp_path, keys):
    (tmp_path / "key.pem").write_bytes(_pem_public(keys.p384))
    error = build_error({"algorithm": "ES256", "public_key_path": "key.pem"}, tmp_path)
    assert "ES256 needs an EC key on secp256r1, got secp384r1" in error.message


def test_rust_harmony_keys(tmp_path, keys):
    where = Where("test.toml", WHERE)
    options = OPTIONS.validate({"use_hs256": True, "hs256_secret": SECRET, "public_key_path": ""}, where)
    assert any("use_hs256: deprecated" in w for w in where.warnings)
    assert any("hs256_secret: deprecated" in w for w in where.warnings)
    mw = JwtAuth("auth", options, BuildContext(reactor=new_clock()))
    assert mw.algorithm == "HS256"
    assert run(mw, bearer(token(SECRET, "HS256"))) is None
    # Without use_hs256 the Rust default is RS256 with public_key_path.
    mw = make({"public_key_path": write_pem(tmp_path, keys.rsa), "issuer": "i", "audience": "a"})
    assert mw.algorithm == "RS256"
    assert run(mw, bearer(token(keys.rsa, iss="i", aud="a"))) is None


# -- through a gateway built from TOML -------------------------------------------------


def test_registry_load_by_module_name():
    registry = Registry()
    obj = registry.load("middleware", "jwt_auth", "harmony.middleware.jwt_auth:MIDDLEWARE_TYPE")
    assert obj is MIDDLEWARE_TYPE
    assert registry.middleware("jwtauth") is MIDDLEWARE_TYPE


GATEWAY_TOML = """
[proxy]
id = "unit"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 8080

[middleware_types.jwt_auth]
module = "harmony.middleware.jwt_auth:MIDDLEWARE_TYPE"

[middleware.auth]
type = "jwtauth"
[middleware.auth.options]
algorithm = "RS256"
public_key_path = "keys/public.pem"
audience = "harmony"
routes = [{path_prefix = "/echo/admin", scopes = ["admin"]}]

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


def test_whole_requests_through_a_gateway(tmp_path, keys):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "public.pem").write_bytes(_pem_public(keys.rsa))
    (tmp_path / "harmony.toml").write_text(GATEWAY_TOML)
    registry = builtin_registry()
    config = load_config(str(tmp_path / "harmony.toml"), registry, environ={})
    gateway = build_gateway(config, registry, BuildContext(reactor=new_clock(), config=config))
    stub = StubTreq(gateway.apps["default"].resource())

    def get(path, tok=None):
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        d = stub.request("GET", "http://gw.test" + path, headers=headers)
        stub.flush()
        response = result_of(d)
        body = stub.content(response)
        stub.flush()
        return response, json.loads(result_of(body))

    response, body = get("/echo/x")
    assert response.code == 401
    assert response.headers.getRawHeaders("WWW-Authenticate") == ['Bearer realm="harmony"']
    assert body == {"error": "unauthorized", "message": "Authentication required"}

    response, body = get("/echo/x", token(keys.rsa, aud="other"))
    assert response.code == 401
    assert 'error="invalid_token"' in response.headers.getRawHeaders("WWW-Authenticate")[0]

    response, body = get("/echo/x", token(keys.rsa, aud="harmony", sub="alice"))
    assert response.code == 200
    assert body["metadata"]["jwt.sub"] == "alice"
    assert json.loads(body["metadata"]["jwt.claims"])["aud"] == "harmony"

    response, body = get("/echo/admin/x", token(keys.rsa, aud="harmony", scope="read"))
    assert response.code == 403
    assert response.headers.getRawHeaders("WWW-Authenticate") == [
        'Bearer realm="harmony", error="insufficient_scope", '
        'error_description="The token lacks the scope(s): admin", scope="admin"'
    ]


def test_missing_key_is_a_startup_error(tmp_path):
    (tmp_path / "harmony.toml").write_text(GATEWAY_TOML.replace('public_key_path = "keys/public.pem"\n', ""))
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "harmony.toml"), builtin_registry(), environ={})
    assert str(info.value) == (
        "harmony.toml: middleware.auth.options.public_key_path: required for RS256 (or jwks_url): "
        "a PEM public key file"
    )


def test_unreadable_key_file_is_a_startup_error(tmp_path):
    (tmp_path / "harmony.toml").write_text(GATEWAY_TOML)
    registry = builtin_registry()
    config = load_config(str(tmp_path / "harmony.toml"), registry, environ={})
    with pytest.raises(ConfigError) as info:
        build_gateway(config, registry, BuildContext(reactor=new_clock(), config=config))
    assert str(info.value).startswith(
        "harmony.toml: middleware.auth.options.public_key_path: cannot read 'keys/public.pem'"
    )


class _CountingJWT:
    def __init__(self, real):
        self.real = real
        self.calls = 0

    def decode(self, *args, **kwargs):
        self.calls += 1
        return self.real.decode(*args, **kwargs)


def test_verified_tokens_are_remembered_but_times_checked_each_time():
    from harmony.middleware import jwt_auth as module

    mw = hs256()
    clock = mw._clock
    counting = mw._jwt = _CountingJWT(mw._jwt)
    # Expired 50 s ago: still accepted within the 60 s leeway.
    tok = token(SECRET, alg="HS256", exp=NOW - 50)
    for _ in range(3):
        envelope = bearer(tok)
        assert run(mw, envelope) is None
        assert envelope.metadata["jwt.sub"] == "user-1"
    assert counting.calls == 1
    # Still remembered, but now past the leeway: refused without a decode.
    clock.advance(15)
    assert_invalid_token(run(mw, bearer(tok)), "expired")
    assert counting.calls == 1
    # Remembered for VERIFIED_CACHE_SECS only, then verified again.
    tok2 = token(SECRET, alg="HS256", exp=NOW + 10_000)
    assert run(mw, bearer(tok2)) is None
    clock.advance(module.VERIFIED_CACHE_SECS)
    assert run(mw, bearer(tok2)) is None
    assert counting.calls == 3


def test_remembered_tokens_still_meet_route_rules():
    mw = hs256(routes=[{"path_prefix": "/admin", "scopes": ["admin"]}])
    tok = token(SECRET, alg="HS256", scope="read")
    assert run(mw, bearer(tok, path="/api/x")) is None
    assert run(mw, bearer(tok, path="/admin/x")).status == 403
