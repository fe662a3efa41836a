"""Tests for mcp_bearer: the behaviour tables called directly, then end to end.

Direct tests call the middleware with hand-built ASGI scopes (fast, no network).
End-to-end tests serve a real MCP SDK app with a real uvicorn on a free loopback
port and drive it with the SDK's own client. They adapt to mcp 1.x or 2.x.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from unittest import mock
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import uvicorn
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

import mcp_bearer
from mcp_bearer import (
    DEFAULT_EXCLUDED_PATHS,
    AccessToken,
    AuthenticationError,
    BearerAuthMiddleware,
    BearerAuthProvider,
    InsufficientScopeError,
    StaticTokenProvider,
    get_access_token,
    require_auth,
    require_scopes,
)

try:  # mcp 2.x
    import httpx2 as httpx
    from mcp.server.mcpserver import MCPServer as _Server

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    import httpx  # type: ignore[no-redef]
    from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[no-redef]

    MCP_MAJOR = 1

ALICE_1 = "sk-alice-1-2fQpX9vLr0aTg7YhWm3s"
ALICE_2 = "sk-alice-2-Jd8Kq1Zp4NcVb6RtEw5u"  # the same user after a key rotation
BOB = "sk-bob-Hs7Lm2Qx9PaZc4VnTy8r"
CAROL_NO_SUB = "sk-carol-Ue3Wr6Ty9IoPa2Sd5Fg8"
TOKENS: dict[str, dict[str, Any]] = {
    ALICE_1: {"sub": "alice", "email": "alice@example.com", "scopes": ["read"]},
    ALICE_2: {"sub": "alice", "email": "alice@example.com", "scopes": ["read"]},
    BOB: {"sub": "bob", "email": "bob@example.com", "scopes": ["read", "write"]},
    CAROL_NO_SUB: {"email": "carol@example.com"},
}
# Every secret the suite uses; no log record may ever contain one (see capture_all_logs).
SECRETS: set[str] = set(TOKENS)

UNAUTHORIZED = {"error": "unauthorized", "error_description": "Authentication required"}
INVALID_TOKEN = {"error": "invalid_token", "error_description": "Token is invalid or expired"}
MALFORMED = {"error": "invalid_request", "error_description": "Malformed Authorization header"}
SERVER_ERROR = {"error": "server_error", "error_description": "Authentication failed unexpectedly"}
SESSION_NOT_FOUND = {"error": "session_not_found", "error_description": "Session not found"}
CHALLENGE_INVALID = 'Bearer error="invalid_token", error_description="Token is invalid or expired"'
CHALLENGE_MALFORMED = 'Bearer error="invalid_request", error_description="Malformed Authorization header"'


# --- log capture across the whole suite ---------------------------------------

_all_records: list[logging.LogRecord] = []


class _KeepAll(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _all_records.append(record)


@pytest.fixture(autouse=True, scope="session")
def capture_all_logs() -> Iterator[None]:
    """Every record of every logger, any level, from every thread, checked at the end for secrets."""
    handler = _KeepAll(level=logging.NOTSET)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.NOTSET)
    yield
    root.removeHandler(handler)
    root.setLevel(old_level)
    assert_no_secret_logged(_all_records)


def _record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text + (record.exc_text or "") + (record.stack_info or "")


def assert_no_secret_logged(records: list[logging.LogRecord]) -> None:
    leaks = [(r.name, s[:8]) for r in records for s in SECRETS if s in _record_text(r)]
    assert not leaks, f"secrets found in log records (logger, token prefix): {leaks}"


def test_the_log_scan_finds_a_leaked_token() -> None:
    record = logging.LogRecord("x", logging.DEBUG, __file__, 1, "header was Bearer %s", (BOB,), None)
    with pytest.raises(AssertionError, match="secrets found"):
        assert_no_secret_logged([record])


@pytest.fixture(scope="session", autouse=True)
def quiet_http_clients() -> None:
    # httpx logs every request URL at INFO; harmless, but keep the capture small.
    for name in ("httpx", "httpx2", "httpcore", "mcp"):
        logging.getLogger(name).setLevel(logging.WARNING)


# --- direct harness -----------------------------------------------------------


class RecordingProvider(BearerAuthProvider):
    """A StaticTokenProvider that also records every token it is asked about."""

    def __init__(self, tokens: dict[str, dict[str, Any]] | None = None) -> None:
        self.inner = StaticTokenProvider(TOKENS if tokens is None else tokens)
        self.calls: list[str] = []

    async def verify_token(self, token: str) -> AccessToken | None:
        self.calls.append(token)
        return await self.inner.verify_token(token)


@dataclass
class Outcome:
    messages: list[dict[str, Any]]
    app_calls: list[tuple[dict[str, Any], AccessToken | None]]
    provider_calls: list[str]

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.messages[0].get("headers", []))

    def header(self, name: str) -> str | None:
        values = [v.decode("latin-1") for n, v in self.headers if n.decode("latin-1").lower() == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def json(self) -> Any:
        return json.loads(self.body)


def assert_well_formed_http(messages: list[dict[str, Any]]) -> None:
    """One http.response.start, then body messages, the last with more_body false."""
    assert messages, "no response sent"
    assert messages[0]["type"] == "http.response.start"
    assert isinstance(messages[0]["status"], int)
    assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in messages[0].get("headers", []))
    assert len(messages) >= 2
    assert all(m["type"] == "http.response.body" for m in messages[1:])
    assert all(m.get("more_body", False) for m in messages[1:-1])
    assert not messages[-1].get("more_body", False)


class Harness:
    """The middleware around a recording app, called with hand-built scopes."""

    def __init__(self, provider: BearerAuthProvider | None = None, app_status: int = 200, **options: Any) -> None:
        self.provider = provider if provider is not None else RecordingProvider()
        self.app_calls: list[tuple[dict[str, Any], AccessToken | None]] = []
        self.app_status = app_status
        self.app_headers: list[tuple[bytes, bytes]] = []
        self.middleware = BearerAuthMiddleware(self.app, self.provider, **options)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.app_calls.append((scope, get_access_token()))
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            return
        await send({"type": "http.response.start", "status": self.app_status, "headers": list(self.app_headers)})
        await send({"type": "http.response.body", "body": b"app"})

    def request(
        self,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        path: str = "/mcp",
        method: str = "POST",
        root_path: str = "",
        scope_type: str = "http",
        **extra: Any,
    ) -> Outcome:
        scope: dict[str, Any] = {
            "type": scope_type,
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("latin-1", "replace"),
            "query_string": b"",
            "root_path": root_path,
            "headers": list(headers or []),
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            **extra,
        }
        if scope_type == "websocket":
            del scope["method"]
        return self.call(scope)

    def call(self, scope: dict[str, Any]) -> Outcome:
        messages: list[dict[str, Any]] = []
        calls_before = len(self.app_calls)
        provider_before = len(getattr(self.provider, "calls", []))

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            messages.append(message)

        anyio.run(self.middleware, scope, receive, send)
        return Outcome(messages, self.app_calls[calls_before:], getattr(self.provider, "calls", [])[provider_before:])


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


# --- the 401/400/500 table (issue 2) ------------------------------------------


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
    headers: list[tuple[bytes, bytes]], status: int, body: dict[str, str], challenge: str, provider_sees: str | None
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
    harness = Harness(RecordingProvider({token: {"sub": "long"}}), max_token_length=64)
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
def test_token_elsewhere_than_authorization_is_no_token(headers: list[tuple[bytes, bytes]], query: bytes) -> None:
    outcome = Harness().request(headers, query_string=query)
    assert outcome.status == 401 and outcome.json() == UNAUTHORIZED
    assert outcome.provider_calls == [] and outcome.app_calls == []


class RaisingProvider(BearerAuthProvider):
    async def verify_token(self, token: str) -> AccessToken | None:
        raise RuntimeError(f"database down while checking {token}")


class WrongTypeProvider(BearerAuthProvider):
    def __init__(self, result: object) -> None:
        self.result = result

    async def verify_token(self, token: str) -> AccessToken | None:
        return self.result  # type: ignore[return-value]


@pytest.mark.parametrize(
    "provider",
    [RaisingProvider(), WrongTypeProvider({"sub": "bob"}), WrongTypeProvider(BOB), WrongTypeProvider(True)],
    ids=["raises", "returns-dict", "returns-str", "returns-true"],
)
def test_provider_failure_is_500_logged_and_fails_closed(
    provider: BearerAuthProvider, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="mcp_bearer"):
        outcome = Harness(provider).request(bearer(BOB))
    assert outcome.status == 500 and outcome.json() == SERVER_ERROR
    assert outcome.header("www-authenticate") is None
    assert outcome.app_calls == []
    (record,) = [r for r in caplog.records if r.name == "mcp_bearer"]
    assert record.levelno == logging.ERROR
    assert BOB not in _record_text(record)
    if isinstance(provider, RaisingProvider):
        text = record.getMessage()
        assert "Traceback" in text and "RuntimeError: database down while checking [token]" in text


def test_provider_verify_token_must_be_async() -> None:
    class SyncProvider:
        def verify_token(self, token: str) -> AccessToken | None:
            return None

    with pytest.raises(TypeError, match="verify_token must be an async method"):
        BearerAuthMiddleware(Harness().app, SyncProvider())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"exclude_paths": "/health"}, TypeError, "exclude_paths must be a list or tuple"),
        ({"exclude_paths": ["health"]}, ValueError, "must start with '/'"),
        ({"exclude_paths": ["/ok\n"]}, ValueError, "control characters"),
        ({"max_token_length": 0}, ValueError, "max_token_length must be a positive int"),
        ({"max_token_length": True}, ValueError, "max_token_length must be a positive int"),
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
    ],
)
def test_wrong_configuration_is_refused_clearly(options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        BearerAuthMiddleware(Harness().app, RecordingProvider(), **options)


def test_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="app must be an ASGI callable"):
        BearerAuthMiddleware("app", RecordingProvider())  # type: ignore[arg-type]


# --- paths, root_path and scope types -----------------------------------------


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
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    anyio.run(harness.middleware, scope, None, None)
    assert harness.app_calls == [(scope, None)]


def test_other_scope_types_are_refused_not_passed_on() -> None:
    harness = Harness()
    with pytest.raises(RuntimeError, match="refusing ASGI scope type 'webtransport'"):
        harness.request(bearer(BOB), scope_type="webtransport")
    assert harness.app_calls == [] and harness.provider.calls == []  # type: ignore[attr-defined]


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
    assert harness.app_calls[0][1].token == BOB  # type: ignore[union-attr]


# --- context ------------------------------------------------------------------


def test_context_is_reset_after_the_request_and_never_leaks_to_the_caller() -> None:
    harness = Harness()

    async def two_requests_on_one_task() -> list[AccessToken | None]:
        seen = []
        for headers in (bearer(BOB), [], bearer(ALICE_1)):

            async def send(message: Any) -> None:
                pass

            scope = {"type": "http", "method": "POST", "path": "/mcp", "root_path": "", "headers": headers}
            await harness.middleware(scope, None, send)
            seen.append(get_access_token())  # the caller's context, after the request
        return seen

    assert anyio.run(two_requests_on_one_task) == [None, None, None]
    assert [t.token if t else None for _, t in harness.app_calls] == [BOB, ALICE_1]
    assert get_access_token() is None


def test_context_is_reset_when_the_app_raises() -> None:
    async def failing_app(scope: Any, receive: Any, send: Any) -> None:
        assert get_access_token() is not None
        raise ValueError("app bug")

    middleware = BearerAuthMiddleware(failing_app, RecordingProvider())

    async def run() -> AccessToken | None:
        scope = {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": bearer(BOB)}
        with pytest.raises(ValueError, match="app bug"):
            await middleware(scope, None, None)  # type: ignore[arg-type]
        return get_access_token()

    assert anyio.run(run) is None


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


# --- providers ----------------------------------------------------------------


def test_static_provider_keeps_only_digests() -> None:
    provider = StaticTokenProvider({BOB: {"sub": "bob"}})
    assert BOB not in repr(vars(provider))
    assert BOB.encode() not in repr(vars(provider)).encode()
    assert anyio.run(provider.verify_token, BOB) == AccessToken(BOB, {"sub": "bob"}, [])
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
        ({BOB: {"scopes": "read write"}}, TypeError, '"scopes" of token #1 must be a list'),
    ],
)
def test_static_provider_refuses_bad_tokens_without_echoing_them(tokens: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        StaticTokenProvider(tokens)
    assert BOB not in str(caught.value) and "has space" not in str(caught.value)


def test_access_token_repr_hides_the_secret() -> None:
    token = AccessToken(BOB, {"sub": "bob"}, ["read"])
    assert BOB not in repr(token) and "bob" in repr(token)


# --- end to end: real uvicorn, real MCP SDK server and client ------------------


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL; stop it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        listener.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def mcp_app(*tools: Callable[..., Any], stateless: bool = False, json_response: bool = False) -> Any:
    """The SDK's own streamable HTTP app with these tools, on mcp 2.x or 1.x."""
    if MCP_MAJOR == 2:
        server = _Server("test")
        for tool in tools:
            server.tool()(tool)
        return server.streamable_http_app(stateless_http=stateless, json_response=json_response)
    server = _Server("test", stateless_http=stateless, json_response=json_response)
    for tool in tools:
        server.tool()(tool)
    return server.streamable_http_app()


