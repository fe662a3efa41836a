"""Attacks on the token services and on what the middleware writes down: proxies that would read
tokens, a PyJWT too old to check what we rely on, keys that turn a signature into an HMAC, key
rotation against the refetch cooldown, caches flooded with made-up tokens, forged audit lines,
scopes spelled with other whitespace, deep JSON, waiters left hanging, token types, the mcp floor.

Session ownership, preflights and principals are in test_attacks_sessions.py.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import datetime
import hashlib
import http.server
import importlib.metadata
import json
import logging
import os
import random
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import anyio
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

import mcp_bearer
from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    CachedProvider,
    IntrospectionProvider,
    JWTProvider,
    ProviderChain,
    ProviderUnavailable,
)
from support import (
    ACTIVE,
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    DROP,
    HMAC_SECRET,
    INACTIVE,
    ISSUER,
    REPO,
    SECRETS,
    TEAM,
    FakeProvider,
    Harness,
    IntrospectionEndpoint,
    JWKSEndpoint,
    Receive,
    Scope,
    Send,
    bearer,
    closed_port_url,
    default_keys,
    introspector,
    mcp_bearer_log,
    opaque,
    private_key,
    public_jwk,
    serve,
    sign,
    verify,
)


def public_pem(name: str) -> str:
    public = private_key(name).public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def static_jwt(**options: Any) -> JWTProvider:
    """A JWTProvider with rs1's public key given as key=: nothing fetched."""
    return JWTProvider(**{"issuer": ISSUER, "audience": AUDIENCE, "key": public_pem("rs1"), **options})


def jwks_jwt(endpoint: JWKSEndpoint | str, **options: Any) -> JWTProvider:
    url = endpoint if isinstance(endpoint, str) else endpoint.url
    return JWTProvider(**{"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": url, "jwks_timeout": 2.0, **options})


# --- 4. plain http:// token-service calls never go through a proxy ------------------------------
# A proxy on a plain http:// hop reads the token and our client secret in clear text, and can answer
# for the endpoint. urllib reads HTTP_PROXY/http_proxy unless told not to; https honours HTTPS_PROXY.


class RecordingProxy:
    """A forward proxy on loopback that records what it is sent and answers for every endpoint itself,
    as a hostile one would: every token active, its own key in the JWKS (under the real kid); a CONNECT
    (https) is recorded and refused."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, bytes]] = []  # (method, target, headers and body): in memory only
        self.url = ""
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, status: int, body: bytes) -> None:
                length = int(self.headers.get("content-length") or 0)
                proxy.received.append((self.command, self.path, bytes(self.headers) + self.rfile.read(length)))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self.answer(200, json.dumps({"keys": [public_jwk("rs9", "rsa-1")]}).encode())

            def do_POST(self) -> None:
                self.answer(200, json.dumps({"active": True, "sub": "proxy", "scope": "admin"}).encode())

            def do_CONNECT(self) -> None:
                self.answer(502, b"")

            def log_message(self, *args: Any) -> None:  # requests carry tokens: never on stderr
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def targets(self) -> list[tuple[str, str]]:
        """What it was asked for, without what it was sent (which may hold tokens and secrets)."""
        return [(method, target) for method, target, _ in self.received]


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    recording = RecordingProxy()
    thread = threading.Thread(target=recording.server.serve_forever, daemon=True)
    thread.start()
    yield recording
    recording.server.shutdown()
    recording.server.server_close()
    thread.join(10)


# Run in a process of its own whose environment names the proxy before mcp_bearer is imported, as a
# service started with HTTP_PROXY in its environment is. It prints what each provider said.
PROVIDERS_SCRIPT = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
import mcp_bearer

settings = json.loads(sys.stdin.read())

async def said(provider, token):
    try:
        access = await provider.verify_token(token)
    except mcp_bearer.ProviderUnavailable:
        return "unavailable"
    return None if access is None else access.claims.get("sub")

async def main():
    answers = {}
    if "introspect" in settings:
        introspection = mcp_bearer.IntrospectionProvider(
            settings["introspect"], client_id=settings["client_id"], client_secret=settings["client_secret"]
        )
        answers["introspection"] = [await said(introspection, token) for token in settings["opaque"]]
    if "jwks" in settings:
        keys = mcp_bearer.JWTProvider(
            issuer=settings["issuer"], audience=settings["audience"], jwks_url=settings["jwks"], jwks_timeout=3
        )
        answers["jwt"] = [await said(keys, token) for token in settings["jwts"]]
    print(json.dumps(answers))

asyncio.run(main())
"""


