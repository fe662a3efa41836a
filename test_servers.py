"""End to end: the SDK's own server and client behind the middleware, under every ASGI server we
support (uvicorn, hypercorn asyncio and trio, granian), websockets included."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

import anyio
import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect

from mcp_bearer import (
    BearerAuthMiddleware,
    require_auth,
)
from support import (
    ALICE_1,
    ALICE_2,
    BOB,
    CHALLENGE_INVALID,
    INITIALIZE,
    INVALID_TOKEN,
    MCP_POST_HEADERS,
    SERVERS,
    UNAUTHORIZED,
    FakeProvider,
    ListHandler,
    as_whoami_sees,
    call_json,
    fingerprint,
    mcp_app,
    mcp_session,
    raw_request,
    serve,
    serve_with,
    wait_until,
    whoami,
    whoami_async,
)

# Every test here serves the SDK app with a real server and drives it with the SDK's client.
pytestmark = pytest.mark.slow


# --- end to end under uvicorn: the SDK's server and client ------------------------------


@pytest.mark.anyio
async def test_e2e_no_token_is_refused_before_the_mcp_app(stateful_url: str) -> None:
    status, headers, body = raw_request(stateful_url.rsplit("/", 1)[0], "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)
    assert status == 401 and json.loads(body) == UNAUTHORIZED
    assert headers["www-authenticate"] == "Bearer" and "mcp-session-id" not in headers
    with pytest.raises(Exception):  # noqa: B017 - the SDK client's error type differs between versions
        async with mcp_session(stateful_url, None):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("tool", ["whoami", "whoami_async"])
async def test_e2e_valid_token_sees_its_own_claims(stateful_url: str, tool: str) -> None:
    async with mcp_session(stateful_url, BOB) as (session, _):
        seen = await call_json(session, tool)
    assert seen == as_whoami_sees(BOB)


@pytest.mark.anyio
@pytest.mark.parametrize("tool", ["whoami", "whoami_async"])
async def test_e2e_rotated_keys_of_one_user_on_one_session_each_see_their_own_token(
    stateful_url: str, tool: str
) -> None:
    async with mcp_session(stateful_url, ALICE_1) as (session, client):
        assert (await call_json(session, tool))["token"] == fingerprint(ALICE_1)
        client.headers["Authorization"] = f"Bearer {ALICE_2}"
        assert (await call_json(session, tool))["token"] == fingerprint(ALICE_2)
        client.headers["Authorization"] = f"Bearer {ALICE_1}"
        assert (await call_json(session, tool))["token"] == fingerprint(ALICE_1)


@pytest.mark.anyio
@pytest.mark.parametrize("json_response", [False, True])
async def test_e2e_stateless_mode(json_response: bool) -> None:
    app = BearerAuthMiddleware(
        mcp_app(whoami, whoami_async, stateless=True, json_response=json_response), FakeProvider()
    )
    with serve(app) as base:
        for token in (BOB, ALICE_2):
            async with mcp_session(base + "/mcp", token) as (session, _):
                assert (await call_json(session, "whoami"))["token"] == fingerprint(token)
                assert (await call_json(session, "whoami_async"))["token"] == fingerprint(token)


def test_e2e_app_mounted_under_a_prefix_or_root_path_is_protected() -> None:
    """The peer that got this wrong answered 200 to POST /api/mcp without a token."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    inner = Starlette(routes=[Route("/{path:path}", lambda r: PlainTextResponse(r.url.path), methods=["GET", "POST"])])
    mounted = Starlette(routes=[Mount("/api", app=BearerAuthMiddleware(inner, FakeProvider()))])
    with serve(mounted) as base:
        assert raw_request(base, "POST", "/api/mcp")[0] == 401
        assert raw_request(base, "GET", "/api/health")[0] == 200
        assert raw_request(base, "GET", "/api/health/")[0] == 401
        assert raw_request(base, "POST", "/api/mcp", {"Authorization": f"Bearer {BOB}"})[0] == 200
    # Behind a proxy that strips /api, uvicorn --root-path /api puts it back: the app sees /api/mcp.
    with serve(BearerAuthMiddleware(inner, FakeProvider()), root_path="/api") as base:
        assert raw_request(base, "POST", "/mcp") == (401, mock.ANY, json.dumps(UNAUTHORIZED).encode())
        assert raw_request(base, "GET", "/health")[2] == b"/api/health"
        assert raw_request(base, "GET", "/HEALTH")[0] == 401
        assert raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {BOB}"})[2] == b"/api/mcp"


