# SPDX-License-Identifier: MIT  (c) 2026 the mcp_bearer developers; see LICENSE.
"""Bearer-token authentication for MCP servers and any other ASGI app.

Wrap an ASGI app in :class:`BearerAuthMiddleware` and every request must carry
``Authorization: Bearer <token>`` that your :class:`BearerAuthProvider` accepts;
everything else is answered with a JSON error before the app runs. Inside the
app, :func:`get_access_token` says who is calling.

One file, standard library only: copy it into a project or ``pip install`` it.

References:
- RFC 6750 (Bearer Token Usage): section 2.1 header syntax, section 3 challenges.
- RFC 9110 section 11 (HTTP authentication): case-insensitive scheme, ``1*SP``.
- RFC 9728 (OAuth 2.0 Protected Resource Metadata).
- MCP specification, Authorization (2025-06-18 and 2025-11-25) and the
  Streamable HTTP transport's session management.
"""

from __future__ import annotations

import abc
import argparse
import contextvars
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import secrets
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, ParamSpec
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_EXCLUDED_PATHS",
    "AccessToken",
    "AuthenticationError",
    "BearerAuthMiddleware",
    "BearerAuthProvider",
    "InsufficientScopeError",
    "StaticTokenProvider",
    "get_access_token",
    "main",
    "require_auth",
    "require_scopes",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_EXCLUDED_PATHS: tuple[str, ...] = ("/docs", "/inspector", "/health", "/openmcp.json")
DEFAULT_MAX_TOKEN_LENGTH = 8192
DEFAULT_MAX_SESSIONS = 10_000
PROTECTED_RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"

