"""JWT access tokens: JWTProvider against a real JWKS endpoint.

Real keys (cryptography), a real JWKS endpoint on loopback (uvicorn), nothing mocked at the
HTTP layer. The refusals follow RFC 8725 (JWT best current practices) and the attacks its
section 2 lists; the key-set rules follow RFC 7517 and what goes wrong in practice: fetches
per request, refresh storms from made-up kids, an IdP blip wiping the cache, a blocked loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    JWTProvider,
    ProviderUnavailable,
    StaticTokenProvider,
    require_auth,
)
from support import (
    AUDIENCE,
    BOB,
    CHALLENGE_INVALID,
    DROP,
    HMAC_SECRET,
    INITIALIZE,
    INVALID_TOKEN,
    ISSUER,
    MALFORMED,
    MCP_POST_HEADERS,
    SECRETS,
    TOKENS,
    UNAVAILABLE,
    Harness,
    JWKSEndpoint,
    Receive,
    Scope,
    Send,
    answer_lifespan,
    bearer,
    call_json,
    default_keys,
    mcp_app,
    mcp_session,
    private_key,
    public_jwk,
    raw_request,
    serve,
    serve_with,
    sign,
    verify,
    wait_until,
    whoami,
)

ALL_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")


def public_pem(name: str) -> str:
    return (
        private_key(name)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def b64(data: bytes) -> str:
    return jwt.utils.base64url_encode(data).decode()


def forge(header: dict[str, Any], claims: dict[str, Any] | None = None, signer: Any = None) -> str:
    """A token built by hand, as an attacker would: any header, any signature function (bytes -> bytes)."""
    now = int(time.time())
    body = claims or {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    signature = b64(signer(signing_input.encode())) if signer else ""
    token = f"{signing_input}.{signature}"
    SECRETS.add(token)
    return token


def rsa_signer(name: str) -> Any:
    return lambda data: jwt.get_algorithm_by_name("RS256").sign(data, private_key(name))


def jwt_provider(url: str, **options: Any) -> JWTProvider:
    settings = {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ALL_ALGORITHMS, "jwks_refresh_cooldown": 0.2}
    return JWTProvider(jwks_url=url, **{**settings, "jwks_timeout": 2.0, **options})


# --- what a valid token carries ---------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "key", "kid"),
    [("RS256", "rs1", "rsa-1"), ("PS256", "rs1", "rsa-1"), ("ES256", "ec1", "ec-1"), ("EdDSA", "ed1", "ed-1")],
)
def test_jwt_each_algorithm_verifies_with_the_published_key(jwks: JWKSEndpoint, alg: str, key: str, kid: str) -> None:
    provider = jwt_provider(jwks.url)
    token = sign(alg, key, kid, scope="mcp:tools mcp:read")
    access = verify(provider, token)
    assert access is not None and access.token == token
    assert access.claims["sub"] == "alice" and access.scopes == ["mcp:tools", "mcp:read"]
    assert access.expires_at == access.claims["exp"] + 30.0  # the leeway holds through the middleware too
    assert verify(provider, token) is not None
    assert jwks.hits == 1  # cached, not fetched per request


def test_jwt_scopes_come_from_scope_or_scp() -> None:
    provider = JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=public_pem("rs1"))

    def scopes_of(token: str) -> list[str]:
        access = verify(provider, token)
        assert access is not None
        return access.scopes

    assert scopes_of(sign(scope="a b")) == ["a", "b"]
    assert scopes_of(sign(scope=DROP, scp=["a", "b"])) == ["a", "b"]
    assert scopes_of(sign(scope=DROP, scp="a b")) == ["a", "b"]
    assert scopes_of(sign(scope=DROP)) == []


def test_jwt_clock_skew_within_leeway_is_accepted_and_the_middleware_agrees() -> None:
    provider = JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=public_pem("rs1"), leeway=30)
    now = int(time.time())
    for token in (sign(exp=now - 10, iat=now - 300), sign(nbf=now + 10), sign(iat=now + 10)):
        outcome = Harness(provider).request(bearer(token))
        assert outcome.status == 200, token
    late = verify(provider, sign(exp=now - 10))
    assert late is not None and late.expires_at == now + 20
    strict = JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=public_pem("rs1"), leeway=0)
    assert verify(strict, sign(exp=now - 10)) is None


def test_jwt_several_issuers_and_audiences() -> None:
    provider = JWTProvider(
        issuer=[ISSUER, "https://other-tenant.example.com/"],
        audience=[AUDIENCE, "api://mcp"],
        key=public_pem("rs1"),
    )
    assert verify(provider, sign(iss="https://other-tenant.example.com/")) is not None
    assert verify(provider, sign(aud=["https://unrelated.example.com", "api://mcp"])) is not None
    assert verify(provider, sign(aud=["https://unrelated.example.com"])) is None


def test_jwt_static_key_and_hmac_secret() -> None:
    rsa_provider = JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=public_pem("rs1"), algorithms=["RS256", "PS256"])
    assert verify(rsa_provider, sign("PS256", kid=None)) is not None
    assert verify(rsa_provider, sign("RS256", kid="any-kid")) is not None  # one static key: the kid chooses nothing
    assert verify(rsa_provider, hs256_with_public_pem()) is None
    hs = JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=HMAC_SECRET, algorithms=["HS256"])
    assert verify(hs, sign("HS256", kid=None)) is not None
    assert verify(hs, sign("RS256")) is None
    for shown in (repr(hs), str(vars(hs).get("_issuer"))):
        assert HMAC_SECRET not in shown


# --- RFC 8725 attacks and other tokens that must be refused -----------------------------


def crit_token() -> str:
    # "b64": true is an extension PyJWT itself accepts; listed in crit, we still refuse (RFC 7515 4.1.11).
    return forge({"alg": "RS256", "kid": "rsa-1", "crit": ["b64"], "b64": True}, None, rsa_signer("rs1"))


def hs256_with_public_pem() -> str:
    # The classic algorithm confusion (RFC 8725 2.1): HMAC keyed with the server's public key.
    pem = public_pem("rs1").encode()
    return forge({"alg": "HS256", "kid": "rsa-1"}, None, lambda data: hmac.new(pem, data, "sha256").digest())


def header_supplies_key(member: str) -> str:
    # RFC 8725 3.10 / RFC 7515 4.1.2-4.1.6: a token must not bring the key that verifies it.
    attacker = public_jwk("rs9", "rsa-9")
    value = {"jwk": attacker, "x5c": ["MIIB"], "jku": "{base}/attacker-keys", "x5u": "{base}/attacker-cert"}[member]
    return forge({"alg": "RS256", member: value}, None, rsa_signer("rs9"))


def now() -> int:
    return int(time.time())


JWT_REFUSALS: list[tuple[str, Callable[[], str]]] = [
    ("bad-signature", lambda: sign(key="rs2")),
    ("hs256-signed-with-the-rsa-public-pem", hs256_with_public_pem),
    ("alg-none-empty-signature", lambda: forge({"alg": "none", "kid": "rsa-1"})),
    ("alg-none-with-signature", lambda: forge({"alg": "none"}, None, lambda data: b"x" * 32)),
    ("alg-None-capitalised", lambda: forge({"alg": "None"}, None, lambda data: b"x" * 32)),
    ("alg-not-pinned-rs384", lambda: sign("RS384")),
    ("alg-missing", lambda: forge({"kid": "rsa-1"}, None, rsa_signer("rs1"))),
    ("kid-of-an-ec-key-on-rs256", lambda: sign("RS256", "rs1", "ec-1")),
    ("kid-of-the-rsa-key-on-es256", lambda: sign("ES256", "ec1", "rsa-1")),
    ("kid-not-a-string", lambda: forge({"alg": "RS256", "kid": 1}, None, rsa_signer("rs1"))),
    ("header-jwk", lambda: header_supplies_key("jwk")),
    ("header-x5c", lambda: header_supplies_key("x5c")),
    ("header-jku", lambda: header_supplies_key("jku")),
    ("header-x5u", lambda: header_supplies_key("x5u")),
    ("crit", crit_token),
    ("b64-false", lambda: forge({"alg": "RS256", "kid": "rsa-1", "b64": False}, None, rsa_signer("rs1"))),
    ("expired-beyond-leeway", lambda: sign(exp=now() - 31, iat=now() - 400)),
    ("nbf-beyond-leeway", lambda: sign(nbf=now() + 120)),
    ("iat-beyond-leeway", lambda: sign(iat=now() + 120)),
    ("wrong-issuer", lambda: sign(iss="https://evil.example.com/")),
    ("issuer-without-slash", lambda: sign(iss="https://auth.example.com")),
    ("wrong-audience", lambda: sign(aud="https://other.example.com/mcp")),
    ("no-audience", lambda: sign(aud=DROP)),
    ("no-sub", lambda: sign(sub=DROP)),
    ("no-exp", lambda: sign(exp=DROP)),
    ("exp-a-string", lambda: sign(exp=str(now() + 300))),
    ("scope-a-number", lambda: sign(scope=7)),
    ("scp-an-object", lambda: sign(scope=DROP, scp={"a": 1})),
    ("header-not-json", lambda: "bm90IGpzb24." + sign().split(".", 1)[1]),
    ("header-a-list", lambda: forge(["RS256"], None, rsa_signer("rs1"))),  # type: ignore[arg-type]
    ("api-key", lambda: BOB),
    ("jwe-five-parts", lambda: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d"),
]


@pytest.mark.parametrize("make", [m for _, m in JWT_REFUSALS], ids=[i for i, _ in JWT_REFUSALS])
def test_jwt_refusals_are_401_invalid_token(jwks: JWKSEndpoint, make: Callable[[], str]) -> None:
    provider = jwt_provider(jwks.url, jwks_refresh_cooldown=60)
    assert verify(provider, sign()) is not None  # the key set is in; only the bad token differs
    token = make()
    assert verify(provider, token) is None
    outcome = Harness(provider).request(bearer(token))
    if outcome.status == 400:  # not even token68 (a JSON header with spaces): refused before the provider
        assert outcome.json() == MALFORMED
    else:
        assert outcome.status == 401 and outcome.json() == INVALID_TOKEN
        assert outcome.header("www-authenticate") == CHALLENGE_INVALID
    assert outcome.app_calls == []
    assert jwks.paths == ["/keys"]  # no key fetched from the token's jku/x5u, no refetch for a known kid


def test_jwt_without_kid_only_when_exactly_one_key_fits(jwks: JWKSEndpoint) -> None:
    provider = jwt_provider(jwks.url)
    assert verify(provider, sign("ES256", "ec1", kid=None)) is not None  # one EC key in the set
    jwks.keys = [*default_keys(), public_jwk("rs2", "rsa-2")]
    two_rsa = jwt_provider(jwks.url)
    assert verify(two_rsa, sign("RS256", "rs1", kid=None)) is None  # which of two RSA keys? neither
    assert verify(two_rsa, sign("RS256", "rs1", kid="rsa-1")) is not None


def test_jwt_jwks_entries_it_cannot_use_are_skipped_not_fatal(jwks: JWKSEndpoint) -> None:
    rs2 = private_key("rs2")
    assert isinstance(rs2, rsa.RSAPrivateKey)
    private = jwt.algorithms.RSAAlgorithm.to_jwk(rs2, as_dict=True)
    del private["key_ops"]  # as a careless IdP would publish it: nothing but "d" says it is private
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(weak.public_key(), as_dict=True), "kid": "rsa-1024"}
    weak_jwk.pop("key_ops")
    jwks.keys = [
        "not an object",
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        {"kty": "XYZ", "kid": "future-type"},
        {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
        public_jwk("rs2", "encryption", use="enc"),
        public_jwk("rs2", "wrap-only", key_ops=["wrapKey"]),
        {**private, "kid": "private"},  # a published private key: anyone could sign with it
        public_jwk("rs2", "rs256-only", alg="RS256"),  # RFC 8725 3.1: one algorithm per key
        public_jwk("ec2", "p256-as-eddsa", alg="EdDSA"),
        public_jwk("rs1", "rsa-1", key_ops=["verify"]),
        weak_jwk,  # RFC 7518 3.3: RSA keys of 2048 bits or more
    ]
    provider = jwt_provider(jwks.url)
    assert verify(provider, sign("RS256", "rs1", "rsa-1")) is not None
    for kid in ("broken", "future-type", "secret", "encryption", "wrap-only", "private"):
        assert verify(provider, sign("RS256", "rs2", kid)) is None, kid
    assert verify(provider, sign("RS256", "rs2", "rs256-only")) is not None
    assert verify(provider, sign("PS256", "rs2", "rs256-only")) is None
    assert verify(provider, sign("ES256", "ec2", "p256-as-eddsa")) is None
    now = int(time.time())
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):  # PyJWT signs with it, warning; we refuse to verify
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60}
        weak_token = jwt.encode(claims, weak, algorithm="RS256", headers={"kid": "rsa-1024"})
    SECRETS.add(weak_token)
    assert verify(provider, weak_token) is None
    assert jwks.hits == 1  # unusable entries are known kids, not a reason to refetch


# --- configuration JWTProvider refuses --------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"jwks_url": None}, ValueError, "exactly one of jwks_url= .* and key="),
        ({"jwks_url": "https://a/k", "key": "x" * 40}, ValueError, "exactly one of"),
        ({"issuer": ""}, ValueError, "issuer must be a non-empty string"),
        ({"issuer": []}, ValueError, "issuer must be a non-empty string"),
        ({"audience": ""}, ValueError, "audience must be a non-empty string"),
        ({"audience": [AUDIENCE, ""]}, ValueError, "audience must be a non-empty string"),
        ({"issuer": 7}, TypeError, "issuer must be a list or tuple"),
        ({"algorithms": ["none"]}, ValueError, "'none' means an unsigned token"),
        ({"algorithms": ["RS256", "NONE"]}, ValueError, "'none' means an unsigned token"),
        ({"algorithms": ["RS1"]}, ValueError, "unknown algorithm 'RS1'"),
        ({"algorithms": "RS256"}, TypeError, "algorithms must be a list or tuple"),
        ({"algorithms": []}, ValueError, "at least one algorithm"),
        ({"algorithms": ["HS256"], "jwks_url": "https://a/k"}, ValueError, "HMAC .* needs a shared secret as key="),
        ({"algorithms": ["HS256", "RS256"], "key": HMAC_SECRET}, ValueError, "cannot be mixed"),
        ({"jwks_url": "http://auth.example.com/jwks"}, ValueError, "jwks_url must use https://"),
        ({"jwks_url": "http://10.0.0.1/jwks"}, ValueError, "jwks_url must use https://"),
        ({"jwks_url": "ftp://auth.example.com/jwks"}, ValueError, "jwks_url must be an absolute https:// URL"),
        ({"jwks_url": "/jwks"}, ValueError, "jwks_url must be an absolute https:// URL"),
        ({"jwks_url": "https://user:pw@auth.example.com/jwks"}, ValueError, "must not contain user:password@"),
        ({"jwks_url": "https://auth.example.com/jwks#x"}, ValueError, "must not have a #fragment"),
        ({"jwks_url": "https://auth.example.com:99999/jwks"}, ValueError, "invalid host or port"),
        ({"jwks_url": "https://auth.example.com/\r\njwks"}, ValueError, "printable ASCII"),
        ({"key": "{rsa_pem}", "algorithms": ["HS256"]}, ValueError, "not an HMAC secret"),
        ({"key": "short", "algorithms": ["HS256"]}, ValueError, "too short for HS256"),
        ({"key": "{ec_pem}"}, ValueError, "not a PEM public key usable with RS256"),
        ({"key": "{rsa_pem}", "algorithms": ["RS256", "ES256"]}, ValueError, "usable with ES256"),
        ({"key": "{rsa_private}"}, ValueError, "is a private key"),
        ({"key": "{rsa_1024}"}, ValueError, "too short for RS256"),
        ({"key": 42}, TypeError, "key must be a PEM public key or an HMAC secret"),
        ({"leeway": -1}, ValueError, "leeway must be a finite number of seconds, >= 0"),
        ({"leeway": float("nan")}, ValueError, "leeway must be a finite"),
        ({"leeway": "30"}, TypeError, "leeway must be a number of seconds"),
        ({"jwks_cache_seconds": 0}, ValueError, "jwks_cache_seconds must be a finite number of seconds, > 0"),
        ({"jwks_refresh_cooldown": float("inf")}, ValueError, "jwks_refresh_cooldown must be a finite"),
        ({"jwks_timeout": 0}, ValueError, "jwks_timeout must be a finite"),
        ({"required_claims": "sub"}, TypeError, "required_claims must be a list or tuple"),
        ({"required_claims": ["sub", 1]}, TypeError, "required_claims must be a str"),
    ],
)
def test_jwt_wrong_configuration_is_refused_clearly(options: dict[str, Any], error: type, match: str) -> None:
    pems: dict[str, Callable[[], str]] = {
        "{rsa_pem}": lambda: public_pem("rs1"),
        "{ec_pem}": lambda: public_pem("ec1"),
        "{rsa_private}": lambda: (
            private_key("rs1")
            .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            .decode()
        ),
        "{rsa_1024}": lambda: (
            rsa.generate_private_key(public_exponent=65537, key_size=1024)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        ),
    }
    if options.get("key") in pems:
        options = {**options, "key": pems[options["key"]]()}
    defaults = {"issuer": ISSUER, "audience": AUDIENCE} | ({} if "key" in options else {"jwks_url": "https://a/k"})
    arguments = {**defaults, **options}
    with pytest.raises(error, match=match) as raised:
        JWTProvider(**arguments)
    key = options.get("key")
    assert not isinstance(key, str) or len(key) < 8 or key not in str(raised.value)  # never echoes a key


def test_jwt_without_pyjwt_says_what_to_install() -> None:
    # The hint names what a registry serves and a vendored copy can install: PyJWT itself, recent enough.
    expected = r"JWTProvider needs PyJWT 2.13 or newer with its crypto extra: pip install 'pyjwt\[crypto\]>=2.13'"
    with mock.patch.dict(sys.modules, {"jwt": None}), pytest.raises(ImportError, match=expected):
        JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=public_pem("rs1"))
    expected = r"JWTProvider needs PyJWT's crypto extra \(the cryptography package\): pip install 'pyjwt\[crypto\]"
    with mock.patch.object(jwt.algorithms, "has_crypto", False), pytest.raises(ImportError, match=expected):
        JWTProvider(issuer=ISSUER, audience=AUDIENCE, jwks_url="https://auth.example.com/jwks")
    with mock.patch.object(jwt.algorithms, "has_crypto", False):  # HMAC needs no cryptography
        JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=HMAC_SECRET, algorithms=["HS256"])


# --- the key set's life: rotation, storms, outages --------------------------------------


def test_jwt_key_rotation_accepts_the_new_kid_after_exactly_one_refresh(jwks: JWKSEndpoint) -> None:
    provider = jwt_provider(jwks.url, jwks_refresh_cooldown=0)
    assert verify(provider, sign()) is not None and jwks.hits == 1
    jwks.keys = [*default_keys(), public_jwk("rs2", "rsa-2")]  # the IdP publishes a new key, then signs with it
    rotated = sign("RS256", "rs2", "rsa-2")
    assert verify(provider, rotated) is not None and jwks.hits == 2
    assert verify(provider, rotated) is not None and verify(provider, sign()) is not None and jwks.hits == 2
    jwks.keys = [public_jwk("rs2", "rsa-2")]  # the old key is retired
    assert verify(provider, sign("RS256", "rs1", "rsa-1")) is not None  # still cached: retired at the next refresh
    assert verify(provider, sign("RS256", "rs1", "unknown")) is None and jwks.hits == 3
    assert verify(provider, sign("RS256", "rs1", "rsa-1")) is None  # the refreshed set no longer has it


def test_jwt_storm_of_made_up_kids_costs_one_fetch_per_cooldown(jwks: JWKSEndpoint) -> None:
    cooldown = 0.5
    provider = jwt_provider(jwks.url, jwks_refresh_cooldown=cooldown)
    forged = [forge({"alg": "RS256", "kid": secrets.token_hex(8)}, None, rsa_signer("rs1")) for _ in range(1000)]
    genuine = sign()

    async def storm() -> list[AccessToken | BaseException | None]:
        return await asyncio.gather(*(provider.verify_token(t) for t in [genuine, *forged]), return_exceptions=True)

    started = time.monotonic()
    first = asyncio.run(storm())  # cold: everyone needs the key set at once
    # Those that waited for the fetch: None, the set lacks them; those that came after it, in the
    # cooldown: 503 (ProviderUnavailable). Never an AccessToken.
    assert isinstance(first[0], AccessToken) and None in first[1:]
    assert all(answer is None or isinstance(answer, ProviderUnavailable) for answer in first[1:])
    assert jwks.hits == 1  # single flight: one fetch for 1,001 concurrent requests
    second = asyncio.run(storm())
    assert isinstance(second[0], AccessToken)
    if time.monotonic() - started < cooldown:
        assert jwks.hits == 1  # cooling down: made-up kids cost the IdP nothing...
        # ...and cannot be told from a rotated key's yet: 503, which no cache keeps, never a 401.
        assert all(isinstance(answer, ProviderUnavailable) for answer in second[1:])
    time.sleep(cooldown)
    assert asyncio.run(storm())[0] is not None
    windows = (time.monotonic() - started) / cooldown
    assert 2 <= jwks.hits <= 1 + math.ceil(windows)


def test_jwt_nothing_is_fetched_before_the_first_token(jwks: JWKSEndpoint) -> None:
    """A server must start while its IdP is down: construction never touches the network."""
    provider = jwt_provider(jwks.url)
    time.sleep(0.3)
    assert jwks.hits == 0
    assert verify(provider, sign()) is not None and jwks.hits == 1


def test_jwt_stale_set_is_refreshed_in_the_background(jwks: JWKSEndpoint) -> None:
    """After jwks_cache_seconds a known kid still answers at once, and the set is refetched behind it."""
    provider = jwt_provider(jwks.url, jwks_cache_seconds=0.1, jwks_refresh_cooldown=0.1)
    assert verify(provider, sign()) is not None and jwks.hits == 1
    time.sleep(0.15)
    jwks.mode = "hang"  # the refetch hangs: the known kid must not wait for it
    started = time.monotonic()
    assert verify(provider, sign()) is not None
    assert time.monotonic() - started < 0.5
    wait_until(lambda: jwks.hits >= 2, 5)
    assert jwks.hits == 2
    jwks.release.set()


@pytest.mark.slow
def test_jwt_outage_at_startup_is_503_with_retry_after_then_recovers(jwks_server: JWKSEndpoint) -> None:
    endpoint = jwks_server  # served again, below, on the address that was down
    endpoint.reset()
    down = socket.socket()  # bound, not listening: connections are refused
    down.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{down.getsockname()[1]}/keys"
    provider = jwt_provider(url, jwks_refresh_cooldown=0.2)
    app = BearerAuthMiddleware(mcp_app(whoami), provider)
    token = sign()
    with serve(app) as base:
        status, headers, body = raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {token}"})
        assert status == 503 and json.loads(body) == UNAVAILABLE
        assert headers["retry-after"] == "1" and "www-authenticate" not in headers
        assert raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {BOB}"})[0] == 401  # not JWT-shaped
        with serve(endpoint, listener=down):  # the IdP comes back on the same address
            time.sleep(0.25)  # the cooldown after the failed attempt
            status, _, _ = raw_request(
                base, "POST", "/mcp", {"Authorization": f"Bearer {token}", **MCP_POST_HEADERS}, INITIALIZE
            )
            assert status == 200 and endpoint.hits == 1


@pytest.mark.parametrize("mode", ["500", "hang", "redirect", "garbage", "list", "nokeys", "oversize"])
def test_jwt_failed_refresh_keeps_the_last_good_set(
    jwks: JWKSEndpoint, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = jwt_provider(jwks.url, jwks_cache_seconds=0.1, jwks_refresh_cooldown=0, jwks_timeout=0.5)
    token = sign()
    assert verify(provider, token) is not None
    jwks.mode = mode
    time.sleep(0.15)  # the set is stale now
    with caplog.at_level(logging.WARNING, logger="mcp_bearer"):
        started = time.monotonic()
        assert verify(provider, token) is not None  # a known kid is answered at once from the stale set
        assert time.monotonic() - started < 0.4
        with pytest.raises(ProviderUnavailable):  # a new kid while the IdP fails: it may be a rotated key's
            verify(provider, sign("RS256", "rs1", "unknown-kid"))
        wait_until(lambda: [r for r in caplog.records if "JWKS fetch" in r.getMessage()], 5)
    jwks.release.set()
    assert verify(provider, token) is not None
    warnings = [r for r in caplog.records if r.name == "mcp_bearer" and "JWKS fetch" in r.getMessage()]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert "/moved-keys" not in jwks.paths  # a redirect is not followed


@pytest.mark.parametrize("mode", ["500", "hang", "redirect", "garbage", "list", "nokeys", "oversize"])
def test_jwt_no_good_set_at_all_is_provider_unavailable(jwks: JWKSEndpoint, mode: str) -> None:
    jwks.mode = mode
    provider = jwt_provider(jwks.url, jwks_refresh_cooldown=10, jwks_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as raised:
        verify(provider, sign())
    assert time.monotonic() - started < 2  # bounded by jwks_timeout, not by the hang
    assert 9 <= raised.value.retry_after <= 10  # until the cooldown allows the next attempt
    jwks.release.set()
    assert "/moved-keys" not in jwks.paths


def test_jwt_api_keys_never_wait_on_the_identity_provider(jwks: JWKSEndpoint) -> None:
    jwks.mode = "hang"
    provider = jwt_provider(jwks.url)
    for token in (BOB, "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", "a.b", "a..c", "a.b.c.d"):
        assert verify(provider, token) is None
    assert jwks.hits == 0


@pytest.mark.slow
def test_jwt_hanging_jwks_does_not_delay_other_requests(jwks: JWKSEndpoint) -> None:
    """The fetch runs in a worker thread: the event loop keeps answering everyone else."""
    jwks.mode = "hang"
    jwt_guarded = BearerAuthMiddleware(Harness().app, jwt_provider(jwks.url, jwks_timeout=3.0))
    static_guarded = BearerAuthMiddleware(Harness().app, StaticTokenProvider(TOKENS))

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/static"):
            return await static_guarded(scope, receive, send)
        return await jwt_guarded(scope, receive, send)

    token = sign()
    with serve(router) as base:
        slow: list[int] = []
        waiting = threading.Thread(
            target=lambda: slow.append(raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {token}"})[0])
        )
        waiting.start()
        wait_until(lambda: jwks.hits > 0, 5)
        assert jwks.hits == 1  # the JWKS fetch is hanging now
        for path, headers in (("/static", {"Authorization": f"Bearer {BOB}"}), ("/health", {})):
            started = time.monotonic()
            assert raw_request(base, "GET", path, headers)[0] == 200
            assert time.monotonic() - started < 1.0, path  # not behind the 3 s fetch
        waiting.join(10)
        jwks.release.set()
    assert slow == [503]  # the JWT request itself waited jwks_timeout, then was honest about it


# --- end to end: the SDK's client, hypercorn's trio worker ------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_jwt_whoami_sees_the_tokens_claims_and_scopes(jwks: JWKSEndpoint) -> None:
    provider = jwt_provider(jwks.url)
    token = sign("ES256", "ec1", "ec-1", sub="alice@example.com", scope="mcp:tools mcp:read", email="a@example.com")
    with serve(BearerAuthMiddleware(mcp_app(whoami), provider, required_scopes=["mcp:tools"])) as base:
        async with mcp_session(base + "/mcp", token) as (session, _):
            seen = await call_json(session, "whoami")
        assert seen["scopes"] == ["mcp:tools", "mcp:read"]
        assert seen["claims"]["sub"] == "alice@example.com" and seen["claims"]["email"] == "a@example.com"
        assert seen["claims"]["iss"] == ISSUER and seen["claims"]["aud"] == AUDIENCE
        refused = raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {sign(scope='mcp:read')}"})
        assert refused[0] == 403
    assert jwks.hits == 1


@pytest.mark.slow
def test_e2e_jwt_under_hypercorns_trio_worker(jwks: JWKSEndpoint) -> None:
    """hypercorn --worker-class trio: no asyncio loop; the JWKS fetch is awaited the trio way."""

    async def hello(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await answer_lifespan(receive, send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": require_auth().claims["sub"].encode()})

    app = BearerAuthMiddleware(hello, jwt_provider(jwks.url))
    with serve_with("hypercorn-trio", app) as base:
        status, _, body = raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {sign(sub='trio-user')}"})
        assert (status, body) == (200, b"trio-user") and jwks.hits == 1
        assert raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {sign(key='rs2')}"})[0] == 401