def providers_said(environment: dict[str, str], settings: dict[str, Any]) -> dict[str, list[Any]]:
    """What the providers of ``settings`` said, in a fresh process with ``environment`` (no *_proxy else)."""
    clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "REQUEST_METHOD"}
    module_dir = os.path.dirname(os.path.abspath(mcp_bearer.__file__))
    done = subprocess.run(
        [sys.executable, "-c", PROVIDERS_SCRIPT, module_dir],
        input=json.dumps(settings),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**clean, **environment},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answers: dict[str, list[Any]] = json.loads(done.stdout)
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("variables", [["HTTP_PROXY"], ["http_proxy"], ["HTTP_PROXY", "http_proxy"]])
def test_plain_http_calls_to_token_services_go_direct_whatever_http_proxy_says(
    variables: list[str], proxy: RecordingProxy, introspection: IntrospectionEndpoint, jwks: JWKSEndpoint
) -> None:
    settings = {
        "introspect": introspection.url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "opaque": [ACTIVE, INACTIVE],
        "jwks": jwks.url,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwts": [sign(), sign(key="rs9", kid="rsa-1")],  # the second signed with the proxy's key, the real kid
    }
    said = providers_said(dict.fromkeys(variables, proxy.url), settings)
    assert proxy.targets() == []  # no token, no client secret, no request at all
    assert said == {"introspection": ["dana", None], "jwt": ["alice", None]}  # the real endpoints answered
    assert len(introspection.introspections) == 2 and jwks.hits == 1


@pytest.mark.slow
def test_https_calls_to_token_services_still_honour_https_proxy_and_no_proxy(proxy: RecordingProxy) -> None:
    endpoint = closed_port_url().replace("http://127.0.0.1", "https://localhost")
    settings = {
        "introspect": endpoint + "/introspect",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "opaque": [ACTIVE],
        "jwks": endpoint + "/keys",
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwts": [sign(kid="fresh")],
    }
    assert providers_said({"HTTPS_PROXY": proxy.url}, settings) == {
        "introspection": ["unavailable"],
        "jwt": ["unavailable"],
    }
    host = endpoint.removeprefix("https://")
    assert proxy.targets() == [("CONNECT", host), ("CONNECT", host)]
    assert not [s for s in (ACTIVE, CLIENT_SECRET) for _, _, data in proxy.received if s.encode() in data]
    proxy.received.clear()
    said = providers_said({"https_proxy": proxy.url, "NO_PROXY": "localhost"}, settings)
    assert said == {"introspection": ["unavailable"], "jwt": ["unavailable"]} and proxy.targets() == []


def test_the_proxy_environment_is_read_when_each_call_is_made(
    monkeypatch: pytest.MonkeyPatch, proxy: RecordingProxy, introspection: IntrospectionEndpoint
) -> None:
    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    provider = IntrospectionProvider(
        closed_port_url("/introspect").replace("http://127.0.0.1", "https://localhost"),
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
    )
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)  # after the provider (and the module) exist
    with pytest.raises(ProviderUnavailable):
        verify(provider, ACTIVE)
    assert [method for method, _ in proxy.targets()] == ["CONNECT"]
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert verify(introspector(introspection), ACTIVE) is not None
    assert [method for method, _ in proxy.targets()] == ["CONNECT"]  # still only the https one


# --- 5. PyJWT older than 2.13 is refused; public keys are never HMAC secrets ---------------------


@pytest.mark.parametrize("version", ["2.9.0", "2.12.1", "2.12", "2.10.1", "1.7.1", "0"])
@pytest.mark.parametrize("kind", ["key", "hmac", "jwks"])
def test_jwt_provider_refuses_a_pyjwt_older_than_2_13_at_construction(
    monkeypatch: pytest.MonkeyPatch, version: str, kind: str
) -> None:
    monkeypatch.setattr(jwt, "__version__", version)
    build = {
        "key": static_jwt,
        "hmac": lambda: static_jwt(key=HMAC_SECRET, algorithms=["HS256"]),
        "jwks": lambda: jwks_jwt(closed_port_url()),
    }
    with pytest.raises(ImportError, match=re.escape("pyjwt[crypto]>=2.13")) as refused:
        build[kind]()
    assert version in str(refused.value)


