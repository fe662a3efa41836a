"""Tests for mcp_bearer: the behaviour tables called directly, then end to end.

Direct tests call the middleware with hand-built ASGI scopes (fast, no network).
End-to-end tests serve a real MCP SDK app with a real uvicorn on a free loopback
port and drive it with the SDK's own client. They adapt to mcp 1.x or 2.x.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import functools
import hashlib
import hmac
import http.client
import importlib
import json
import logging
import math
import os
import re
import secrets
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, quote, quote_plus, unquote_plus

import anyio
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from pydantic import BaseModel
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import mcp_bearer
from mcp_bearer import (
    DEFAULT_EXCLUDED_PATHS,
    DEFAULT_MAX_TOKEN_LENGTH,
    AccessToken,
    AuthenticationError,
    BearerAuthMiddleware,
    BearerAuthProvider,
    CachedProvider,
    InsufficientScopeError,
    IntrospectionProvider,
    JWTProvider,
    ProviderChain,
    ProviderUnavailable,
    StaticTokenProvider,
    get_access_token,
    require_auth,
    require_scopes,
)

try:  # mcp 2.x
    import httpx2 as httpx
    from mcp.server.mcpserver import Context
    from mcp.server.mcpserver import MCPServer as _Server

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    import httpx  # type: ignore[no-redef]
    from mcp.server.fastmcp import Context  # type: ignore[no-redef,assignment]
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
# Property tests: 2,000 examples each in CI; HYPOTHESIS_PROFILE=long runs 50,000 by hand. (The plugin's
# --hypothesis-profile option would need the profile registered in a conftest.py; we keep one test file.)
settings.register_profile("ci", max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=50_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every secret the suite uses; no log record may ever contain one (see capture_all_logs).
SECRETS: set[str] = set(TOKENS)

UNAUTHORIZED = {"error": "unauthorized", "error_description": "Authentication required"}
INVALID_TOKEN = {"error": "invalid_token", "error_description": "Token is invalid or expired"}
MALFORMED = {"error": "invalid_request", "error_description": "Malformed Authorization header"}
SERVER_ERROR = {"error": "server_error", "error_description": "Authentication failed unexpectedly"}
NOT_BUILT = "BearerAuthMiddleware cannot be built, so nothing behind it can be served: "
SESSION_NOT_FOUND = {"error": "session_not_found", "error_description": "Session not found"}
UNAVAILABLE = {"error": "temporarily_unavailable", "error_description": "Token verification is temporarily unavailable"}
CHALLENGE_INVALID = 'Bearer error="invalid_token", error_description="Token is invalid or expired"'
CHALLENGE_MALFORMED = 'Bearer error="invalid_request", error_description="Malformed Authorization header"'


# --- log capture across the whole suite ---------------------------------------


class ListHandler(logging.Handler):
    """Keeps every record it is given, at any level."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True, scope="session")
def capture_all_logs() -> Iterator[None]:
    """Every record of every logger, any level, from every thread, checked at the end for secrets."""
    handler = ListHandler()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.NOTSET)
    yield
    root.removeHandler(handler)
    root.setLevel(old_level)
    assert_no_secret_logged(handler.records)


def _record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text + (record.exc_text or "") + (record.stack_info or "")


def assert_no_secret_logged(records: list[logging.LogRecord]) -> None:
    texts = [(r.name, _record_text(r)) for r in records]  # once per record: the suite registers many secrets
    leaks = [(name, s[:8]) for name, text in texts for s in SECRETS if s in text]
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


# --- the 401/400/500 table: RFC 6750 section 3 and the refusals we add ------


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


