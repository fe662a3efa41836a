"""End to end over both generations of MCP, through uvicorn and the SDK's own clients.

MCP 2026-07-28: ``mcp.client.Client`` in its default mode, no handshake, every request standing alone
(``Mcp-Method``/``Mcp-Name`` headers, ``requestState``). 2025-11-25: the initialize handshake,
``ClientSession`` over ``streamable_http_client`` as the TypeScript SDK client does; the only one on
mcp 1.x. For each: the 401s and their challenges, each caller seeing their own claims, the
per-operation 403, expiry mid-connection, 503 while the identity provider is down, the audit trail;
and the SDK itself knowing the caller, so that its own protections (session owners, the principal a
``requestState`` is sealed to) hold behind this middleware.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from mcp_bearer import AccessToken, BearerAuthMiddleware, JWTProvider, principal_key
from support import (
    ALICE_1,
    ALICE_2,
    BOB,
    GENERATIONS,
    HANDSHAKE,
    INVALID_TOKEN,
    ISSUER,
    MCP_MAJOR,
    MCP_POST_HEADERS,
    MODERN,
    SECRETS,
    SESSION_NOT_FOUND,
    TOKENS,
    UNAUTHORIZED,
    UNAVAILABLE,
    FakeProvider,
    JWKSEndpoint,
    as_whoami_sees,
    httpx,
    mcp_app,
    mcp_bearer_log,
    raw_request,
    serve,
    sign,
    tool_text,
    whoami,
)

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

PROTOCOLS = GENERATIONS
RESOURCE = "https://mcp.example.com/mcp"
METADATA = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"

DELETER = "sk-proto-deleter-4Rf7Tg2Yh9Uj6Ik"
EXPIRING = "sk-proto-expiring-8Ol3Pz5Xc1Vb7Nm"
PROTOCOL_TOKENS = {**TOKENS, DELETER: {"sub": "dee", "scopes": ["read", "projects:delete"]}}
SECRETS.update({DELETER, EXPIRING})
RULES = {"tools/call delete_*": ["projects:delete"]}

RAN: list[str] = []  # every tool call that really ran, by tool


def delete_project() -> str:
    RAN.append("delete_project")
    return "deleted"


def principal() -> str | None:
    RAN.append("principal")
    return principal_key()


def sdk_caller() -> dict[str, Any]:
    """The caller as the SDK's own auth context names it (what its session and requestState checks use)."""
    from mcp.server.auth.middleware.auth_context import get_access_token as sdk_access_token

    RAN.append("sdk_caller")
    access = sdk_access_token()
    if access is None:
        return {"nobody": True}
    return {"client_id": access.client_id, "subject": access.subject, "scopes": access.scopes}


TOOLS: list[Callable[..., Any]] = [whoami, delete_project, principal, sdk_caller]
if MCP_MAJOR == 2:
    from mcp.server.mcpserver import Context
    from mcp_types import InputRequiredResult

    async def confirm(ctx: Context) -> str | InputRequiredResult:
        """Asks once (a 2026-07-28 input_required result whose requestState the SDK seals), then acts."""
        if ctx.request_state is None:
            return InputRequiredResult(request_state="asked")
        RAN.append("confirm")
        return f"confirmed for {principal_key()}"

    TOOLS.append(confirm)


@pytest.fixture(autouse=True)
def fresh_counts() -> None:
    RAN.clear()


@dataclass
class Guarded:
    url: str
    base: str
    path: str  # where the client posts: under a root path, the server strips nothing itself
    middleware: BearerAuthMiddleware
    provider: FakeProvider


@pytest.fixture(scope="module", params=["", "/api"], ids=["root", "under-root-path"])
def guarded(request: pytest.FixtureRequest) -> Iterator[Guarded]:
    """The SDK's stateful streamable HTTP app behind the middleware; the second time with uvicorn's --root-path."""
    provider = FakeProvider(tokens=PROTOCOL_TOKENS)
    options: dict[str, Any] = {"operation_scopes": RULES, "required_scopes": ["read"], "resource": RESOURCE}
    middleware = BearerAuthMiddleware(mcp_app(*TOOLS), provider, audit=True, **options)
    with serve(middleware, root_path=request.param) as base:
        yield Guarded(base + "/mcp", base, request.param + "/mcp", middleware, provider)


# --- connecting as each generation of client does ------------------------------------------------


@dataclass
class Exchange:
    """One HTTP response the client received, for asserting what it was told whatever it raised."""

    mcp_method: str | None
    mcp_name: str | None
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Connection:
    call_tool: Callable[..., Awaitable[Any]]
    http: Any  # the httpx client, whose Authorization header a test may change
    client: Any  # mcp.client.Client or ClientSession