@pytest.mark.parametrize("version", ["2.13.0", "2.13.1", "2.15.1", "3.0", "3.0.0", "10.1"])
def test_jwt_provider_accepts_pyjwt_2_13_and_newer(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(jwt, "__version__", version)
    assert verify(static_jwt(), sign()) is not None


def der(name: str) -> bytes:
    public = private_key(name).public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate(name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "idp.example")])
    key: Any = private_key(name)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
    builder = builder.serial_number(1).not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
    return builder.sign(key, hashes.SHA256())


def public_keys_as_secrets() -> dict[str, str | bytes]:
    """What an operator may paste where an HMAC secret belongs: the IdP's public key in every encoding.
    A token signed with HS256 under that public key (public, so anyone can) must never verify."""
    jwk = public_jwk("rs1", "rsa-1")
    ssh = (
        private_key("ed1").public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return {
        "pem-str": public_pem("rs1"),
        "pem-bytes": public_pem("ec1").encode(),
        "pem-certificate": certificate("rs1").public_bytes(serialization.Encoding.PEM),
        "der-rsa": der("rs1"),
        "der-ec": der("ec1"),
        "der-ed25519": der("ed1"),
        "der-certificate": certificate("rs1").public_bytes(serialization.Encoding.DER),
        "der-pkcs1": private_key("rs1")
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1),
        "jwk-str": json.dumps(jwk),
        "jwk-bytes": json.dumps(jwk).encode(),
        "jwk-set": json.dumps({"keys": [jwk]}),
        "jwk-indented": json.dumps({"keys": [jwk]}, indent=2).encode(),
        "ssh": ssh,
    }


@pytest.fixture(params=["pyjwt-as-installed", "pyjwt-that-takes-any-key"])
def hmac_preparation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """PyJWT 2.13 refuses public keys as HMAC secrets too; the module must not depend on it (a vendored
    or patched PyJWT may not), so every refusal is also tried with a PyJWT that takes any key."""
    if request.param == "pyjwt-that-takes-any-key":
        monkeypatch.setattr(jwt.algorithms.HMACAlgorithm, "prepare_key", lambda self, key: jwt.utils.force_bytes(key))
    return str(request.param)


@pytest.mark.parametrize("form", list(public_keys_as_secrets()))
def test_a_public_key_in_any_encoding_is_refused_as_an_hmac_secret(hmac_preparation: str, form: str) -> None:
    key = public_keys_as_secrets()[form]
    with pytest.raises(ValueError, match="HMAC"):
        static_jwt(key=key, algorithms=["HS256"])


def test_random_hmac_secrets_are_accepted_even_those_that_start_like_der(hmac_preparation: str) -> None:
    """0x30 is both "0" and the tag of a DER SEQUENCE: a random secret may begin with it, and with a
    byte that happens to be its own length. Seeded: the same secrets every run."""
    generator = random.Random(20260728)
    candidates: list[str | bytes] = [HMAC_SECRET, secrets.token_urlsafe(48), "0" + secrets.token_hex(31)]
    for _ in range(4000):
        size = generator.randrange(32, 80)
        candidates.append(b"0" + generator.randbytes(size - 1))
        candidates.append(b"0" + bytes([size - 2]) + generator.randbytes(size - 2))  # a SEQUENCE's length, by chance
    candidates += ["0" + "".join(generator.choice("0123456789abcdef") for _ in range(64)) for _ in range(200)]
    refused = []
    for key in candidates:
        try:
            static_jwt(key=key, algorithms=["HS256"])
        except ValueError:
            refused.append(key)
    assert refused == []
    # And such a secret really verifies the tokens it signed.
    secret = b"0" + bytes([46]) + random.Random(7).randbytes(46)
    token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60}, secret, "HS256")
    SECRETS.add(token)
    assert verify(static_jwt(key=secret, algorithms=["HS256"]), token) is not None


# --- 6. smaller defects --------------------------------------------------------------------------