def test_e2e_cors_preflight_and_readable_401_from_a_browser() -> None:
    from starlette.middleware.cors import CORSMiddleware

    origin = "https://app.example"
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id",
    }
    # As the README shows: CORS outside, so refusals carry CORS headers a browser needs to read them.
    outside = CORSMiddleware(
        BearerAuthMiddleware(mcp_app(whoami), FakeProvider()),
        allow_origins=[origin],
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["authorization", "content-type", "mcp-session-id", "mcp-protocol-version"],
        expose_headers=["Mcp-Session-Id", "WWW-Authenticate"],
    )
    with serve(outside) as base:
        status, headers, _ = raw_request(base, "OPTIONS", "/mcp", preflight)
        assert status == 200 and headers["access-control-allow-origin"] == origin
        for _ in range(2):  # the second proves the refusal's header list was not grown in place
            status, headers, _ = raw_request(base, "POST", "/mcp", {**MCP_POST_HEADERS, "Origin": origin}, INITIALIZE)
            assert status == 401 and headers["www-authenticate"] == "Bearer"
            assert headers["access-control-allow-origin"] == origin
            assert "www-authenticate" in headers["access-control-expose-headers"].lower()
    # CORS inside the app: the middleware answers the real preflight itself (it could act in the app,
    # or in an older SDK), and the app's CORSMiddleware still decides who may read the answers.
    inside = BearerAuthMiddleware(
        CORSMiddleware(mcp_app(whoami), allow_origins=[origin], allow_methods=["POST"], allow_headers=["*"]),
        FakeProvider(),
    )
    with serve(inside) as base:
        status, headers, body = raw_request(base, "OPTIONS", "/mcp", preflight)
        assert (status, body) == (204, b"") and headers["access-control-allow-origin"] == "*"
        assert headers["access-control-allow-headers"] == "authorization, *"
        assert raw_request(base, "OPTIONS", "/mcp", {"Origin": origin})[0] == 401
        status, headers, _ = raw_request(base, "POST", "/mcp", {**MCP_POST_HEADERS, "Origin": origin}, INITIALIZE)
        assert status == 401  # the app's CORS adds nothing to a refusal made before it: README says put it outside


# --- the same app under every ASGI server we support ------------------------------------
# A server, not the middleware, turns ASGI messages into bytes on the wire: the challenge, the
# websocket refusal and the per-request identity must survive each one. Each runs on a free loopback
# port; uvicorn and hypercorn in this process, so their log records join the suite-wide secret scan,
# granian in its own, whose output is scanned for tokens when it stops.


async def echo_with_caller(websocket: Any) -> None:
    """A websocket endpoint next to the MCP app: echoes one message, prefixed with the caller's ``sub``."""
    await websocket.accept()
    message = await websocket.receive_text()
    await websocket.send_text(f"{require_auth().claims['sub']}: {message}")
    await websocket.close()


NO_EXTENSION = "/no-extension"  # websocket paths under here reach the middleware as from an older server