class ScriptedProvider(BearerAuthProvider):
    """A provider that does one thing: raise an exception class it was given, or return an answer (or call for one)."""

    def __init__(self, behaviour: Any) -> None:
        self.behaviour = behaviour
        self.calls: list[str] = []

    async def verify_token(self, token: str) -> AccessToken | None:
        self.calls.append(token)
        if isinstance(self.behaviour, type):  # an exception class; the message names the token, as careless code does
            raise self.behaviour(f"lookup failed for {token}")
        if callable(self.behaviour):
            return self.behaviour()  # type: ignore[no-any-return]
        return self.behaviour  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "provider",
    [ScriptedProvider(RuntimeError), ScriptedProvider({"sub": "bob"}), ScriptedProvider(BOB), ScriptedProvider(True)],
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
    if provider.behaviour is RuntimeError:  # type: ignore[attr-defined]
        text = record.getMessage()
        assert "Traceback" in text and "RuntimeError: lookup failed for [token]" in text


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
        BearerAuthMiddleware(Harness().app, RecordingProvider(), **options)
    # Lazy builders (Starlette's add_middleware) can swallow the exception; the ERROR record remains.
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, f"{NOT_BUILT}{error.__name__}: {refused.value}")
    ]


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
def serve(app: Any, listener: socket.socket | None = None, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL; stop it."""
    listener = listener or mcp_bearer._listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", "lifespan": "on", **config}))
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
async def mcp_session(url: str, token: str | None, **client_options: Any) -> AsyncIterator[tuple[ClientSession, Any]]:
    """An initialized SDK ClientSession; the second item is the httpx client, whose headers can change.

    ``client_options`` go to the httpx client (``auth``, ``event_hooks``, ``timeout``).
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client_options.setdefault("timeout", 30)
    async with (
        httpx.AsyncClient(headers=headers, **client_options) as client,
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
    with pytest.raises(Exception):  # noqa: B017 - the SDK client's error type differs between versions
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
    app = BearerAuthMiddleware(
        mcp_app(whoami, whoami_async, stateless=True, json_response=json_response), RecordingProvider()
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


# --- the same app under every ASGI server we support ----------------------------
# A server, not the middleware, turns ASGI messages into bytes on the wire: the challenge, the
# websocket refusal and the per-request identity must survive each one. Each runs on a free loopback
# port; uvicorn and hypercorn in this process, so their log records join the suite-wide secret scan,
# granian in its own, whose output is scanned for tokens when it stops.

SERVERS = ["uvicorn", "hypercorn-asyncio", "hypercorn-trio", "granian"]


def announcing_startup(app: Any, started: threading.Event) -> Any:
    """Sets ``started`` once the app has answered lifespan startup (or turned lifespan down)."""

    async def announce(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def observed(message: Any) -> None:
            await send(message)
            if message["type"].startswith("lifespan.startup."):
                started.set()

        try:
            await app(scope, receive, observed)
        finally:
            started.set()

    return announce


def wait_until_serving(port: int, started: threading.Event, thread: threading.Thread, name: str) -> None:
    deadline = time.monotonic() + 20
    while not started.wait(0.01):
        assert thread.is_alive() and time.monotonic() < deadline, f"{name} did not start"
    while True:  # granian's worker opens its listener after lifespan startup
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert thread.is_alive() and time.monotonic() < deadline, f"{name} does not accept connections"
            time.sleep(0.01)


ServerStop = list[Callable[[], None]]  # filled by the server's event loop once it can be stopped


@contextlib.contextmanager
def server_thread(name: str, run: Callable[[], None], stops: ServerStop) -> Iterator[threading.Thread]:
    """Run a server's event loop in a thread; stop it and wait for it on the way out, failure or not."""
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        if thread.is_alive() and stops:
            stops[0]()
        thread.join(20)
        assert not thread.is_alive(), f"{name} did not stop"


@contextlib.contextmanager
def serve_hypercorn(app: Any, worker_class: str) -> Iterator[str]:
    """hypercorn.asyncio.serve or hypercorn.trio.serve, each in a thread with its own event loop."""
    import trio
    from hypercorn.asyncio import serve as serve_asyncio
    from hypercorn.config import Config
    from hypercorn.trio import serve as serve_trio

    listener = mcp_bearer._listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket from here and closes it
    config.errorlog = logging.getLogger("hypercorn.error")  # into the suite's log capture, not stderr
    config.graceful_timeout = 1
    started = threading.Event()
    app = announcing_startup(app, started)
    stops: ServerStop = []

    async def on_trio() -> None:
        token, shutdown = trio.lowlevel.current_trio_token(), trio.Event()
        stops.append(lambda: trio.from_thread.run_sync(shutdown.set, trio_token=token))
        await serve_trio(app, config, shutdown_trigger=shutdown.wait)

    async def on_asyncio() -> None:
        loop, shutdown = asyncio.get_running_loop(), asyncio.Event()
        stops.append(lambda: loop.call_soon_threadsafe(shutdown.set))
        await serve_asyncio(app, config, shutdown_trigger=shutdown.wait)

    run = (lambda: trio.run(on_trio)) if worker_class == "trio" else (lambda: asyncio.run(on_asyncio()))
    with server_thread(f"hypercorn ({worker_class})", run, stops) as thread:
        wait_until_serving(port, started, thread, f"hypercorn ({worker_class})")
        yield f"http://127.0.0.1:{port}"


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def answers_http(base: str, process: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether the server at ``base`` answers HTTP at all; False once ``process`` has exited."""
    host, port = base.removeprefix("http://").split(":")
    while process.poll() is None:
        connection = http.client.HTTPConnection(host, int(port), timeout=1)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return True
        except OSError:
            assert time.monotonic() < deadline, "granian did not start"
            time.sleep(0.05)
        finally:
            connection.close()
    return False


@contextlib.contextmanager
def serve_granian(factory: str) -> Iterator[str]:
    """``python -m granian --interface asgi --factory MODULE:FACTORY``, as users run it, in its own process.

    Not granian's embedded server: its Rust threads sometimes abort the interpreter at exit (about one
    run in ten here), which would take the test run with them. Granian binds by host and port only, so
    the port is picked free and the start retried if another process took it in between.
    """
    with tempfile.TemporaryFile() as output:
        for _attempt in range(3):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = ["--interface", "asgi", "--factory", "--host", "127.0.0.1", "--port", str(port), factory]
            process = subprocess.Popen(
                [sys.executable, "-m", "granian", *command],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": REPO},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
            try:
                if answers_http(base, process, time.monotonic() + 30):
                    break
            except BaseException:
                process.kill()
                process.wait()
                raise
        else:
            output.seek(0)
            pytest.fail(f"granian did not start on any of three free ports:\n{output.read().decode()}")
        try:
            yield base
        finally:
            process.terminate()
            process.wait(20)
            output.seek(0)
            logged = output.read().decode(errors="replace")
            assert not [s[:8] for s in SECRETS if s in logged], "granian's output holds a token"


@contextlib.contextmanager
def serve_with(server: str, app: Any) -> Iterator[str]:
    """Serve an ASGI app, lifespan included, with ``server`` (one of SERVERS); yield its base URL; stop it.

    ``app`` is an ASGI app or ``"MODULE:FACTORY"``, a function that builds one; granian needs the latter,
    since it runs in a process of its own.
    """
    if server == "granian":
        if not isinstance(app, str):
            raise TypeError("granian runs in its own process: pass 'MODULE:FACTORY', not an app object")
        with serve_granian(app) as base:
            yield base
        return
    if isinstance(app, str):
        module, _, factory = app.partition(":")
        app = getattr(importlib.import_module(module), factory)()
    if server == "uvicorn":
        with serve(app) as base:
            yield base
    elif server in ("hypercorn-asyncio", "hypercorn-trio"):
        with serve_hypercorn(app, server.removeprefix("hypercorn-")) as base:
            yield base
    else:
        raise ValueError(f"unknown server {server!r}; one of {SERVERS}")


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
    return without_websocket_http_response(BearerAuthMiddleware(mcp_and_websocket_app(), RecordingProvider()))


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
        assert await call_json(session, tool) == {"token": fingerprint(BOB), "claims": TOKENS[BOB]}


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
        assert answers == [{"token": fingerprint(token), "claims": TOKENS[token]}] * 4


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


# --- the MCP authorization spec: expiry, scopes, metadata, sessions -----------


@pytest.mark.parametrize(
    ("expires_at", "status"),
    [(None, 200), (time.time() + 60, 200), (time.time() - 1, 401), (0, 401), (float("nan"), 401)],
    ids=["never", "future", "past", "epoch", "nan"],
)
def test_expired_token_is_refused_even_when_the_provider_returned_it(expires_at: float | None, status: int) -> None:
    outcome = Harness(ScriptedProvider(AccessToken(BOB, expires_at=expires_at))).request(bearer(BOB))
    assert outcome.status == status
    if status == 401:
        assert outcome.json() == INVALID_TOKEN and outcome.header("www-authenticate") == CHALLENGE_INVALID
        assert outcome.app_calls == []


@pytest.mark.parametrize(
    ("granted", "status"),
    [(["read", "write"], 200), (["write", "admin", "read"], 200), (["read"], 403), ([], 403), ("read write", 403)],
)
def test_required_scopes_answer_403_insufficient_scope(granted: Any, status: int) -> None:
    outcome = Harness(ScriptedProvider(AccessToken(BOB, scopes=granted)), required_scopes=["read", "write"]).request(
        bearer(BOB)
    )
    assert outcome.status == status
    if status == 403:
        assert outcome.json() == {
            "error": "insufficient_scope",
            "error_description": "Insufficient scope",
            "scope": "read write",
        }
        assert outcome.header("www-authenticate") == (
            'Bearer error="insufficient_scope", scope="read write", error_description="Insufficient scope"'
        )
        assert outcome.app_calls == []


def test_required_scopes_join_every_401_challenge() -> None:
    harness = Harness(required_scopes=["read"])
    assert harness.request([]).header("www-authenticate") == 'Bearer scope="read"'
    assert harness.request(bearer("sk-nobody")).header("www-authenticate") == (
        'Bearer error="invalid_token", scope="read", error_description="Token is invalid or expired"'
    )


def test_require_scopes_in_a_tool() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(require_scopes("read"))
        with pytest.raises(InsufficientScopeError) as caught:
            require_scopes("read", "admin", "write")
        seen.append(caught.value)
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    harness = Harness()
    harness.middleware = BearerAuthMiddleware(app, harness.provider)
    assert harness.request(bearer(ALICE_1)).status == 204
    token, error = seen
    assert token.token == ALICE_1
    assert error.missing_scopes == ("admin", "write") and isinstance(error, AuthenticationError)
    assert "admin write" in str(error)


METADATA_OPTIONS = {
    "resource": "https://mcp.example.com/mcp",
    "authorization_servers": ["https://auth.example.com"],
    "required_scopes": ["mcp:tools"],
    "resource_name": "Example MCP",
}


@pytest.mark.parametrize("path", ["/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"])
def test_protected_resource_metadata_is_served_unauthenticated(path: str) -> None:
    harness = Harness(**METADATA_OPTIONS)
    outcome = harness.request([], path=path, method="GET")
    assert outcome.status == 200 and harness.app_calls == [] and outcome.provider_calls == []
    assert outcome.json() == {
        "resource": "https://mcp.example.com/mcp",
        "authorization_servers": ["https://auth.example.com"],
        "scopes_supported": ["mcp:tools"],
        "bearer_methods_supported": ["header"],
        "resource_name": "Example MCP",
    }
    assert outcome.header("cache-control") == "public, max-age=3600"
    assert outcome.header("content-type") == "application/json"
    head = harness.request([], path=path, method="HEAD")
    assert head.status == 200 and head.body == b"" and head.header("content-length") == str(len(outcome.body))


def test_metadata_paths_are_exact_and_other_methods_are_guarded() -> None:
    harness = Harness(**METADATA_OPTIONS)
    for path in ("/.well-known/oauth-protected-resource/", "/.well-known/oauth-protected-resource/other"):
        assert harness.request([], path=path, method="GET").status == 401
    assert harness.request([], path="/.well-known/oauth-protected-resource", method="POST").status == 401
    assert Harness().request([], path="/.well-known/oauth-protected-resource", method="GET").status == 401


def test_scopes_supported_can_differ_from_required_scopes() -> None:
    harness = Harness(resource="https://x.example/", scopes_supported=["a", "b"])
    outcome = harness.request([], path="/.well-known/oauth-protected-resource", method="GET")
    assert outcome.json()["scopes_supported"] == ["a", "b"] and "resource_name" not in outcome.json()
    assert harness.request([]).header("www-authenticate") == (
        'Bearer resource_metadata="https://x.example/.well-known/oauth-protected-resource"'
    )


def test_every_challenge_names_realm_scope_and_resource_metadata() -> None:
    harness = Harness(realm='mcp "prod" \\ eu', **METADATA_OPTIONS)
    url = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
    realm = 'realm="mcp \\"prod\\" \\\\ eu"'
    assert (
        harness.request([]).header("www-authenticate")
        == f'Bearer {realm}, scope="mcp:tools", resource_metadata="{url}"'
    )
    assert harness.request(bearer("sk-nobody")).header("www-authenticate") == (
        f'Bearer {realm}, error="invalid_token", scope="mcp:tools", '
        f'error_description="Token is invalid or expired", resource_metadata="{url}"'
    )
    assert harness.request(bearer(BOB)).header("www-authenticate") == (  # BOB lacks mcp:tools
        f'Bearer {realm}, error="insufficient_scope", scope="mcp:tools", '
        f'error_description="Insufficient scope", resource_metadata="{url}"'
    )


def session_harness(**options: Any) -> Harness:
    """An app that creates a session on POST without one, and answers 404 for a session it forgot."""
    harness = Harness(**options)
    known: set[bytes] = set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        harness.app_calls.append((scope, get_access_token()))
        sid = dict(scope["headers"]).get(b"mcp-session-id")
        if sid is None:
            sid = b"sid-%d" % len(harness.app_calls)
            known.add(sid)
            status = 200
        elif sid not in known:
            status = 404
        elif scope["method"] == "DELETE":
            known.discard(sid)
            status = 200
        else:
            status = 200
        await send({"type": "http.response.start", "status": status, "headers": [(b"mcp-session-id", sid)]})
        await send({"type": "http.response.body", "body": b"{}"})

    harness.middleware = BearerAuthMiddleware(app, harness.provider, **options)
    harness.known_sessions = known  # type: ignore[attr-defined]
    return harness


def with_session(headers: list[tuple[bytes, bytes]], sid: str) -> list[tuple[bytes, bytes]]:
    return [*headers, (b"mcp-session-id", sid.encode())]


def test_a_session_belongs_to_the_principal_that_created_it() -> None:
    harness = session_harness()
    created = harness.request(bearer(ALICE_1))
    sid = created.header("mcp-session-id")
    assert created.status == 200 and sid
    assert harness.request(with_session(bearer(ALICE_1), sid)).status == 200
    assert harness.request(with_session(bearer(ALICE_2), sid)).status == 200  # same sub, rotated key
    stolen = harness.request(with_session(bearer(BOB), sid))
    assert stolen.status == 404 and stolen.json() == SESSION_NOT_FOUND and stolen.app_calls == []
    assert stolen.header("www-authenticate") is None
    assert harness.request(with_session(bearer(ALICE_1), sid)).status == 200  # alice carries on


def test_without_sub_the_session_belongs_to_the_token() -> None:
    harness = session_harness()
    sid = harness.request(bearer(CAROL_NO_SUB)).header("mcp-session-id")
    assert sid and harness.request(with_session(bearer(CAROL_NO_SUB), sid)).status == 200
    other = StaticTokenProvider({"sk-other": {"email": "carol@example.com"}})
    harness.provider.inner = other  # type: ignore[attr-defined]
    assert harness.request(with_session(bearer("sk-other"), sid)).status == 404


def test_unknown_and_duplicated_session_ids_are_refused() -> None:
    harness = session_harness()
    assert harness.request(with_session(bearer(BOB), "never-created")).status == 404
    sid = harness.request(bearer(BOB)).header("mcp-session-id")
    assert sid
    alice_sid = harness.request(bearer(ALICE_1)).header("mcp-session-id")
    assert alice_sid
    # Bob names alice's session next to his own, in either order: the app would take one of them
    # (Starlette takes the first), so the middleware must not check just the other.
    for pair in ((sid, alice_sid), (alice_sid, sid)):
        both = harness.request(with_session(with_session(bearer(BOB), pair[0]), pair[1]))
        assert both.status == 404 and both.app_calls == []


def test_session_binding_ends_with_delete_or_app_404() -> None:
    harness = session_harness()
    sid = harness.request(bearer(BOB)).header("mcp-session-id")
    assert sid
    assert harness.request(with_session(bearer(BOB), sid), method="DELETE").status == 200
    assert harness.middleware._sessions.owners == {}  # type: ignore[union-attr]
    sid = harness.request(bearer(BOB)).header("mcp-session-id")
    assert sid
    harness.known_sessions.discard(sid.encode())  # type: ignore[attr-defined]  # the app expired it
    assert harness.request(with_session(bearer(BOB), sid)).status == 404
    assert harness.middleware._sessions.owners == {}  # type: ignore[union-attr]


def test_session_table_is_bounded_oldest_first() -> None:
    harness = session_harness(max_sessions=3)
    sids = [harness.request(bearer(BOB)).header("mcp-session-id") for _ in range(5)]
    assert list(harness.middleware._sessions.owners) == [s.encode() for s in sids[2:]]  # type: ignore[union-attr]
    assert harness.request(with_session(bearer(BOB), sids[0])).status == 404  # type: ignore[arg-type]
    assert harness.request(with_session(bearer(BOB), sids[4])).status == 200  # type: ignore[arg-type]


def test_bind_sessions_false_leaves_sessions_to_the_app() -> None:
    harness = session_harness(bind_sessions=False)
    sid = harness.request(bearer(ALICE_1)).header("mcp-session-id")
    assert sid and harness.request(with_session(bearer(BOB), sid)).status == 200


PREFLIGHT = [(b"origin", b"https://app.example"), (b"access-control-request-method", b"POST")]


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
def test_only_a_real_cors_preflight_passes_without_credentials(
    headers: list[tuple[bytes, bytes]], allow: bool, passes: bool
) -> None:
    outcome = Harness(allow_cors_preflight=allow).request(headers, method="OPTIONS")
    assert (outcome.status == 200) is passes and bool(outcome.app_calls) is passes
    if not passes:
        assert outcome.status == 401 and outcome.json() == UNAUTHORIZED
    assert outcome.provider_calls == []


def listener_and_url() -> tuple[socket.socket, str]:
    listener = mcp_bearer._listen("127.0.0.1", 0)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def recording(app: Any, seen: list[tuple[str, str]]) -> Any:
    """Outermost ASGI layer that notes (method, path) of every HTTP request."""

    async def record(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append((scope["method"], scope["path"]))
        await app(scope, receive, send)

    return record


def test_e2e_metadata_document_over_http() -> None:
    listener, base = listener_and_url()
    app = BearerAuthMiddleware(
        mcp_app(whoami), RecordingProvider(), resource=base + "/mcp", authorization_servers=["https://auth.example.com"]
    )
    with serve(app, listener) as base:
        for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"):
            status, headers, body = raw_request(base, "GET", path)
            assert status == 200 and headers["cache-control"] == "public, max-age=3600"
            assert json.loads(body) == {
                "resource": base + "/mcp",
                "authorization_servers": ["https://auth.example.com"],
                "bearer_methods_supported": ["header"],
            }
        status, headers, body = raw_request(base, "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)
        assert status == 401
        assert (
            headers["www-authenticate"] == f'Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/mcp"'
        )


class _NoStorage:
    async def get_tokens(self) -> None:
        return None

    async def set_tokens(self, tokens: Any) -> None:
        pass

    async def get_client_info(self) -> None:
        return None

    async def set_client_info(self, info: Any) -> None:
        pass


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.anyio
async def test_e2e_sdk_oauth_client_follows_resource_metadata_to_the_authorization_server() -> None:
    """The SDK's own 401 handling reads resource_metadata, fetches our document, then asks its issuer."""
    from mcp.client.auth import OAuthClientProvider
    from mcp.shared.auth import OAuthClientMetadata

    seen_here: list[tuple[str, str]] = []
    seen_by_issuer: list[tuple[str, str]] = []
    listener, base = listener_and_url()
    with serve(recording(_not_found, seen_by_issuer)) as issuer:
        guarded = BearerAuthMiddleware(
            mcp_app(whoami), RecordingProvider(), resource=base + "/mcp", authorization_servers=[issuer]
        )
        with serve(recording(guarded, seen_here), listener):
            oauth = OAuthClientProvider(
                base + "/mcp", OAuthClientMetadata(redirect_uris=["http://127.0.0.1:1/cb"]), _NoStorage()
            )
            with pytest.raises(BaseException):  # noqa: B017 - no real issuer: the flow must stop
                async with mcp_session(base + "/mcp", None, auth=oauth, timeout=20):
                    pass
    assert seen_here[:2] == [("POST", "/mcp"), ("GET", "/.well-known/oauth-protected-resource/mcp")]
    metadata = oauth.context.protected_resource_metadata
    assert metadata is not None and str(metadata.resource) == base + "/mcp"
    assert ("GET", "/.well-known/oauth-authorization-server") in seen_by_issuer


@pytest.mark.anyio
async def test_e2e_second_principal_on_first_principals_session_gets_404(stateful_url: str) -> None:
    session_ids: list[str] = []

    async def note_session(response: Any) -> None:
        if "mcp-session-id" in response.headers:
            session_ids.append(response.headers["mcp-session-id"])

    base = stateful_url.rsplit("/", 1)[0]
    async with mcp_session(stateful_url, ALICE_1, event_hooks={"response": [note_session]}) as (session, _):
        assert (await call_json(session, "whoami"))["claims"]["sub"] == "alice"
        call = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "whoami"}}).encode()
        headers = {**MCP_POST_HEADERS, "mcp-session-id": session_ids[0], "mcp-protocol-version": "2025-06-18"}
        status, _, body = raw_request(base, "POST", "/mcp", {**headers, "Authorization": f"Bearer {BOB}"}, call)
        assert status == 404 and json.loads(body) == SESSION_NOT_FOUND
        status, _, body = raw_request(base, "DELETE", "/mcp", {**headers, "Authorization": f"Bearer {BOB}"})
        assert status == 404  # nor may bob end alice's session
        assert (await call_json(session, "whoami"))["claims"]["sub"] == "alice"  # alice carries on


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
        BearerAuthMiddleware(mcp_app(whoami), RecordingProvider()),
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
    # CORS inside the app: the middleware lets only the real preflight through.
    inside = BearerAuthMiddleware(
        CORSMiddleware(mcp_app(whoami), allow_origins=[origin], allow_methods=["POST"], allow_headers=["*"]),
        RecordingProvider(),
    )
    with serve(inside) as base:
        status, headers, _ = raw_request(base, "OPTIONS", "/mcp", preflight)
        assert status == 200 and headers["access-control-allow-origin"] == origin
        assert raw_request(base, "OPTIONS", "/mcp", {"Origin": origin})[0] == 401


# --- identity under concurrency on one session ---------------------------------


class PerCallToken(httpx.Auth):  # type: ignore[misc]
    """Sends each tools/call with the token its argument ``n`` names; everything else with ``default``."""

    def __init__(self, tokens: list[str], default: str) -> None:
        self.tokens = tokens
        self.default = default

    def auth_flow(self, request: Any) -> Iterator[Any]:
        token = self.default
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            message = json.loads(request.content)
            token = self.tokens[message["params"]["arguments"]["n"]]
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


async def identity(n: int) -> dict[str, Any]:
    """Who the call sees before and after yielding to the other calls in flight."""
    before = require_auth().token
    await anyio.sleep(0.01)
    return {"n": n, "before": fingerprint(before), "after": fingerprint(require_auth().token)}


TEAM = [f"sk-team-{n:02d}-{hashlib.sha256(str(n).encode()).hexdigest()[:20]}" for n in range(50)]
SECRETS.update(TEAM)


@dataclass
class Tally:
    """What a batch of calls saw: wrong identities, unexpected statuses or errors, hangs."""

    calls: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hangs: int = 0

    def __iadd__(self, other: Tally) -> Tally:
        self.calls += other.calls
        self.mismatches += other.mismatches
        self.errors += other.errors
        self.hangs += other.hangs
        return self


async def concurrent_calls(url: str, tokens: list[str], calls: int, limit: anyio.Semaphore) -> Tally:
    """``calls`` identity calls on one session, cycling through ``tokens``, at most ``limit`` in flight."""
    tally = Tally()
    async with mcp_session(url, None, auth=PerCallToken(tokens, tokens[0]), timeout=60) as (session, _):

        async def one(i: int) -> None:
            n = i % len(tokens)
            async with limit:
                tally.calls += 1
                try:
                    with anyio.fail_after(30):
                        result = await session.call_tool("identity", {"n": n})
                except TimeoutError:
                    tally.hangs += 1
                    return
                except Exception as exc:  # the client's error types differ between SDK versions
                    tally.errors.append(f"call {i}: {type(exc).__name__}")
                    return
            seen = json.loads(result.content[0].text)  # type: ignore[union-attr]
            expected = fingerprint(tokens[n])
            if seen != {"n": n, "before": expected, "after": expected}:
                tally.mismatches.append(f"call {i}: {seen}")

        async with anyio.create_task_group() as group:
            for i in range(calls):
                group.start_soon(one, i)
    return tally


@pytest.mark.anyio
async def test_e2e_20_concurrent_calls_on_one_session_each_see_their_own_token() -> None:
    """mcp 1.x answered every call on a stateful session with its first request's token (SDK #2208)."""
    tokens = TEAM[:20]
    provider = RecordingProvider({token: {"sub": "team"} for token in tokens})
    with serve(BearerAuthMiddleware(mcp_app(identity), provider)) as base:
        tally = await concurrent_calls(base + "/mcp", tokens, calls=20, limit=anyio.Semaphore(20))
    assert tally == Tally(calls=20)
    assert set(provider.calls) == set(tokens)


# --- the legacy HTTP+SSE transport: a session belongs to whoever opened its stream ---
# GET /sse opens a stream whose first event names /messages/?session_id=<hex>; POSTs to that URL land on
# the stream. Without binding, any valid token could post into someone else's session, or answer the
# owner's elicitation (server-to-client request ids are small counters), as the SDK's own auth forbids.


class Confirmation(BaseModel):
    ok: bool


async def confirm(ctx: Context) -> str:  # type: ignore[type-arg]
    """Asks the caller to confirm, then reports who answered what."""
    answer = await ctx.elicit("Delete everything?", schema=Confirmation)
    return json.dumps({"action": answer.action, "data": getattr(answer, "data", None) and answer.data.model_dump()})


def sse_app(*tools: Callable[..., Any]) -> Any:
    """The SDK's own legacy SSE app (GET /sse, POST /messages/) with these tools, on mcp 2.x or 1.x."""
    server = _Server("test")
    for tool in tools:
        server.tool()(tool)
    return server.sse_app()


@contextlib.asynccontextmanager
async def sse_session(base: str, token: str, **session_options: Any) -> AsyncIterator[tuple[ClientSession, str]]:
    """An initialized SDK ClientSession over the SDK's own ``sse_client``; the second item is its session id."""
    ids: list[str] = []
    async with (
        sse_client(
            base + "/sse", headers={"Authorization": f"Bearer {token}"}, on_session_created=ids.append
        ) as streams,
        ClientSession(streams[0], streams[1], **session_options) as session,
    ):
        await session.initialize()
        yield session, ids[0]


def post_message(base: str, token: str, query: str, message: dict[str, Any], path: str = "/messages/") -> Any:
    headers = {"content-type": "application/json", "Authorization": f"Bearer {token}"}
    return raw_request(base, "POST", f"{path}?{query}", headers, json.dumps(message).encode())


def forms_of(session_id: str, other: str) -> list[tuple[str, str]]:
    """Every spelling of a session id the SDK would route to that session, as (path, query)."""
    hyphenated = str(uuid.UUID(hex=session_id))
    return [
        ("/messages/", f"session_id={session_id}"),
        ("/messages/", f"session_id={session_id.upper()}"),
        ("/messages/", f"session_id=%7B{session_id}%7D"),
        ("/messages/", f"session_id=urn:uuid:{hyphenated}"),
        ("/messages/", f"session_id={hyphenated}"),
        ("/messages/", f"session_id={session_id}&session_id={other}"),
        ("/messages/", f"session_id={other}&session_id={session_id}"),
        ("/messages/anything", f"session_id={session_id}"),
        ("/messages/", f"session%5Fid={session_id}"),
        ("/messages/", f"session_id={session_id}&x=1"),
        ("/messages", f"session_id={session_id}"),  # Starlette redirects this to /messages/
    ]


TOOL_CALL = {"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}


@pytest.fixture
def sse_base() -> Iterator[str]:
    with serve(BearerAuthMiddleware(sse_app(whoami, whoami_async, confirm), RecordingProvider())) as base:
        yield base


@pytest.mark.anyio
async def test_e2e_sse_client_works_and_each_caller_sees_their_own_claims(sse_base: str) -> None:
    async with sse_session(sse_base, BOB) as (bob, _), sse_session(sse_base, CAROL_NO_SUB) as (carol, _):
        for tool in ("whoami", "whoami_async"):
            assert await call_json(bob, tool) == {"token": fingerprint(BOB), "claims": TOKENS[BOB]}
            assert await call_json(carol, tool) == {"token": fingerprint(CAROL_NO_SUB), "claims": TOKENS[CAROL_NO_SUB]}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("owner", "intruder"),
    [(ALICE_1, BOB), (CAROL_NO_SUB, BOB), (BOB, CAROL_NO_SUB)],
    ids=["alice-bob", "carol-bob", "bob-carol"],
)
async def test_e2e_sse_another_principal_cannot_post_into_a_session_in_any_spelling(
    sse_base: str, owner: str, intruder: str
) -> None:
    async with sse_session(sse_base, owner) as (session, victim), sse_session(sse_base, intruder) as (_, own):
        for path, query in forms_of(victim, own):
            status, _, body = post_message(sse_base, intruder, query, TOOL_CALL, path)
            assert (status, json.loads(body)) == (404, SESSION_NOT_FOUND), (path, query)
        assert (await call_json(session, "whoami"))["token"] == fingerprint(owner)  # the owner carries on


@pytest.mark.anyio
async def test_e2e_sse_without_sub_the_session_belongs_to_the_token_not_the_person() -> None:
    tokens = {CAROL_NO_SUB: {"email": "carol@example.com"}, ALICE_2: {"email": "carol@example.com"}}
    with serve(BearerAuthMiddleware(sse_app(whoami), RecordingProvider(tokens))) as base:
        async with sse_session(base, CAROL_NO_SUB) as (session, victim):
            status, _, _ = post_message(base, ALICE_2, f"session_id={victim}", TOOL_CALL)
            assert status == 404
            status, _, _ = post_message(base, CAROL_NO_SUB, f"session_id={victim.upper()}", TOOL_CALL)
            assert status == 202  # the owner's own post, in another spelling, reaches the SDK
            assert (await call_json(session, "whoami"))["token"] == fingerprint(CAROL_NO_SUB)


@pytest.mark.anyio
async def test_e2e_sse_a_forged_elicitation_answer_is_refused_and_the_owner_decides(sse_base: str) -> None:
    """Bob answers the confirmation alice's tool asked her for: her tool must go on with her answer."""
    from mcp.types import ElicitResult

    asked = anyio.Event()
    forged = anyio.Event()

    async def alice_answers(context: Any, params: Any) -> ElicitResult:
        asked.set()
        await forged.wait()
        return ElicitResult(action="decline")

    async with sse_session(sse_base, ALICE_1, elicitation_callback=alice_answers) as (session, victim):
        async with anyio.create_task_group() as group:
            results: list[Any] = []

            async def call() -> None:
                results.append(await session.call_tool("confirm", {}))

            group.start_soon(call)
            with anyio.fail_after(10):
                await asked.wait()
            for request_id in range(10):  # the SDK numbers its requests to the client from 0
                answer = {"jsonrpc": "2.0", "id": request_id, "result": {"action": "accept", "content": {"ok": True}}}
                status = await anyio.to_thread.run_sync(post_message, sse_base, BOB, f"session_id={victim}", answer)
                assert status[0] == 404
            forged.set()
        assert json.loads(results[0].content[0].text) == {"action": "decline", "data": None}


@pytest.mark.anyio
async def test_e2e_sse_binding_ends_with_the_stream_and_the_table_stays_bounded() -> None:
    middleware = BearerAuthMiddleware(sse_app(whoami), RecordingProvider(), max_sessions=2)
    with serve(middleware) as base:
        async with sse_session(base, ALICE_1) as (_, first_id):
            assert middleware._sessions.owners == {first_id: "sub:alice"}
            async with sse_session(base, ALICE_1) as (_, second_id), sse_session(base, BOB) as (third, third_id):
                assert set(middleware._sessions.owners) == {second_id, third_id}  # the oldest was forgotten
                # Forgotten is refused, even for its owner, rather than left unguarded: they reconnect.
                assert post_message(base, ALICE_1, f"session_id={first_id}", TOOL_CALL)[0] == 404
                assert (await call_json(third, "whoami"))["claims"]["sub"] == "bob"
            await until(lambda: middleware._sessions.owners == {})  # the server notices the client left
        await until(lambda: middleware._sessions.owners == {})


def wait_until(condition: Callable[[], object], seconds: float) -> None:
    """Poll ``condition`` until it holds or ``seconds`` pass; the caller asserts what it needs."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.01)


def test_an_app_without_the_sse_transport_keeps_its_own_session_id_parameter() -> None:
    harness = Harness()
    for query in (b"session_id=mine", b"session_id=a&session_id=b", b"session_id=" + uuid.uuid4().hex.encode()):
        outcome = harness.request(bearer(BOB), path="/messages/", query_string=query)
        assert outcome.status == 200 and outcome.body == b"app", query


# --- the command line ------------------------------------------------------------

REPO = os.path.dirname(os.path.abspath(__file__))
# The ways a user starts the command line; each must give one mcp_bearer module, the one their server imports.
PYTHON_M = (sys.executable, "-m", "mcp_bearer")
# pip installs the console script next to the interpreter; CI installs the package, so it must be there.
CONSOLE_SCRIPT = (os.path.join(os.path.dirname(sys.executable), "mcp-bearer"),)
IMPORTED_MAIN = (sys.executable, "-c", "import sys, mcp_bearer; mcp_bearer.main(sys.argv[1:])")


@contextlib.contextmanager
def cli_server(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str = REPO,
    command: tuple[str, ...] = PYTHON_M,
    stderr: list[str] | None = None,
) -> Iterator[tuple[str, list[str]]]:
    """Run ``COMMAND --port 0 ARGS``; yield (base URL, stdout lines before 'Serving'); stop it.

    ``stderr``, if given, receives the lines the server wrote there, once it has stopped.
    """
    process = subprocess.Popen(
        [*command, "--port", "0", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Serving "):
                break
        else:
            pytest.fail(f"server exited: {process.wait()} {process.stderr.read() if process.stderr else ''}")
        url = lines[-1].split()[1]
        yield url.removesuffix("/mcp"), lines
    finally:
        process.terminate()
        process.wait(20)
        if stderr is not None and process.stderr is not None:
            stderr.extend(process.stderr.read().splitlines())


def run_cli(
    *args: str, cwd: str = REPO, command: tuple[str, ...] = PYTHON_M, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO, "MCP_BEARER_TOKENS": "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.anyio
async def test_cli_demo_prints_one_token_and_serves_whoami_with_it() -> None:
    with cli_server(env={"MCP_BEARER_TOKENS": ""}) as (base, lines):
        token = lines[0].removeprefix("Bearer token: ")
        SECRETS.add(token)
        config = json.loads("\n".join(lines[2:-1]))
        assert config == {
            "mcpServers": {"demo": {"url": base + "/mcp", "headers": {"Authorization": f"Bearer {token}"}}}
        }
        assert raw_request(base, "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)[0] == 401
        async with mcp_session(base + "/mcp", token) as (session, _):
            assert await call_json(session, "whoami") == {"sub": "demo-user"}


@pytest.mark.anyio
async def test_cli_demo_takes_tokens_from_the_environment() -> None:
    with cli_server(env={"MCP_BEARER_TOKENS": f"{BOB}, {ALICE_1}"}) as (base, lines):
        assert not any("Bearer" in line for line in lines)  # nothing generated, nothing printed
        async with mcp_session(base + "/mcp", ALICE_1) as (session, _):
            assert await call_json(session, "whoami") == {"sub": "user-2"}
        assert raw_request(base, "POST", "/mcp", {"Authorization": "Bearer sk-nobody"})[0] == 401


def test_cli_serves_any_asgi_app_with_every_option(tmp_path: Any) -> None:
    (tmp_path / "plain_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': scope['path'].encode()})\n"
    )
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({BOB: {"sub": "bob", "scopes": ["read", "write"]}, ALICE_1: {"sub": "alice"}}))
    args = ["plain_app:app", "--tokens-file", str(tokens), "--exclude", "/status", "--required-scope", "write"]
    args += ["--resource", "https://mcp.example.com/mcp", "--authorization-server", "https://auth.example.com"]
    with cli_server(*args, cwd=str(tmp_path)) as (base, lines):
        assert lines == [f"Serving {base}/mcp behind bearer-token authentication (Ctrl+C to stop)"]
        assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {BOB}"})[2] == b"/x"
        assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {ALICE_1}"})[0] == 403
        assert raw_request(base, "GET", "/status")[0] == 200
        assert raw_request(base, "GET", "/health")[0] == 401  # --exclude replaced the defaults
        status, _, body = raw_request(base, "GET", "/.well-known/oauth-protected-resource/mcp")
        assert status == 200 and json.loads(body)["authorization_servers"] == ["https://auth.example.com"]
        assert (
            'resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp"'
            in (raw_request(base, "GET", "/x")[1]["www-authenticate"])
        )


# The user's own module imports mcp_bearer; if the command line ran a second copy of the module as
# __main__, the middleware would set one context variable and the tools read another: every caller None.
USER_SERVER = """\
import asyncio
import hashlib

from mcp_bearer import get_access_token
{server_import}

server = Server("user")


def caller() -> dict:
    token = get_access_token()
    if token is None:
        return {{"token": None, "claims": None}}
    # A digest, not the token: tool results reach DEBUG logs.
    return {{"token": hashlib.sha256(token.token.encode()).hexdigest()[:16], "claims": token.claims}}


@server.tool()
def whoami() -> dict:
    return caller()


@server.tool()
async def whoami_async() -> dict:
    await asyncio.sleep(0)
    return caller()
"""
SERVER_IMPORT = {
    2: "from mcp.server.mcpserver import MCPServer as Server",
    1: "from mcp.server.fastmcp import FastMCP as Server",
}
ENTRY_POINTS = pytest.mark.parametrize(
    "command", [PYTHON_M, CONSOLE_SCRIPT, IMPORTED_MAIN], ids=["python-m", "console-script", "imported-main"]
)


@pytest.mark.anyio
@ENTRY_POINTS
async def test_cli_tools_of_a_user_module_see_their_own_caller(command: tuple[str, ...], tmp_path: Any) -> None:
    (tmp_path / "user_server.py").write_text(USER_SERVER.format(server_import=SERVER_IMPORT[MCP_MAJOR]))
    (tmp_path / "tokens.json").write_text(json.dumps({ALICE_1: TOKENS[ALICE_1], BOB: TOKENS[BOB]}))
    args = ("user_server:server", "--tokens-file", "tokens.json")
    with cli_server(*args, cwd=str(tmp_path), command=command) as (base, _):
        async with mcp_session(base + "/mcp", ALICE_1) as (alice, _), mcp_session(base + "/mcp", BOB) as (bob, _):
            for tool in ("whoami", "whoami_async", "whoami"):
                for session, token in ((alice, ALICE_1), (bob, BOB)):
                    expected = {"token": fingerprint(token), "claims": TOKENS[token]}
                    assert await call_json(session, tool) == expected, (tool, TOKENS[token]["sub"])


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield taken.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens-file", "/nonexistent/tokens.json"], "cannot read tokens file '/nonexistent/tokens.json'"),
        (["--tokens-file", "{tmp}"], "cannot read tokens file"),  # a directory
        (["--tokens-file", "{tmp}/bad.json"], "is not valid JSON"),
        (["--tokens-file", "{tmp}/list.json"], "must hold a JSON object of token -> claims"),
        (["--tokens-file", "{tmp}/flat.json"], "must hold a JSON object of token -> claims"),
        (["--tokens-file", "{tmp}/badkey.json"], "token #2 is not a non-empty RFC 6750 token"),
        (["no_such_module_xyz:app"], "cannot import module 'no_such_module_xyz'"),
        (["json:no_such_app"], "module 'json' has no attribute 'no_such_app'"),
        (["json"], "must look like MODULE:ATTR"),
        (["json:__name__"], "neither an ASGI app nor an MCP server"),
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
        (["--port", "http"], "argument --port: invalid int value"),
        (["--resource", "not-a-url"], "resource must be an absolute http(s) URL"),
        (["--required-scope", "two words"], "is not an RFC 6749 scope-token"),
        (["--exclude", "health"], "exclude_paths entries must start with '/'"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_cli_bad_input_is_one_stderr_line_and_exit_2(
    args: list[str], message: str, tmp_path: Any, busy_port: int
) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text(json.dumps([BOB]))
    (tmp_path / "flat.json").write_text(json.dumps({BOB: "bob"}))
    (tmp_path / "badkey.json").write_text(json.dumps({BOB: {}, f"{BOB} x": {}}))
    args = [a.format(tmp=tmp_path, busy=busy_port) for a in args]
    result = run_cli(*args, "--port", str(busy_port)) if "--port" not in args else run_cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcp_bearer: error: "), result.stderr
    assert message.format(busy=busy_port) in lines[0]
    assert BOB not in result.stderr and BOB not in result.stdout


def test_cli_listener_lets_asyncio_turn_nagle_off() -> None:
    """Found by the benchmark: with create_server's protocol 0, each CLI response waited ~40 ms."""

    async def accepted_nodelay() -> int:
        nodelay: list[int] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nodelay.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = mcp_bearer._listen("127.0.0.1", 0)
        async with await asyncio.start_server(on_connect, sock=listener):
            _, writer = await asyncio.open_connection(*listener.getsockname())
            while not nodelay:
                await asyncio.sleep(0.01)
            writer.close()
        return nodelay[0]

    assert asyncio.run(accepted_nodelay()) != 0


@pytest.mark.parametrize(
    ("command", "prog"),
    [(PYTHON_M, "python -m mcp_bearer"), (CONSOLE_SCRIPT, "mcp-bearer"), (IMPORTED_MAIN, "python -m mcp_bearer")],
    ids=["python-m", "console-script", "imported-main"],
)
def test_cli_help_explains_and_every_entry_point_refuses_alike(command: tuple[str, ...], prog: str) -> None:
    result = run_cli("--help", command=command)
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: {prog} "), result.stdout  # the name the user typed
    for option in ("--tokens-file", "--exclude", "--required-scope", "--resource", "--authorization-server"):
        assert option in result.stdout
    assert "MCP_BEARER_TOKENS" in result.stdout
    result = run_cli("--no-such-option", command=command)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["mcp_bearer: error: unrecognized arguments: --no-such-option"]


# --- hostile requests: the adversarial table and property-based fuzzing ---------

# --- helpers for the adversarial table ------------------------------------------

Headers = list[tuple[bytes, bytes]]
Response = tuple[int | str, Any]  # (status, body) or, for non-HTTP answers, (event, detail)

BOB_B = BOB.encode()
MEGABYTE = 1 << 20
MAX_TOKEN = "sk-max-" + "A" * (DEFAULT_MAX_TOKEN_LENGTH - 7)  # a real key of exactly max_token_length
TABLE_TOKENS: dict[str, dict[str, Any]] = {**TOKENS, MAX_TOKEN: {"sub": "max"}}
WS_HTTP_RESPONSE = {"extensions": {"websocket.http.response": {}}}

APP: Response = (200, "app")  # what Harness's app answers
RAISES: Response = ("raises", RuntimeError)
# (response, tokens the provider was asked about, app called)
PUBLIC = (APP, [], True)
NO_CREDENTIALS = ((401, UNAUTHORIZED), [], False)
MALFORMED_400 = ((400, MALFORMED), [], False)
TOO_LONG = ((401, INVALID_TOKEN), [], False)


def verified(token: str = BOB) -> tuple[Response, list[str], bool]:
    return APP, [token], True


def rejected(token: str) -> tuple[Response, list[str], bool]:
    return (401, INVALID_TOKEN), [token], False


def auth(value: bytes) -> Headers:
    return [(b"authorization", value)]


def case(case_id: str, headers: Headers, expect: tuple[Response, list[str], bool], **request: Any) -> Any:
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
    return first["status"], "app" if outcome.body == b"app" else outcome.json()


# --- 1. the adversarial table -------------------------------------------------

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
    case("options-preflight", PREFLIGHT, PUBLIC, method="OPTIONS"),
    case(
        "options-preflight-odd-case",
        [(b"ORIGIN", b"x"), (b"Access-Control-Request-Method", b"GET")],
        PUBLIC,
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
    harness = Harness(RecordingProvider(TABLE_TOKENS))
    if expected == RAISES:
        with pytest.raises(RuntimeError, match="refusing ASGI scope type"):
            harness.request(headers, **request_kw)
    else:
        outcome = harness.request(headers, **request_kw)
        assert observe(outcome) == expected
        # RFC 6750 3: every 400/401 carries a Bearer challenge; nothing else does.
        challenge = (outcome.messages and outcome.header("www-authenticate")) or ""
        assert challenge.startswith("Bearer") is (expected[0] in (400, 401))
    assert harness.provider.calls == provider_sees  # type: ignore[attr-defined]
    assert bool(harness.app_calls) is app_called
    if app_called:  # the app sees exactly the verified identity, or none on public routes
        ((_, seen),) = harness.app_calls
        assert (seen.token if seen else None) == (provider_sees[0] if provider_sees else None)


# --- 2. property-based fuzzing against an independent oracle -----------------

# Restated from RFC 9110 5.6.2 and RFC 6750 2.1, deliberately not imported from mcp_bearer.
ORACLE_TCHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
ORACLE_B64CHARS = frozenset("-._~+/" + string.ascii_letters + string.digits)
# Around the real keys' lengths (27 and 31), so "exactly max" and "one more" both happen often.
FUZZ_MAX_LENGTHS = (DEFAULT_MAX_TOKEN_LENGTH, DEFAULT_MAX_TOKEN_LENGTH, len(BOB), len(BOB) - 1, len(ALICE_1), 4)


def oracle(
    headers: Headers, path: str, method: str, root_path: str, max_length: int
) -> tuple[list[Response], str | None]:
    """What the spec says must happen: the acceptable (status, body) answers and the token the provider sees."""
    relative = path[len(root_path) :] if root_path and path.startswith(root_path) else path
    if relative in DEFAULT_EXCLUDED_PATHS:
        return [APP], None
    names = [name.lower() for name, _ in headers]
    if method == "OPTIONS" and b"origin" in names and b"access-control-request-method" in names:
        return [APP], None
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
    assert observed[0] < 500  # the provider never fails here
    assert observed in allowed, (observed, allowed)
    # Only a verified token for exactly the bytes after "Bearer " (or a public request) reaches the app.
    assert outcome.provider_calls == ([asked] if asked is not None else [])
    assert bool(outcome.app_calls) is (observed == APP)
    if outcome.app_calls:
        ((_, seen),) = outcome.app_calls
        assert (seen.token if seen else None) == asked


@dataclass
class LookAlike:
    """Has every attribute of an AccessToken, but is not one (a provider returning its own class)."""

    token: str
    claims: dict[str, Any]
    scopes: list[str]
    expires_at: float | None


@contextlib.contextmanager
def mcp_bearer_log(name: str = "mcp_bearer") -> Iterator[list[logging.LogRecord]]:
    handler = ListHandler()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


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
    harness = Harness(ScriptedProvider(behaviour))
    with mcp_bearer_log() as records:
        outcome = harness.request(bearer(token), method=method)
    assert_well_formed_http(outcome.messages)
    assert harness.provider.calls == [token]  # type: ignore[attr-defined]
    failed = kind in ("raises", "wrong-type")
    assert (outcome.status == 500) is failed  # 500 iff the provider failed
    if failed:
        assert outcome.json() == SERVER_ERROR and outcome.header("www-authenticate") is None
        (record,) = records  # logged once, without the token
        assert record.levelno == logging.ERROR and token not in record.getMessage()
    elif kind == "valid":
        assert observe(outcome) == APP
    else:
        assert observe(outcome) == (401, INVALID_TOKEN) and not records
    assert bool(harness.app_calls) is (kind == "valid")


# --- a failing send is not a failing provider ---------------------------------


@pytest.mark.parametrize("refused", [bearer("sk-nobody"), []], ids=["invalid-token", "no-token"])
def test_a_send_that_fails_mid_refusal_is_not_reported_as_a_provider_failure(refused: Headers) -> None:
    """The client goes away while the refusal is being sent: send raises on the body.

    The error must reach the server as it is, and no second response may be started
    (ASGI: one http.response.start per request); nor is it a provider crash to log.
    """
    harness = Harness()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            raise OSError("client disconnected")

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/mcp", "root_path": "", "headers": refused}
    with mcp_bearer_log() as records, pytest.raises(OSError, match="client disconnected"):
        anyio.run(harness.middleware, scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 401
    assert not records
    assert harness.app_calls == []


# --- the README's code, as users will copy it ------------------------------------


def readme_block(marker: str) -> str:
    """The README's python code block that contains ``marker``."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:
        blocks = readme.read().split("```python\n")[1:]
    (block,) = [b.split("```", 1)[0] for b in blocks if marker in b]
    return block


@pytest.mark.anyio
async def test_readme_quick_start_server_works_as_written() -> None:
    source = readme_block("# server.py")
    if MCP_MAJOR == 1:
        source = source.replace(
            "from mcp.server.mcpserver import MCPServer", "from mcp.server.fastmcp import FastMCP as MCPServer"
        )
    SECRETS.update({"sk-abc123", "sk-def456"})
    namespace: dict[str, Any] = {"__name__": "server"}
    exec(compile(source, "README.md:server.py", "exec"), namespace)
    with serve(namespace["app"]) as base:
        assert raw_request(base, "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)[0] == 401
        async with mcp_session(base + "/mcp", "sk-def456") as (session, _):
            result = await session.call_tool("whoami", {})
            assert result.content[0].text == "Hello bob@example.com"  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_readme_jwt_provider_example_works_as_written() -> None:
    """The README's JWTProvider block against a real JWKS endpoint and the SDK's client."""
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

    key = rsa_keys.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1"}

    jwks = JWKSEndpoint()  # the JWT section's test endpoint, serving just this key
    jwks.keys = [jwk]

    def sign(**claims: Any) -> str:
        now = int(time.time())
        body = {"iss": "https://auth.example.com/", "aud": "https://mcp.example.com/mcp", "sub": "alice"}
        token = pyjwt.encode({**body, "exp": now + 60, **claims}, key, algorithm="RS256", headers={"kid": "k1"})
        SECRETS.add(token)
        return token

    with serve(jwks) as jwks_base:
        source = readme_block("# at most one refetch").replace(
            "https://auth.example.com/.well-known/jwks.json", jwks_base + "/jwks"
        )
        namespace: dict[str, Any] = {"server": _Server("readme")}
        namespace["server"].tool()(whoami)
        exec(compile(source, "README.md:jwt", "exec"), namespace)
        with serve(namespace["app"]) as base:
            async with mcp_session(base + "/mcp", sign(scope="mcp:tools")) as (session, _):
                seen = await call_json(session, "whoami")
                assert seen["claims"]["sub"] == "alice"
            refused = [
                sign(scope="mcp:read"),  # lacks the required scope: 403
                sign(scope="mcp:tools", aud="https://other.example.com/mcp"),  # a token for another resource
                sign(scope="mcp:tools", exp=int(time.time()) - 60),
            ]
            statuses = [raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {t}"})[0] for t in refused]
            assert statuses == [403, 401, 401]


def test_readme_identity_provider_settings_construct_offline() -> None:
    """Copy-paste settings: they build (no fetch happens before the first token) and pin what they say."""
    namespace: dict[str, Any] = {}
    exec(compile(readme_block("# Auth0:"), "README.md:idps", "exec"), namespace)
    for name in ("auth0", "keycloak", "entra"):
        provider = namespace[name]
        assert isinstance(provider, mcp_bearer.JWTProvider) and provider._jwks.key_set is None
        assert provider._jwks.url.startswith("https://") and provider._algorithms == ("RS256",)


def test_readme_introspection_cache_and_chain_compose_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The three blocks in one namespace, as a reader pastes them, with the token services unreachable."""
    closed = mcp_bearer._listen("127.0.0.1", 0)
    down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now: every call is refused at once
    monkeypatch.setenv("MCP_BEARER_CLIENT_SECRET", "cs-readme-Qm4Tn8Wz")
    SECRETS.update({"cs-readme-Qm4Tn8Wz", "sk-ci-robot"})
    namespace: dict[str, Any] = {
        "server": _Server("readme"),
        "jwt_provider": mcp_bearer.JWTProvider(issuer="i", audience="a", jwks_url=down + "/jwks"),
    }
    for marker in ("introspection = IntrospectionProvider(", "provider = CachedProvider(introspection", "api_keys ="):
        source = readme_block(marker).replace("https://auth.example.com/oauth2/introspect", down + "/introspect")
        exec(compile(source, "README.md:providers", "exec"), namespace)
    assert isinstance(namespace["app"], BearerAuthMiddleware)
    harness = Harness(namespace["provider"])
    robot = harness.request(bearer("sk-ci-robot"))  # API keys first: no token service asked
    assert robot.status == 200 and robot.app_calls[0][1].claims["sub"] == "ci-robot"  # type: ignore[union-attr]
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"k1"}').rstrip(b"=").decode()
    for token in ("opaque-Lk2Vb9Xq", f"{header}.e30.c2ln"):  # introspection down; a JWT with the JWKS down
        SECRETS.add(token)
        outcome = harness.request(bearer(token))
        assert outcome.status == 503 and outcome.header("retry-after") is not None, token


def test_readme_fastapi_add_middleware_serves_its_docs_and_guards_its_routes() -> None:
    SECRETS.add("sk-abc123")
    namespace: dict[str, Any] = {"__name__": "fastapi_app"}
    exec(compile(readme_block("# fastapi_app.py"), "README.md:fastapi_app.py", "exec"), namespace)
    with serve(namespace["app"]) as base:
        assert raw_request(base, "GET", "/docs")[0] == 200
        status, _, body = raw_request(base, "GET", "/openapi.json")  # the docs page fetches it
        assert status == 200 and "/whoami" in json.loads(body)["paths"]
        assert raw_request(base, "GET", "/health")[0] == 200
        assert raw_request(base, "GET", "/whoami")[0] == 401
        status, _, body = raw_request(base, "GET", "/whoami", {"Authorization": "Bearer sk-abc123"})
        assert status == 200 and json.loads(body) == {"sub": "alice"}


def test_fastapi_with_the_default_excluded_paths_guards_the_schema_its_docs_page_needs() -> None:
    from fastapi import FastAPI

    app = FastAPI()
    app.add_middleware(BearerAuthMiddleware, provider=StaticTokenProvider(TOKENS))
    with serve(app) as base:
        assert raw_request(base, "GET", "/docs")[0] == 200
        assert raw_request(base, "GET", "/openapi.json")[0] == 401  # why the README says what to pass


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
def test_add_middleware_with_a_bad_option_is_an_error_record_at_startup(framework: str) -> None:
    """Starlette builds middleware lazily; uvicorn's lifespan="auto" reports a failing lifespan at INFO only."""
    from fastapi import FastAPI
    from starlette.applications import Starlette

    app = FastAPI() if framework == "fastapi" else Starlette()
    app.add_middleware(BearerAuthMiddleware, provider=StaticTokenProvider(TOKENS), max_sessions=0)
    expected = (logging.ERROR, f"{NOT_BUILT}ValueError: max_sessions must be a positive int, not 0")
    with mcp_bearer_log() as records, serve(app, lifespan="auto") as base:
        assert [(r.levelno, r.getMessage()) for r in records] == [expected]  # before any request
        assert raw_request(base, "GET", "/", {"Authorization": f"Bearer {BOB}"})[0] == 500
        assert [(r.levelno, r.getMessage()) for r in records] == [expected] * 2  # each retry is logged too


def test_module_imports_only_the_standard_library() -> None:
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import mcp_bearer; "
        "third = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'mcp_bearer', '__main__'}; "
        "assert not third, third"
    )
    result = subprocess.run([sys.executable, "-I", "-S", "-c", check, REPO], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- provider faults, load, leaks ------------------------------------------------

RAISE, HANG, WRONG_TYPE, EXPIRED, SLOW = (
    f"sk-{kind}-Vb7Nq2Lx8Rz4" for kind in ("raise", "hang", "wrongtype", "expired", "slow")
)
SECRETS.update({RAISE, HANG, WRONG_TYPE, EXPIRED, SLOW})


class FaultyProvider(BearerAuthProvider):
    """Misbehaves as the token says; otherwise a StaticTokenProvider. Runs on the server's loop."""

    def __init__(self) -> None:
        self.static = StaticTokenProvider(TOKENS)
        self.hanging = threading.Event()
        self.hang_cancelled = threading.Event()
        self.in_flight = 0
        self.max_in_flight = 0

    async def verify_token(self, token: str) -> AccessToken | None:
        if token == RAISE:
            raise ConnectionError(f"token service unreachable for {token}")
        if token == WRONG_TYPE:
            return {"sub": "x"}  # type: ignore[return-value]
        if token == EXPIRED:
            return AccessToken(token, {"sub": "late"}, expires_at=time.time() - 5)
        if token == HANG:
            self.hanging.set()
            try:
                await anyio.sleep(3600)
            finally:
                self.hang_cancelled.set()
        if token == SLOW:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await anyio.sleep(0.05)
            self.in_flight -= 1
            return AccessToken(token, {"sub": "slow"})
        return await self.static.verify_token(token)


def test_provider_faults_under_a_real_server(caplog: pytest.LogCaptureFixture) -> None:
    provider = FaultyProvider()
    reached: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            token = get_access_token()
            reached.append(token.token if token else None)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    def status(base: str, token: str) -> int:
        return int(raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {token}"})[0])

    with caplog.at_level(logging.DEBUG, logger="mcp_bearer"):
        with serve(BearerAuthMiddleware(app, provider), timeout_graceful_shutdown=1) as base:
            # A provider that hangs, and a client that gives up on it and disconnects.
            host, port = base.removeprefix("http://").split(":")
            hung = socket.create_connection((host, int(port)))
            hung.sendall(f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {HANG}\r\n\r\n".encode())
            assert provider.hanging.wait(10)
            hung.close()
            # The server keeps serving everyone else, each with a verdict of its own.
            verdicts = {token: status(base, token) for token in (RAISE, WRONG_TYPE, EXPIRED, BOB, RAISE)}
            assert verdicts == {RAISE: 500, WRONG_TYPE: 500, EXPIRED: 401, BOB: 200}
            # Slow verdicts overlap instead of queueing behind one another.
            with __import__("concurrent.futures").futures.ThreadPoolExecutor(25) as pool:
                slow = list(pool.map(lambda _: status(base, SLOW), range(25)))
            assert slow == [200] * 25 and provider.max_in_flight > 1
        assert provider.hang_cancelled.is_set()  # cancelled at shutdown, never answered by the app
    assert HANG not in reached and RAISE not in reached and WRONG_TYPE not in reached and EXPIRED not in reached
    assert reached.count(BOB) == 1 and reached.count(SLOW) == 25
    records = [r for r in caplog.records if r.name == "mcp_bearer"]
    assert len(records) == 3  # one per failure: two raises, one wrong type
    assert all(r.levelno == logging.ERROR for r in records)
    raised = [r.getMessage() for r in records if "raised" in r.getMessage()]
    assert len(raised) == 2 and all("Traceback" in m and "ConnectionError" in m for m in raised)
    assert_no_secret_logged(records)


def shared_sub(n: int) -> str:
    """Half the tokens have a user of their own; the other half share five users."""
    return f"user-{n}" if n < 25 else f"shared-{n % 5}"


@pytest.mark.anyio
async def test_load_no_cross_talk_at_100_in_flight() -> None:
    """2,000 tool calls from 50 tokens, stateful and stateless, mixed with refused requests."""
    provider = RecordingProvider({token: {"sub": shared_sub(n)} for n, token in enumerate(TEAM)})
    stateful = BearerAuthMiddleware(mcp_app(identity), provider)
    stateless = BearerAuthMiddleware(mcp_app(identity, stateless=True, json_response=True), provider)
    by_user: dict[str, list[str]] = {}
    for n, token in enumerate(TEAM):
        by_user.setdefault(shared_sub(n), []).append(token)
    sessions = [by_user[f"shared-{k}"] for k in range(5)] + [by_user[f"user-{k}"] for k in range(5)]
    limit = anyio.Semaphore(100)
    tally = Tally()
    refused = Tally()

    async def refusals(base: str, session_owner: str) -> None:
        """Requests that must be refused: no token, an unknown token, another user's session."""
        async with httpx.AsyncClient(timeout=30) as client:
            created = await client.post(
                base + "/mcp",
                content=INITIALIZE,
                headers={**MCP_POST_HEADERS, "Authorization": f"Bearer {session_owner}"},
            )
            victim = created.headers["mcp-session-id"]
            cases = [({}, 401), ({"Authorization": "Bearer sk-nobody"}, 401), ({"Authorization": "Basic eDp5"}, 401)]
            cases.append(({"Authorization": f"Bearer {TEAM[1]}", "mcp-session-id": victim}, 404))
            for i in range(200):
                headers, expected = cases[i % len(cases)]
                async with limit:
                    refused.calls += 1
                    response = await client.post(
                        base + "/mcp", content=INITIALIZE, headers={**MCP_POST_HEADERS, **headers}
                    )
                if response.status_code != expected:
                    refused.mismatches.append(f"{i}: {response.status_code} != {expected}")

    async def session_batch(base: str, tokens: list[str], calls: int) -> None:
        nonlocal tally
        tally += await concurrent_calls(base + "/mcp", tokens, calls, limit)

    with serve(stateful) as stateful_base, serve(stateless) as stateless_base:
        async with anyio.create_task_group() as group:
            for tokens in sessions:  # 10 stateful sessions, 100 calls each
                group.start_soon(session_batch, stateful_base, tokens, 100)
            for k in range(10):  # stateless: every call its own request, any token
                group.start_soon(session_batch, stateless_base, TEAM[k::10], 100)
            group.start_soon(refusals, stateful_base, TEAM[0])
    print(
        f"\nload: {tally.calls} calls, {len(tally.mismatches)} mismatches, {len(tally.errors)} errors, "
        f"{tally.hangs} hangs; {refused.calls} refusals, {len(refused.mismatches)} wrong"
    )
    assert tally == Tally(calls=2000)
    assert refused == Tally(calls=200)


def test_memory_stays_bounded_over_100k_requests() -> None:
    """Authorized, refused, excluded, sessions created and deleted: memory is bounded by max_sessions."""
    import gc
    import tracemalloc

    open_sessions = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal open_sessions
        headers = []
        if scope["method"] == "POST" and scope["path"] == "/mcp":
            open_sessions += 1
            headers = [(b"mcp-session-id", b"s%d" % open_sessions)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = BearerAuthMiddleware(app, StaticTokenProvider(TOKENS), max_sessions=100)

    async def noop(message: Any) -> None:
        pass

    def scope(path: str, method: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        return {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers}

    async def drive(rounds: int) -> None:
        for i in range(rounds):
            await middleware(scope("/mcp", "POST", bearer(BOB)), None, noop)  # creates a session
            await middleware(scope("/mcp", "GET", bearer(ALICE_1)), None, noop)
            await middleware(
                scope("/mcp", "DELETE", [*bearer(BOB), (b"mcp-session-id", b"s%d" % open_sessions)]), None, noop
            )
            await middleware(scope("/mcp", "POST", bearer(ALICE_2)), None, noop)  # kept until evicted
            await middleware(scope("/mcp", "GET", []), None, noop)
            await middleware(scope("/mcp", "GET", bearer(f"sk-unknown-{i}")), None, noop)
            await middleware(scope("/mcp", "GET", [(b"authorization", b"Bearer a b")]), None, noop)
            await middleware(scope("/health", "GET", []), None, noop)
            await middleware(scope("/mcp", "GET", [(b"mcp-session-id", b"nope"), *bearer(BOB)]), None, noop)
            await middleware(scope("/mcp", "OPTIONS", PREFLIGHT), None, noop)

    async def measure() -> tuple[int, int]:
        await drive(1_000)  # warm up: caches, interned strings, the session table filled to its bound
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await drive(10_000)  # 100,000 requests
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return before, after

    before, after = anyio.run(measure)
    assert middleware._sessions is not None
    sessions = middleware._sessions.owners
    assert len(sessions) == 100
    # All the table may hold at its bound: the dict and every key and principal in it (all may be
    # re-allocated while tracing), plus 4 KiB for the interpreter's own caches.
    allowance = sys.getsizeof(sessions) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in sessions.items()) + 4096
    print(f"\nmemory over 100,000 requests: {after - before:+d} bytes (allowed {allowance})")
    assert after - before <= allowance
    assert get_access_token() is None and mcp_bearer._current_token.get() is None


# --- JWT access tokens: JWTProvider against a real JWKS endpoint ---------------------
#
# Real keys (cryptography), a real JWKS endpoint on loopback (uvicorn), nothing mocked at the
# HTTP layer. The refusals follow RFC 8725 (JWT best current practices) and the attacks its
# section 2 lists; the key-set rules follow RFC 7517 and what goes wrong in practice: fetches
# per request, refresh storms from made-up kids, an IdP blip wiping the cache, a blocked loop.


ISSUER = "https://auth.example.com/"
AUDIENCE = "https://mcp.example.com/mcp"
ALL_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
HMAC_SECRET = "hs-secret-4c1d9e7f2a8b6d3e5f0a9c8b7e6d5f4a3b2c1d0e"  # 46 bytes: over HS256's 32
SECRETS.add(HMAC_SECRET)
DROP = object()  # a claim value meaning "leave the claim out"


@functools.cache
def private_key(name: str) -> Any:
    """Keys by name; the first two letters say the type: rs (RSA 2048), ec (P-256), ed (Ed25519)."""
    if name.startswith("rs"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if name.startswith("ec"):
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(name: str) -> str:
    return (
        private_key(name)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def public_jwk(name: str, kid: str | None, **members: Any) -> dict[str, Any]:
    kind = {"rs": jwt.algorithms.RSAAlgorithm, "ec": jwt.algorithms.ECAlgorithm, "ed": jwt.algorithms.OKPAlgorithm}
    entry: dict[str, Any] = kind[name[:2]].to_jwk(private_key(name).public_key(), as_dict=True)
    entry.pop("key_ops", None)  # as most IdPs publish them: no key_ops
    if kid is not None:
        entry["kid"] = kid
    return {**entry, **members}


def default_keys() -> list[dict[str, Any]]:
    return [public_jwk("rs1", "rsa-1"), public_jwk("ec1", "ec-1"), public_jwk("ed1", "ed-1")]


def sign(
    alg: str = "RS256",
    key: str = "rs1",
    kid: str | None = "rsa-1",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A JWT as an IdP would issue it; claims override the defaults, DROP removes one."""
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, "scope": "read write"}
    body = {k: v for k, v in {**body, **claims}.items() if v is not DROP}
    signer = HMAC_SECRET if alg.startswith("HS") else private_key(key)
    token = jwt.encode(body, signer, algorithm=alg, headers={**({"kid": kid} if kid else {}), **(headers or {})})
    SECRETS.add(token)
    return token


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


async def answer_lifespan(receive: Any, send: Any) -> None:
    """A test token service's lifespan: nothing to start, nothing to stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def hang_until(release: threading.Event, seconds: float = 10) -> None:
    """A token service that stops answering, until its test ends (``release``), or at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not release.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


class JWKSEndpoint:
    """A JWKS endpoint that counts hits and can fail, hang, redirect, send junk or switch key sets."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        if hasattr(self, "release"):
            self.release.set()  # a hang left over from the last test ends now, not at its deadline
        self.keys: list[Any] = default_keys()
        self.mode = "ok"  # ok, 500, hang, redirect, garbage, list, nokeys, oversize
        self.paths: list[str] = []
        self.release = threading.Event()

    @property
    def hits(self) -> int:
        return len(self.paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await answer_lifespan(receive, send)
        self.paths.append(scope["path"])
        status, headers, body = 200, [(b"content-type", b"application/json")], b""
        if self.mode == "hang":
            await hang_until(self.release)
        if self.mode == "500":
            status, body = 500, b'{"error": "down"}'
        elif self.mode == "redirect":
            status, headers = 302, [(b"location", b"/moved-keys")]
        elif self.mode == "garbage":
            body = b"<html>not json</html>"
        elif self.mode == "list":
            body = json.dumps(self.keys).encode()
        elif self.mode == "nokeys":
            body = b'{"keys": []}'
        elif self.mode == "oversize":
            body = json.dumps({"keys": self.keys, "padding": "x" * (1 << 20)}).encode()
        else:
            body = json.dumps({"keys": self.keys}).encode()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[tuple[JWKSEndpoint, str]]:
    endpoint = JWKSEndpoint()
    with serve(endpoint) as base:
        yield endpoint, base


@pytest.fixture
def jwks(jwks_server: tuple[JWKSEndpoint, str]) -> JWKSEndpoint:
    endpoint, base = jwks_server
    endpoint.reset()
    endpoint.url = base + "/keys"  # type: ignore[attr-defined]
    return endpoint


def jwt_provider(url: str, **options: Any) -> JWTProvider:
    settings = {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ALL_ALGORITHMS, "jwks_refresh_cooldown": 0.2}
    return JWTProvider(jwks_url=url, **{**settings, "jwks_timeout": 2.0, **options})


def verify(provider: BearerAuthProvider, token: str) -> AccessToken | None:
    return anyio.run(provider.verify_token, token)


@pytest.mark.parametrize(
    ("alg", "key", "kid"),
    [("RS256", "rs1", "rsa-1"), ("PS256", "rs1", "rsa-1"), ("ES256", "ec1", "ec-1"), ("EdDSA", "ed1", "ed-1")],
)
def test_jwt_each_algorithm_verifies_with_the_published_key(jwks: JWKSEndpoint, alg: str, key: str, kid: str) -> None:
    provider = jwt_provider(jwks.url)  # type: ignore[attr-defined]
    token = sign(alg, key, kid, scope="mcp:tools mcp:read")
    access = verify(provider, token)
    assert access is not None and access.token == token
    assert access.claims["sub"] == "alice" and access.scopes == ["mcp:tools", "mcp:read"]
    assert access.expires_at == access.claims["exp"] + 30.0  # the leeway holds through the middleware too
    assert verify(provider, token) is not None
    assert jwks.hits == 1  # cached, not fetched per request


def test_jwt_scopes_come_from_scope_or_scp() -> None:
    provider = JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=public_pem("rs1"))
    assert verify(provider, sign(scope="a b")).scopes == ["a", "b"]  # type: ignore[union-attr]
    assert verify(provider, sign(scope=DROP, scp=["a", "b"])).scopes == ["a", "b"]  # type: ignore[union-attr]
    assert verify(provider, sign(scope=DROP, scp="a b")).scopes == ["a", "b"]  # type: ignore[union-attr]
    assert verify(provider, sign(scope=DROP)).scopes == []  # type: ignore[union-attr]


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
    provider = jwt_provider(jwks.url, jwks_refresh_cooldown=60)  # type: ignore[attr-defined]
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


def test_jwt_without_kid_only_when_exactly_one_key_fits(jwks: JWKSEndpoint) -> None:
    provider = jwt_provider(jwks.url)  # type: ignore[attr-defined]
    assert verify(provider, sign("ES256", "ec1", kid=None)) is not None  # one EC key in the set
    jwks.keys = [*default_keys(), public_jwk("rs2", "rsa-2")]
    two_rsa = jwt_provider(jwks.url)  # type: ignore[attr-defined]
    assert verify(two_rsa, sign("RS256", "rs1", kid=None)) is None  # which of two RSA keys? neither
    assert verify(two_rsa, sign("RS256", "rs1", kid="rsa-1")) is not None


def test_jwt_jwks_entries_it_cannot_use_are_skipped_not_fatal(jwks: JWKSEndpoint) -> None:
    private = jwt.algorithms.RSAAlgorithm.to_jwk(private_key("rs2"), as_dict=True)
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
    provider = jwt_provider(jwks.url)  # type: ignore[attr-defined]
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
    expected = r"JWTProvider needs PyJWT with its crypto extra: pip install 'mcp_bearer\[jwt\]'"
    with mock.patch.dict(sys.modules, {"jwt": None}), pytest.raises(ImportError, match=expected):
        JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=public_pem("rs1"))
    with mock.patch.object(jwt.algorithms, "has_crypto", False), pytest.raises(ImportError, match=expected):
        JWTProvider(issuer=ISSUER, audience=AUDIENCE, jwks_url="https://auth.example.com/jwks")
    with mock.patch.object(jwt.algorithms, "has_crypto", False):  # HMAC needs no cryptography
        JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=HMAC_SECRET, algorithms=["HS256"])


# --- the key set's life: rotation, storms, outages ------------------------------------


def test_jwt_key_rotation_accepts_the_new_kid_after_exactly_one_refresh(jwks: JWKSEndpoint) -> None:
    provider = jwt_provider(jwks.url, jwks_refresh_cooldown=0)  # type: ignore[attr-defined]
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
    provider = jwt_provider(jwks.url, jwks_refresh_cooldown=cooldown)  # type: ignore[attr-defined]
    forged = [forge({"alg": "RS256", "kid": secrets.token_hex(8)}, None, rsa_signer("rs1")) for _ in range(1000)]
    genuine = sign()

    async def storm() -> list[AccessToken | None]:
        return await asyncio.gather(*(provider.verify_token(t) for t in [genuine, *forged]))

    started = time.monotonic()
    first = asyncio.run(storm())  # cold: everyone needs the key set at once
    assert first[0] is not None and not any(first[1:])
    assert jwks.hits == 1  # single flight: one fetch for 1,001 concurrent requests
    second = asyncio.run(storm())
    if time.monotonic() - started < cooldown:
        assert jwks.hits == 1  # cooling down: made-up kids cost the IdP nothing
    assert second[0] is not None and not any(second[1:])
    time.sleep(cooldown)
    assert asyncio.run(storm())[0] is not None
    windows = (time.monotonic() - started) / cooldown
    assert 2 <= jwks.hits <= 1 + math.ceil(windows)


def test_jwt_outage_at_startup_is_503_with_retry_after_then_recovers(jwks_server: tuple[JWKSEndpoint, str]) -> None:
    endpoint, _ = jwks_server
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


def test_provider_unavailable_is_503_with_retry_after_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    cases = {0.2: "1", 1.0: "1", 2.5: "3", 30: "30", -5: "1", float("nan"): "1", float("inf"): "3600", 1e9: "3600"}
    for retry_after, header in cases.items():
        caplog.clear()
        provider = ScriptedProvider(lambda r=retry_after: (_ for _ in ()).throw(ProviderUnavailable(retry_after=r)))
        with caplog.at_level(logging.DEBUG, logger="mcp_bearer"):
            outcome = Harness(provider).request(bearer(BOB))
        assert_well_formed_http(outcome.messages)
        assert outcome.status == 503 and outcome.json() == UNAVAILABLE
        assert outcome.header("retry-after") == header, retry_after
        assert outcome.header("www-authenticate") is None and outcome.app_calls == []
        assert outcome.header("content-length") == str(len(outcome.body))
        (record,) = [r for r in caplog.records if r.name == "mcp_bearer"]
        assert record.levelno == logging.WARNING and BOB not in _record_text(record)
    assert ProviderUnavailable().retry_after == 5.0
    assert str(ProviderUnavailable()) == "Token verification is temporarily unavailable"


@pytest.mark.parametrize("mode", ["500", "hang", "redirect", "garbage", "list", "nokeys", "oversize"])
def test_jwt_failed_refresh_keeps_the_last_good_set(
    jwks: JWKSEndpoint, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = jwt_provider(jwks.url, jwks_cache_seconds=0.1, jwks_refresh_cooldown=0, jwks_timeout=0.5)  # type: ignore[attr-defined]
    token = sign()
    assert verify(provider, token) is not None
    jwks.mode = mode
    time.sleep(0.15)  # the set is stale now
    with caplog.at_level(logging.WARNING, logger="mcp_bearer"):
        started = time.monotonic()
        assert verify(provider, token) is not None  # a known kid is answered at once from the stale set
        assert time.monotonic() - started < 0.4
        assert verify(provider, sign("RS256", "rs1", "unknown-kid")) is None  # not 503: we still have keys
        wait_until(lambda: [r for r in caplog.records if "JWKS fetch" in r.getMessage()], 5)
    jwks.release.set()
    assert verify(provider, token) is not None
    warnings = [r for r in caplog.records if r.name == "mcp_bearer" and "JWKS fetch" in r.getMessage()]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert "/moved-keys" not in jwks.paths  # a redirect is not followed


@pytest.mark.parametrize("mode", ["500", "hang", "redirect", "garbage", "list", "nokeys", "oversize"])
def test_jwt_no_good_set_at_all_is_provider_unavailable(jwks: JWKSEndpoint, mode: str) -> None:
    jwks.mode = mode
    provider = jwt_provider(jwks.url, jwks_refresh_cooldown=10, jwks_timeout=0.3)  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as raised:
        verify(provider, sign())
    assert time.monotonic() - started < 2  # bounded by jwks_timeout, not by the hang
    assert 9 <= raised.value.retry_after <= 10  # until the cooldown allows the next attempt
    jwks.release.set()
    assert "/moved-keys" not in jwks.paths


def test_jwt_api_keys_never_wait_on_the_identity_provider(jwks: JWKSEndpoint) -> None:
    jwks.mode = "hang"
    provider = jwt_provider(jwks.url)  # type: ignore[attr-defined]
    for token in (BOB, "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", "a.b", "a..c", "a.b.c.d"):
        assert verify(provider, token) is None
    assert jwks.hits == 0


def test_jwt_hanging_jwks_does_not_delay_other_requests(jwks: JWKSEndpoint) -> None:
    """The fetch runs in a worker thread: the event loop keeps answering everyone else."""
    jwks.mode = "hang"
    jwt_guarded = BearerAuthMiddleware(Harness().app, jwt_provider(jwks.url, jwks_timeout=3.0))  # type: ignore[attr-defined]
    static_guarded = BearerAuthMiddleware(Harness().app, StaticTokenProvider(TOKENS))

    async def router(scope: Any, receive: Any, send: Any) -> None:
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


# --- end to end: the SDK's client, hypercorn's trio worker, the command line ---------


def whoami_jwt() -> dict[str, Any]:
    """The caller's JWT claims and scopes, as a tool sees them."""
    token = require_auth()
    return {"claims": token.claims, "scopes": token.scopes}


@pytest.mark.anyio
async def test_e2e_jwt_whoami_sees_the_tokens_claims_and_scopes(jwks: JWKSEndpoint) -> None:
    provider = jwt_provider(jwks.url)  # type: ignore[attr-defined]
    token = sign("ES256", "ec1", "ec-1", sub="alice@example.com", scope="mcp:tools mcp:read", email="a@example.com")
    with serve(BearerAuthMiddleware(mcp_app(whoami_jwt), provider, required_scopes=["mcp:tools"])) as base:
        async with mcp_session(base + "/mcp", token) as (session, _):
            seen = await call_json(session, "whoami_jwt")
        assert seen["scopes"] == ["mcp:tools", "mcp:read"]
        assert seen["claims"]["sub"] == "alice@example.com" and seen["claims"]["email"] == "a@example.com"
        assert seen["claims"]["iss"] == ISSUER and seen["claims"]["aud"] == AUDIENCE
        refused = raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {sign(scope='mcp:read')}"})
        assert refused[0] == 403
    assert jwks.hits == 1


def test_e2e_jwt_under_hypercorns_trio_worker(jwks: JWKSEndpoint) -> None:
    """hypercorn --worker-class trio: no asyncio loop; the JWKS fetch is awaited the trio way."""

    async def hello(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await answer_lifespan(receive, send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": require_auth().claims["sub"].encode()})

    app = BearerAuthMiddleware(hello, jwt_provider(jwks.url))  # type: ignore[attr-defined]
    with serve_with("hypercorn-trio", app) as base:
        status, _, body = raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {sign(sub='trio-user')}"})
        assert (status, body) == (200, b"trio-user") and jwks.hits == 1
        assert raw_request(base, "GET", "/mcp", {"Authorization": f"Bearer {sign(key='rs2')}"})[0] == 401


def test_cli_jwks_url_protects_an_app_with_jwt(jwks: JWKSEndpoint) -> None:
    args = ["--jwks-url", jwks.url, "--issuer", ISSUER, "--audience", AUDIENCE, "--audience", "api://x"]  # type: ignore[attr-defined]
    with cli_server(*args, "--algorithm", "ES256", "--algorithm", "RS256") as (base, lines):
        assert lines == [f"Serving {base}/mcp behind bearer-token authentication (Ctrl+C to stop)"]  # no token printed
        auth = {"Authorization": f"Bearer {sign('ES256', 'ec1', 'ec-1', aud='api://x')}", **MCP_POST_HEADERS}
        assert raw_request(base, "POST", "/mcp", auth, INITIALIZE)[0] == 200
        assert raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {sign('PS256')}"})[0] == 401
        assert raw_request(base, "GET", "/health")[0] != 401


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jwks-url", "https://a.example/k", "--issuer", "x"], "--jwks-url needs --issuer and --audience"),
        (["--jwks-url", "https://a.example/k", "--audience", "x"], "--jwks-url needs --issuer and --audience"),
        (["--issuer", "x", "--audience", "y"], "--issuer and --algorithm need --jwks-url"),
        (["--audience", "y"], "--audience needs --jwks-url or --introspection-url"),
        (["--introspection-url", "https://a.example/i"], "needs --client-id and the client secret in $MCP_BEARER"),
        (["--introspection-url", "https://a.example/i", "--client-id", "c", "--no-secret"], "client secret in $MCP"),
        (["--client-id", "c"], "--client-id needs --introspection-url"),
        (["--introspection-url", "http://a.example/i", "--client-id", "c"], "url must use https://"),
        (
            ["--introspection-url", "https://a.example/i", "--client-id", "c", "--audience", "a", "--audience", "b"],
            "at most one --audience",
        ),
        (["--introspection-url", "https://a.example/i", "--client-id", "c", "--tokens-file", "/nonexistent"], "read"),
        (["--cache-ttl", "0"], "ttl must be a finite number of seconds, > 0"),
        (["--cache-ttl", "soon"], "argument --cache-ttl: invalid float value"),
        (["--jwks-url", "http://a.example/k", "--issuer", "x", "--audience", "y"], "jwks_url must use https://"),
        (["--jwks-url", "https://a.example/k", "--issuer", "x", "--audience", "y", "--algorithm", "none"], "'none'"),
        (["--jwks-url", "https://a.example/k", "--issuer", "x", "--audience", "y", "--algorithm", "HS256"], "HMAC"),
    ],
)
def test_cli_bad_token_sources_are_one_stderr_line_and_exit_2(args: list[str], message: str) -> None:
    """The client secret comes from the environment only: never an argument, which shows in ps."""
    secret = {} if "--no-secret" in args else {"MCP_BEARER_CLIENT_SECRET": "cs-Zr8Lq3Vw"}
    result = run_cli(*[a for a in args if a != "--no-secret"], env={"MCP_BEARER_CLIENT_SECRET": "", **secret})
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcp_bearer: error: ") and message in lines[0], result.stderr
    assert "cs-Zr8Lq3Vw" not in result.stderr + result.stdout


# --- the network helper: the one place that touches the network --------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://auth.example.com/jwks", True),
        ("https://auth.example.com:8443/jwks?tenant=a", True),
        ("http://localhost:8080/jwks", True),
        ("http://127.0.0.1/jwks", True),
        ("http://127.9.9.9/jwks", True),
        ("http://[::1]:8080/x", True),
        ("http://auth.example.com/jwks", False),
        ("http://localhost.evil.com/jwks", False),
        ("http://127.0.0.1.nip.io/jwks", False),
        ("http://[::ffff:10.0.0.1]/x", False),
        ("https://a@auth.example.com/jwks", False),
        ("https://auth.example.com/jwks#", False),
        ("file:///etc/passwd", False),
        ("https:///jwks", False),
    ],
)
def test_checked_endpoint(url: str, allowed: bool) -> None:
    if allowed:
        assert mcp_bearer._checked_endpoint("jwks_url", url) == url
    else:
        with pytest.raises(ValueError, match="jwks_url"):
            mcp_bearer._checked_endpoint("jwks_url", url)


@pytest.mark.parametrize("url", ["https://u:pw-Hx7Tq2@auth.example.com/\njwks", "https://u:pw-Hx7Tq2@a.example/k"])
def test_a_refused_endpoint_never_quotes_its_password(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        mcp_bearer._checked_endpoint("url", url)
    assert "pw-Hx7Tq2" not in str(refused.value)


def test_http_call_bounds_time_and_size_and_follows_no_redirect(jwks: JWKSEndpoint) -> None:
    url = jwks.url  # type: ignore[attr-defined]

    async def call(**options: Any) -> tuple[int, bytes]:
        return await mcp_bearer._http_call(url, timeout=options.pop("timeout", 2.0), **options)

    status, body = anyio.run(call)
    assert status == 200 and json.loads(body)["keys"]
    jwks.mode = "redirect"
    assert anyio.run(call)[0] == 302 and "/moved-keys" not in jwks.paths
    jwks.mode = "500"
    assert anyio.run(call)[0] == 500  # a status, not an exception
    jwks.mode = "oversize"
    with pytest.raises(OSError, match="larger than 1048576 bytes"):
        anyio.run(call)
    jwks.mode = "hang"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        anyio.run(functools.partial(call, timeout=0.3))
    assert time.monotonic() - started < 1.5
    jwks.release.set()
    jwks.mode = "ok"
    secret_headers = {"authorization": "Basic " + HMAC_SECRET}
    assert anyio.run(functools.partial(call, body=b"token=" + BOB.encode(), headers=secret_headers))[0] == 200
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    with pytest.raises(OSError) as refused:
        anyio.run(functools.partial(mcp_bearer._http_call, f"http://127.0.0.1:{closed.getsockname()[1]}/", timeout=2.0))
    closed.close()
    assert HMAC_SECRET not in str(refused.value)


def test_jwt_stale_set_is_refreshed_in_the_background(jwks: JWKSEndpoint) -> None:
    """After jwks_cache_seconds a known kid still answers at once, and the set is refetched behind it."""
    provider = jwt_provider(jwks.url, jwks_cache_seconds=0.1, jwks_refresh_cooldown=0.1)  # type: ignore[attr-defined]
    assert verify(provider, sign()) is not None and jwks.hits == 1
    time.sleep(0.15)
    jwks.mode = "hang"  # the refetch hangs: the known kid must not wait for it
    started = time.monotonic()
    assert verify(provider, sign()) is not None
    assert time.monotonic() - started < 0.5
    wait_until(lambda: jwks.hits >= 2, 5)
    assert jwks.hits == 2
    jwks.release.set()


def test_jwt_nothing_is_fetched_before_the_first_token(jwks: JWKSEndpoint) -> None:
    """A server must start while its IdP is down: construction never touches the network."""
    provider = jwt_provider(jwks.url)  # type: ignore[attr-defined]
    time.sleep(0.3)
    assert jwks.hits == 0
    assert verify(provider, sign()) is not None and jwks.hits == 1


# --- opaque tokens, caching, chains and the audit trail ---------------------------
#
# IntrospectionProvider against a real RFC 7662 endpoint on loopback (uvicorn, nothing mocked at the
# HTTP layer) that authenticates its client (RFC 6749 section 2.3.1) and fails in each way a token
# service fails in practice. CachedProvider driven directly, where time and concurrency can be
# steered: what goes wrong in caches is a verdict outliving its token, a stampede on the token
# service, a shared claims dict, a raw token left in memory. ProviderChain and the audit trail
# end to end, under real servers and the SDK's client.


RESOURCE = "https://mcp.example.com/mcp"
CLIENT_ID = "mcp:server"  # a colon, so an id sent without RFC 6749 2.3.1 form-encoding splits wrongly
CLIENT_SECRET = "cs-7Hq:2Lx+9R z/4Vb%ü-Tn8"  # every character Basic or a form could mangle
WRONG_SECRET = "cs-wrong-Pk3Ym6Wd1Xs9Gh4"
SECRETS.update({CLIENT_SECRET, WRONG_SECRET})
for _secret in (CLIENT_SECRET, WRONG_SECRET):  # as they travel: form-encoded, and inside Basic
    SECRETS.update({quote_plus(_secret), quote(_secret)})
    SECRETS.add(base64.b64encode(f"{quote_plus(CLIENT_ID)}:{quote_plus(_secret)}".encode()).decode())


def opaque(name: str) -> str:
    """An opaque token as an authorization server issues them, registered with the log scan."""
    token = f"op-{name}-{hashlib.sha256(name.encode()).hexdigest()[:20]}"
    SECRETS.add(token)
    return token


ACTIVE = opaque("active")  # aud a list; nested claims
INACTIVE = opaque("inactive")  # unknown to the endpoint: {"active": false}
AUD_EXACT = opaque("aud-exact")  # aud the resource itself, as a string
AUD_OTHER = opaque("aud-other")
AUD_LIST_OTHER = opaque("aud-list-other")
AUD_EXTENDED = opaque("aud-extended")  # the resource as a prefix of another: no substring match
AUD_NONE = opaque("aud-none")
ACTIVE_STRING = opaque("active-string")  # "active": "true", which is not the JSON literal true
ACTIVE_ONE = opaque("active-one")
SCOPE_LIST = opaque("scope-list")  # "scope" must be a space-separated string (RFC 7662 2.2)
EXP_STRING = opaque("exp-string")  # "exp" must be a NumericDate, a JSON number


@dataclass
class Received:
    """One request as the endpoint saw it; kept in memory only, since it holds a token and a secret."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode(), keep_blank_values=True)


class IntrospectionEndpoint:
    """An RFC 7662 introspection endpoint that authenticates its client and fails on demand.

    Modes: ok, slow (5 ms), 500, hang (until ``release``), garbage, list (JSON, not an object),
    oversize (a valid active answer over 1 MiB), redirect (302 to a path that says active to anyone).
    """

    def __init__(self) -> None:
        self.url = ""
        self.reset()

    def reset(self) -> None:
        now = int(time.time())
        self.mode = "ok"
        self.requests: list[Received] = []
        self.release = threading.Event()
        self.answers: dict[str, dict[str, Any]] = {
            ACTIVE: {
                "active": True,
                "sub": "dana",
                "scope": "mcp:tools read",
                "exp": now + 3600,
                "aud": [RESOURCE, "https://other.example.com"],
                "client_id": "desktop-app",
                "groups": ["ops", "dev"],
            },
            AUD_EXACT: {"active": True, "sub": "erin", "aud": RESOURCE},
            AUD_OTHER: {"active": True, "sub": "erin", "aud": "https://other.example.com"},
            AUD_LIST_OTHER: {"active": True, "sub": "erin", "aud": ["https://other.example.com"]},
            AUD_EXTENDED: {"active": True, "sub": "erin", "aud": RESOURCE + "/admin"},
            AUD_NONE: {"active": True, "sub": "erin"},
            ACTIVE_STRING: {"active": "true", "sub": "mallory"},
            ACTIVE_ONE: {"active": 1, "sub": "mallory"},
            SCOPE_LIST: {"active": True, "sub": "x", "scope": ["read"]},
            EXP_STRING: {"active": True, "sub": "x", "exp": str(now + 3600)},
        }

    @property
    def introspections(self) -> list[Received]:
        return [r for r in self.requests if r.path == "/introspect"]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await answer_lifespan(receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in scope["headers"]]
        request = Received(scope["method"], scope["path"], headers, body)
        self.requests.append(request)
        status, extra, payload = await self.answer(request)
        headers_out = [(b"content-type", b"application/json"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers_out})
        await send({"type": "http.response.body", "body": payload})

    async def answer(self, request: Received) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if request.path == "/redirected":  # where the redirect points: it would let anyone in
            return 200, [], json.dumps({"active": True, "sub": "redirected", "scope": "admin"}).encode()
        if self.mode == "hang":
            await hang_until(self.release)
        elif self.mode == "slow":
            await asyncio.sleep(0.005)
        if self.mode == "500":
            return 500, [], b'{"error": "server_error"}'
        if self.mode == "redirect":
            return 302, [(b"location", b"/redirected")], b""
        if self.mode == "garbage":
            return 200, [], b"<html>not json</html>"
        if self.mode == "list":
            return 200, [], b'[{"active": true, "sub": "dana"}]'
        if self.mode == "oversize":
            return 200, [], json.dumps({"active": True, "sub": "big", "padding": "x" * (1 << 20)}).encode()
        # RFC 7662 section 2.1: a form-encoded POST, from an authenticated client, naming one token.
        if request.method != "POST" or request.header("content-type") != ["application/x-www-form-urlencoded"]:
            return 400, [], b'{"error": "invalid_request"}'
        if not self.authenticated(request):
            return 401, [(b"www-authenticate", b'Basic realm="introspection"')], b'{"error": "invalid_client"}'
        tokens = request.form.get("token", [])
        if len(tokens) != 1:
            return 400, [], b'{"error": "invalid_request"}'
        return 200, [], json.dumps(self.answers.get(tokens[0], {"active": False})).encode()

    @staticmethod
    def authenticated(request: Received) -> bool:
        """RFC 6749 section 2.3.1: Basic over the form-encoded id and secret, or both in the form; never both."""
        form, basic = request.form, request.header("authorization")
        if basic and ("client_id" in form or "client_secret" in form):  # "MUST NOT use more than one method"
            return False
        if not basic:
            return form.get("client_id") == [CLIENT_ID] and form.get("client_secret") == [CLIENT_SECRET]
        scheme, _, encoded = basic[0].partition(" ")
        try:
            client_id, colon, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except ValueError:
            return False
        if len(basic) != 1 or scheme != "Basic" or not colon:
            return False
        return (unquote_plus(client_id), unquote_plus(secret)) == (CLIENT_ID, CLIENT_SECRET)


@pytest.fixture(scope="module")
def introspection_server() -> Iterator[IntrospectionEndpoint]:
    endpoint = IntrospectionEndpoint()
    with serve(endpoint) as base:
        endpoint.url = base + "/introspect"
        yield endpoint


@pytest.fixture
def introspection(introspection_server: IntrospectionEndpoint) -> Iterator[IntrospectionEndpoint]:
    introspection_server.reset()
    yield introspection_server
    introspection_server.release.set()  # a hanging answer must not outlive its test


def introspector(endpoint: IntrospectionEndpoint, **options: Any) -> IntrospectionProvider:
    return IntrospectionProvider(endpoint.url, **{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **options})


def ask(provider: BearerAuthProvider, token: str) -> AccessToken | None:
    return anyio.run(provider.verify_token, token)


async def caller(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that answers with the caller's claims as JSON (null on a public path)."""
    if scope["type"] != "http":
        return
    access = get_access_token()
    body = json.dumps(None if access is None else access.claims).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def test_introspection_active_token_carries_the_response_as_claims(introspection: IntrospectionEndpoint) -> None:
    access = ask(introspector(introspection), ACTIVE)
    assert isinstance(access, AccessToken) and access.token == ACTIVE
    assert access.claims == introspection.answers[ACTIVE]  # the whole response, "active" included
    assert access.scopes == ["mcp:tools", "read"]  # RFC 7662 2.2: "scope" is space-separated
    assert access.expires_at == introspection.answers[ACTIVE]["exp"]
    (request,) = introspection.requests
    assert (request.method, request.path) == ("POST", "/introspect")
    assert request.header("accept") == ["application/json"]
    assert request.form == {"token": [ACTIVE], "token_type_hint": ["access_token"]}
    assert ask(introspector(introspection), AUD_NONE) == AccessToken(AUD_NONE, {"active": True, "sub": "erin"})


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_introspection_sends_the_client_credentials_as_configured_and_only_so(
    introspection: IntrospectionEndpoint, auth_method: str
) -> None:
    assert ask(introspector(introspection, auth_method=auth_method), ACTIVE) is not None  # the endpoint checked them
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
    assert ask(introspector(introspection), token) is None  # RFC 7662 2.2: only the JSON literal true
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
    access = ask(introspector(introspection, audience=RESOURCE), token)
    assert (access is not None) == passes
    assert ask(introspector(introspection), token) is not None  # without audience=, aud is not checked


def test_introspection_wrong_client_credentials_are_unavailable_not_a_bad_token(
    introspection: IntrospectionEndpoint,
) -> None:
    """A 401 from the authorization server means our configuration is wrong, not the caller's token."""
    for auth_method in ("client_secret_basic", "client_secret_post"):
        with pytest.raises(ProviderUnavailable) as refused:
            ask(introspector(introspection, client_secret=WRONG_SECRET, auth_method=auth_method), ACTIVE)
        assert str(refused.value) == "introspection endpoint answered HTTP 401"
    outcome = Harness(introspector(introspection, client_secret=WRONG_SECRET)).request(bearer(ACTIVE))
    assert outcome.status == 503 and outcome.app_calls == []


def closed_port_url() -> str:
    with socket.create_server(("127.0.0.1", 0)) as probe:  # closed on exit: connections are refused
        return f"http://127.0.0.1:{probe.getsockname()[1]}/introspect"


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
    url = closed_port_url() if mode == "refused" else introspection.url
    provider = IntrospectionProvider(url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as refused:
        ask(provider, token)
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
    arguments = {"url": "https://auth.example.com/introspect", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
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


def test_introspection_never_blocks_the_event_loop(introspection: IntrospectionEndpoint) -> None:
    """While the token service hangs, API-key callers and public paths on the same server answer at once."""
    provider = ProviderChain(StaticTokenProvider(TOKENS), introspector(introspection, timeout=3.0))
    introspection.mode = "hang"
    hung: list[Any] = []
    with serve(BearerAuthMiddleware(caller, provider)) as base:
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
        assert seen == {"token": fingerprint(ACTIVE), "claims": introspection.answers[ACTIVE]}
        status, _, body = raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {AUD_OTHER}"})
        assert (status, json.loads(body)) == (401, INVALID_TOKEN)
    assert [r.form["token"] for r in introspection.introspections] == [[ACTIVE], [AUD_OTHER]]


class CountingProvider(BearerAuthProvider):
    """Answers from a table after ``delay`` seconds, counting calls: a fresh copy of an AccessToken,
    an exception raised, any other value as it is; a token not in the table is None."""

    def __init__(self, answers: dict[str, Any] | None = None, delay: float = 0.0) -> None:
        self.answers = answers or {}
        self.delay = delay
        self.calls: list[str] = []

    async def verify_token(self, token: str) -> AccessToken | None:
        self.calls.append(token)
        await anyio.sleep(self.delay)
        answer = self.answers.get(token)
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, AccessToken):
            return AccessToken(token, copy.deepcopy(answer.claims), list(answer.scopes), answer.expires_at)
        return answer  # type: ignore[no-any-return]


def verdict(sub: str = "dana", expires_in: float | None = 300.0, **claims: Any) -> AccessToken:
    """What a token service says about a good token; the token itself is filled in per request."""
    expires_at = None if expires_in is None else time.time() + expires_in
    return AccessToken("", {"sub": sub, "groups": ["ops", "dev"], **claims}, ["read"], expires_at)


T1, T2, T3, T4, T5 = (opaque(f"cached-{n}") for n in range(1, 6))


async def together(n: int, call: Callable[[], Awaitable[Any]]) -> list[Any]:
    """``n`` concurrent calls; each result, or the exception it raised."""
    results: list[Any] = [None] * n

    async def one(i: int) -> None:
        try:
            results[i] = await call()
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as group:
        for i in range(n):
            group.start_soon(one, i)
    return results


def test_cache_remembers_a_verdict_for_ttl_then_asks_again() -> None:
    provider = CountingProvider({T1: verdict()})
    cache = CachedProvider(provider, ttl=0.2)
    first, second = ask(cache, T1), ask(cache, T1)
    assert first is not None and second is not None and provider.calls == [T1]
    assert second.token == T1 and second.claims == {"sub": "dana", "groups": ["ops", "dev"]}
    assert second.scopes == ["read"] and second.expires_at == first.expires_at
    time.sleep(0.25)
    assert ask(cache, T1) is not None and provider.calls == [T1, T1]


@pytest.mark.parametrize(
    ("expires_in", "kept_for"),
    [(0.2, 0.2), (-1.0, 0.0), (math.nan, 0.0), (None, 300.0)],
    ids=["expires-before-ttl", "already-expired", "nan", "no-expiry"],
)
def test_cache_never_outlives_the_tokens_own_expiry(expires_in: float | None, kept_for: float) -> None:
    provider = CountingProvider({T1: verdict(expires_in=expires_in)})
    cache = CachedProvider(provider, ttl=300)
    ask(cache, T1)
    ask(cache, T1)
    assert len(provider.calls) == (1 if kept_for else 2)
    time.sleep(0.25)
    ask(cache, T1)
    assert len(provider.calls) == (2 if kept_for == 0.2 else 1 if kept_for else 3)


@pytest.mark.parametrize("negative_ttl", [0.0, 0.2])
def test_cache_remembers_no_only_with_a_negative_ttl(negative_ttl: float) -> None:
    """A bad token repeated by a client (or an attacker) hits the token service once per negative_ttl."""
    provider = CountingProvider()
    cache = CachedProvider(provider, negative_ttl=negative_ttl)
    assert ask(cache, T1) is None and ask(cache, T1) is None
    assert len(provider.calls) == (1 if negative_ttl else 2)
    time.sleep(0.25)
    assert ask(cache, T1) is None and len(provider.calls) == (2 if negative_ttl else 3)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("answer", [verdict(), None], ids=["access-token", "none"])
def test_cache_single_flight_100_concurrent_first_requests_make_1_call(backend: str, answer: Any) -> None:
    """No stampede: a burst of new requests with one token costs the token service one call."""
    provider = CountingProvider({T1: answer}, delay=0.05)
    cache = CachedProvider(provider)  # negative_ttl 0: the "no" is shared, though not kept
    results = anyio.run(together, 100, lambda: cache.verify_token(T1), backend=backend)
    assert provider.calls == [T1]
    if answer is None:
        assert results == [None] * 100
    else:
        assert all(isinstance(r, AccessToken) and r.token == T1 and r.claims["sub"] == "dana" for r in results)
        assert len({id(r) for r in results}) == len({id(r.claims) for r in results}) == 100
        assert len({id(r.claims["groups"]) for r in results}) == len({id(r.scopes) for r in results}) == 100


def test_cache_each_request_gets_its_own_token_and_claims() -> None:
    """A tool that edits its caller's claims (nested lists too) must not edit the next caller's."""
    cache = CachedProvider(CountingProvider({T1: verdict()}, delay=0.05))

    async def requests() -> list[Any]:
        async def first() -> AccessToken | None:
            access = await cache.verify_token(T1)
            assert access is not None
            access.claims["groups"].append("admin")  # at once, before any other request runs
            access.claims["sub"] = "mallory"
            access.scopes.append("admin")
            return access

        async def second() -> AccessToken | None:
            await anyio.sleep(0.01)  # while the first is verifying: it waits for the same verdict
            return await cache.verify_token(T1)

        async with anyio.create_task_group() as group:
            results: list[Any] = [None, None]

            async def run(i: int, request: Callable[[], Awaitable[Any]]) -> None:
                results[i] = await request()

            group.start_soon(run, 0, first)
            group.start_soon(run, 1, second)
        cached = await cache.verify_token(T1)
        assert cached is not None
        cached.claims["groups"].append("admin")  # a request answered from the cache edits its copy
        cached.scopes.append("admin")
        return [*results, cached, await cache.verify_token(T1)]

    mutated, waited, _, cached = anyio.run(requests)
    for access in (waited, cached):
        assert access.claims == {"sub": "dana", "groups": ["ops", "dev"]} and access.scopes == ["read"]
    assert mutated.claims["groups"] == ["ops", "dev", "admin"]


def test_cache_is_bounded_and_forgets_the_oldest_first() -> None:
    provider = CountingProvider(dict.fromkeys((T1, T2, T3, T4, T5), verdict()))
    cache = CachedProvider(provider, max_entries=3)
    for token in (T1, T2, T3, T4, T5):
        ask(cache, token)
    assert len(cache._entries) == 3
    for token in (T5, T4, T3):
        ask(cache, token)
    assert provider.calls == [T1, T2, T3, T4, T5]  # the newest three were kept
    ask(cache, T1)
    assert provider.calls[-1] == T1 and len(cache._entries) == 3


def test_cache_invalidate_and_clear_forget_even_a_verdict_in_flight() -> None:
    """Revocation: after invalidate(token) the token service is asked again, even if it was being asked."""
    provider = CountingProvider({T1: verdict(), T2: verdict()})
    cache = CachedProvider(provider)
    ask(cache, T1), ask(cache, T2)
    cache.invalidate(T1)
    ask(cache, T1), ask(cache, T2)
    assert provider.calls == [T1, T2, T1]
    cache.clear()
    ask(cache, T1), ask(cache, T2)
    assert provider.calls == [T1, T2, T1, T1, T2]

    for forget in (lambda: cache.invalidate(T3), cache.clear):
        cache.clear()
        provider.calls.clear()
        provider.delay = 0.05

        async def forgotten_while_verifying(forget: Callable[[], None] = forget) -> AccessToken | None:
            async with anyio.create_task_group() as group:
                group.start_soon(cache.verify_token, T3)
                await anyio.sleep(0.02)
                forget()
            return await cache.verify_token(T3)

        provider.answers[T3] = verdict()
        assert anyio.run(forgotten_while_verifying) is not None
        assert provider.calls == [T3, T3]  # the verdict begun before the forgetting was not kept


@pytest.mark.parametrize(
    "failure", [ProviderUnavailable("token service down"), RuntimeError("bug")], ids=["unavailable", "runtime"]
)
def test_cache_never_keeps_an_exception_and_every_waiter_sees_it(failure: Exception) -> None:
    provider = CountingProvider({T1: failure}, delay=0.05)
    cache = CachedProvider(provider, negative_ttl=60)
    results = anyio.run(together, 10, lambda: cache.verify_token(T1))
    assert provider.calls == [T1] and all(isinstance(r, type(failure)) for r in results)
    with pytest.raises(type(failure)):
        ask(cache, T1)
    assert provider.calls == [T1, T1]  # not kept: the next request asks again
    provider.answers[T1] = verdict()  # the service recovers
    assert ask(cache, T1) is not None and ask(cache, T1) is not None and len(provider.calls) == 3
    harness = Harness(CachedProvider(CountingProvider({T1: failure})))
    assert harness.request(bearer(T1)).status == (503 if isinstance(failure, ProviderUnavailable) else 500)


def test_cache_a_cancelled_first_request_leaves_the_others_to_ask_for_themselves() -> None:
    """A client that hangs up mid-verification must not leave the requests waiting on it stuck."""
    provider = CountingProvider({T1: verdict()}, delay=0.2)
    cache = CachedProvider(provider)

    async def scenario() -> list[Any]:
        leader = anyio.CancelScope()

        async def lead() -> None:
            with leader:
                await cache.verify_token(T1)

        with anyio.fail_after(2):
            async with anyio.create_task_group() as group:
                group.start_soon(lead)
                await anyio.sleep(0.05)  # the first request is inside the provider now
                results: list[Any] = []

                async def follow() -> None:
                    results.append(await cache.verify_token(T1))

                for _ in range(5):
                    group.start_soon(follow)
                await anyio.sleep(0.05)
                leader.cancel()
        return results

    started = time.monotonic()
    results = anyio.run(scenario)
    assert time.monotonic() - started < 1.0
    assert len(results) == 5 and all(isinstance(r, AccessToken) and r.token == T1 for r in results)
    assert provider.calls == [T1, T1]  # one new call for the five, not five


def held(root: object) -> Iterator[object]:
    """Everything a cache's data reaches: containers, AccessTokens and futures opened up; no code, no frames."""
    stack, seen = [root], set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        yield value
        if isinstance(value, dict):
            stack.extend([*value.keys(), *value.values()])
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif isinstance(value, AccessToken):
            stack.extend([value.token, value.claims, value.scopes, value.expires_at])
        elif isinstance(value, concurrent.futures.Future) and value.done() and not value.cancelled():
            stack.append(value.exception() or value.result())
        elif isinstance(value, BaseException):
            stack.extend(value.args)
        elif hasattr(type(value), "__slots__") and not isinstance(value, (str, bytes, int, float)):
            stack.extend(getattr(value, name) for name in type(value).__slots__ if hasattr(value, name))


def assert_holds_no_token(cache: CachedProvider, tokens: list[str]) -> None:
    data = {name: value for name, value in vars(cache).items() if name != "_verify"}  # not the wrapped provider
    values = list(held(data))
    for token in tokens:
        assert not [v for v in values if isinstance(v, str) and token in v], "a raw token in the cache"
        assert not [v for v in values if isinstance(v, (bytes, bytearray)) and token.encode() in v], "token bytes"


def test_cache_holds_no_raw_token_in_memory() -> None:
    """A heap dump or a debugger on the cache must not yield tokens: keys are SHA-256 digests."""
    tokens = [T1, T2, T3, T4]
    provider = CountingProvider({T1: verdict(), T2: verdict(note="x"), T4: verdict()}, delay=0.05)
    cache = CachedProvider(provider, negative_ttl=60)

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            for token in tokens:
                group.start_soon(cache.verify_token, token)
            await anyio.sleep(0.02)
            assert len(cache._flights) == 4
            assert_holds_no_token(cache, tokens)  # while the verdicts are being fetched

    anyio.run(scenario)
    assert set(cache._entries) == {hashlib.sha256(t.encode()).digest() for t in tokens}  # T3: a kept "no"
    assert_holds_no_token(cache, tokens)
    assert not [s for s in SECRETS if s in repr(cache)]
    # The walk would see a token if one were kept: the check can fail.
    cache._entries[b"probe"] = (
        0.0,
        mcp_bearer._Verdict(mcp_bearer._Claims({"sub": "x", "roles": [{"token": T1}]}), (), None),
    )
    with pytest.raises(AssertionError, match="raw token"):
        assert_holds_no_token(cache, tokens)


class SyncVerifier:
    def verify_token(self, token: str) -> AccessToken | None:
        return None


@pytest.mark.parametrize(
    ("provider", "options", "error", "match"),
    [
        (SyncVerifier(), {}, TypeError, "must be an async method"),
        (object(), {}, TypeError, "must be an async method"),
        (CountingProvider(), {"ttl": 0}, ValueError, "ttl"),
        (CountingProvider(), {"ttl": -1}, ValueError, "ttl"),
        (CountingProvider(), {"ttl": math.inf}, ValueError, "ttl"),
        (CountingProvider(), {"ttl": math.nan}, ValueError, "ttl"),
        (CountingProvider(), {"ttl": "300"}, TypeError, "ttl"),
        (CountingProvider(), {"negative_ttl": -1}, ValueError, "negative_ttl"),
        (CountingProvider(), {"negative_ttl": math.nan}, ValueError, "negative_ttl"),
        (CountingProvider(), {"negative_ttl": None}, TypeError, "negative_ttl"),
        (CountingProvider(), {"max_entries": 0}, ValueError, "max_entries"),
        (CountingProvider(), {"max_entries": 2.5}, TypeError, "max_entries"),
        (CountingProvider(), {"max_entries": True}, TypeError, "max_entries"),
    ],
)
def test_cache_refuses_a_bad_configuration(
    provider: Any, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CachedProvider(provider, **options)
    CachedProvider(CountingProvider(), ttl=0.001, negative_ttl=0, max_entries=1)  # the smallest allowed


def test_e2e_cached_introspection_asks_once_for_20_concurrent_requests_and_forgets_a_revoked_token(
    introspection: IntrospectionEndpoint,
) -> None:
    introspection.mode = "slow"  # 5 ms per answer: the 20 requests overlap it
    cache = CachedProvider(introspector(introspection))
    headers = {"Authorization": f"Bearer {ACTIVE}"}
    with serve(BearerAuthMiddleware(caller, cache)) as base:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: raw_request(base, "GET", "/mcp", headers), range(20)))
        assert [(status, json.loads(body)["sub"]) for status, _, body in answers] == [(200, "dana")] * 20
        assert len(introspection.introspections) == 1
        del introspection.answers[ACTIVE]  # revoked at the authorization server
        assert raw_request(base, "GET", "/mcp", headers)[0] == 200  # still cached: revocation needs invalidate
        cache.invalidate(ACTIVE)
        assert raw_request(base, "GET", "/mcp", headers)[0] == 401
    assert len(introspection.introspections) == 2


def test_chain_consults_in_order_the_first_access_token_wins_and_none_moves_on() -> None:
    first = CountingProvider({T1: verdict("from-first")})
    second = CountingProvider({T1: verdict("from-second"), T2: verdict("from-second")})
    chain = ProviderChain(first, second)
    assert ask(chain, T1).claims["sub"] == "from-first" and second.calls == []  # type: ignore[union-attr]
    assert ask(chain, T2).claims["sub"] == "from-second"  # type: ignore[union-attr]
    assert ask(chain, T3) is None  # nobody knows it
    assert first.calls == [T1, T2, T3] and second.calls == [T2, T3]


@pytest.mark.parametrize(
    ("answer", "status"),
    [(RuntimeError("token store bug"), 500), (ProviderUnavailable(), 503), ({"sub": "x"}, 500)],
    ids=["raises", "unavailable", "wrong-type"],
)
def test_chain_a_broken_provider_stops_the_chain(answer: Any, status: int) -> None:
    """A provider that fails is never read as "not mine, try the next": that would hide outages and bugs."""
    broken, later = CountingProvider({T1: answer}), CountingProvider({T1: verdict()})
    chain = ProviderChain(broken, later)
    if isinstance(answer, Exception):
        with pytest.raises(type(answer)):
            ask(chain, T1)
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


def test_e2e_chain_api_key_callers_get_in_while_the_jwks_endpoint_is_down(introspection: IntrospectionEndpoint) -> None:
    """API keys first, then JWTs: an IdP outage costs the JWT callers a 503, not the API-key callers anything."""
    introspection.mode = "500"  # the loopback server stands in for an IdP whose JWKS endpoint is down
    jwks_url = introspection.url.replace("/introspect", "/jwks")
    jwts = JWTProvider(issuer="https://auth.example.com/", audience=RESOURCE, jwks_url=jwks_url, jwks_timeout=1.0)
    app = BearerAuthMiddleware(caller, ProviderChain(StaticTokenProvider(TOKENS), jwts))
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
        ((StaticTokenProvider(TOKENS), SyncVerifier()), TypeError, "provider #2: SyncVerifier.verify_token must be"),
        ((object(),), TypeError, "provider #1"),
    ],
)
def test_chain_refuses_a_bad_configuration(providers: tuple[Any, ...], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ProviderChain(*providers)


DOWN = opaque("down")  # its provider cannot decide: 503
AUDIT_FIELDS = ("outcome", "status", "error", "method", "path", "client", "principal")  # as in record.mcp_bearer


def audit_provider() -> ProviderChain:
    return ProviderChain(StaticTokenProvider(TOKENS), CountingProvider({DOWN: ProviderUnavailable("IdP down")}))


def request_from(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """One plain HTTP/1.1 request; returns (status, "127.0.0.1:PORT" it came from)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        connection.connect()
        client = ":".join(map(str, connection.sock.getsockname()[:2]))
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status, client
    finally:
        connection.close()


def short_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def test_e2e_audit_trail_of_a_mixed_run() -> None:
    """One INFO record per decision, for people and for JSON formatters alike; never a token."""
    reached: list[str] = []  # the client address of every request the app was given

    async def noting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            reached.append(":".join(map(str, scope["client"])))
        await inner(scope, receive, send)

    inner = mcp_app(whoami)
    app = BearerAuthMiddleware(noting, audit_provider(), audit=True, required_scopes=["write"])

    async def whoami_over_mcp(url: str) -> Any:
        async with mcp_session(url, BOB) as (session, _):
            return await call_json(session, "whoami")

    refused = [  # (token or header, path) -> what the trail must say
        (None, "/mcp", "401 unauthorized", None),
        ("sk-nobody-Zq8Lm3Wx5Rt", "/mcp", "401 invalid_token", short_digest("sk-nobody-Zq8Lm3Wx5Rt")),
        (ALICE_1, "/mcp", "403 insufficient_scope", "alice"),  # read, not write
        (CAROL_NO_SUB, "/mcp", "403 insufficient_scope", short_digest(CAROL_NO_SUB)),  # no sub: a digest
        (DOWN, "/mcp", "503 temporarily_unavailable", short_digest(DOWN)),
        ("a b", "/mcp", "400 invalid_request", None),  # malformed: no token to name
        (None, "/mcp%0d%0aforged", "401 unauthorized", None),  # an encoded CR LF in the path
    ]
    SECRETS.add("sk-nobody-Zq8Lm3Wx5Rt")
    expected = []
    with mcp_bearer_log("mcp_bearer.audit") as records, serve(app) as base:
        for token, path, outcome, principal in refused:
            status, client = request_from(base, "POST", path, {"Authorization": f"Bearer {token}"} if token else {})
            code, _, error = outcome.partition(" ")
            assert status == int(code)
            decoded = path.replace("%0d%0a", "\r\n")
            expected.append((outcome, int(code), error, "POST", decoded, client, principal))
        assert len(records) == len(refused)  # each written before its response, refusals included
        assert anyio.run(whoami_over_mcp, base + "/mcp")["claims"]["sub"] == "bob"
    denied, allowed = records[: len(refused)], records[len(refused) :]
    assert [tuple(r.mcp_bearer[k] for k in AUDIT_FIELDS) for r in denied] == expected  # type: ignore[attr-defined]
    assert len(allowed) == len(reached) and len(allowed) >= 2  # initialize, tools/call, ... : one record each
    for record in allowed:
        fields = record.mcp_bearer  # type: ignore[attr-defined]
        assert (fields["outcome"], fields["status"], fields["error"]) == ("allowed", None, None)
        assert (fields["path"], fields["principal"]) == ("/mcp", "bob") and fields["method"] in (
            "POST",
            "GET",
            "DELETE",
        )
    assert sorted(r.mcp_bearer["client"] for r in allowed) == sorted(reached)  # type: ignore[attr-defined]
    used = [BOB, ALICE_1, CAROL_NO_SUB, DOWN, "sk-nobody-Zq8Lm3Wx5Rt"]
    for record in records:
        fields = record.mcp_bearer  # type: ignore[attr-defined]
        assert (record.name, record.levelno, set(fields)) == ("mcp_bearer.audit", logging.INFO, set(AUDIT_FIELDS))
        assert re.fullmatch(r"127\.0\.0\.1:\d+", fields["client"])
        message = record.getMessage()
        outcome, method, path, client, principal = (
            fields[k] for k in ("outcome", "method", "path", "client", "principal")
        )
        assert message == f"{outcome}: {method} {path!r} from {client}, principal {principal}"
        assert "\n" not in logging.Formatter().format(record) and "\r" not in message  # no forged second line
        assert not [t for t in used if t in message or t in repr(vars(record))]


def test_audit_is_off_by_default_and_must_be_a_bool() -> None:
    with mcp_bearer_log("mcp_bearer.audit") as records:
        harness = Harness(audit_provider(), required_scopes=["read"])
        statuses = [
            harness.request(headers).status for headers in ([], bearer(BOB), bearer(CAROL_NO_SUB), bearer(DOWN))
        ]
        assert statuses == [401, 200, 403, 503]
        assert records == []
        audited = Harness(audit_provider(), audit=True)  # without required scopes, a token without sub gets in
        assert audited.request(bearer(CAROL_NO_SUB)).status == 200
        assert [r.mcp_bearer["principal"] for r in records] == [short_digest(CAROL_NO_SUB)]  # type: ignore[attr-defined]
    for wrong in ("yes", 1, None):
        with pytest.raises(TypeError, match="audit must be True or False"):
            BearerAuthMiddleware(caller, audit_provider(), audit=wrong)  # type: ignore[arg-type]


def test_audit_records_decisions_about_tokens_only() -> None:
    """Public paths, the metadata document and CORS preflights decide nothing about a token: no record."""
    with mcp_bearer_log("mcp_bearer.audit") as records:
        harness = Harness(audit_provider(), audit=True, resource="https://mcp.example.com/mcp")
        assert harness.request(path="/health", method="GET").status == 200
        assert harness.request(path="/.well-known/oauth-protected-resource", method="GET").status == 200
        assert harness.request(PREFLIGHT, method="OPTIONS").status == 200
        assert records == []
        assert harness.request(method="OPTIONS").status == 401  # not a real preflight: a decision
        assert [r.mcp_bearer["outcome"] for r in records] == ["401 unauthorized"]  # type: ignore[attr-defined]


def test_cli_chains_api_keys_and_cached_introspection_and_prints_the_audit_trail(
    introspection: IntrospectionEndpoint, tmp_path: Any
) -> None:
    """The README's command: API keys first, opaque tokens introspected once per TTL, one audit line each."""
    (tmp_path / "plain_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    sub = scope['state']['access_token'].claims['sub']\n"
        "    await send({'type': 'http.response.body', 'body': sub.encode()})\n"
    )
    (tmp_path / "keys.json").write_text(json.dumps({BOB: {"sub": "bob"}}))
    args = ["plain_app:app", "--tokens-file", "keys.json", "--introspection-url", introspection.url]
    args += ["--client-id", CLIENT_ID, "--cache-ttl", "60", "--audit"]
    stderr: list[str] = []
    with cli_server(*args, cwd=str(tmp_path), env={"MCP_BEARER_CLIENT_SECRET": CLIENT_SECRET}, stderr=stderr) as (
        base,
        _,
    ):
        assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {BOB}"})[2] == b"bob"
        assert introspection.introspections == []  # an API key never reaches the token service
        for _ in range(3):
            assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {ACTIVE}"})[2] == b"dana"
        assert len(introspection.introspections) == 1  # the cache answered the other two
        assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {INACTIVE}"})[0] == 401
        assert raw_request(base, "GET", "/x")[0] == 401
    trail = [line for line in stderr if " mcp_bearer.audit " in line]
    outcomes = [line.split(" mcp_bearer.audit ", 1)[1].split(":", 1)[0] for line in trail]
    assert outcomes == ["allowed"] * 4 + ["401 invalid_token", "401 unauthorized"], stderr
    assert "principal bob" in trail[0] and "principal dana" in trail[1]
    assert not [line for line in stderr if any(secret in line for secret in (BOB, ACTIVE, INACTIVE, CLIENT_SECRET))]