# An unknown kid during the refetch cooldown: nobody can tell yet whether the token is good. A cached
# "no" would lock out every token of a newly rotated key for negative_ttl; a 503 is asked again.


@pytest.mark.slow
def test_cached_jwt_a_newly_rotated_key_during_the_cooldown_is_503_never_a_kept_no_then_accepted(
    jwks: JWKSEndpoint,
) -> None:
    cooldown = 6.0
    provider = CachedProvider(jwks_jwt(jwks, jwks_refresh_cooldown=cooldown), negative_ttl=60)
    assert verify(provider, sign(kid="made-up")) is None  # fetched for it: the issuer does not know it
    cooldown_started = time.monotonic()
    assert jwks.hits == 1
    jwks.keys = [*default_keys(), public_jwk("rs2", "rsa-2")]  # the IdP rotates right after
    rotated = sign(key="rs2", kid="rsa-2")
    for _ in range(3):
        with pytest.raises(ProviderUnavailable) as unavailable:
            verify(provider, rotated)
        assert 1 <= unavailable.value.retry_after <= cooldown
    outcome = Harness(provider).request(bearer(rotated))
    assert outcome.status == 503 and int(outcome.header("retry-after") or 0) >= 1
    assert verify(provider, sign()) is not None  # the keys in hand still verify meanwhile
    assert time.monotonic() - cooldown_started < cooldown, "too slow to check within the cooldown"
    assert jwks.hits == 1  # the cooldown held: no fetch per request
    deadline = cooldown_started + cooldown + 15
    accepted: AccessToken | None = None
    while accepted is None and time.monotonic() < deadline:
        with contextlib.suppress(ProviderUnavailable):
            accepted = verify(provider, rotated)
            assert accepted is not None, "kept as a no"
        time.sleep(0.2)
    assert accepted is not None and accepted.claims["sub"] == "alice"
    assert jwks.hits == 2


def foreign(issuer: Any, kid: str = "their-key") -> str:
    """A token of another issuer (DROP: of none), with a kid our JWKS does not have, as an attacker
    builds it: any iss, even one no IdP would sign (a list, an object). The signature is never reached."""
    now = int(time.time())
    claims = {"iss": issuer, "aud": AUDIENCE, "sub": "alice", "exp": now + 300}
    segments = [{"alg": "RS256", "kid": kid}, {k: v for k, v in claims.items() if v is not DROP}]
    encoded = [base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode() for part in segments]
    token = ".".join([*encoded, "c2lnbmF0dXJl"])
    SECRETS.add(token)
    return token


def test_jwt_a_token_of_another_issuer_is_refused_before_any_jwks_fetch(jwks: JWKSEndpoint) -> None:
    provider = jwks_jwt(jwks)
    others = [foreign("https://evil.example/"), foreign(ISSUER + "x"), foreign(ISSUER.rstrip("/")), foreign(["x"])]
    others += [foreign(DROP, "no-iss"), foreign({"iss": ISSUER}, "dict-iss")]
    for token in others:
        assert verify(provider, token) is None
    assert jwks.hits == 0  # before the first good token: nothing fetched for strangers
    assert verify(provider, sign()) is not None and jwks.hits == 1
    for n, token in enumerate(others):
        assert verify(provider, foreign("https://evil.example/", f"new-kid-{n}")) is None
        assert verify(provider, token) is None
    assert jwks.hits == 1  # nor any refetch afterwards: a made-up kid of another issuer costs nothing


@pytest.fixture(scope="module")
def second_jwks_server() -> Iterator[JWKSEndpoint]:
    endpoint = JWKSEndpoint()
    with serve(endpoint) as base:
        endpoint.url = base + "/keys"
        yield endpoint


ISSUER_B = "https://login.other.example/"