def fingerprint(token: str) -> str:
    """Tools answer with this, not the token: response bodies reach DEBUG logs (sse_starlette)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def whoami() -> dict[str, Any]:
    """Claims and token fingerprint of the caller, as the tool sees them (sync tool)."""
    token = require_auth()
    return {"token": fingerprint(token.token), "claims": token.claims}


async def whoami_async() -> dict[str, Any]:
    """The same from an async tool."""
    await anyio.sleep(0)
    token = require_auth()
    return {"token": fingerprint(token.token), "claims": token.claims}


@contextlib.asynccontextmanager
async def mcp_session(url: str, token: str | None) -> AsyncIterator[tuple[ClientSession, Any]]:
    """An initialized SDK ClientSession; the second item is the httpx client, whose headers can change."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx.AsyncClient(headers=headers, timeout=30) as client,
        streamable_http_client(url, http_client=client) as streams,
        ClientSession(streams[0], streams[1]) as session,
    ):
        await session.initialize()
        yield session, client


async def call_json(session: ClientSession, tool: str) -> Any:
    result = await session.call_tool(tool, {})
    assert not (getattr(result, "is_error", None) or getattr(result, "isError", None)), result
    return json.loads(result.content[0].text)  # type: ignore[union-attr]


def raw_request(base: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
    """One plain HTTP/1.1 request; returns (status, lowercase headers dict, body)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


MCP_POST_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
).encode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def stateful_url() -> Iterator[str]:
    app = BearerAuthMiddleware(mcp_app(whoami, whoami_async), RecordingProvider())
    with serve(app) as base:
        yield base + "/mcp"


@pytest.mark.anyio
async def test_e2e_no_token_is_refused_before_the_mcp_app(stateful_url: str) -> None:
    status, headers, body = raw_request(stateful_url.rsplit("/", 1)[0], "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)
    assert status == 401 and json.loads(body) == UNAUTHORIZED
    assert headers["www-authenticate"] == "Bearer" and "mcp-session-id" not in headers
    with pytest.raises(Exception):  # noqa: B017, PT011 - the SDK client's error type differs between versions
        async with mcp_session(stateful_url, None):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("tool", ["whoami", "whoami_async"])
async def test_e2e_valid_token_sees_its_own_claims(stateful_url: str, tool: str) -> None:
    async with mcp_session(stateful_url, BOB) as (session, _):
        seen = await call_json(session, tool)
    assert seen == {"token": fingerprint(BOB), "claims": TOKENS[BOB]}


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
    app = BearerAuthMiddleware(mcp_app(whoami, whoami_async, stateless=True, json_response=json_response), RecordingProvider())
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
    mounted = Starlette(routes=[Mount("/api", app=BearerAuthMiddleware(inner, RecordingProvider()))])
    with serve(mounted) as base:
        assert raw_request(base, "POST", "/api/mcp")[0] == 401
        assert raw_request(base, "GET", "/api/health")[0] == 200
        assert raw_request(base, "GET", "/api/health/")[0] == 401
        assert raw_request(base, "POST", "/api/mcp", {"Authorization": f"Bearer {BOB}"})[0] == 200
    # Behind a proxy that strips /api, uvicorn --root-path /api puts it back: the app sees /api/mcp.
    with serve(BearerAuthMiddleware(inner, RecordingProvider()), root_path="/api") as base:
        assert raw_request(base, "POST", "/mcp") == (401, mock.ANY, json.dumps(UNAUTHORIZED).encode())
        assert raw_request(base, "GET", "/health")[2] == b"/api/health"
        assert raw_request(base, "GET", "/HEALTH")[0] == 401
        assert raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {BOB}"})[2] == b"/api/mcp"