@contextlib.asynccontextmanager
async def connect(
    url: str, token: str | None, protocol: str, seen: list[Exchange] | None = None
) -> AsyncIterator[Connection]:
    async def note(response: httpx.Response) -> None:
        await response.aread()
        request = response.request.headers
        if seen is not None:
            exchange = Exchange(
                request.get("mcp-method"),
                request.get("mcp-name"),
                response.status_code,
                dict(response.headers),
                response.content,
            )
            seen.append(exchange)

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, event_hooks={"response": [note]}, timeout=30) as http:
        if protocol == MODERN:
            from mcp.client import Client

            async with Client(streamable_http_client(url, http_client=http)) as client:
                assert client.protocol_version == MODERN
                yield Connection(client.call_tool, http, client)
            return
        async with (
            streamable_http_client(url, http_client=http) as streams,
            ClientSession(streams[0], streams[1]) as session,
        ):
            initialized = await session.initialize()
            version = getattr(initialized, "protocol_version", None) or getattr(initialized, "protocolVersion", None)
            assert version == HANDSHAKE
            yield Connection(session.call_tool, http, session)


def leaves(exc: BaseException) -> list[BaseException]:
    """The errors inside (exception groups nest; Python 3.10 has them from the exceptiongroup backport)."""
    inner = getattr(exc, "exceptions", None)
    return [leaf for e in inner for leaf in leaves(e)] if isinstance(inner, tuple) else [exc]


async def refusal(attempt: Callable[[], Awaitable[object]]) -> list[BaseException]:
    """The errors an attempt ends with: mcp 2.x raises MCPError from the call; mcp 1.x's transport
    fails on the HTTP status, and its task group raises an HTTPStatusError as the connection closes."""
    try:
        with anyio.fail_after(30):
            await attempt()
    except Exception as exc:  # the two SDKs report a refused request differently, as above
        return leaves(exc)
    pytest.fail("the request was not refused")


def reported(errors: list[BaseException], status: int) -> bool:
    """Whether the client reported the refusal: as an MCPError, or as the HTTP status itself."""
    exceptions = importlib.import_module("mcp.shared.exceptions")
    mcp_error = getattr(exceptions, "MCPError", None) or exceptions.McpError  # 2.x's name, then 1.x's
    return any(
        isinstance(e, mcp_error) or getattr(getattr(e, "response", None), "status_code", None) == status for e in errors
    )


async def called(connection: Connection, tool: str, **arguments: Any) -> Any:
    result = await connection.call_tool(tool, arguments)
    assert not (getattr(result, "is_error", None) or getattr(result, "isError", None)), result
    text = tool_text(result)
    with contextlib.suppress(ValueError):
        return json.loads(text)
    return text


# --- 401: no token, or a token the provider refuses ---------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("token", "body", "challenge"),
    [
        (None, UNAUTHORIZED, f'Bearer scope="read", resource_metadata="{METADATA}"'),
        (
            "sk-nobody",
            INVALID_TOKEN,
            f'Bearer error="invalid_token", scope="read", error_description="Token is invalid or expired", '
            f'resource_metadata="{METADATA}"',
        ),
    ],
    ids=["no-token", "unknown-token"],
)
async def test_a_client_without_a_valid_token_gets_401_with_its_challenge_and_nothing_runs(
    guarded: Guarded, protocol: str, token: str | None, body: dict[str, str], challenge: str
) -> None:
    seen: list[Exchange] = []

    async def attempt() -> None:
        async with connect(guarded.url, token, protocol, seen) as connection:
            await connection.call_tool("delete_project", {})

    errors = await refusal(attempt)
    assert seen and reported(errors, 401)
    for exchange in seen:
        assert (exchange.status, json.loads(exchange.body)) == (401, body)
        assert exchange.headers["www-authenticate"] == challenge
        assert exchange.headers["content-type"] == "application/json"
    assert RAN == []


# --- each caller sees their own claims; principal_key names the principal -------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_each_caller_sees_their_own_claims_and_a_stable_principal(guarded: Guarded, protocol: str) -> None:
    async with (
        connect(guarded.url, ALICE_1, protocol) as alice,
        connect(guarded.url, BOB, protocol) as bob,
        connect(guarded.url, ALICE_2, protocol) as rotated,
    ):
        for _ in range(3):
            assert await called(alice, "whoami") == as_whoami_sees(ALICE_1)
            assert await called(bob, "whoami") == as_whoami_sees(BOB)
        keys = [await called(c, "principal") for c in (alice, rotated, alice, bob)]
    assert keys[0] == keys[1] == keys[2] == ["mcp_bearer:api-key", "alice"]  # a rotated key: the same principal
    assert keys[3] == ["mcp_bearer:api-key", "bob"]


