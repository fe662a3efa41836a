"""The middleware's contract, called directly with hand-built ASGI scopes: no server, no network.

What RFC 6750 and RFC 9110 say a bearer-token check must answer to every request, what it must
never let through, and what it does when its provider fails or it is configured wrongly. Every other
capability has a test file of its own; what they share is in support.py and conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import string
import time
import zlib
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from mcp_bearer import (
    DEFAULT_EXCLUDED_PATHS,
    DEFAULT_MAX_TOKEN_LENGTH,
    AccessToken,
    AuthenticationError,
    BearerAuthMiddleware,
    ProviderUnavailable,
    get_access_token,
    require_auth,
    require_scopes,
)
from support import (
    ALICE_1,
    BOB,
    CHALLENGE_INVALID,
    CHALLENGE_MALFORMED,
    INVALID_TOKEN,
    MALFORMED,
    NOT_BUILT,
    PREFLIGHT,
    SERVER_ERROR,
    SESSION_NOT_FOUND,
    TOKENS,
    UNAUTHORIZED,
    UNAVAILABLE,
    FakeProvider,
    Harness,
    Headers,
    Message,
    Outcome,
    Receive,
    Scope,
    Send,
    SyncProvider,
    assert_no_secret_logged,
    assert_well_formed_http,
    bearer,
    mcp_bearer_log,
    never_receive,
    never_send,
    record_text,
)

# --- the 401/400 table: RFC 6750 section 3 and the refusals we add ----------------------


@pytest.mark.parametrize(
    ("headers", "status", "body", "challenge", "provider_sees"),
    [
        ([], 401, UNAUTHORIZED, "Bearer", None),
        ([(b"authorization", b"Basic YWxpY2U6cHc=")], 401, UNAUTHORIZED, "Bearer", None),
        ([(b"authorization", b"Bearer")], 401, UNAUTHORIZED, "Bearer", None),
        ([(b"authorization", b"Bearer   ")], 401, UNAUTHORIZED, "Bearer", None),
        ([(b"authorization", b"Bearerx")], 401, UNAUTHORIZED, "Bearer", None),
        (bearer("sk-nobody"), 401, INVALID_TOKEN, CHALLENGE_INVALID, "sk-nobody"),
        ([(b"authorization", b"Bearer " + b"a" * 8193)], 401, INVALID_TOKEN, CHALLENGE_INVALID, None),
        (bearer(BOB) + bearer(BOB), 400, MALFORMED, CHALLENGE_MALFORMED, None),
        ([(b"authorization", b"Bearer a b")], 400, MALFORMED, CHALLENGE_MALFORMED, None),
        ([(b"authorization", b"Bearer a\tb")], 400, MALFORMED, CHALLENGE_MALFORMED, None),
        ([(b"authorization", b"Bearer a,b")], 400, MALFORMED, CHALLENGE_MALFORMED, None),
        ([(b"authorization", b'Bearer "a"')], 400, MALFORMED, CHALLENGE_MALFORMED, None),
        ([(b"authorization", "Bearer sk-caf\u00e9".encode())], 400, MALFORMED, CHALLENGE_MALFORMED, None),
        ([(b"authorization", b"Bearer a=b")], 400, MALFORMED, CHALLENGE_MALFORMED, None),
    ],
    ids=[
        "no-header",
        "basic",
        "bearer-alone",
        "bearer-spaces-only",
        "bearerx-other-scheme",
        "unknown-token",
        "over-max-length",
        "two-headers",
        "inner-space",
        "inner-tab",
        "comma",
        "quoted",
        "non-ascii",
        "padding-not-at-end",
    ],
)
def test_refusal_table(
    headers: Headers, status: int, body: dict[str, str], challenge: str, provider_sees: str | None
) -> None:
    harness = Harness()
    outcome = harness.request(headers)
    assert_well_formed_http(outcome.messages)
    assert outcome.status == status
    assert outcome.json() == body
    assert outcome.header("www-authenticate") == challenge
    assert outcome.header("content-type") == "application/json"
    assert outcome.header("content-length") == str(len(outcome.body))
    assert outcome.provider_calls == ([provider_sees] if provider_sees else [])
    assert outcome.app_calls == []


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer {BOB}",
        f"bearer {BOB}",
        f"BEARER {BOB}",
        f"BeArEr {BOB}",
        f"Bearer    {BOB}",  # RFC 9110: 1*SP between scheme and token
        f"  \tBearer {BOB} \t ",  # OWS around the field value
    ],
)
def test_valid_token_reaches_the_app_with_its_identity(value: str) -> None:
    harness = Harness()
    outcome = harness.request([(b"authorization", value.encode())])
    assert outcome.status == 200 and outcome.body == b"app"
    assert outcome.provider_calls == [BOB]
    ((scope, seen),) = outcome.app_calls
    assert seen is not None and seen.token == BOB and seen.claims["sub"] == "bob"
    assert seen.scopes == ["read", "write"]
    assert scope["state"]["access_token"] is seen


@pytest.mark.parametrize("name", [b"Authorization", b"AUTHORIZATION", b"aUtHoRiZaTiOn"])
def test_header_name_is_case_insensitive(name: bytes) -> None:
    outcome = Harness().request([(name, f"Bearer {BOB}".encode())])
    assert outcome.status == 200 and outcome.provider_calls == [BOB]


def test_two_authorization_headers_in_different_case_are_still_two() -> None:
    outcome = Harness().request([(b"Authorization", f"Bearer {BOB}".encode()), (b"authorization", b"Bearer x")])
    assert outcome.status == 400 and outcome.json() == MALFORMED and outcome.app_calls == []


def test_token_of_exactly_max_length_is_verified() -> None:
    token = "k" * 64
    harness = Harness(FakeProvider(tokens={token: {"sub": "long"}}), max_token_length=64)
    assert harness.request(bearer(token)).status == 200
    over = harness.request(bearer(token + "k"))
    assert over.status == 401 and over.json() == INVALID_TOKEN and over.provider_calls == []


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([(b"proxy-authorization", f"Bearer {BOB}".encode())], b""),
        ([], f"access_token={BOB}".encode()),
        ([(b"cookie", f"access_token={BOB}".encode())], b""),
    ],
    ids=["proxy-authorization", "query-string", "cookie"],
)
def test_token_elsewhere_than_authorization_is_no_token(headers: Headers, query: bytes) -> None:
    outcome = Harness().request(headers, query_string=query)
    assert outcome.status == 401 and outcome.json() == UNAUTHORIZED
    assert outcome.provider_calls == [] and outcome.app_calls == []


# --- a provider that fails: an honest 500 or 503, never a pass --------------------------


@pytest.mark.parametrize(
    "provider",
    [
        FakeProvider(otherwise=RuntimeError),
        FakeProvider(otherwise={"sub": "bob"}),
        FakeProvider(otherwise=BOB),
        FakeProvider(otherwise=True),
    ],
    ids=["raises", "returns-dict", "returns-str", "returns-true"],
)
def test_provider_failure_is_500_logged_and_fails_closed(
    provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="mcp_bearer"):
        outcome = Harness(provider).request(bearer(BOB))
    assert outcome.status == 500 and outcome.json() == SERVER_ERROR
    assert outcome.header("www-authenticate") is None
    assert outcome.app_calls == []
    (record,) = [r for r in caplog.records if r.name == "mcp_bearer"]
    assert record.levelno == logging.ERROR
    assert BOB not in record_text(record)
    if provider.otherwise is RuntimeError:
        text = record.getMessage()
        assert "Traceback" in text and "RuntimeError: lookup failed for [token]" in text


def test_provider_verify_token_must_be_async() -> None:
    with pytest.raises(TypeError, match="verify_token must be an async method"):
        BearerAuthMiddleware(Harness().app, SyncProvider())  # type: ignore[arg-type]


def test_provider_unavailable_is_503_with_retry_after_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    cases = {0.2: "1", 1.0: "1", 2.5: "3", 30: "30", -5: "1", float("nan"): "1", float("inf"): "3600", 1e9: "3600"}
    for retry_after, header in cases.items():
        caplog.clear()
        provider = FakeProvider(otherwise=ProviderUnavailable(retry_after=retry_after))
        with caplog.at_level(logging.DEBUG, logger="mcp_bearer"):
            outcome = Harness(provider).request(bearer(BOB))
        assert_well_formed_http(outcome.messages)
        assert outcome.status == 503 and outcome.json() == UNAVAILABLE
        assert outcome.header("retry-after") == header, retry_after
        assert outcome.header("www-authenticate") is None and outcome.app_calls == []
        assert outcome.header("content-length") == str(len(outcome.body))
        (record,) = [r for r in caplog.records if r.name == "mcp_bearer"]
        assert record.levelno == logging.WARNING and BOB not in record_text(record)
    assert ProviderUnavailable().retry_after == 5.0
    assert str(ProviderUnavailable()) == "Token verification is temporarily unavailable"


@pytest.mark.parametrize("refused", [bearer("sk-nobody"), []], ids=["invalid-token", "no-token"])
def test_a_send_that_fails_mid_refusal_is_not_reported_as_a_provider_failure(refused: Headers) -> None:
    """The client goes away while the refusal is being sent: send raises on the body.

    The error must reach the server as it is, and no second response may be started
    (ASGI: one http.response.start per request); nor is it a provider crash to log.
    """
    harness = Harness()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            raise OSError("client disconnected")

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    scope: Scope = {"type": "http", "method": "POST", "path": "/mcp", "root_path": "", "headers": refused}
    with mcp_bearer_log() as records, pytest.raises(OSError, match="client disconnected"):
        anyio.run(harness.middleware, scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 401
    assert not [r for r in records if r.levelno > logging.DEBUG]  # at most why the token was refused
    assert harness.app_calls == []


# --- configuration the middleware refuses to be built with ------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"exclude_paths": "/health"}, TypeError, "exclude_paths must be a list or tuple"),
        ({"exclude_paths": ["health"]}, ValueError, "must start with '/'"),
        ({"exclude_paths": ["/ok\n"]}, ValueError, "control characters"),
        ({"max_token_length": 0}, ValueError, "max_token_length must be a positive int"),
        ({"max_token_length": True}, TypeError, "max_token_length must be a positive int, not bool"),
        ({"max_sessions": 0}, ValueError, "max_sessions must be a positive int"),
        ({"required_scopes": "read"}, TypeError, "required_scopes must be a list or tuple"),
        ({"required_scopes": ["read write"]}, ValueError, "scope-token"),
        ({"required_scopes": ['a"b']}, ValueError, "scope-token"),
        ({"resource": "mcp.example.com/mcp"}, ValueError, "absolute http"),
        ({"resource": "https://x/mcp#frag"}, ValueError, "without query or fragment"),
        ({"resource": "https://x/mcp\r\nSet-Cookie: a=b"}, ValueError, "printable ASCII"),
        ({"resource": "https://x/mcp", "authorization_servers": ["ftp://as"]}, ValueError, "absolute http"),
        ({"resource": "https://x/mcp", "resource_name": "a\x00b"}, ValueError, "control characters"),
        ({"realm": 'x"\r\ny'}, ValueError, "printable ASCII"),
        ({"authorization_servers": ["https://as"]}, ValueError, "need resource="),
        ({"exclud_paths": ["/health"]}, TypeError, "unexpected keyword argument 'exclud_paths'"),
    ],
)
def test_wrong_configuration_is_refused_clearly_and_logged(options: dict[str, Any], error: type, match: str) -> None:
    with mcp_bearer_log() as records, pytest.raises(error, match=match) as refused:
        BearerAuthMiddleware(Harness().app, FakeProvider(), **options)
    # Lazy builders (Starlette's add_middleware) can swallow the exception; the ERROR record remains.
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, f"{NOT_BUILT}{error.__name__}: {refused.value}")
    ]


def test_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="app must be an ASGI callable"):
        BearerAuthMiddleware("app", FakeProvider())  # type: ignore[arg-type]


# --- paths, root_path and scope types ---------------------------------------------------


@pytest.mark.parametrize("path", DEFAULT_EXCLUDED_PATHS)
def test_default_excluded_paths_are_public(path: str) -> None:
    outcome = Harness().request(path=path, method="GET")
    assert outcome.status == 200 and outcome.provider_calls == []
    ((_, seen),) = outcome.app_calls
    assert seen is None


@pytest.mark.parametrize("path", ["/health/", "/healthz", "/HEALTH", "//health", "/health/../mcp", "/", "/mcp", ""])
def test_excluded_path_lookalikes_are_protected(path: str) -> None:
    outcome = Harness().request(path=path, method="GET")
    assert outcome.status == 401 and outcome.app_calls == []


@pytest.mark.parametrize(
    ("root_path", "path", "public"),
    [
        ("/api", "/api/health", True),
        ("/api", "/api/mcp", False),
        ("/api", "/health", True),  # old-style scope whose path lacks root_path: nothing to strip
        ("/api", "/apihealth", False),
        ("/api", "/api/api/health", False),
        ("/other", "/api/health", False),
    ],
)
def test_root_path_is_stripped_before_matching(root_path: str, path: str, public: bool) -> None:
    outcome = Harness().request(path=path, root_path=root_path, method="GET")
    assert (outcome.status == 200) is public
    assert bool(outcome.app_calls) is public


def test_custom_excluded_paths_replace_the_defaults() -> None:
    harness = Harness(exclude_paths=["/status"])
    assert harness.request(path="/status").status == 200
    assert harness.request(path="/health").status == 401


def test_lifespan_passes_straight_through() -> None:
    harness = Harness()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    anyio.run(harness.middleware, scope, never_receive, never_send)
    assert harness.app_calls == [(scope, None)]


def test_other_scope_types_are_refused_not_passed_on() -> None:
    provider = FakeProvider()
    harness = Harness(provider)
    with pytest.raises(RuntimeError, match="refusing ASGI scope type 'webtransport'"):
        harness.request(bearer(BOB), scope_type="webtransport")
    assert harness.app_calls == [] and provider.calls == []


def test_websocket_refused_with_http_response_extension() -> None:
    harness = Harness()
    outcome = harness.request([], scope_type="websocket", extensions={"websocket.http.response": {}})
    start, body = outcome.messages
    assert start["type"] == "websocket.http.response.start" and start["status"] == 401
    assert (b"www-authenticate", b"Bearer") in start["headers"]
    assert body["type"] == "websocket.http.response.body" and json.loads(body["body"]) == UNAUTHORIZED
    assert harness.app_calls == []


def test_websocket_refused_with_close_1008_without_extension() -> None:
    harness = Harness()
    outcome = harness.request(bearer("sk-nobody"), scope_type="websocket")
    assert outcome.messages == [{"type": "websocket.close", "code": 1008}]
    assert harness.app_calls == []


def test_websocket_with_valid_token_is_accepted() -> None:
    harness = Harness()
    outcome = harness.request(bearer(BOB), scope_type="websocket")
    assert outcome.messages == [{"type": "websocket.accept"}]
    seen = harness.app_calls[0][1]
    assert seen is not None and seen.token == BOB


@pytest.mark.parametrize(
    ("headers", "allow", "passes"),
    [
        (PREFLIGHT, True, True),
        ([(b"Origin", b"https://app.example"), (b"Access-Control-Request-Method", b"POST")], True, True),
        (PREFLIGHT[:1], True, False),
        (PREFLIGHT[1:], True, False),
        ([], True, False),
        (PREFLIGHT, False, False),
    ],
    ids=["preflight", "preflight-odd-case", "origin-only", "method-only", "bare-options", "preflight-disabled"],
)
def test_only_a_real_cors_preflight_is_answered_without_credentials_and_never_by_the_app(
    headers: Headers, allow: bool, passes: bool
) -> None:
    """A preflight can never act: the middleware answers it, so no app (nor an older SDK) ever sees one."""
    outcome = Harness(allow_cors_preflight=allow).request(headers, method="OPTIONS", body=b'{"jsonrpc": "2.0"}')
    assert (outcome.status == 204) is passes and outcome.app_calls == []
    if passes:
        assert outcome.body == b"" and outcome.header("access-control-allow-origin") == "*"
        assert outcome.header("access-control-allow-headers") == "authorization, *"
    else:
        assert outcome.status == 401 and outcome.json() == UNAUTHORIZED
    assert outcome.provider_calls == []


# --- context: the identity is the request's own, and gone after it ----------------------


def test_context_is_reset_after_the_request_and_never_leaks_to_the_caller() -> None:
    harness = Harness()

    async def two_requests_on_one_task() -> list[AccessToken | None]:
        seen = []
        for headers in (bearer(BOB), [], bearer(ALICE_1)):

            async def send(message: Message) -> None:
                pass

            scope: Scope = {"type": "http", "method": "POST", "path": "/mcp", "root_path": "", "headers": headers}
            await harness.middleware(scope, never_receive, send)
            seen.append(get_access_token())  # the caller's context, after the request
        return seen

    assert anyio.run(two_requests_on_one_task) == [None, None, None]
    assert [t.token if t else None for _, t in harness.app_calls] == [BOB, ALICE_1]
    assert get_access_token() is None


def test_context_is_reset_when_the_app_raises() -> None:
    async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
        assert get_access_token() is not None
        raise ValueError("app bug")

    middleware = BearerAuthMiddleware(failing_app, FakeProvider())

    async def run() -> AccessToken | None:
        scope: Scope = {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": bearer(BOB)}
        with pytest.raises(ValueError, match="app bug"):
            await middleware(scope, never_receive, never_send)
        return get_access_token()

    assert anyio.run(run) is None


def test_the_sdks_caller_is_the_requests_own_and_gone_after_it_even_when_the_app_raises() -> None:
    """With sdk_identity, the SDK's auth context variable holds the caller for the app only."""
    from mcp.server.auth.middleware.auth_context import get_access_token as sdk_access_token

    seen: list[tuple[str | None, str | None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        access = sdk_access_token()
        seen.append((access.subject if access else None, scope["user"].access_token.subject))
        if access is not None and access.subject == "alice":
            raise ValueError("app bug")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = BearerAuthMiddleware(app, FakeProvider(), sdk_identity=True)

    async def discard(message: Message) -> None:
        pass

    async def run() -> list[object]:
        after: list[object] = []
        for token in (BOB, ALICE_1, BOB):
            scope: Scope = {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": bearer(token)}
            with contextlib.suppress(ValueError):
                await middleware(scope, never_receive, discard)
            after.append(sdk_access_token())
        return after

    assert anyio.run(run) == [None, None, None]
    assert seen == [("bob", "bob"), ("alice", "alice"), ("bob", "bob")]


def test_state_is_created_when_absent_and_kept_when_present() -> None:
    harness = Harness()
    harness.request(bearer(BOB))
    assert harness.app_calls[0][0]["state"]["access_token"].token == BOB
    harness.request(bearer(BOB), state={"from_lifespan": 1})
    assert harness.app_calls[1][0]["state"] == {"from_lifespan": 1, "access_token": harness.app_calls[1][1]}


def test_helpers_outside_a_request() -> None:
    assert get_access_token() is None
    with pytest.raises(AuthenticationError, match="Authentication required"):
        require_auth()
    with pytest.raises(AuthenticationError, match="Authentication required"):
        require_scopes("read")


def test_refusals_send_a_fresh_header_list_each_time() -> None:
    """Outer middleware (Starlette's CORSMiddleware) appends to message["headers"] in place."""
    harness = Harness()
    first = harness.request([])
    first.messages[0]["headers"].append((b"access-control-allow-origin", b"*"))
    second = harness.request([])
    assert second.header("access-control-allow-origin") is None
    assert len(second.headers) == len(first.headers) - 1


# --- hostile requests: the adversarial table --------------------------------------------


Response = tuple[int | str, Any]  # (status, body) or, for non-HTTP answers, (event, detail)

BOB_B = BOB.encode()
MEGABYTE = 1 << 20
MAX_TOKEN = "sk-max-" + "A" * (DEFAULT_MAX_TOKEN_LENGTH - 7)  # a real key of exactly max_token_length
TABLE_TOKENS: dict[str, dict[str, Any]] = {**TOKENS, MAX_TOKEN: {"sub": "max"}}
WS_HTTP_RESPONSE: dict[str, Any] = {"extensions": {"websocket.http.response": {}}}

APP: Response = (200, "app")  # what Harness's app answers
RAISES: Response = ("raises", RuntimeError)
Expected = tuple[Response, list[str], bool]  # (response, tokens the provider was asked about, app called)
PUBLIC: Expected = (APP, [], True)
PREFLIGHT_ANSWER: Response = (204, None)  # answered by the middleware, no body
ANSWERED_PREFLIGHT: Expected = (PREFLIGHT_ANSWER, [], False)
NO_CREDENTIALS: Expected = ((401, UNAUTHORIZED), [], False)
MALFORMED_400: Expected = ((400, MALFORMED), [], False)
TOO_LONG: Expected = ((401, INVALID_TOKEN), [], False)


def verified(token: str = BOB) -> Expected:
    return APP, [token], True


def rejected(token: str) -> Expected:
    return (401, INVALID_TOKEN), [token], False


def auth(value: bytes) -> Headers:
    return [(b"authorization", value)]


def case(case_id: str, headers: Headers, expect: Expected, **request: Any) -> Any:
    return pytest.param(headers, request, *expect, id=case_id)


def observe(outcome: Outcome) -> Response:
    """Reduce any answer to (status, body), so one table covers http, websocket and lifespan."""
    if not outcome.messages:
        return ("silent", None)  # lifespan: the app was called and answered nothing
    first = outcome.messages[0]
    if first["type"] == "websocket.close":
        return ("close", first["code"])
    if first["type"] == "websocket.accept":
        return ("accept", None)
    if first["type"] == "http.response.start":
        assert_well_formed_http(outcome.messages)
    if first["status"] == 204:
        return 204, None if outcome.body == b"" else outcome.body
    return first["status"], "app" if outcome.body == b"app" else outcome.json()


ADVERSARIAL = [
    case("baseline-valid", bearer(BOB), verified()),
    # Duplicates: two credentials and a proxy or app that picks another one than we did.
    case("dup-valid-then-invalid", bearer(BOB) + bearer("sk-nobody"), MALFORMED_400),
    case("dup-invalid-then-valid", bearer("sk-nobody") + bearer(BOB), MALFORMED_400),
    case("dup-valid-twice", bearer(BOB) + bearer(BOB), MALFORMED_400),
    case("dup-two-users", bearer(ALICE_1) + bearer(BOB), MALFORMED_400),
    case("dup-valid-then-empty", bearer(BOB) + auth(b""), MALFORMED_400),
    case("dup-basic-then-valid", auth(b"Basic eDp5") + bearer(BOB), MALFORMED_400),
    case(
        "dup-odd-case-names", [(b"AUTHORIZATION", b"Bearer x"), (b"aUtHoRiZaTiOn", b"Bearer " + BOB_B)], MALFORMED_400
    ),
    case("dup-far-apart", bearer(BOB) + [(b"x-a", b"1")] * 50 + [(b"Authorization", b"Bearer x")], MALFORMED_400),
    # Comma-joined (RFC 9110 5.3 list folding by a proxy): one header, token with ", " in it.
    case("comma-valid-invalid", auth(b"Bearer " + BOB_B + b", Bearer sk-nobody"), MALFORMED_400),
    case("comma-invalid-valid", auth(b"Bearer sk-nobody, Bearer " + BOB_B), MALFORMED_400),
    case("comma-valid-valid-no-space", auth(b"Bearer " + BOB_B + b",Bearer " + BOB_B), MALFORMED_400),
    case("comma-basic-then-bearer", auth(b"Basic eDp5, Bearer " + BOB_B), NO_CREDENTIALS),
    # Header names: case-insensitive (RFC 9110 5.1), but look-alike names are other headers.
    case("name-title-case", [(b"Authorization", b"Bearer " + BOB_B)], verified()),
    case("name-upper-case", [(b"AUTHORIZATION", b"Bearer " + BOB_B)], verified()),
    case("name-mixed-case", [(b"aUtHoRiZaTiOn", b"Bearer " + BOB_B)], verified()),
    case("name-trailing-space", [(b"authorization ", b"Bearer " + BOB_B)], NO_CREDENTIALS),
    case("name-trailing-nul", [(b"authorization\x00", b"Bearer " + BOB_B)], NO_CREDENTIALS),
    case("name-british", [(b"authorisation", b"Bearer " + BOB_B)], NO_CREDENTIALS),
    case("name-x-prefixed", [(b"x-authorization", b"Bearer " + BOB_B)], NO_CREDENTIALS),
    # Scheme and separator (RFC 9110 11.1 scheme case-insensitive, 1*SP; RFC 6750 2.1).
    case("bearer-alone", auth(b"Bearer"), NO_CREDENTIALS),
    case("bearer-space", auth(b"Bearer "), NO_CREDENTIALS),
    case("bearer-two-spaces-valid", auth(b"Bearer  " + BOB_B), verified()),
    case("bearer-tab-valid", auth(b"Bearer\t" + BOB_B), MALFORMED_400),
    case("bearer-space-tab-valid", auth(b"Bearer \t" + BOB_B), MALFORMED_400),
    case("bearer-vtab-valid", auth(b"Bearer\x0b" + BOB_B), MALFORMED_400),
    case("bearer-nbsp-valid", auth(b"Bearer\xa0" + BOB_B), MALFORMED_400),
    case("bearer-colon-valid", auth(b"Bearer:" + BOB_B), MALFORMED_400),
    case("bearer-slash-valid", auth(b"Bearer/" + BOB_B), MALFORMED_400),  # "/" ends the scheme yet is token68
    case("bearer-quote-valid", auth(b'Bearer"' + BOB_B + b'"'), MALFORMED_400),
    case("bearerx", auth(b"Bearerx"), NO_CREDENTIALS),
    case("bearer-glued-valid", auth(b"Bearer" + BOB_B), NO_CREDENTIALS),  # "Bearersk-bob..." is one scheme
    case("bearer-dot-valid", auth(b"Bearer." + BOB_B), NO_CREDENTIALS),  # "." is a tchar: still one scheme
    case("mixed-case-scheme-valid", auth(b"BeArEr " + BOB_B), verified()),
    case("basic-valid", auth(b"Basic " + BOB_B), NO_CREDENTIALS),
    case("token-scheme-valid", auth(b"Token " + BOB_B), NO_CREDENTIALS),
    case("bearer-bearer-valid", auth(b"Bearer Bearer " + BOB_B), MALFORMED_400),
    case("valid-then-word", auth(b"Bearer " + BOB_B + b" y"), MALFORMED_400),
    case("valid-quoted", auth(b'Bearer "' + BOB_B + b'"'), MALFORMED_400),
    case("valid-trailing-comma", auth(b"Bearer " + BOB_B + b","), MALFORMED_400),
    case("valid-padding-is-another-token", auth(b"Bearer " + BOB_B + b"="), rejected(BOB + "=")),
    case("leading-padding", auth(b"Bearer =" + BOB_B), MALFORMED_400),
    case("ows-around-valid", auth(b" \t Bearer " + BOB_B + b"\t "), verified()),
    # Control and non-ASCII bytes: never let them near a provider, a log or a SQL query.
    case("nul-after-valid", auth(b"Bearer " + BOB_B + b"\x00"), MALFORMED_400),
    case("nul-inside-valid", auth(b"Bearer sk-bob\x00" + BOB_B[6:]), MALFORMED_400),
    case("nul-before-scheme", auth(b"\x00Bearer " + BOB_B), NO_CREDENTIALS),
    case("cr-after-valid", auth(b"Bearer " + BOB_B + b"\r"), MALFORMED_400),
    case("lf-after-valid", auth(b"Bearer " + BOB_B + b"\n"), MALFORMED_400),
    case("crlf-injection", auth(b"Bearer " + BOB_B + b"\r\nX-Admin: 1"), MALFORMED_400),
    case("del-after-valid", auth(b"Bearer " + BOB_B + b"\x7f"), MALFORMED_400),
    case("latin1-after-valid", auth(b"Bearer " + BOB_B + b"\xe9"), MALFORMED_400),
    case("latin1-only", auth(b"Bearer \xff\xfe"), MALFORMED_400),
    case("latin1-in-scheme", auth(b"B\xe9arer " + BOB_B), NO_CREDENTIALS),
    # Length: exactly max_token_length is verified; one byte more never reaches the provider.
    case("exactly-max-length", bearer(MAX_TOKEN), verified(MAX_TOKEN)),
    case("max-length-plus-one", bearer(MAX_TOKEN + "A"), TOO_LONG),
    case("megabyte-token", auth(b"Bearer " + b"A" * MEGABYTE), TOO_LONG),
    case("megabyte-spaces-then-valid", auth(b"Bearer" + b" " * MEGABYTE + BOB_B), verified()),  # 1*SP
    case("valid-then-megabyte-spaces", auth(b"Bearer " + BOB_B + b" " * MEGABYTE), verified()),
    case("megabyte-other-header-valid", [(b"x-junk", b"j" * MEGABYTE), *bearer(BOB)], verified()),
    case("megabyte-spaces-only", auth(b"Bearer" + b" " * MEGABYTE), NO_CREDENTIALS),
    # Only RFC 6750 2.1 (the Authorization header) is accepted: no 2.2 body, 2.3 query, cookies, proxies.
    case("proxy-authorization-only", [(b"proxy-authorization", b"Bearer " + BOB_B)], NO_CREDENTIALS),
    case("query-only", [], NO_CREDENTIALS, query_string=b"access_token=" + BOB_B),
    case("cookie-only", [(b"cookie", b"access_token=" + BOB_B)], NO_CREDENTIALS),
    case(
        "proxy-valid-header-unknown", [(b"proxy-authorization", b"Bearer " + BOB_B), *bearer("sk-x")], rejected("sk-x")
    ),
    # Excluded paths match exactly; a look-alike must not become a public route to the app.
    case("health-public", [], PUBLIC, path="/health", method="GET"),
    case("health-ignores-even-bad-auth", bearer(BOB) + bearer("x"), PUBLIC, path="/health", method="GET"),
    case("health-trailing-slash", bearer("x") + bearer("y"), MALFORMED_400, path="/health/"),
    case("healthz", [], NO_CREDENTIALS, path="/healthz"),
    case("health-upper", [], NO_CREDENTIALS, path="/HEALTH"),
    case("health-double-slash", [], NO_CREDENTIALS, path="//health"),
    case("health-dotdot", [], NO_CREDENTIALS, path="/health/../mcp"),
    case("health-2f-encoded-path", [], NO_CREDENTIALS, path="/health%2F..%2Fmcp"),
    case("health-2f-decoded-path", [], NO_CREDENTIALS, path="/health/../mcp", raw_path=b"/health%2F..%2Fmcp"),
    case("raw-path-says-health", [], NO_CREDENTIALS, path="/mcp", raw_path=b"/health"),
    case("health-semicolon", [], NO_CREDENTIALS, path="/health;x"),
    case("health-question-mark", [], NO_CREDENTIALS, path="/health?x"),
    case("health-nul", [], NO_CREDENTIALS, path="/health\x00"),
    case("health-leading-space", [], NO_CREDENTIALS, path=" /health"),
    case("empty-path", [], NO_CREDENTIALS, path=""),
    case("empty-path-valid", bearer(BOB), verified(), path=""),
    # root_path (ASGI: path includes it) is stripped only when path starts with it.
    case("root-match-public", [], PUBLIC, path="/api/health", root_path="/api"),
    case("root-match-protected", bearer(BOB), verified(), path="/api/mcp", root_path="/api"),
    case("root-no-slash-boundary", [], NO_CREDENTIALS, path="/apihealth", root_path="/api"),
    case("root-double-slash", [], NO_CREDENTIALS, path="/api//health", root_path="/api"),
    case("root-trailing-slash", [], NO_CREDENTIALS, path="/api/health", root_path="/api/"),
    case("root-case-differs", [], NO_CREDENTIALS, path="/API/health", root_path="/api"),
    case("root-other-prefix", [], NO_CREDENTIALS, path="/api/health", root_path="/other"),
    case("root-stripped-once", [], NO_CREDENTIALS, path="/api/api/health", root_path="/api"),
    case("root-is-the-excluded-path", [], NO_CREDENTIALS, path="/health", root_path="/health"),
    # HEAD and OPTIONS: only a real CORS preflight (Fetch: Origin + Access-Control-Request-Method) is free.
    case("head-no-token", [], NO_CREDENTIALS, method="HEAD"),
    case("head-valid", bearer(BOB), verified(), method="HEAD"),
    case("options-bare", [], NO_CREDENTIALS, method="OPTIONS"),
    case("options-origin-only", PREFLIGHT[:1], NO_CREDENTIALS, method="OPTIONS"),
    case("options-acrm-only", PREFLIGHT[1:], NO_CREDENTIALS, method="OPTIONS"),
    case("options-preflight", PREFLIGHT, ANSWERED_PREFLIGHT, method="OPTIONS"),
    case(
        "options-preflight-odd-case",
        [(b"ORIGIN", b"x"), (b"Access-Control-Request-Method", b"GET")],
        ANSWERED_PREFLIGHT,
        method="OPTIONS",
    ),
    case("options-lowercase-method", PREFLIGHT, NO_CREDENTIALS, method="options"),
    case("post-with-preflight-headers", PREFLIGHT, NO_CREDENTIALS, method="POST"),
    case("get-with-preflight-headers-bad-auth", PREFLIGHT + bearer("x") + bearer("y"), MALFORMED_400, method="GET"),
    # Session binding: a session id is never a credential, and an unknown one is 404.
    case("session-no-token", [(b"mcp-session-id", b"s1")], NO_CREDENTIALS),
    case("session-unknown-valid", [(b"mcp-session-id", b"s1"), *bearer(BOB)], ((404, SESSION_NOT_FOUND), [BOB], False)),
    # Websocket handshakes are guarded like HTTP.
    case("ws-no-token-http-response", [], NO_CREDENTIALS, scope_type="websocket", **WS_HTTP_RESPONSE),
    case("ws-dup-http-response", bearer(BOB) + bearer(BOB), MALFORMED_400, scope_type="websocket", **WS_HTTP_RESPONSE),
    case("ws-no-token-close", [], (("close", 1008), [], False), scope_type="websocket"),
    case("ws-too-long-close", bearer(MAX_TOKEN + "A"), (("close", 1008), [], False), scope_type="websocket"),
    case("ws-tab-close", auth(b"Bearer\t" + BOB_B), (("close", 1008), [], False), scope_type="websocket"),
    case("ws-valid", bearer(BOB), (("accept", None), [BOB], True), scope_type="websocket"),
    # Unknown scope types are refused before anything else runs, whatever credentials they carry.
    case("type-webtransport-valid", bearer(BOB), (RAISES, [], False), scope_type="webtransport"),
    case("type-upper-http-valid", bearer(BOB), (RAISES, [], False), scope_type="HTTP"),
    case("type-empty-valid", bearer(BOB), (RAISES, [], False), scope_type=""),
    case("type-excluded-path", [], (RAISES, [], False), scope_type="https", path="/health"),
    case("type-lifespan-passes", [], (("silent", None), [], True), scope_type="lifespan"),
]


@pytest.mark.parametrize(("headers", "request_kw", "expected", "provider_sees", "app_called"), ADVERSARIAL)
def test_adversarial_request(
    headers: Headers, request_kw: dict[str, Any], expected: Response, provider_sees: list[str], app_called: bool
) -> None:
    provider = FakeProvider(tokens=TABLE_TOKENS)
    harness = Harness(provider)
    if expected == RAISES:
        with pytest.raises(RuntimeError, match="refusing ASGI scope type"):
            harness.request(headers, **request_kw)
    else:
        outcome = harness.request(headers, **request_kw)
        assert observe(outcome) == expected
        # RFC 6750 3: every 400/401 carries a Bearer challenge; nothing else does.
        challenge = (outcome.messages and outcome.header("www-authenticate")) or ""
        assert challenge.startswith("Bearer") is (expected[0] in (400, 401))
    assert provider.calls == provider_sees
    assert bool(harness.app_calls) is app_called
    if app_called:  # the app sees exactly the verified identity, or none on public routes
        ((_, seen),) = harness.app_calls
        assert (seen.token if seen else None) == (provider_sees[0] if provider_sees else None)


# --- hostile requests: property-based fuzzing against an independent oracle -------------


# Restated from RFC 9110 5.6.2 and RFC 6750 2.1, deliberately not imported from mcp_bearer.
ORACLE_TCHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
ORACLE_B64CHARS = frozenset("-._~+/" + string.ascii_letters + string.digits)
# Around the real keys' lengths (27 and 31), so "exactly max" and "one more" both happen often.
FUZZ_MAX_LENGTHS = (DEFAULT_MAX_TOKEN_LENGTH, DEFAULT_MAX_TOKEN_LENGTH, len(BOB), len(BOB) - 1, len(ALICE_1), 4)


# Without resource=, OAuth discovery finds no authorization server here: 404, not a 401 (README, HTTP responses).
ORACLE_DISCOVERY = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")
ORACLE_NO_OAUTH = (
    404,
    {"error": "not_found", "error_description": "No OAuth here: send an API key as Authorization: Bearer <key>"},
)
ORACLE_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def oracle_discovery(relative: str) -> bool:
    discovery = relative.startswith((*ORACLE_DISCOVERY, "/.well-known/oauth-protected-resource"))
    return discovery or relative == "/register" or relative.endswith("/.well-known/openid-configuration")


def oracle_bad_key(token: str) -> bool:
    """Shaped like one of our keys (mcpb_) but its CRC-32 checksum, in base62, does not hold: nobody is asked."""
    if not token.startswith("mcpb_"):
        return False
    if not re.fullmatch(r"mcpb_[0-9a-f]{12}_[0-9A-Za-z]{38}", token):
        return True
    value = zlib.crc32(token[:-6].encode())
    return "".join(ORACLE_BASE62[value // 62**n % 62] for n in (5, 4, 3, 2, 1, 0)) != token[-6:]


def oracle(
    headers: Headers, path: str, method: str, root_path: str, max_length: int
) -> tuple[list[Response], str | None]:
    """What the spec says must happen: the acceptable (status, body) answers and the token the provider sees."""
    relative = path[len(root_path) :] if root_path and path.startswith(root_path) else path
    allowed, asked = oracle_by_rule(headers, relative, method, max_length)
    if oracle_discovery(relative):
        allowed = [ORACLE_NO_OAUTH if answer[0] == 401 else answer for answer in allowed]
    return allowed, asked


def oracle_by_rule(headers: Headers, relative: str, method: str, max_length: int) -> tuple[list[Response], str | None]:
    if relative in DEFAULT_EXCLUDED_PATHS:
        return [APP], None
    names = [name.lower() for name, _ in headers]
    if method == "OPTIONS" and b"origin" in names and b"access-control-request-method" in names:
        return [PREFLIGHT_ANSWER], None
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if not values:
        return [(401, UNAUTHORIZED)], None
    if len(values) > 1:
        return [(400, MALFORMED)], None
    text = values[0].decode("latin-1").strip(" \t")
    scheme_end = next((i for i, c in enumerate(text) if c not in ORACLE_TCHARS), len(text))
    scheme, rest = text[:scheme_end], text[scheme_end:]
    if scheme.lower() != "bearer" or not rest:
        return [(401, UNAUTHORIZED)], None
    if not rest.startswith(" "):
        return [(400, MALFORMED)], None
    token = rest.lstrip(" ")
    unpadded = token.rstrip("=")
    well_formed = bool(unpadded) and all(c in ORACLE_B64CHARS for c in unpadded)
    if len(token) > max_length:
        # The spec does not order "too long" and "malformed"; both refuse without asking the provider.
        return [(401, INVALID_TOKEN)] if well_formed else [(401, INVALID_TOKEN), (400, MALFORMED)], None
    if not well_formed:
        return [(400, MALFORMED)], None
    if oracle_bad_key(token):
        return [(401, INVALID_TOKEN)], None
    if token not in TOKENS:
        return [(401, INVALID_TOKEN)], token
    if b"mcp-session-id" in names:  # no session was ever created through this middleware
        return [(404, SESSION_NOT_FOUND)], token
    return [APP], token


def any_case(word: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda upper: bytes(c ^ 0x20 if u and chr(c).isalpha() else c for c, u in zip(word, upper, strict=True))
    )


VALID_TOKENS = [t.encode() for t in TOKENS]
# Repeats in sampled_from weight the draw towards near-valid headers, so the app is reached often.
JUNK = st.one_of(
    st.sampled_from([b""] * 6 + [b" ", b"  ", b"\t", b"=", b",", b" x", b'"', b"\x00", b"\r\n", b"\x7f", b"\xff"]),
    st.binary(max_size=3),
)
SCHEME = st.one_of(
    st.sampled_from([b"Bearer"] * 4 + [b"Basic", b"Bearerx", b"Bearer!", b"Bear", b"Token", b""]),
    any_case(b"bearer"),
)
SEPARATOR = st.sampled_from([b" "] * 8 + [b"  ", b"", b"\t", b" \t", b",", b"\x00", b":", b"/", b"=", b"\xa0"])
TOKEN = st.one_of(
    st.sampled_from(VALID_TOKENS),
    st.sampled_from(VALID_TOKENS),
    st.sampled_from(VALID_TOKENS),
    st.just(b""),
    st.tuples(JUNK, st.sampled_from(VALID_TOKENS), JUNK).map(b"".join),  # a real key with a hostile twist
    st.from_regex(r"[A-Za-z0-9\-._~+/]{1,40}={0,2}", fullmatch=True).map(str.encode),
    st.binary(max_size=20),
)
OWS = st.sampled_from([b""] * 4 + [b" ", b"\t", b" \t ", b"\x00", b"\x0b"])
SUFFIX = st.one_of(st.just(b""), st.just(b""), JUNK)
STRUCTURED = st.tuples(OWS, SCHEME, SEPARATOR, TOKEN, SUFFIX).map(b"".join)
AUTH_VALUE = st.one_of(
    STRUCTURED,
    STRUCTURED,
    STRUCTURED,
    st.binary(max_size=40),
)
OTHER_NAME = st.one_of(
    st.sampled_from(
        [
            *(b"proxy-authorization", b"cookie", b"origin", b"access-control-request-method", b"mcp-session-id"),
            *(b"authorization ", b"x-authorization", b"authorisation", b"authorizatio", b"content-type"),
        ]
    ).flatmap(any_case),
    st.binary(max_size=16),
)
OTHER_HEADERS = st.lists(st.tuples(OTHER_NAME, st.one_of(AUTH_VALUE, st.just(b"x"))), max_size=2)
HEADERS = st.tuples(
    OTHER_HEADERS,
    st.one_of(  # mostly exactly one Authorization header, else none or two
        st.tuples(any_case(b"authorization"), AUTH_VALUE).map(lambda header: [header]),
        st.tuples(any_case(b"authorization"), AUTH_VALUE).map(lambda header: [header]),
        st.lists(st.tuples(any_case(b"authorization"), AUTH_VALUE), max_size=2),
    ),
    OTHER_HEADERS,
).map(lambda parts: [header for part in parts for header in part])
PATH = st.one_of(
    st.sampled_from(
        ["/mcp"] * 6
        + [*DEFAULT_EXCLUDED_PATHS, "/health/", "/healthz", "/HEALTH", "//health", "/health/../mcp", ""]
        + ["/", "/health;x", "/health?x", "/health%2F..%2Fmcp", "/docs/", "/api/health"]
    ),
    st.text(max_size=12),
)
ROOT_PATH = st.sampled_from(["", "", "", "/api", "/api/", "/health", "/"])
METHOD = st.sampled_from(["POST", "POST", "GET", "GET", "HEAD", "OPTIONS", "OPTIONS", "DELETE", "PUT", "options"])


@pytest.mark.slow
@given(
    headers=HEADERS,
    path=PATH,
    root_path=ROOT_PATH,
    mounted=st.booleans(),
    method=METHOD,
    max_length=st.sampled_from(FUZZ_MAX_LENGTHS),
)
def test_fuzzed_requests_match_the_oracle(
    headers: Headers, path: str, root_path: str, mounted: bool, method: str, max_length: int
) -> None:
    if mounted:  # ASGI: path includes root_path; old-style servers send it without
        path = root_path + path
    harness = Harness(max_token_length=max_length)
    allowed, asked = oracle(headers, path, method, root_path, max_length)
    outcome = harness.request(headers, path=path, method=method, root_path=root_path)  # never raises
    assert_well_formed_http(outcome.messages)
    observed = observe(outcome)
    event(f"status {observed[0]}" + (" (verified)" if asked and observed == APP else ""))
    assert isinstance(observed[0], int) and observed[0] < 500  # the provider never fails here
    assert observed in allowed, (observed, allowed)
    # Only a verified token for exactly the bytes after "Bearer " (or a public request) reaches the app.
    assert outcome.provider_calls == ([asked] if asked is not None else [])
    assert bool(outcome.app_calls) is (observed == APP)
    if outcome.app_calls:
        ((_, seen),) = outcome.app_calls
        assert (seen.token if seen else None) == asked


# --- broken providers, fuzzed: every failure is a 500, every other answer is honoured ---


@dataclass
class LookAlike:
    """Has every attribute of an AccessToken, but is not one (a provider returning its own class)."""

    token: str
    claims: dict[str, Any]
    scopes: list[str]
    expires_at: float | None


EXCEPTIONS = st.sampled_from([RuntimeError, ValueError, KeyError, TimeoutError, OSError, ZeroDivisionError, Exception])
# Includes a duck-typed look-alike: only a real AccessToken may reach the app.
WRONG_TYPES = st.sampled_from(
    [{"sub": "bob"}, "sk-bob", b"", True, False, 0, 1.5, [], (), object(), LookAlike("t", {"sub": "x"}, [], None)]
)
LATER = st.floats(min_value=60, max_value=1e9)  # far enough ahead that the clock cannot catch up mid-test
# Callables run at verify time, so "expired" and "valid" are relative to when the middleware checks.
EXPIRED_ANSWER = LATER.map(lambda delta: lambda: AccessToken("t", {"sub": "x"}, [], time.time() - delta))
VALID = st.one_of(
    st.just(lambda: AccessToken("t", {"sub": "x"}, [])),
    LATER.map(lambda delta: lambda: AccessToken("t", {"sub": "x"}, [], time.time() + delta)),
)


@pytest.mark.slow
@given(
    kind=st.sampled_from(["raises", "wrong-type", "none", "expired", "valid"]),
    data=st.data(),
    token=st.one_of(st.sampled_from(list(TOKENS)), st.from_regex(r"sk-[A-Za-z0-9]{16,24}", fullmatch=True)),
    method=st.sampled_from(["GET", "POST", "DELETE", "HEAD"]),
)
def test_provider_failures_are_500_and_fail_closed(kind: str, data: st.DataObject, token: str, method: str) -> None:
    behaviour = data.draw(
        {"raises": EXCEPTIONS, "wrong-type": WRONG_TYPES, "none": st.none(), "expired": EXPIRED_ANSWER, "valid": VALID}[
            kind
        ]
    )
    provider = FakeProvider(otherwise=behaviour)
    harness = Harness(provider)
    with mcp_bearer_log() as records:
        outcome = harness.request(bearer(token), method=method)
    assert_well_formed_http(outcome.messages)
    assert provider.calls == [token]
    failed = kind in ("raises", "wrong-type")
    assert (outcome.status == 500) is failed  # 500 iff the provider failed
    if failed:
        assert outcome.json() == SERVER_ERROR and outcome.header("www-authenticate") is None
        (record,) = records  # logged once, without the token
        assert record.levelno == logging.ERROR and token not in record.getMessage()
    elif kind == "valid":
        assert observe(outcome) == APP
    else:
        # Refused, not failed: one DEBUG record says why, for operators; nothing louder.
        assert observe(outcome) == (401, INVALID_TOKEN)
        assert [(r.levelno, r.getMessage()) for r in records] == [
            (
                logging.DEBUG,
                "token refused: 'expired'" if kind == "expired" else "token refused: 'refused by the provider'",
            )
        ]
    assert bool(harness.app_calls) is (kind == "valid")


# --- the suite's own scan for leaked secrets --------------------------------------------


def test_the_log_scan_finds_a_leaked_token() -> None:
    record = logging.LogRecord("x", logging.DEBUG, __file__, 1, "header was Bearer %s", (BOB,), None)
    with pytest.raises(AssertionError, match="secrets found"):
        assert_no_secret_logged([record])
