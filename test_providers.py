"""The providers that hold no network of their own: StaticTokenProvider's API keys, AccessToken,
and ProviderChain, which consults several in order."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import anyio
import pytest

from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    JWTProvider,
    ProviderChain,
    ProviderUnavailable,
    StaticTokenProvider,
)
from support import (
    ALICE_1,
    BOB,
    RESOURCE,
    SECRETS,
    T1,
    T2,
    T3,
    TOKENS,
    UNAVAILABLE,
    FakeProvider,
    Harness,
    IntrospectionEndpoint,
    SyncProvider,
    bearer,
    claims_echo,
    raw_request,
    serve,
    verdict,
    verify,
)

# --- StaticTokenProvider and AccessToken ------------------------------------------------


def test_static_provider_keeps_only_digests() -> None:
    provider = StaticTokenProvider({BOB: {"sub": "bob"}})
    assert BOB not in repr(vars(provider))
    assert BOB.encode() not in repr(vars(provider)).encode()
    # Its own source: an API key's subject never passes for an IdP's (principal_key).
    assert anyio.run(provider.verify_token, BOB) == AccessToken(BOB, {"sub": "bob"}, [], None, "mcp_bearer:api-key")
    assert anyio.run(provider.verify_token, BOB[:-1]) is None
    assert anyio.run(provider.verify_token, "caf\u00e9") is None  # non-ASCII str does not raise


def test_static_provider_scopes_come_from_claims_and_copies_are_returned() -> None:
    provider = StaticTokenProvider({BOB: {"sub": "bob", "scopes": ["read"]}})
    first = anyio.run(provider.verify_token, BOB)
    assert first is not None and first.scopes == ["read"]
    first.claims["sub"] = "mallory"
    first.scopes.append("admin")
    second = anyio.run(provider.verify_token, BOB)
    assert second is not None and second.claims["sub"] == "bob" and second.scopes == ["read"]


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        ([BOB], TypeError, "tokens must be a mapping"),
        ({"": {}}, ValueError, "token #1 is not"),
        ({"has space": {}}, ValueError, "token #1 is not"),
        ({BOB: {}, "sk-\u00e9": {}}, ValueError, "token #2 is not"),
        ({BOB: "bob"}, TypeError, "claims of token #1 must be a mapping"),
        ({BOB: {"scopes": "read write"}}, TypeError, 'token #1: "scopes" must be a list'),
    ],
)
def test_static_provider_refuses_bad_tokens_without_echoing_them(tokens: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        StaticTokenProvider(tokens)
    assert BOB not in str(caught.value) and "has space" not in str(caught.value)


def test_access_token_repr_hides_the_secret() -> None:
    token = AccessToken(BOB, {"sub": "bob"}, ["read"])
    assert BOB not in repr(token) and "bob" in repr(token)


# --- ProviderChain: the first AccessToken wins, a failure stops the chain ---------------


def test_chain_consults_in_order_the_first_access_token_wins_and_none_moves_on() -> None:
    first = FakeProvider({T1: verdict("from-first")})
    second = FakeProvider({T1: verdict("from-second"), T2: verdict("from-second")})
    chain = ProviderChain(first, second)

    def sub_seen(token: str) -> object:
        access = verify(chain, token)
        return None if access is None else access.claims["sub"]

    assert sub_seen(T1) == "from-first" and second.calls == []
    assert sub_seen(T2) == "from-second"
    assert verify(chain, T3) is None  # nobody knows it
    assert first.calls == [T1, T2, T3] and second.calls == [T2, T3]


@pytest.mark.parametrize(
    ("answer", "status"),
    [(RuntimeError("token store bug"), 500), (ProviderUnavailable(), 503), ({"sub": "x"}, 500)],
    ids=["raises", "unavailable", "wrong-type"],
)
def test_chain_a_broken_provider_stops_the_chain(answer: Any, status: int) -> None:
    """A provider that fails is never read as "not mine, try the next": that would hide outages and bugs."""
    broken, later = FakeProvider({T1: answer}), FakeProvider({T1: verdict()})
    chain = ProviderChain(broken, later)
    if isinstance(answer, Exception):
        with pytest.raises(type(answer)):
            verify(chain, T1)
    outcome = Harness(chain).request(bearer(T1))
    assert outcome.status == status and outcome.app_calls == [] and later.calls == []
    assert (outcome.header("retry-after") is not None) == (status == 503)


def jwt_shaped(claims: dict[str, Any]) -> str:
    """Three base64url segments with an RS256 header: what JWTProvider takes to be its own."""
    segments = [{"alg": "RS256", "kid": "key-1", "typ": "JWT"}, claims]
    encoded = [base64.urlsafe_b64encode(json.dumps(s).encode()).rstrip(b"=").decode() for s in segments]
    token = ".".join([*encoded, "c2lnbmF0dXJl"])
    SECRETS.add(token)
    return token


@pytest.mark.slow
def test_e2e_chain_api_key_callers_get_in_while_the_jwks_endpoint_is_down(introspection: IntrospectionEndpoint) -> None:
    """API keys first, then JWTs: an IdP outage costs the JWT callers a 503, not the API-key callers anything."""
    introspection.mode = "500"  # the loopback server stands in for an IdP whose JWKS endpoint is down
    jwks_url = introspection.url.replace("/introspect", "/jwks")
    jwts = JWTProvider(issuer="https://auth.example.com/", audience=RESOURCE, jwks_url=jwks_url, jwks_timeout=1.0)
    app = BearerAuthMiddleware(claims_echo, ProviderChain(StaticTokenProvider(TOKENS), jwts))
    token = jwt_shaped({"iss": "https://auth.example.com/", "aud": RESOURCE, "sub": "jay", "exp": time.time() + 60})
    with serve(app) as base:
        for key, sub in ((BOB, "bob"), (ALICE_1, "alice")):
            status, _, body = raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {key}"})
            assert (status, json.loads(body)["sub"]) == (200, sub)
        assert raw_request(base, "GET", "/mcp", {"Authorization": "Bearer sk-nobody-Zq8Lm3Wx"})[0] == 401
        assert introspection.requests == []  # not one JWKS fetch on behalf of a non-JWT
        status, headers, body = raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {token}"})
        assert (status, json.loads(body)) == (503, UNAVAILABLE) and int(headers["retry-after"]) >= 1
        assert [r.path for r in introspection.requests] == ["/jwks"]  # the JWT did go to the IdP
        assert raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {BOB}"})[0] == 200
    assert len(introspection.requests) == 1


@pytest.mark.parametrize(
    ("providers", "error", "match"),
    [
        ((), ValueError, "at least one provider"),
        ((StaticTokenProvider(TOKENS), SyncProvider()), TypeError, "provider #2: SyncProvider.verify_token must be"),
        ((object(),), TypeError, "provider #1"),
    ],
)
def test_chain_refuses_a_bad_configuration(providers: tuple[Any, ...], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ProviderChain(*providers)