# --- 403: an operation the token lacks scopes for -----------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_operation_the_token_lacks_scopes_for_is_403_and_never_runs(guarded: Guarded, protocol: str) -> None:
    seen: list[Exchange] = []

    async def attempt() -> None:
        async with connect(guarded.url, BOB, protocol, seen) as connection:
            assert (await called(connection, "whoami"))["claims"]["sub"] == "bob"
            await connection.call_tool("delete_project", {})

    errors = await refusal(attempt)
    (refused,) = [e for e in seen if e.status == 403]
    assert reported(errors, 403)
    assert json.loads(refused.body) == {
        "error": "insufficient_scope",
        "error_description": "Insufficient scope for this operation",
        "scope": "read projects:delete",
    }
    assert refused.headers["www-authenticate"] == (
        'Bearer error="insufficient_scope", scope="read projects:delete", '
        f'error_description="Insufficient scope for this operation", resource_metadata="{METADATA}"'
    )
    if protocol == MODERN:
        assert refused.mcp_method == "tools/call"  # the client named it in the header, as the body does
    assert "delete_project" not in RAN
    async with connect(guarded.url, DELETER, protocol) as connection:
        assert await called(connection, "delete_project") == "deleted"
    assert RAN.count("delete_project") == 1


# --- expiry: the same token, past its expires_at mid-connection ---------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_token_that_expires_mid_connection_is_refused_from_then_on(guarded: Guarded, protocol: str) -> None:
    expires = [time.time() + 3600]
    guarded.provider.answers[EXPIRING] = lambda: AccessToken(EXPIRING, {"sub": "eve"}, ["read"], expires[0])
    seen: list[Exchange] = []

    async def attempt() -> None:
        async with connect(guarded.url, EXPIRING, protocol, seen) as connection:
            assert (await called(connection, "whoami"))["claims"] == {"sub": "eve"}
            expires[0] = time.time() - 1
            await connection.call_tool("principal", {})

    try:
        errors = await refusal(attempt)
    finally:
        del guarded.provider.answers[EXPIRING]
    assert reported(errors, 401)
    assert [json.loads(e.body) for e in seen if e.status == 401][:1] == [INVALID_TOKEN]
    assert "principal" not in RAN


# --- 503 while the identity provider is down, then back ---------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_503_while_the_jwks_endpoint_is_down_at_startup_then_the_sdk_sees_the_jwt_caller(
    jwks: JWKSEndpoint, protocol: str
) -> None:
    jwks.mode = "500"
    provider = JWTProvider(issuer=ISSUER, audience=RESOURCE, jwks_url=jwks.url, jwks_refresh_cooldown=0)
    token = sign(aud=RESOURCE, sub="alice", azp="desktop-app", scope="read write")
    with serve(BearerAuthMiddleware(mcp_app(*TOOLS), provider)) as base:
        seen: list[Exchange] = []

        async def attempt() -> None:
            async with connect(base + "/mcp", token, protocol, seen):
                pass

        errors = await refusal(attempt)
        assert reported(errors, 503) and seen
        for exchange in seen:
            assert (exchange.status, json.loads(exchange.body)) == (503, UNAVAILABLE)
            assert 1 <= int(exchange.headers["retry-after"]) <= 3600
        jwks.mode = "ok"
        async with connect(base + "/mcp", token, protocol) as connection:
            assert await called(connection, "sdk_caller") == {
                "client_id": "desktop-app",  # the JWT's azp
                "subject": "alice",
                "scopes": ["read", "write"],
            }


# --- the audit trail --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_audit_trail_records_each_decision_with_its_principal(guarded: Guarded, protocol: str) -> None:
    with mcp_bearer_log("mcp_bearer.audit") as records:
        async with connect(guarded.url, BOB, protocol) as connection:
            await called(connection, "whoami")
        with contextlib.suppress(Exception):  # refused as the tests above show; here only its record counts
            async with connect(guarded.url, BOB, protocol) as connection:
                await connection.call_tool("delete_project", {})
        with contextlib.suppress(Exception):
            async with connect(guarded.url, None, protocol):
                pass
    fields = [r.mcp_bearer for r in records]  # type: ignore[attr-defined]
    assert all(r.levelno == logging.INFO for r in records)
    bob = json.dumps(["mcp_bearer:api-key", "bob"])
    outcomes = {(f["outcome"], f["principal"]) for f in fields}
    assert {("allowed", bob), ("403 insufficient_scope", bob), ("401 unauthorized", None)} <= outcomes
    assert {f["path"] for f in fields} == {guarded.path}
    assert {f["method"] for f in fields} <= {"POST", "GET", "DELETE"}
    assert outcomes <= {("allowed", bob), ("403 insufficient_scope", bob), ("401 unauthorized", None)}


