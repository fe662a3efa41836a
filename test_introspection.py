"""Opaque tokens: IntrospectionProvider against a real RFC 7662 endpoint on loopback (uvicorn,
nothing mocked at the HTTP layer) that authenticates its client (RFC 6749 section 2.3.1) and fails in
each way a token service fails in practice."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any
from urllib.parse import quote, quote_plus

import anyio
import pytest

from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    CachedProvider,
    IntrospectionProvider,
    ProviderChain,
    ProviderUnavailable,
    StaticTokenProvider,
)
from support import (
    ACTIVE,
    ACTIVE_ONE,
    ACTIVE_STRING,
    AUD_EXACT,
    AUD_EXTENDED,
    AUD_LIST_OTHER,
    AUD_NONE,
    AUD_OTHER,
    BOB,
    CLIENT_ID,
    CLIENT_SECRET,
    EXP_STRING,
    INACTIVE,
    INVALID_TOKEN,
    RESOURCE,
    SCOPE_LIST,
    SECRETS,
    TOKENS,
    UNAVAILABLE,
    WRONG_SECRET,
    Harness,
    IntrospectionEndpoint,
    assert_well_formed_http,
    bearer,
    call_json,
    claims_echo,
    closed_port_url,
    fingerprint,
    introspector,
    mcp_app,
    mcp_session,
    raw_request,
    serve,
    serve_with,
    verify,
    whoami,
)

# --- what an active token carries, and how the client authenticates ---------------------


def test_introspection_active_token_carries_the_response_as_claims(introspection: IntrospectionEndpoint) -> None:
    access = verify(introspector(introspection), ACTIVE)
    assert isinstance(access, AccessToken) and access.token == ACTIVE
    assert access.claims == introspection.answers[ACTIVE]  # the whole response, "active" included
    assert access.scopes == ["mcp:tools", "read"]  # RFC 7662 2.2: "scope" is space-separated
    assert access.expires_at == introspection.answers[ACTIVE]["exp"]
    (request,) = introspection.requests
    assert (request.method, request.path) == ("POST", "/introspect")
    assert request.header("accept") == ["application/json"]
    assert request.form == {"token": [ACTIVE], "token_type_hint": ["access_token"]}
    assert verify(introspector(introspection), AUD_NONE) == AccessToken(AUD_NONE, {"active": True, "sub": "erin"})


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_introspection_sends_the_client_credentials_as_configured_and_only_so(
    introspection: IntrospectionEndpoint, auth_method: str
) -> None:
    assert verify(introspector(introspection, auth_method=auth_method), ACTIVE) is not None  # the endpoint checked them
    (request,) = introspection.requests
    form = request.form
    assert form["token"] == [ACTIVE] and form["token_type_hint"] == ["access_token"]
    if auth_method == "client_secret_basic":
        assert len(request.header("authorization")) == 1 and request.header("authorization")[0].startswith("Basic ")
        assert set(form) == {"token", "token_type_hint"}  # no id or secret in the body
        assert CLIENT_SECRET.encode() not in request.body and quote_plus(CLIENT_SECRET).encode() not in request.body
    else:
        assert request.header("authorization") == []
        assert set(form) == {"token", "token_type_hint", "client_id", "client_secret"}
        assert form["client_id"] == [CLIENT_ID] and form["client_secret"] == [CLIENT_SECRET]
    assert not [name for name, value in request.headers if CLIENT_SECRET in value or ACTIVE in value]


@pytest.mark.parametrize("token", [INACTIVE, ACTIVE_STRING, ACTIVE_ONE], ids=["false", "string-true", "one"])
def test_introspection_anything_but_active_true_is_no_token(introspection: IntrospectionEndpoint, token: str) -> None:
    assert verify(introspector(introspection), token) is None  # RFC 7662 2.2: only the JSON literal true
    assert len(introspection.introspections) == 1


@pytest.mark.parametrize(
    ("token", "passes"),
    [
        (ACTIVE, True),  # a list holding the resource
        (AUD_EXACT, True),  # the resource as a string
        (AUD_OTHER, False),
        (AUD_LIST_OTHER, False),
        (AUD_EXTENDED, False),  # "https://mcp.example.com/mcp/admin" contains the resource, but is not it
        (AUD_NONE, False),
    ],
    ids=["list-holding-it", "string-equal", "string-other", "list-without-it", "string-extending-it", "absent"],
)
def test_introspection_audience_must_be_in_aud(introspection: IntrospectionEndpoint, token: str, passes: bool) -> None:
    """RFC 7662 section 4: a token issued for another resource server must not be accepted here."""
    access = verify(introspector(introspection, audience=RESOURCE), token)
    assert (access is not None) == passes
    assert verify(introspector(introspection), token) is not None  # without audience=, aud is not checked


# --- a token service that cannot answer: 503, never a 401 nor a pass --------------------


def test_introspection_wrong_client_credentials_are_unavailable_not_a_bad_token(
    introspection: IntrospectionEndpoint,
) -> None:
    """A 401 from the authorization server means our configuration is wrong, not the caller's token."""
    for auth_method in ("client_secret_basic", "client_secret_post"):
        with pytest.raises(ProviderUnavailable) as refused:
            verify(introspector(introspection, client_secret=WRONG_SECRET, auth_method=auth_method), ACTIVE)
        assert str(refused.value) == "introspection endpoint answered HTTP 401"
    outcome = Harness(introspector(introspection, client_secret=WRONG_SECRET)).request(bearer(ACTIVE))
    assert outcome.status == 503 and outcome.app_calls == []