logger = logging.getLogger("mcp_bearer")
# Log messages are constants: nothing a client sends, above all no token, reaches them.
_LOG_PROVIDER_RAISED = "token provider raised; request refused with 500\n%s"
_LOG_PROVIDER_WRONG_TYPE = "token provider returned %s, not an AccessToken; request refused with 500"
_LOG_NOT_BUILT = "BearerAuthMiddleware cannot be built, so nothing behind it can be served: %s: %s"

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_TOKEN68 = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
# RFC 9110 section 11.4: credentials = auth-scheme [ 1*SP token68 ], the scheme case-insensitive,
# optional whitespace around the field value (section 5.5). Anything else is refused.
_BEARER_CREDENTIALS = re.compile(rb"[ \t]*(?i:bearer) +(" + _TOKEN68.pattern + rb")[ \t]*")
# The header scan lowers only names of these lengths: authorization, mcp-session-id.
_WATCHED_NAME_SIZES = frozenset({len(b"authorization"), len(b"mcp-session-id")})
# RFC 9110 section 5.6.2 tchar: a scheme is a run of these, so "Bearerx" is another scheme.
_TCHARS = frozenset(
    bytes([c]) for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


# --- public types -------------------------------------------------------------


class AuthenticationError(Exception):
    """The current request carries no (sufficient) credentials."""


class InsufficientScopeError(AuthenticationError):
    """The caller's token lacks scopes; ``missing_scopes`` names them."""

    def __init__(self, missing_scopes: Sequence[str]) -> None:
        self.missing_scopes = tuple(missing_scopes)
        super().__init__("Insufficient scope: missing " + " ".join(self.missing_scopes))


@dataclass(slots=True)
class AccessToken:
    """A verified token: ``claims`` holds who (``sub``, ``email``, ...), ``scopes`` what."""

    # repr=False: a logged or printed AccessToken must not reveal the secret.
    token: str = field(repr=False)
    claims: dict[str, Any] = field(default_factory=dict)
    scopes: list[str] = field(default_factory=list)
    expires_at: float | None = None  # Unix seconds; None never expires


# --- providers ----------------------------------------------------------------


class BearerAuthProvider(abc.ABC):
    """Decides whether a bearer token is valid. Subclass and implement ``verify_token``."""

    @abc.abstractmethod
    async def verify_token(self, token: str) -> AccessToken | None:
        """Return an :class:`AccessToken` for a valid token, ``None`` for anything else."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class StaticTokenProvider(BearerAuthProvider):
    """A fixed set of API keys: ``{token: claims}``; a ``"scopes"`` list in the claims becomes the scopes.

    Only SHA-256 digests of the tokens are kept. A presented token is hashed and
    looked up by digest, so lookup time depends on the digest, not on how many
    leading characters of a real key the caller guessed.
    """

    def __init__(self, tokens: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(tokens, Mapping):
            raise TypeError(f"tokens must be a mapping of token -> claims, not {type(tokens).__name__}")
        self._claims_by_digest: dict[bytes, tuple[dict[str, Any], list[str]]] = {}
        # Errors say which entry by position, never by the token itself.
        for position, (token, claims) in enumerate(tokens.items(), 1):
            if not isinstance(token, str) or not _TOKEN68.fullmatch(token.encode("utf-8", "replace")):
                raise ValueError(f"token #{position} is not a non-empty RFC 6750 token (A-Z a-z 0-9 -._~+/ then =)")
            if not isinstance(claims, Mapping):
                raise TypeError(f"claims of token #{position} must be a mapping, not {type(claims).__name__}")
            scopes = claims.get("scopes", [])
            if isinstance(scopes, str) or not all(isinstance(s, str) for s in scopes):
                raise TypeError(f'"scopes" of token #{position} must be a list of strings')
            self._claims_by_digest[_digest(token)] = (dict(claims), list(scopes))

    async def verify_token(self, token: str) -> AccessToken | None:
        entry = self._claims_by_digest.get(_digest(token))
        if entry is None:
            return None
        claims, scopes = entry
        return AccessToken(token, dict(claims), list(scopes))


# --- context helpers ----------------------------------------------------------

_current_token: contextvars.ContextVar[AccessToken | None] = contextvars.ContextVar(
    "mcp_bearer_access_token", default=None
)


def _mcp_request_scope() -> Mapping[str, Any] | None:
    """The ASGI scope of the HTTP request behind the MCP request being handled, if any.

    ``mcp`` 1.x runs a stateful session's handlers in a task that inherited the
    context of the session's *first* request (SDK issue #2208), so there the
    context variable is stale. The SDK's own request context carries the
    current HTTP request; we read it only if the caller already imported ``mcp``.
    """
    lowlevel = sys.modules.get("mcp.server.lowlevel.server")
    request_ctx = getattr(lowlevel, "request_ctx", None)
    if request_ctx is None:
        return None
    request = getattr(request_ctx.get(None), "request", None)
    scope = getattr(request, "scope", None)
    return scope if isinstance(scope, Mapping) else None


def get_access_token() -> AccessToken | None:
    """The verified token of the current request, or ``None`` (no request, or an excluded path)."""
    scope = _mcp_request_scope()
    if scope is None:
        return _current_token.get()
    state = scope.get("state")
    token = state.get("access_token") if isinstance(state, Mapping) else None
    return token if isinstance(token, AccessToken) else None


def require_auth() -> AccessToken:
    """The current request's token; raises :class:`AuthenticationError` when there is none."""
    token = get_access_token()
    if token is None:
        raise AuthenticationError("Authentication required")
    return token


def require_scopes(*scopes: str) -> AccessToken:
    """The current request's token if it holds every scope; else :class:`InsufficientScopeError`."""
    token = require_auth()
    missing = [s for s in scopes if s not in token.scopes]
    if missing:
        raise InsufficientScopeError(missing)
    return token


# --- the middleware -----------------------------------------------------------

_Response = tuple[int, tuple[tuple[bytes, bytes], ...], bytes]  # status, headers, body


def _json_response(status: int, body: Mapping[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> _Response:
    """The one way every response of this module is built (once, at construction)."""
    payload = json.dumps(body).encode()
    return (
        status,
        (
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *headers,
        ),
        payload,
    )


def _quote(value: str) -> str:
    # RFC 9110 section 5.6.4 quoted-string: escape backslash and double quote.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _checked_text(name: str, value: object, *, header: bool) -> str:
    """Refuse configuration that could split or corrupt a header (CR, LF, other controls)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    bad = (lambda c: not " " <= c <= "~") if header else (lambda c: c < " " or c == "\x7f")
    if any(bad(c) for c in value):
        kind = "printable ASCII" if header else "free of control characters"
        raise ValueError(f"{name} must be {kind}: {value!r}")
    return value


def _checked_url(name: str, value: object) -> str:
    url = _checked_text(name, value, header=True)
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{name} must be an absolute http(s) URL without query or fragment: {url!r}")
    return url


def _strings(name: str, values: object) -> tuple[str, ...]:
    # A lone str is iterable too; exclude_paths="/health" would exclude "/", "h", ...
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list or tuple of strings, not {type(values).__name__}")
    return tuple(_checked_text(name, v, header=False) for v in values)


_P = ParamSpec("_P")


def _logged_when_refused(init: Callable[_P, None]) -> Callable[_P, None]:
    """Log a refused configuration once, then raise it.

    Starlette's ``add_middleware`` builds the middleware at lifespan or at the first
    request; under uvicorn's default ``lifespan="auto"`` the error then reaches only an
    INFO line and every request is a 500. Messages name options, never a token.
    """

    @functools.wraps(init)
    def logged_init(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            init(*args, **kwargs)
        except Exception as exc:
            logger.error(_LOG_NOT_BUILT, type(exc).__name__, exc)
            raise

    return logged_init


class BearerAuthMiddleware:
    """ASGI middleware: requests need a valid ``Authorization: Bearer`` token.

    ``lifespan`` passes through; ``http`` and ``websocket`` are guarded; other
    scope types are refused. Excluded paths match exactly, after ``root_path``.
    Refusals are JSON with an RFC 6750 ``WWW-Authenticate`` challenge, built
    once here so that the per-request path only picks one.
    """

    @_logged_when_refused
    def __init__(
        self,
        app: ASGIApp,
        provider: BearerAuthProvider,
        *,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDED_PATHS,
        max_token_length: int = DEFAULT_MAX_TOKEN_LENGTH,
        required_scopes: Sequence[str] = (),
        resource: str | None = None,
        authorization_servers: Sequence[str] = (),
        scopes_supported: Sequence[str] | None = None,
        resource_name: str | None = None,
        realm: str | None = None,
        bind_sessions: bool = True,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        allow_cors_preflight: bool = True,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI callable, not {type(app).__name__}")
        verify = getattr(provider, "verify_token", None)
        if not inspect.iscoroutinefunction(verify):
            raise TypeError(f"{type(provider).__name__}.verify_token must be an async method (async def verify_token)")
        for name, number in (("max_token_length", max_token_length), ("max_sessions", max_sessions)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise ValueError(f"{name} must be a positive int, not {number!r}")
        excluded = _strings("exclude_paths", exclude_paths)
        for path in excluded:
            if not path.startswith("/"):
                raise ValueError(f"exclude_paths entries must start with '/': {path!r}")
        scopes = _strings("required_scopes", required_scopes)
        advertised = scopes if scopes_supported is None else _strings("scopes_supported", scopes_supported)
        for scope_token in (*scopes, *advertised):
            if not _SCOPE_TOKEN.fullmatch(scope_token):
                raise ValueError(
                    f"scope {scope_token!r} is not an RFC 6749 scope-token (no spaces, quotes, backslashes)"
                )

        self.app = app
        self._verify: Callable[[str], Awaitable[AccessToken | None]] = verify
        self._excluded_paths = frozenset(excluded)
        self._max_token_length = max_token_length
        self._required_scopes = frozenset(scopes)
        self._sessions: dict[bytes, str] | None = {} if bind_sessions else None
        self._max_sessions = max_sessions
        self._allow_cors_preflight = allow_cors_preflight

        # RFC 9728 section 5.1: challenges point at the metadata; section 3.1: the
        # well-known suffix goes between host and path of the resource identifier.
        metadata_url = None
        self._metadata_paths: frozenset[str] = frozenset()
        if resource is not None:
            parts = urlsplit(_checked_url("resource", resource))
            suffix = "" if parts.path in ("", "/") else parts.path
            metadata_url = f"{parts.scheme}://{parts.netloc}{PROTECTED_RESOURCE_METADATA_PATH}{suffix}"
            self._metadata_paths = frozenset(
                {PROTECTED_RESOURCE_METADATA_PATH, PROTECTED_RESOURCE_METADATA_PATH + suffix}
            )
            servers = _strings("authorization_servers", authorization_servers)
            document: dict[str, Any] = {
                "resource": resource,
                "authorization_servers": [_checked_url("authorization_servers", url) for url in servers],
                "bearer_methods_supported": ["header"],  # RFC 6750 section 2.1 only: no query, no body
            }
            if advertised:
                document["scopes_supported"] = list(advertised)
            if resource_name is not None:
                document["resource_name"] = _checked_text("resource_name", resource_name, header=False)
            self._metadata = _json_response(200, document, ((b"cache-control", b"public, max-age=3600"),))
            self._metadata_head = (self._metadata[0], self._metadata[1], b"")
        elif authorization_servers or resource_name is not None:
            raise ValueError("authorization_servers and resource_name need resource= (the server's canonical URL)")
        if realm is not None:
            _checked_text("realm", realm, header=True)
        scope_text = " ".join(scopes)

        def refusal(status: int, error: str, description: str, *, challenge: bool = True) -> _Response:
            body = {"error": error, "error_description": description}
            if status == 403:
                body["scope"] = scope_text
            if not challenge:
                return _json_response(status, body)
            # RFC 6750 section 3.1: a request without credentials gets no error code.
            code = None if status == 401 and error == "unauthorized" else error
            params = [
                ("realm", realm),
                ("error", code),
                ("scope", scope_text or None),  # MCP 2025-11-25: tell the client which scopes to ask for
                ("error_description", code and description),
                ("resource_metadata", metadata_url),
            ]
            value = ", ".join(f"{name}={_quote(v)}" for name, v in params if v)
            return _json_response(status, body, ((b"www-authenticate", f"Bearer {value}".rstrip().encode()),))

        self._unauthorized = refusal(401, "unauthorized", "Authentication required")
        self._invalid_token = refusal(401, "invalid_token", "Token is invalid or expired")
        self._malformed = refusal(400, "invalid_request", "Malformed Authorization header")
        self._insufficient_scope = refusal(403, "insufficient_scope", "Insufficient scope")
        self._server_error = refusal(500, "server_error", "Authentication failed unexpectedly", challenge=False)
        # MCP Streamable HTTP: 404 for a session id is how a client learns to start a new session.
        self._session_not_found = refusal(404, "session_not_found", "Session not found", challenge=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":  # the MCP SDK starts its session manager here
                return await self.app(scope, receive, send)
            if kind != "websocket":
                raise RuntimeError(f"mcp_bearer: refusing ASGI scope type {kind!r}; only http, websocket, lifespan")

        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        if path in self._excluded_paths:
            return await self.app(scope, receive, send)
        method = scope.get("method")
        if path in self._metadata_paths and (method == "GET" or method == "HEAD"):
            return await self._respond(scope, send, self._metadata if method == "GET" else self._metadata_head)
        if method == "OPTIONS" and self._allow_cors_preflight and _is_preflight(scope["headers"]):
            return await self.app(scope, receive, send)

        # One pass over the raw header pairs, as uvicorn's ProxyHeadersMiddleware does.
        # Servers send lowercase names; hand-built scopes may not (RFC 9110 section 5.1).
        authorization = None
        authorization_count = 0
        session_id = None
        session_id_count = 0
        for name, value in scope["headers"]:
            if len(name) in _WATCHED_NAME_SIZES:
                name = name.lower()
                if name == b"authorization":
                    authorization = value
                    authorization_count += 1
                elif name == b"mcp-session-id":
                    session_id = value
                    session_id_count += 1

        if authorization is None:
            return await self._respond(scope, send, self._unauthorized)
        if authorization_count > 1:  # which one would the app trust? Refuse rather than guess.
            return await self._respond(scope, send, self._malformed)
        credentials = _BEARER_CREDENTIALS.fullmatch(authorization)
        if credentials is None:
            return await self._respond(scope, send, self._refusal_for(authorization))
        token_bytes: bytes = credentials[1]
        if len(token_bytes) > self._max_token_length:
            return await self._respond(scope, send, self._invalid_token)
        token = token_bytes.decode("ascii")

        try:
            access = await self._verify(token)
            refusal = self._judge(access)
        except Exception as exc:
            # Fail closed, and say so honestly: a provider crash is not a bad key.
            # The traceback is logged with the token cut out, in case the provider put it in a message.
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            logger.error(_LOG_PROVIDER_RAISED, text.replace(token, "[token]"))
            refusal = self._server_error
        if refusal is not None:  # sent outside the try: a failing send is the server's error, not the provider's
            return await self._respond(scope, send, refusal)
        assert isinstance(access, AccessToken)  # for the type checker: _judge refused everything else

        if self._sessions is not None and kind == "http":
            if session_id is not None:
                # MCP spec: a session never stands in for authentication; it belongs to its creator.
                if session_id_count > 1 or self._sessions.get(session_id) != _principal(access, token):
                    return await self._respond(scope, send, self._session_not_found)
                send = self._ending_send(send, session_id, method == "DELETE")
            elif method == "POST":  # only an initialize POST creates a session
                send = self._binding_send(send, access, token)

        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["access_token"] = access
        reset = _current_token.set(access)
        try:
            await self.app(scope, receive, send)
        finally:
            _current_token.reset(reset)

    def _judge(self, access: object) -> _Response | None:
        """The refusal a provider's answer earns, or None for a token that may pass."""
        if access is None:
            return self._invalid_token
        if not isinstance(access, AccessToken):
            logger.error(_LOG_PROVIDER_WRONG_TYPE, type(access).__name__)
            return self._server_error
        # "not >" rather than "<=": an expires_at of NaN (json accepts it) counts as expired.
        if access.expires_at is not None and not access.expires_at > time.time():
            return self._invalid_token
        granted = access.scopes
        if self._required_scopes and (isinstance(granted, str) or not self._required_scopes.issubset(granted)):
            return self._insufficient_scope
        return None

    def _refusal_for(self, authorization: bytes) -> _Response:
        """Why a header that is not ``Bearer <token68>`` is refused: no bearer credentials, or malformed ones."""
        credentials = authorization.strip(b" \t")
        # RFC 9110 section 11.1: the scheme ends where tchars end, so "Bearerx" and "Basic" are other schemes.
        if credentials[:6].lower() != b"bearer" or credentials[6:7] in _TCHARS:
            return self._unauthorized
        if not credentials[6:]:  # "Bearer" alone: no credentials at all (RFC 6750 section 3.1)
            return self._unauthorized
        return self._malformed  # "Bearer a b", "Bearer\tx", 'Bearer "x"', non-ASCII, ...

    def _binding_send(self, send: Send, access: AccessToken, token: str) -> Send:
        """Watch a response that may create a session, and bind the session to its creator."""
        sessions: dict[bytes, str] = self._sessions  # type: ignore[assignment]

        async def binding_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", ()):
                    if len(name) == 14 and name.lower() == b"mcp-session-id" and value:
                        sessions[value] = _principal(access, token)
                        if len(sessions) > self._max_sessions:  # oldest first; its owner re-initializes
                            del sessions[next(iter(sessions))]
            await send(message)

        return binding_send

    def _ending_send(self, send: Send, session_id: bytes, deleting: bool) -> Send:
        """Watch a response on a session, and forget the session once the app has ended it."""
        sessions: dict[bytes, str] = self._sessions  # type: ignore[assignment]

        async def ending_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 404 or (deleting and 200 <= status < 300):
                    sessions.pop(session_id, None)
            await send(message)

        return ending_send

    async def _respond(self, scope: Scope, send: Send, response: _Response) -> None:
        status, headers, body = response
        # A fresh message and header list each time: outer middleware (Starlette's
        # CORSMiddleware, for one) appends to message["headers"] in place.
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": list(headers)})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": list(headers)})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})  # RFC 6455 7.4.1: policy violation