def without_websocket_http_response(app: Any) -> Any:
    """Hides the ``websocket.http.response`` extension from websockets under NO_EXTENSION.

    All four servers offer it; this shows on each real server what a client gets where a server does not.
    """

    async def hide(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"].startswith(NO_EXTENSION + "/"):
            extensions = dict(scope.get("extensions") or {})
            extensions.pop("websocket.http.response", None)
            scope = {**scope, "path": scope["path"].removeprefix(NO_EXTENSION), "extensions": extensions}
        await app(scope, receive, send)

    return hide


def mcp_and_websocket_app() -> Any:
    """The SDK's streamable HTTP app and a websocket route in one Starlette app, as users combine them.

    Starlette runs no lifespan of a mounted app, and the SDK starts its session manager in its own
    (on mcp 1.x and 2.x alike); the outer app must run the inner one's, or every MCP request fails.
    """
    from starlette.applications import Starlette
    from starlette.routing import Mount, WebSocketRoute

    mcp = mcp_app(whoami, whoami_async)
    return Starlette(
        routes=[WebSocketRoute("/ws", echo_with_caller), Mount("/", mcp)],
        lifespan=lambda _: mcp.router.lifespan_context(mcp),
    )


def served_app() -> Any:
    """What every server serves: the SDK app and a websocket route behind the middleware."""
    return without_websocket_http_response(BearerAuthMiddleware(mcp_and_websocket_app(), FakeProvider()))


@pytest.fixture(scope="module", params=SERVERS)
def served(request: pytest.FixtureRequest) -> Iterator[str]:
    with serve_with(request.param, f"{__name__}:served_app") as base:
        yield base


def websocket_connect(base: str, path: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # The client logs its own request headers at DEBUG; that logger stays out of the secret scan,
    # the servers' own websocket loggers stay in it.
    return connect(
        "ws" + base.removeprefix("http") + path, additional_headers=headers, open_timeout=10, logger=CLIENT_LOG
    )


CLIENT_LOG = logging.getLogger("test.websocket-client")
CLIENT_LOG.propagate = False


def test_servers_no_token_is_401_with_a_bearer_challenge(served: str) -> None:
    status, headers, body = raw_request(served, "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)
    assert (status, json.loads(body)) == (401, UNAUTHORIZED)
    assert headers["www-authenticate"] == "Bearer" and headers["content-type"] == "application/json"
    assert "mcp-session-id" not in headers


@pytest.mark.anyio
@pytest.mark.parametrize("tool", ["whoami", "whoami_async"])
async def test_servers_sdk_client_sees_its_claims(served: str, tool: str) -> None:
    async with mcp_session(served + "/mcp", BOB) as (session, _):
        assert await call_json(session, tool) == as_whoami_sees(BOB)


@pytest.mark.anyio
async def test_servers_two_callers_at_once_each_see_their_own_claims(served: str) -> None:
    seen: dict[str, list[Any]] = {BOB: [], ALICE_1: []}

    async def caller(token: str) -> None:
        async with mcp_session(served + "/mcp", token) as (session, _):
            for tool in ("whoami", "whoami_async", "whoami", "whoami_async"):
                seen[token].append(await call_json(session, tool))

    async with anyio.create_task_group() as group:
        group.start_soon(caller, BOB)
        group.start_soon(caller, ALICE_1)
    for token, answers in seen.items():
        assert answers == [as_whoami_sees(token)] * 4


@pytest.mark.parametrize(
    ("token", "expected", "challenge"),
    [(None, UNAUTHORIZED, "Bearer"), ("sk-nobody", INVALID_TOKEN, CHALLENGE_INVALID)],
    ids=["no-token", "invalid-token"],
)
def test_servers_websocket_refused_with_401_and_challenge(
    served: str, token: str | None, expected: dict[str, str], challenge: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        websocket_connect(served, "/ws", token)
    response = refused.value.response
    assert response.status_code == 401 and json.loads(response.body) == expected
    assert response.headers["www-authenticate"] == challenge


def test_servers_websocket_refused_without_the_extension_is_a_bare_403(served: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        websocket_connect(served, NO_EXTENSION + "/ws", None)
    response = refused.value.response
    assert response.status_code == 403 and "www-authenticate" not in response.headers
    assert b"unauthorized" not in response.body


# uvicorn's default websocket implementation (websockets-sansio, chosen whenever `websockets` is
# installed) counts a handshake as complete only on accept or close, so after a refusal sent through
# websocket.http.response it logs this at ERROR, although the client got the whole 401. Its wsproto
# and legacy websockets implementations do not; neither does any server for the bare 403.
UVICORN_REFUSAL_LOG = "ASGI callable returned without completing handshake."


# Granian runs in its own process; its output is checked for tokens when it stops.
@pytest.mark.parametrize("served", ["uvicorn", "hypercorn-asyncio", "hypercorn-trio"], indirect=True)
@pytest.mark.parametrize("path", ["/ws", NO_EXTENSION + "/ws"])
def test_servers_what_a_refused_websocket_logs(served: str, path: str, request: pytest.FixtureRequest) -> None:
    server = request.node.callspec.params["served"]
    expected = [UVICORN_REFUSAL_LOG] if (server, path) == ("uvicorn", "/ws") else []
    handler = ListHandler()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]  # uvicorn's records stop at "uvicorn"
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with pytest.raises(InvalidStatus):
            websocket_connect(served, path, None)
        # uvicorn logs after the app returns, a moment after the client has its answer.
        wait_until(lambda: warnings_of(handler) == expected, 2 if expected else 0.3)
        assert warnings_of(handler) == expected
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def warnings_of(handler: ListHandler) -> list[str]:
    return [record.getMessage() for record in handler.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("path", ["/ws", NO_EXTENSION + "/ws"])
def test_servers_websocket_with_a_token_is_accepted_and_knows_its_caller(served: str, path: str) -> None:
    with websocket_connect(served, path, BOB) as websocket:
        websocket.send("hello")
        assert websocket.recv(timeout=10) == "bob: hello"
        # The app closes first. Waiting for its close keeps the client's own from crossing it: on a
        # close from each side at once, hypercorn's trio worker sends twice on one socket and its
        # whole server dies (trio.BusyResourceError), failing the tests after this one.
        with pytest.raises(ConnectionClosedOK):
            websocket.recv(timeout=10)