@pytest.mark.parametrize("down", ["500", "hang", "closed"])
def test_a_chain_of_two_issuers_routes_b_tokens_to_b_while_a_is_down(
    jwks: JWKSEndpoint, second_jwks_server: JWKSEndpoint, down: str
) -> None:
    second_jwks_server.reset()
    second_jwks_server.keys = [public_jwk("rs2", "rsa-b")]
    jwks.mode = "ok" if down == "closed" else down
    a = jwks_jwt(closed_port_url() if down == "closed" else jwks, jwks_timeout=1.0)
    chain = ProviderChain(a, jwks_jwt(second_jwks_server, issuer=ISSUER_B))
    harness = Harness(chain)
    started = time.monotonic()
    for n in range(5):
        outcome = harness.request(bearer(sign(key="rs2", kid="rsa-b", iss=ISSUER_B, jti=str(n))))
        assert outcome.status == 200
        access = outcome.app_calls[0][1]
        assert access is not None and access.claims["iss"] == ISSUER_B
    assert time.monotonic() - started < 5  # never waited on A's hanging endpoint (1 s a try)
    assert jwks.hits == 0
    assert harness.request(bearer(sign())).status == 503  # A's own tokens: A cannot tell now


def test_cache_a_flood_of_made_up_tokens_never_pushes_out_valid_verdicts() -> None:
    valid = TEAM[:50]
    provider = FakeProvider(tokens={token: {"sub": f"user-{n}"} for n, token in enumerate(valid)})
    option_sets: list[dict[str, Any]] = [{}, {"max_negative_entries": 7}]
    for options in option_sets:
        cache = CachedProvider(provider, negative_ttl=60, max_entries=100, **options)

        async def flood(cache: CachedProvider = cache) -> tuple[int, int]:
            for token in valid:
                assert await cache.verify_token(token) is not None
            for n in range(5000):  # far more than max_entries, let alone max_negative_entries
                assert await cache.verify_token(f"made-up-{n}") is None
            provider.calls.clear()
            for token in valid:
                assert await cache.verify_token(token) is not None
            asked_again = len(provider.calls)
            for n in reversed(range(4990, 5000)):  # the newest refusals are kept, within their own bound
                await cache.verify_token(f"made-up-{n}")
            return asked_again, len(provider.calls) - asked_again

        asked_again, refusals_asked = anyio.run(flood)
        assert asked_again == 0, f"{asked_again} valid tokens were asked again after the flood"
        kept = options.get("max_negative_entries", 100 // 10)
        assert refusals_asked == 10 - kept


# The audit trail: every field a client or an IdP supplies is quoted, so no CR, LF or other control
# character, and no quote, can end a field early or start a line of its own.

LITERAL = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|None"
AUDIT_LINE = re.compile(
    rf"(?P<outcome>[^:']+): (?P<method>{LITERAL}) (?P<path>{LITERAL}) from (?P<client>{LITERAL}), "
    rf"principal (?P<principal>{LITERAL})(?:, reason (?P<reason>{LITERAL}))?"
)
NOBODY = "sk-nobody-Wq4Zr8Tx"  # a token no provider knows
SECRETS.add(NOBODY)
HOSTILE = [
    "\r\n2026-07-28 INFO mcp_bearer.audit allowed: 'POST' '/admin' from '10.0.0.1', principal 'root'",
    "\n",
    "\r",
    "\x00",
    "\x1b[2K\x1b[1A",
    "\x85",
    "\u2028",
    "\u2029",
    "' from '1.2.3.4', principal 'root",
    '" from "1.2.3.4", principal "root',
    "\\', principal \\'root",
    "\t\x0b\x0c",
]


def audit_lines(records: list[logging.LogRecord]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each audit record's line read back field by field, beside the fields the record carries."""
    read = []
    for record in records:
        line = record.getMessage()
        assert line.isprintable(), f"a control character in the trail: {line!r}"
        match = AUDIT_LINE.fullmatch(line)
        assert match is not None, f"a line that does not read back: {line!r}"
        literals = {name: value for name, value in match.groupdict().items() if name != "outcome" and value}
        values = {"outcome": match["outcome"], **{name: ast.literal_eval(v) for name, v in literals.items()}}
        read.append((values, vars(record)["mcp_bearer"]))
    return read


@pytest.mark.parametrize("hostile", HOSTILE, ids=[repr(h)[1:12] for h in HOSTILE])
def test_audit_no_field_a_client_or_idp_supplies_can_forge_a_line(hostile: str) -> None:
    token = opaque(f"hostile-{HOSTILE.index(hostile)}")
    claims = {"sub": "alice" + hostile, "iss": "https://idp.example/" + hostile}
    provider = FakeProvider({token: AccessToken(token, claims, ["read"])})
    harness = Harness(provider, audit=True, required_scopes=["read"])
    keys = static_jwt()
    with mcp_bearer_log("mcp_bearer.audit") as records:
        path = "/mcp" + hostile
        address = ("10.0.0.1" + hostile, 443)
        harness.request(bearer(token), path=path, client=address, method="POST" + hostile)  # allowed
        harness.request(bearer(NOBODY), path=path, client=address)  # refused by the provider
        jwt_harness = Harness(keys, audit=True)
        jwt_harness.request(bearer(sign(iss="https://evil.example/" + hostile)), path=path, client=address)
    read = audit_lines(records)
    assert len(read) == 3
    for values, fields in read:
        assert values == {k: v for k, v in fields.items() if k in values}  # the line says what the fields say
        assert values["path"] == path and values["client"] == f"{address[0]}:443"
    assert read[0][0]["method"] == "POST" + hostile
    assert read[0][0]["principal"] == mcp_bearer.principal_key(AccessToken(token, claims))
    assert read[2][0]["reason"] == f"wrong issuer {'https://evil.example/' + hostile!r}"  # itself quoted, then quoted


# Every way a token is refused: (the token, what its provider says, the middleware's options).
REFUSALS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "unknown": (opaque("refused-unknown"), None, {}),
    "unavailable": (opaque("refused-unavailable"), ProviderUnavailable("IdP down"), {}),
    "raising": (opaque("refused-raising"), RuntimeError, {}),
    "wrong-type": (opaque("refused-wrong-type"), {"sub": "alice"}, {}),
    "too-long": (opaque("refused-too-long") + "x" * 100, None, {"max_token_length": 64}),
    "throttled": (opaque("refused-throttled"), None, {"max_failures": 1}),
}
SECRETS.update(token for token, _, _ in REFUSALS.values())


@pytest.mark.parametrize("case", list(REFUSALS))
def test_audit_a_refused_token_is_named_by_nothing_derived_from_it(case: str) -> None:
    token, answer, options = REFUSALS[case]
    harness = Harness(FakeProvider({token: answer}), audit=True, **options)
    with mcp_bearer_log("mcp_bearer") as records:
        for _ in range(3):
            assert harness.request(bearer(token)).status >= 400
    digest = hashlib.sha256(token.encode()).hexdigest()
    keyed = getattr(mcp_bearer, "_keyed_digest", lambda token: "")(token)
    forms = {digest[:8], digest[-8:], keyed[:8], token[:8], base64.b64encode(token.encode()).decode()[:12]} - {""}
    audited = [r for r in records if r.name == "mcp_bearer.audit"]
    assert audited, "no audit record"
    for record in records:
        text = record.getMessage() + json.dumps(vars(record).get("mcp_bearer"), default=str)
        assert not [form for form in forms if form in text], text
    assert {vars(r)["mcp_bearer"]["principal"] for r in audited} == {None}


# RFC 6749 3.3: scope = scope-token *( SP scope-token ). str.split() also splits on tabs, newlines,
# NBSP and other Unicode spaces: "read\twrite" would pass for two scopes an IdP never granted.

NOT_A_SPACE = ["\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u00a0", "\u2003", "\u2028", "\u3000"]
NOT_SCOPES = [f"read{separator}write" for separator in NOT_A_SPACE] + [
    'read" "write',
    "read\\ write\\",
    "réad wríte",
    "read\x00 write\x7f",
]


SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 3.3


def scopes_of_jwt(scope: Any, scp: Any = DROP) -> list[str]:
    access = verify(static_jwt(), sign(scope=scope, scp=scp))
    assert access is not None
    return access.scopes


@pytest.mark.parametrize("spelling", NOT_SCOPES, ids=[repr(s) for s in NOT_SCOPES])
def test_scopes_split_on_spaces_only_and_other_parts_are_no_scopes(
    spelling: str, introspection: IntrospectionEndpoint
) -> None:
    opaque_token = opaque("scopes-" + hashlib.sha256(spelling.encode()).hexdigest()[:8])
    introspection.answers[opaque_token] = {"active": True, "sub": "x", "scope": spelling}
    granted = {
        "jwt scope": scopes_of_jwt(spelling),
        "jwt scp string": scopes_of_jwt(DROP, spelling),
        "jwt scp list": scopes_of_jwt(DROP, [spelling]),
        "introspection": (verify(introspector(introspection), opaque_token) or AccessToken("")).scopes,
    }
    leaked = {where: {"read", "write"} & set(scopes) for where, scopes in granted.items()}
    assert leaked == {where: set() for where in granted}
    # Nor is any other part a scope: none would fit a challenge, nor match a required scope-token.
    assert [scope for scopes in granted.values() for scope in scopes if not SCOPE_TOKEN.fullmatch(scope)] == []
    for required in ("read", "write"):
        assert Harness(static_jwt(), required_scopes=[required]).request(bearer(sign(scope=spelling))).status == 403


def test_scopes_separated_by_several_spaces_are_still_the_scopes() -> None:
    assert scopes_of_jwt("read  write") == ["read", "write"]
    assert scopes_of_jwt(" read write ") == ["read", "write"]
    assert scopes_of_jwt(DROP, ["read", "wr\u00a0ite", "write"]) == ["read", "write"]
    assert (
        Harness(static_jwt(), required_scopes=["read", "write"]).request(bearer(sign(scope="read  write"))).status
        == 200
    )


class DeepIntrospection(IntrospectionEndpoint):
    """An introspection endpoint whose every answer is ``body``: JSON nested past the parser's recursion limit."""

    body = b""

    async def answer(self, request: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return 200, [], self.body


@pytest.fixture(scope="module")
def deep_server() -> Iterator[DeepIntrospection]:
    endpoint = DeepIntrospection()
    with serve(endpoint) as base:
        endpoint.url = base + "/introspect"
        yield endpoint


DEEP = {
    "open-arrays": b"[" * 100_000,
    "closed-arrays": b"[" * 100_000 + b"]" * 100_000,
    "objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "inside-an-answer": b'{"active": true, "sub": "x", "groups": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("shape", list(DEEP))
def test_deeply_nested_introspection_json_is_503_never_500(deep_server: DeepIntrospection, shape: str) -> None:
    deep_server.body = DEEP[shape]
    token = opaque("deep-" + shape)
    with pytest.raises(ProviderUnavailable):
        verify(introspector(deep_server), token)
    outcome = Harness(introspector(deep_server)).request(bearer(token))
    assert (outcome.status, outcome.app_calls) == (503, [])


def test_a_jwt_whose_claims_are_deeply_nested_is_refused_before_any_fetch(jwks: JWKSEndpoint) -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "unknown"}).encode()).rstrip(b"=")
    claims = base64.urlsafe_b64encode(b"[" * 5_000).rstrip(b"=")  # past the parser's recursion, within max_token_length
    token = (header + b"." + claims + b".c2ln").decode()
    assert verify(jwks_jwt(jwks), token) is None
    assert Harness(jwks_jwt(jwks)).request(bearer(token)).status == 401
    assert jwks.hits == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cache_every_waiter_gets_the_leaders_answer_even_one_that_cannot_be_kept(backend: str) -> None:
    """A provider that answers AccessToken(token, claims=None): a verdict the cache cannot keep. The first
    request gets 500; the others waiting on its call must get the same, not wait forever."""
    broken = AccessToken("", cast(Any, None))
    provider = FakeProvider(otherwise=broken, delay=0.2)
    middleware = BearerAuthMiddleware(ok_app, CachedProvider(provider))
    statuses: list[int] = []

    async def one() -> None:
        sent: list[Any] = []

        async def receive() -> Any:
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message)

        await middleware(plain_scope(bearer(ALICE)), receive, send)
        statuses.append(sent[0]["status"])

    async def many() -> None:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                for _ in range(20):
                    group.start_soon(one)

    anyio.run(many, backend=backend)
    assert statuses == [500] * 20
    assert len(provider.calls) == 1  # one call, shared