@pytest.mark.parametrize(
    ("mode", "token"),
    [
        ("500", ACTIVE),
        ("hang", ACTIVE),
        ("garbage", ACTIVE),
        ("list", ACTIVE),
        ("oversize", ACTIVE),
        ("redirect", ACTIVE),
        ("refused", ACTIVE),
        ("ok", SCOPE_LIST),
        ("ok", EXP_STRING),
    ],
    ids=["500", "hang", "garbage", "list", "oversize", "redirect", "refused", "scope-list", "exp-string"],
)
def test_introspection_without_a_usable_answer_is_503_never_401_nor_a_pass(
    introspection: IntrospectionEndpoint, mode: str, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    introspection.mode = "ok" if mode == "refused" else mode
    url = closed_port_url("/introspect") if mode == "refused" else introspection.url
    provider = IntrospectionProvider(url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as refused:
        verify(provider, token)
    assert time.monotonic() - started < 1.5  # the timeout holds: 0.5 s, not the endpoint's 10 s hang
    for secret in (token, CLIENT_SECRET, quote_plus(CLIENT_SECRET)):
        assert secret not in str(refused.value) and secret not in repr(refused.value)
    with caplog.at_level(logging.DEBUG, logger="mcp_bearer"):
        outcome = Harness(provider).request(bearer(token))
    assert_well_formed_http(outcome.messages)
    assert outcome.status == 503 and outcome.json() == UNAVAILABLE and outcome.app_calls == []
    assert outcome.header("retry-after") == "5" and outcome.header("www-authenticate") is None
    assert [r.levelno for r in caplog.records if r.name == "mcp_bearer"] == [logging.WARNING]
    assert not [r for r in introspection.requests if r.path == "/redirected"]  # the redirect was not followed


@pytest.mark.slow
def test_introspection_never_blocks_the_event_loop(introspection: IntrospectionEndpoint) -> None:
    """While the token service hangs, API-key callers and public paths on the same server answer at once."""
    provider = ProviderChain(StaticTokenProvider(TOKENS), introspector(introspection, timeout=3.0))
    introspection.mode = "hang"
    hung: list[Any] = []
    with serve(BearerAuthMiddleware(claims_echo, provider)) as base:
        waiting = threading.Thread(
            target=lambda: hung.append(raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {ACTIVE}"}))
        )
        waiting.start()
        deadline = time.monotonic() + 5
        while not introspection.requests:
            assert time.monotonic() < deadline, "the introspection request never arrived"
            time.sleep(0.005)
        started = time.monotonic()
        status, _, body = raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {BOB}"})
        assert (status, json.loads(body)["sub"]) == (200, "bob")
        assert raw_request(base, "GET", "/health")[0] == 200
        assert time.monotonic() - started < 1.0 and waiting.is_alive()
        introspection.release.set()  # the token service answers after all: the waiting caller gets in
        waiting.join(5)
    assert hung[0][0] == 200 and json.loads(hung[0][2])["sub"] == "dana"


# --- configuration IntrospectionProvider refuses ----------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"url": "http://auth.example.com/introspect"}, ValueError, "must use https://"),
        ({"url": f"https://mcp:{quote(CLIENT_SECRET, safe='')}@auth.example.com/x"}, ValueError, "user:password@"),
        ({"url": "ftp://auth.example.com/introspect"}, ValueError, "https://"),
        ({"url": "https://auth.example.com/introspect#x"}, ValueError, "fragment"),
        ({"url": None}, TypeError, "url must be a str"),
        ({"auth_method": "private_key_jwt"}, ValueError, "auth_method must be"),
        ({"auth_method": "none"}, ValueError, "auth_method must be"),
        ({"client_id": ""}, TypeError, "client_id must be a non-empty str"),
        ({"client_secret": ""}, TypeError, "client_secret must be a non-empty str"),
        ({"client_secret": None}, TypeError, "client_secret must be a non-empty str"),
        ({"client_secret": CLIENT_SECRET.encode()}, TypeError, "client_secret must be a non-empty str"),
        ({"audience": ""}, TypeError, "audience"),
        ({"audience": [RESOURCE]}, TypeError, "audience"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": math.nan}, ValueError, "timeout"),
        ({"timeout": math.inf}, ValueError, "timeout"),
        ({"timeout": "5"}, TypeError, "timeout"),
        ({"timeout": True}, TypeError, "timeout"),
    ],
)
def test_introspection_refuses_a_bad_configuration_without_echoing_the_secret(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    arguments: dict[str, Any] = {
        "url": "https://auth.example.com/introspect",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    arguments.update(options)
    with pytest.raises(error, match=match) as refused:
        IntrospectionProvider(**arguments)
    assert CLIENT_SECRET[:8] not in str(refused.value)  # not even in part, nor as bytes or quoted


def test_introspection_repr_names_the_endpoint_never_the_secret_and_construction_is_offline(
    introspection: IntrospectionEndpoint,
) -> None:
    for auth_method in ("client_secret_basic", "client_secret_post"):
        text = repr(introspector(introspection, auth_method=auth_method, audience=RESOURCE))
        assert introspection.url in text and CLIENT_ID in text and RESOURCE in text
        assert not [s for s in SECRETS if s in text]
    for url in ("http://localhost:1/x", "http://127.0.0.2/x", "http://[::1]:1/x", "https://auth.example.com/x"):
        IntrospectionProvider(url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)  # loopback http is allowed
    assert introspection.requests == []  # a server starts while its token service is down


# --- end to end: the SDK's client under asyncio and trio --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn-trio"])
def test_e2e_introspected_claims_reach_whoami(introspection: IntrospectionEndpoint, server: str) -> None:
    """The SDK's client and tool, an opaque token, one introspection for the whole session (asyncio and trio)."""
    provider = CachedProvider(introspector(introspection, audience=RESOURCE))
    # Built outside any event loop, as a server process builds it: its locks then fit trio too.
    app = BearerAuthMiddleware(mcp_app(whoami), provider, required_scopes=["mcp:tools"])

    async def whoami_over_mcp(url: str) -> Any:
        async with mcp_session(url, ACTIVE) as (session, _):
            return await call_json(session, "whoami")

    with serve_with(server, app) as base:
        seen = anyio.run(whoami_over_mcp, base + "/mcp")
        assert seen == {
            "token": fingerprint(ACTIVE),
            "claims": introspection.answers[ACTIVE],
            "scopes": ["mcp:tools", "read"],
        }
        status, _, body = raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {AUD_OTHER}"})
        assert (status, json.loads(body)) == (401, INVALID_TOKEN)
    assert [r.form["token"] for r in introspection.introspections] == [[ACTIVE], [AUD_OTHER]]