def _is_preflight(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A CORS preflight (Fetch standard): OPTIONS with Origin and Access-Control-Request-Method.

    Browsers never send credentials on a preflight, so it must pass unauthenticated.
    """
    names = {name.lower() for name, _ in headers}
    return b"origin" in names and b"access-control-request-method" in names


def _principal(access: AccessToken, token: str) -> str:
    """Who owns a session: the ``sub`` claim, else the token's digest (never the token).

    Keying on ``sub`` lets a user rotate keys mid-session; the prefixes keep a
    ``sub`` from ever equalling some token's digest.
    """
    subject = access.claims.get("sub") if isinstance(access.claims, Mapping) else None
    if isinstance(subject, str) and subject:
        return "sub:" + subject
    return "token:" + _digest(token).hex()


# --- the command line ---------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    """Bad input on the command line: one line on stderr, exit code 2."""
    print(f"mcp_bearer: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load_tokens(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as file:
            tokens = json.load(file)
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read tokens file {path!r}: {getattr(exc, 'strerror', None) or exc}")
    except json.JSONDecodeError as exc:
        _fail(f"tokens file {path!r} is not valid JSON: {exc.msg} at line {exc.lineno}")
    if not isinstance(tokens, dict) or not all(isinstance(c, dict) for c in tokens.values()):
        _fail(f'tokens file {path!r} must hold a JSON object of token -> claims, e.g. {{"sk-1": {{"sub": "alice"}}}}')
    return tokens


def _load_app(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        _fail(f"app {target!r} must look like MODULE:ATTR, e.g. server:app")
    sys.path.insert(0, os.getcwd())  # as uvicorn does: serve a module from the current directory
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        _fail(f"cannot import module {module_name!r}: {exc}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            _fail(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if hasattr(obj, "streamable_http_app"):  # an MCPServer (mcp 2.x) or FastMCP (mcp 1.x)
        return obj.streamable_http_app()
    if not callable(obj):
        _fail(f"{target!r} is neither an ASGI app nor an MCP server, but a {type(obj).__name__}")
    return obj


def _demo_app(host: str) -> Any:
    """A one-tool MCP server: ``whoami`` returns the caller's claims."""

    def whoami() -> dict[str, Any]:
        """Who is calling: the claims of the bearer token."""
        return dict(require_auth().claims)

    try:
        server: Any = importlib.import_module("mcp.server.mcpserver").MCPServer("mcp_bearer demo")
        server.tool()(whoami)
        return server.streamable_http_app(host=host)
    except ImportError:  # mcp 1.x
        server = importlib.import_module("mcp.server.fastmcp").FastMCP("mcp_bearer demo", host=host)
        server.tool()(whoami)
        return server.streamable_http_app()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn, made with protocol IPPROTO_TCP rather than 0.

    asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections accepted
    from an IPPROTO_TCP socket; otherwise every response waits about 40 ms.
    """
    listener = socket.create_server((host, port))
    return socket.socket(listener.family, listener.type, socket.IPPROTO_TCP, fileno=listener.detach())


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``mcp-bearer`` (console script) or ``python -m mcp_bearer``."""
    # Usage names the command the user typed; error lines always start "mcp_bearer: error:".
    installed = os.path.splitext(os.path.basename(sys.argv[0]))[0] == "mcp-bearer"
    parser = _ArgumentParser(
        prog="mcp-bearer" if installed else "python -m mcp_bearer",
        description="Serve an ASGI app or MCP server behind bearer-token authentication; "
        "without APP, a demo MCP server with a whoami tool. Tokens come from --tokens-file, "
        "else MCP_BEARER_TOKENS (comma-separated), else one random token printed once.",
    )
    parser.add_argument(
        "app", nargs="?", metavar="MODULE:ATTR", help="an ASGI app, or an object with streamable_http_app()"
    )
    parser.add_argument(
        "--tokens-file", metavar="FILE", help='JSON object of token -> claims, e.g. {"sk-1": {"sub": "alice"}}'
    )
    parser.add_argument(
        "--exclude",
        action="append",
        metavar="PATH",
        help=f"public path, exact match, repeatable (replaces the defaults {', '.join(DEFAULT_EXCLUDED_PATHS)})",
    )
    parser.add_argument(
        "--required-scope", action="append", default=[], metavar="S", help="scope every token must hold, repeatable"
    )
    parser.add_argument(
        "--resource",
        metavar="URL",
        help="canonical URL of this server, e.g. https://mcp.example.com/mcp; serves RFC 9728 metadata",
    )
    parser.add_argument(
        "--authorization-server",
        action="append",
        default=[],
        metavar="URL",
        help="issuer URL listed in the metadata, repeatable",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    args = parser.parse_args(argv)

    generated = None
    if args.tokens_file is not None:
        tokens = _load_tokens(args.tokens_file)
    elif os.environ.get("MCP_BEARER_TOKENS", "").strip():
        keys = [key.strip() for key in os.environ["MCP_BEARER_TOKENS"].split(",") if key.strip()]
        tokens = {key: {"sub": f"user-{n}"} for n, key in enumerate(keys, 1)}
    else:
        generated = secrets.token_urlsafe(32)
        tokens = {generated: {"sub": "demo-user"}}

    try:
        import uvicorn
    except ImportError:
        _fail("uvicorn is not installed; pip install 'mcp_bearer[demo]'")
    try:
        app = _load_app(args.app) if args.app else _demo_app(args.host)
    except ImportError as exc:
        _fail(f"the demo needs the mcp package ({exc}); pip install 'mcp_bearer[demo]'")
    # A bad option is the one stderr line below; the ERROR record the middleware logs for lazy
    # builders would print it a second time (logging's last-resort handler writes to stderr).
    logger.disabled = True
    try:
        guarded = BearerAuthMiddleware(
            app,
            StaticTokenProvider(tokens),
            exclude_paths=DEFAULT_EXCLUDED_PATHS if args.exclude is None else args.exclude,
            required_scopes=args.required_scope,
            resource=args.resource,
            authorization_servers=args.authorization_server,
        )
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    finally:
        logger.disabled = False

    # Bind here, not in uvicorn, so a busy port is one clear line and exit 2.
    try:
        listener = _listen(args.host, args.port)
    except (OSError, OverflowError) as exc:
        _fail(f"cannot listen on {args.host}:{args.port}: {getattr(exc, 'strerror', None) or exc}")
    port = listener.getsockname()[1]
    url = f"http://{args.host}:{port}/mcp"
    if generated is not None:  # printed once, on purpose: the demo's only key
        config = {"mcpServers": {"demo": {"url": url, "headers": {"Authorization": f"Bearer {generated}"}}}}
        print(f"Bearer token: {generated}\nClient configuration:\n{json.dumps(config, indent=2)}", flush=True)
    print(f"Serving {url} behind bearer-token authentication (Ctrl+C to stop)", flush=True)
    uvicorn.Server(uvicorn.Config(guarded, log_level="warning")).run(sockets=[listener])


if __name__ == "__main__":
    # `python -m mcp_bearer` runs this file as __main__, a copy of the module beside the one a user's
    # server imports: a middleware from here would set another context variable, with another
    # AccessToken class, than the tools read. Use only the real module.
    import mcp_bearer

    mcp_bearer.main()