ALICE = opaque("alice-of-the-cache")


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def plain_scope(headers: list[tuple[bytes, bytes]]) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


# RFC 9068 section 4 and RFC 8725 3.11: explicit typing. A token of another type signed by the same
# IdP (an ID token, a refresh token) must not pass for an access token.


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT", "Application/At+Jwt"])
def test_required_typ_accepts_the_access_token_type_in_any_case_with_or_without_application(typ: str) -> None:
    assert verify(static_jwt(required_typ="at+jwt"), sign(headers={"typ": typ})) is not None


@pytest.mark.parametrize("typ", ["JWT", None, "jwt", "", "at+jwt2", "application/jwt", "id+jwt", "at+jwt ", "at jwt"])
def test_required_typ_refuses_every_other_type_and_none(typ: str | None) -> None:
    token = sign(headers={"typ": typ})
    if typ in (None, ""):
        assert "typ" not in jwt.get_unverified_header(token)
    assert verify(static_jwt(required_typ="at+jwt"), token) is None
    assert Harness(static_jwt(required_typ="at+jwt")).request(bearer(token)).status == 401


@pytest.mark.parametrize("typ", ["JWT", None, "at+jwt", "id+jwt", "anything"])
def test_without_required_typ_any_type_passes(typ: str | None) -> None:
    token = sign(headers={"typ": typ})
    assert verify(static_jwt(required_typ=None), token) is not None
    assert verify(static_jwt(), token) is not None