# --- the SDK knows the caller --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_sdks_own_get_access_token_inside_a_tool_names_the_caller(guarded: Guarded, protocol: str) -> None:
    for token, subject, scopes in ((ALICE_1, "alice", ["read"]), (BOB, "bob", ["read", "write"])):
        async with connect(guarded.url, token, protocol) as connection:
            assert await called(connection, "sdk_caller") == {
                "client_id": json.dumps(["mcp_bearer:api-key", subject]),  # API keys: the principal, no IdP client
                "subject": subject,
                "scopes": scopes,
            }


@pytest.mark.parametrize("stateless", [False, True], ids=["stateful", "stateless"])
async def test_without_sdk_identity_the_sdk_sees_nobody(stateless: bool) -> None:
    app = BearerAuthMiddleware(mcp_app(sdk_caller, stateless=stateless), FakeProvider(), sdk_identity=False)
    with serve(app) as base:
        async with connect(base + "/mcp", BOB, HANDSHAKE) as connection:
            assert await called(connection, "sdk_caller") == {"nobody": True}


@pytest.mark.parametrize("sdk_identity", [None, True])
async def test_a_session_alice_created_is_refused_to_bob_by_the_sdk_itself(sdk_identity: bool | None) -> None:
    """With bind_sessions=False this middleware does not guard sessions; the SDK does, knowing the caller."""
    app = BearerAuthMiddleware(mcp_app(*TOOLS), FakeProvider(), bind_sessions=False, sdk_identity=sdk_identity)
    seen: list[Exchange] = []
    with serve(app) as base:
        async with connect(base + "/mcp", ALICE_1, HANDSHAKE, seen) as alice:
            (session_id,) = {e.headers["mcp-session-id"] for e in seen if "mcp-session-id" in e.headers}
            call = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "principal"}})
            headers = {**MCP_POST_HEADERS, "mcp-session-id": session_id, "mcp-protocol-version": HANDSHAKE}
            status, _, body = raw_request(
                base, "POST", "/mcp", {**headers, "Authorization": f"Bearer {BOB}"}, call.encode()
            )
            assert status == 404 and json.loads(body) != SESSION_NOT_FOUND  # the SDK's answer, not ours
            assert RAN == []
            status, _, _ = raw_request(
                base, "POST", "/mcp", {**headers, "Authorization": f"Bearer {ALICE_2}"}, call.encode()
            )
            assert status == 200 and RAN == ["principal"]  # alice's rotated key: the same principal
            assert await called(alice, "principal") == ["mcp_bearer:api-key", "alice"]


@pytest.mark.modern_only  # requestState is MCP 2026-07-28
async def test_a_request_state_minted_for_alice_and_replayed_by_bob_is_refused_by_the_sdk(guarded: Guarded) -> None:
    from mcp.shared.exceptions import MCPError

    async with connect(guarded.url, ALICE_1, MODERN) as connection:
        asked = await connection.client.session.call_tool("confirm", {}, allow_input_required=True)
        state = asked.request_state
        assert state and state != "asked"  # sealed by the SDK, bound to the principal that asked
        connection.http.headers["Authorization"] = f"Bearer {BOB}"
        with pytest.raises(MCPError, match="Invalid or expired requestState"):
            await connection.client.session.call_tool("confirm", {}, request_state=state, allow_input_required=True)
        assert RAN == []
        connection.http.headers["Authorization"] = f"Bearer {ALICE_2}"  # alice, her key rotated
        answer = await connection.client.session.call_tool(
            "confirm", {}, request_state=state, allow_input_required=True
        )
        assert tool_text(answer) == f"confirmed for {json.dumps(['mcp_bearer:api-key', 'alice'])}"
    assert RAN == ["confirm"]


@pytest.mark.modern_only  # Mcp-Name is MCP 2026-07-28
async def test_a_uri_the_client_sends_in_a_base64_sentinel_is_judged_as_the_body_names_it() -> None:
    """A name that would not survive as a header travels as =?base64?...?= (Streamable HTTP, Standard Headers)."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("test")
    server.resource("file:///docs/café au lait", name="public")(lambda: "public")
    server.resource("file:///admin/café", name="secret")(lambda: "secret")
    rules = {"resources/read file:///admin/*": ["admin"]}
    seen: list[Exchange] = []
    with serve(BearerAuthMiddleware(server.streamable_http_app(), FakeProvider(), operation_scopes=rules)) as base:

        async def attempt() -> None:
            async with connect(base + "/mcp", BOB, MODERN, seen) as connection:
                public = await connection.client.read_resource("file:///docs/café au lait")
                assert public.contents[0].text == "public"
                await connection.client.read_resource("file:///admin/café")

        assert reported(await refusal(attempt), 403)
    reads = [e for e in seen if e.mcp_method == "resources/read"]
    assert [e.status for e in reads] == [200, 403]
    assert all(e.mcp_name is not None and e.mcp_name.startswith("=?base64?") for e in reads)