@pytest.mark.parametrize("nonce", ["n-0S6_WzA2Mj", "", 0, None])
def test_an_id_token_with_a_nonce_is_refused_by_default(nonce: Any) -> None:
    assert verify(static_jwt(), sign(nonce=nonce)) is None
    assert verify(static_jwt(required_typ=None), sign(nonce=nonce, headers={"typ": "JWT"})) is None


@pytest.mark.parametrize(
    "answer",
    [
        {"token_type": "refresh_token"},
        {"token_type": "Refresh_Token"},
        {"token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
        {"token_use": "refresh"},
        {"typ": "Refresh"},
        {"typ": "refresh", "token_type": "Bearer"},
    ],
)
def test_introspection_refuses_an_answer_that_says_refresh_token(
    introspection: IntrospectionEndpoint, answer: dict[str, str]
) -> None:
    token = opaque("refresh-" + json.dumps(answer))
    introspection.answers[token] = {"active": True, "sub": "dana", "scope": "read", **answer}
    assert verify(introspector(introspection), token) is None


@pytest.mark.parametrize(
    "answer", [{"token_type": "Bearer"}, {"token_type": "access_token"}, {"token_use": "access"}, {"typ": "Bearer"}, {}]
)
def test_introspection_accepts_an_answer_that_says_access_token(
    introspection: IntrospectionEndpoint, answer: dict[str, str]
) -> None:
    token = opaque("access-" + json.dumps(answer))
    introspection.answers[token] = {"active": True, "sub": "dana", "scope": "read", **answer}
    assert verify(introspector(introspection), token) is not None


# The oldest mcp admitted is the oldest tested, and 2.0.x (whose SSE messages route acted on any
# method) is excluded: the installed SDK must be one pyproject.toml admits.


def admitted(requirement: str, version: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a small comparison for exactly the specifiers pyproject.toml uses: >= and !=X.*
        release = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
        for spec in requirement.removeprefix("mcp").split(","):
            floor = tuple(int(part) for part in re.findall(r"\d+", spec))
            below = spec.startswith(">=") and release < floor
            if below or (spec.startswith("!=") and release[: len(floor)] == floor):
                return False
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


@pytest.mark.parametrize("comparison", ["packaging", "without-packaging"])
def test_the_installed_mcp_is_one_pyproject_admits_and_the_floor_is_1_30_without_2_0(
    comparison: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tomllib = pytest.importorskip("tomllib")
    if comparison == "without-packaging":
        monkeypatch.setitem(sys.modules, "packaging.requirements", None)  # the import fails: the small comparison
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as file:
        project = tomllib.load(file)["project"]
    extras = project["optional-dependencies"].values()
    requirements = [r for extra in extras for r in extra if re.match(r"mcp\s*[<>=!~]", r)]
    assert set(requirements) == {"mcp>=1.30,!=2.0.*"}
    installed = importlib.metadata.version("mcp")
    assert admitted(requirements[0], installed), f"mcp {installed} is outside {requirements[0]}"
    versions = ("1.29.9", "1.30.0", "1.30.1", "2.0.0", "2.0.5", "2.1.0", "2.3.0")
    assert [v for v in versions if admitted(requirements[0], v)] == ["1.30.0", "1.30.1", "2.1.0", "2.3.0"]
