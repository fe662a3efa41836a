# SPDX-License-Identifier: MIT  (c) 2026 the mcp_bearer developers; see LICENSE.
"""Bearer-token authentication for MCP servers and any other ASGI app.

Wrap an ASGI app in :class:`BearerAuthMiddleware` and every request must carry
``Authorization: Bearer <token>`` that your :class:`BearerAuthProvider` accepts;
everything else is answered with a JSON error before the app runs. Inside the
app, :func:`get_access_token` says who is calling.

One file, standard library only: copy it into a project or ``pip install`` it.

Contents, top to bottom (where each guarantee of the README is enforced):

1. Helpers used everywhere: option checks (``TypeError`` for a wrong type, ``ValueError``
   for a wrong value, the option named), token digests, and ``_Claims``, the one
   rule by which every provider gives each request claims no other request shares.
2. Public types: :class:`AccessToken` (its ``repr`` hides the token), the errors.
3. Providers. :class:`StaticTokenProvider` keeps only digests. ``_http_call`` is the only
   code that touches the network (worker thread, deadline, size bound, no redirect).
   ``_JWKSource`` is an issuer's key set over time (cache, cooldown, single flight, last
   good set); :class:`JWTProvider` applies RFC 8725 around PyJWT's signature check.
   :class:`IntrospectionProvider` (RFC 7662), :class:`CachedProvider`, :class:`ProviderChain`.
4. Context helpers: :func:`get_access_token`, :func:`require_auth`, :func:`require_scopes`.
5. The middleware. ``_Response``: every answer, refusals included, built once at
   construction (``_Refusals`` holds the RFC 6750 challenges). ``_credentials``: the header
   scan and the ``Bearer`` syntax (RFC 6750 2.1, RFC 9110 11). ``_SessionOwners``: MCP
   sessions belong to their creator, on both HTTP transports. ``BearerAuthMiddleware.__call__``
   runs the request path in order: public paths, credentials, provider (fail closed:
   500/503, never a pass), expiry and scopes (``_judge``), sessions, then the app with
   the caller in a context variable and in ``scope["state"]``.
6. The command line: :func:`main` (``mcp-bearer`` / ``python -m mcp_bearer``).

References:
- RFC 6750 (Bearer Token Usage): section 2.1 header syntax, section 3 challenges.
- RFC 9110 section 11 (HTTP authentication): case-insensitive scheme, ``1*SP``.
- RFC 9728 (OAuth 2.0 Protected Resource Metadata).
- RFC 8725 (JWT best current practices), RFC 7662 (token introspection).
- MCP specification, Authorization (2025-06-18 and 2025-11-25) and the
  Streamable HTTP transport's session management.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import contextvars
import fnmatch
import functools
import hashlib
import hmac
import http.client
import importlib
import inspect
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, ParamSpec, TypeGuard, TypeVar
from urllib.parse import parse_qsl, quote_plus, unquote, urlencode, urlsplit

__all__ = [
    "DEFAULT_EXCLUDED_PATHS",
    "AccessToken",
    "AuthenticationError",
    "BearerAuthMiddleware",
    "BearerAuthProvider",
    "CachedProvider",
    "InsufficientScopeError",
    "IntrospectionProvider",
    "JWTProvider",
    "Operation",
    "ProviderChain",
    "ProviderUnavailable",
    "StaticTokenProvider",
    "get_access_token",
    "main",
    "principal_key",
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
_MAX_SSE_PREAMBLE = 4096  # bytes of an event stream read for its endpoint event
_MAX_MESSAGE_PATHS = 64

logger = logging.getLogger("mcp_bearer")
_audit_logger = logging.getLogger("mcp_bearer.audit")
# Log messages are constants: nothing a client sends, above all no token, reaches them.
_LOG_PROVIDER_RAISED = "token provider raised; request refused with 500\n%s"
_LOG_PROVIDER_WRONG_TYPE = "token provider returned %s, not an AccessToken; request refused with 500"
_LOG_PROVIDER_UNAVAILABLE = "token provider unavailable (%s); request refused with 503, Retry-After %d"
_LOG_JWKS_FAILED = "JWKS fetch from %s failed (%s); keeping the last good key set, if any"
# Every field a client or an IdP supplies is quoted (%r): an encoded CR or LF in a path, a
# forwarded address or a subject cannot forge a line of the trail.
_LOG_AUDIT = "%s: %r %r from %r, principal %r"
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


# --- helpers used everywhere ------------------------------------------------------
# Wrong configuration is refused at construction: TypeError for a wrong type, ValueError
# for a wrong value, and the message names the option, never a secret it might hold.


def _checked_text(name: str, value: object, *, header: bool) -> str:
    """A str that cannot split or corrupt a header (``header=True``: printable ASCII) or a log line."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    bad = (lambda c: not " " <= c <= "~") if header else (lambda c: c < " " or c == "\x7f")
    if any(bad(c) for c in value):
        kind = "printable ASCII" if header else "free of control characters"
        raise ValueError(f"{name} must be {kind}: {value!r}")
    return value


def _strings(name: str, values: object) -> tuple[str, ...]:
    # A lone str is iterable too; exclude_paths="/health" would exclude "/", "h", ...
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list or tuple of strings, not {type(values).__name__}")
    return tuple(_checked_text(name, v, header=False) for v in values)


def _scope_tokens(name: str, values: object) -> tuple[str, ...]:
    """Scopes as RFC 6749 section 3.3 defines them: each a scope-token, so it fits a challenge unescaped."""
    scopes = _strings(name, values)
    for scope_token in scopes:
        if not _SCOPE_TOKEN.fullmatch(scope_token):
            raise ValueError(f"scope {scope_token!r} is not an RFC 6749 scope-token (no spaces, quotes, backslashes)")
    return scopes


def _scope_list(text: str) -> list[str]:
    """RFC 6749 section 3.3: scopes are separated by spaces only, and a part that is not a scope-token
    (a tab, a non-ASCII letter, a quote) is no scope at all, so it can never match a required one."""
    return [part for part in text.split(" ") if _SCOPE_TOKEN.fullmatch(part)]


def _is_number(value: object) -> TypeGuard[int | float]:
    """A JSON number: bool is an int to Python, but true is not 1 in a claim or an option."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(name: str, value: object, *, zero: bool = False) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be a finite number of seconds, {'>= 0' if zero else '> 0'}: {value!r}")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
    return value


def _digest(token: str) -> bytes:
    """How a token is looked up (API keys, the verdict cache): SHA-256, so no table ever holds the token."""
    return hashlib.sha256(token.encode()).digest()


_PROCESS_KEY = secrets.token_bytes(32)


def _keyed_digest(token: str) -> str:
    """What may stand for a token where people read (principals, logs): an HMAC under a per-process key.

    Unlike a plain hash, it cannot confirm a guessed password that a user pasted as a token.
    """
    return hmac.new(_PROCESS_KEY, token.encode(), hashlib.sha256).hexdigest()[:32]


def _quote(value: str) -> str:
    # RFC 9110 section 5.6.4 quoted-string: escape backslash and double quote.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _copied(value: Any) -> Any:
    """A copy no one else shares. Claims are JSON: lists and dicts are their only mutable parts."""
    if isinstance(value, Mapping):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


class _Claims:
    """Claims handed out again and again: ``copy()`` gives each request a copy no other request shares.

    The one copying rule of every provider: a tool that edits its claims (appends to
    ``claims["groups"]``) never changes what another request sees. Planned once: a flat list
    or dict copies with ``list()``/``dict()``, five times faster than walking it. Slots, not a
    closure, so that a debugger or a memory walk sees what an entry holds.
    """

    __slots__ = ("_claims", "_plan")

    def __init__(self, claims: Mapping[str, Any]) -> None:
        self._claims: dict[str, Any] = _copied(claims)
        plan: list[tuple[str, Callable[[Any], Any]]] = []
        for key, value in self._claims.items():
            if isinstance(value, (dict, list)):
                items = value.values() if isinstance(value, dict) else value
                nested = any(isinstance(item, (dict, list)) for item in items)
                plan.append((key, _copied if nested else dict if isinstance(value, dict) else list))
        self._plan = tuple(plan)

    def copy(self) -> dict[str, Any]:
        claims = self._claims.copy()
        for key, copier in self._plan:
            claims[key] = copier(claims[key])
        return claims


# --- public types -------------------------------------------------------------


class AuthenticationError(Exception):
    """The current request carries no (sufficient) credentials."""


class InsufficientScopeError(AuthenticationError):
    """The caller's token lacks scopes; ``missing_scopes`` names them."""

    def __init__(self, missing_scopes: Sequence[str]) -> None:
        self.missing_scopes = tuple(missing_scopes)
        super().__init__("Insufficient scope: missing " + " ".join(self.missing_scopes))


class ProviderUnavailable(Exception):
    """A provider cannot decide right now (say, its issuer is unreachable): 503 with Retry-After, not 401."""

    def __init__(self, message: str = "Token verification is temporarily unavailable", *, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class AccessToken:
    """A verified token: ``claims`` holds who (``sub``, ``email``, ...), ``scopes`` what."""

    # repr=False: a logged or printed AccessToken must not reveal the secret.
    token: str = field(repr=False)
    claims: dict[str, Any] = field(default_factory=dict)
    scopes: list[str] = field(default_factory=list)
    expires_at: float | None = None  # Unix seconds; None never expires
    # Who vouches for the claims, where that is not their "iss": set by providers whose claims are
    # their own (API keys), so that one source's subjects never pass for another's (see principal_key).
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    """One MCP operation a request asks for, as the app will read it (see ``operation_scopes``).

    ``method`` is the JSON-RPC method (``"tools/call"``), ``name`` the tool or prompt name or the
    resource URI (None for methods that name nothing), ``params`` the request's params as sent.
    """

    method: str
    name: str | None
    params: Mapping[str, Any]


# --- providers ----------------------------------------------------------------


class BearerAuthProvider(abc.ABC):
    """Decides whether a bearer token is valid. Subclass and implement ``verify_token``."""

    @abc.abstractmethod
    async def verify_token(self, token: str) -> AccessToken | None:
        """Return an :class:`AccessToken` for a valid token, ``None`` for anything else."""


def _verifier(name: str, provider: object) -> Callable[[str], Awaitable[AccessToken | None]]:
    """``provider.verify_token``, which must be a coroutine function: the middleware awaits it."""
    verify = getattr(provider, "verify_token", None)
    if not inspect.iscoroutinefunction(verify):
        raise TypeError(f"{name}: {type(provider).__name__}.verify_token must be an async method (async def ...)")
    return verify


_API_KEYS = "mcp_bearer:api-key"  # the source of every API key's claims: never an IdP's issuer
_UNNAMED_SOURCE = "mcp_bearer:provider"  # claims with neither a source nor an "iss"


class StaticTokenProvider(BearerAuthProvider):
    """A fixed set of API keys: ``{token: claims}``; a ``"scopes"`` list in the claims becomes the scopes.

    Only SHA-256 digests of the tokens are kept. A presented token is hashed and
    looked up by digest, so lookup time depends on the digest, not on how many
    leading characters of a real key the caller guessed.
    """

    def __init__(self, tokens: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(tokens, Mapping):
            raise TypeError(f"tokens must be a mapping of token -> claims, not {type(tokens).__name__}")
        self._by_digest: dict[bytes, tuple[_Claims, tuple[str, ...]]] = {}
        # Errors say which entry by position, never by the token itself.
        for position, (token, claims) in enumerate(tokens.items(), 1):
            if not isinstance(token, str) or not _TOKEN68.fullmatch(token.encode("utf-8", "replace")):
                raise ValueError(f"token #{position} is not a non-empty RFC 6750 token (A-Z a-z 0-9 -._~+/ then =)")
            if not isinstance(claims, Mapping):
                raise TypeError(f"claims of token #{position} must be a mapping, not {type(claims).__name__}")
            scopes = claims.get("scopes", [])
            if isinstance(scopes, str) or not all(isinstance(s, str) for s in scopes):
                raise TypeError(f'"scopes" of token #{position} must be a list of strings')
            self._by_digest[_digest(token)] = (_Claims(claims), tuple(scopes))

    def __repr__(self) -> str:  # never a token, nor a digest of one
        return f"StaticTokenProvider({len(self._by_digest)} keys)"

    async def verify_token(self, token: str) -> AccessToken | None:
        entry = self._by_digest.get(_digest(token))
        if entry is None:
            return None
        claims, scopes = entry
        return AccessToken(token, claims.copy(), list(scopes), None, _API_KEYS)


# --- network: the one helper that touches it ------------------------------------

T = TypeVar("T")
_MAX_RESPONSE_BYTES = 1 << 20
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _worker_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The module's worker threads for blocking network calls, created on first use."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="mcp_bearer")
        return _executor


def _checked_endpoint(name: str, url: object) -> str:
    """A URL this module may fetch: https, or http to a loopback host (development); no userinfo, no fragment."""
    try:
        text = _checked_text(name, url, header=True)
    except ValueError:  # its message quotes the value, which may hold user:password@
        raise ValueError(f"{name} must be printable ASCII") from None
    parts = urlsplit(text)
    try:
        host, _ = parts.hostname, parts.port  # .port raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"{name} has an invalid host or port") from None
    if not host or parts.scheme not in ("https", "http"):
        raise ValueError(f"{name} must be an absolute https:// URL")
    if "@" in parts.netloc:  # credentials in a URL end up in logs and proxies
        raise ValueError(f"{name} must not contain user:password@")
    if "#" in text:
        raise ValueError(f"{name} must not have a #fragment")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ValueError(f"{name} must use https:// (http:// only to localhost, 127.0.0.0/8 or ::1)")
    return text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _result(future: concurrent.futures.Future[T], timeout: float | None = None) -> T:
    """Wait for a future that another thread completes, under asyncio or trio, without blocking the loop.

    Any number of requests may wait on one future (single flight); a waiter that
    is cancelled or times out never cancels the future for the others.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: trio (hypercorn --worker-class trio)
        trio: Any = importlib.import_module("trio")
        done = trio.Event()
        trio_token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # the run ended: nobody is left to wake
                trio_token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await done.wait()
    else:
        waiter = asyncio.wrap_future(future)
        # Collect the outcome even if nobody is left to: no "exception was never retrieved" noise.
        waiter.add_done_callback(lambda w: w.cancelled() or w.exception())
        await asyncio.wait([waiter], timeout=timeout)  # unlike wait_for, never cancels the shared future
    if not future.done():
        raise TimeoutError("timed out waiting for a worker thread")
    return future.result()


async def _http_call(
    url: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float
) -> tuple[int, bytes]:
    """``(status, body)`` of one GET (or POST with ``body``), run in a worker thread, all within ``timeout``.

    Raises OSError (TimeoutError for the deadline) for every failure. Messages never
    carry the request body or header values: those hold tokens and client secrets.
    """
    deadline = time.monotonic() + timeout
    future = _worker_pool().submit(_http_exchange, url, body, dict(headers or {}), deadline)
    try:
        return await _result(future, timeout)
    finally:
        future.cancel()  # still waiting for a worker: never start it (a no-op once it runs)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer, not an instruction: the endpoint is the configured one (no open redirect, no SSRF)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _opener(scheme: str) -> urllib.request.OpenerDirector:
    """Plain http (allowed to loopback only) never goes through a proxy: a proxy would read the token and
    our client secret in clear text, and could answer for the endpoint. https honours HTTPS_PROXY and
    NO_PROXY, read when the call is made, as urllib reads them."""
    proxies = urllib.request.ProxyHandler({} if scheme == "http" else None)
    return urllib.request.build_opener(proxies, _NoRedirect)


def _http_exchange(url: str, body: bytes | None, headers: dict[str, str], deadline: float) -> tuple[int, bytes]:
    """The only code in this module that touches the network; runs in a worker thread (see ``_http_call``)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("HTTP request timed out waiting for a worker thread")
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)  # noqa: S310 - _checked_endpoint
    try:
        response: Any = _opener(request.type).open(request, timeout=remaining)
    except urllib.error.HTTPError as error:
        response = error  # 3xx, 4xx, 5xx: a status to return; its body is read (and closed) like any other
    except urllib.error.URLError as error:  # reason: the socket or TLS error, never our headers or body
        if isinstance(error.reason, TimeoutError):
            raise TimeoutError("HTTP request timed out") from None
        raise OSError(f"HTTP request failed: {error.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as error:  # ValueError text may quote a header
        if isinstance(error, TimeoutError):
            raise TimeoutError("HTTP request timed out") from None
        raise OSError(f"HTTP request failed: {type(error).__name__}") from None
    with response:
        try:
            status = int(response.getcode())
            read = getattr(response, "read1", response.read)  # read1: whatever one recv brings, so the deadline holds
            chunks: list[bytes] = []
            size = 0
            while chunk := read(65536):
                size += len(chunk)
                if size > _MAX_RESPONSE_BYTES:
                    raise OSError(f"HTTP response larger than {_MAX_RESPONSE_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError("HTTP response took too long")
                chunks.append(chunk)
        except (http.client.HTTPException, ValueError) as error:
            raise OSError(f"HTTP response unreadable: {type(error).__name__}") from None
    return status, b"".join(chunks)


# --- JWT access tokens: the issuer's keys, then the checks around PyJWT -------------

# RFC 7518 section 3.1, RFC 8037 section 3.1: the key type (and curves) each algorithm verifies with.
_KEY_TYPES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    **{f"HS{n}": ("oct", None) for n in (256, 384, 512)},
    **{f"RS{n}": ("RSA", None) for n in (256, 384, 512)},
    **{f"PS{n}": ("RSA", None) for n in (256, 384, 512)},
    "ES256": ("EC", ("P-256",)),
    "ES384": ("EC", ("P-384",)),
    "ES512": ("EC", ("P-521",)),
    "ES256K": ("EC", ("secp256k1",)),
    "EdDSA": ("OKP", ("Ed25519", "Ed448")),
}
# RFC 7515 section 7.1 (compact JWS): three segments of these; anything else (an API key, a JWE) is not ours.
_BASE64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_MAX_HEADERS_KEPT = 256  # distinct JWS headers remembered: an issuer signs with a handful
_UNKNOWN_KID = object()


class _KeySet(NamedTuple):
    """One fetched JWKS, replaced as a whole: readers never see half of a refresh."""

    fetched_at: float  # time.monotonic()
    by_kid: dict[str, dict[str, Any]]  # kid -> {algorithm: key object}
    sole: dict[str, Any]  # algorithm -> the only key that fits it (for tokens without kid)


def _jwk_keys(jwt: Any, entry: object, algorithms: Sequence[str]) -> dict[str, Any]:
    """The pinned algorithms one JWKS entry may verify, each with its key object; {} to skip the entry.

    RFC 7517 section 5: entries we cannot use (not an object, another use, ...) are skipped,
    not fatal to the set. RFC 8725 section 3.1: a key with an ``alg`` serves that algorithm
    only, and each algorithm only a key of its own type, so a key is never read as another kind.
    """
    if not isinstance(entry, dict) or "d" in entry:  # a published private key signs for anyone
        return {}
    if entry.get("use", "sig") != "sig" or not isinstance(entry.get("kid", ""), str):
        return {}
    operations = entry.get("key_ops")
    if operations is not None and (not isinstance(operations, list) or "verify" not in operations):
        return {}
    declared = entry.get("alg")
    keys: dict[str, Any] = {}
    for algorithm in algorithms if declared is None else [declared]:
        if algorithm not in algorithms:
            continue
        key_type, curves = _KEY_TYPES[algorithm]
        if entry.get("kty") != key_type or (curves is not None and entry.get("crv") not in curves):
            continue
        try:
            keys[algorithm] = jwt.PyJWK(entry, algorithm=algorithm).key
        except Exception:  # noqa: S112 - untrusted input to a parser: a key we cannot read is one we skip
            continue
    return keys


def _key_set(jwt: Any, document: object, algorithms: Sequence[str]) -> _KeySet:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set: a JSON object with a keys list")
    by_kid: dict[str, dict[str, Any]] = {}
    fitting: dict[str, list[Any]] = {}
    for entry in document["keys"]:
        keys = _jwk_keys(jwt, entry, algorithms)
        kid = entry.get("kid") if keys else None  # keys: entry is an object whose kid, if any, is a str
        for algorithm, key in keys.items():
            if kid is not None:
                by_kid.setdefault(kid, {}).setdefault(algorithm, key)
            fitting.setdefault(algorithm, []).append(key)
    if not fitting:
        raise ValueError(f"no key usable with {', '.join(algorithms)}")
    sole = {algorithm: keys[0] for algorithm, keys in fitting.items() if len(keys) == 1}
    return _KeySet(time.monotonic(), by_kid, sole)


class _JWKSource:
    """An issuer's JWK Set over time, the key source apart from the verification (as PyJWT's ``JWKSetCache``).

    Fetched on first need in a worker thread, never at construction and never on the event
    loop; kept ``cache_seconds`` (a stale set still answers while a refresh runs in the
    background); refetched for an unknown ``kid`` at most once per ``cooldown``, concurrent
    requests sharing one fetch; the last good set kept when a refresh fails.
    """

    def __init__(
        self, jwt: Any, url: str, algorithms: Sequence[str], *, cache_seconds: float, cooldown: float, timeout: float
    ) -> None:
        self._jwt = jwt
        self.url = url
        self._algorithms = algorithms
        self._cache_seconds = cache_seconds
        self._cooldown = cooldown
        self._timeout = timeout
        self.key_set: _KeySet | None = None  # installed by the worker thread that fetched it
        self._fetch: concurrent.futures.Future[bool] | None = None
        self._last_attempt = -math.inf
        self._lock = threading.Lock()  # held for a few lines, never across I/O

    def cached_key(self, kid: str | None, algorithm: str) -> Any:
        """The key from the set in hand (a stale set starts a refresh in the background), else ``_UNKNOWN_KID``."""
        key_set = self.key_set
        if key_set is None:
            return _UNKNOWN_KID
        key = self._find(key_set, kid, algorithm)
        if key is not _UNKNOWN_KID and time.monotonic() - key_set.fetched_at >= self._cache_seconds:
            self._start_fetch()  # stale: refresh in the background, answer now with what we have
        return key

    async def fetched_key(self, kid: str | None, algorithm: str) -> Any:
        """The key after asking the issuer again (no set yet, or a kid we have not seen: rotation, or made up).

        None only when a set fetched for this request does not know the kid. When it cannot be
        refetched now (the cooldown, a failed or slow fetch), nobody can tell yet whether the token
        is good: :class:`ProviderUnavailable`, a 503 that no cache keeps, rather than a 401 that a
        newly rotated key's valid tokens would get.
        """
        fetch = self._start_fetch()
        fetched = False
        if fetch is not None:
            with contextlib.suppress(TimeoutError):
                fetched = await _result(fetch, self._timeout)
        key = self.cached_key(kid, algorithm)
        if key is _UNKNOWN_KID and not fetched:
            retry_after = max(1.0, self._last_attempt + self._cooldown - time.monotonic())
            raise ProviderUnavailable(
                "no key for this kid, and the JWKS could not be fetched again now", retry_after=retry_after
            )
        return None if key is _UNKNOWN_KID else key

    @staticmethod
    def _find(key_set: _KeySet, kid: str | None, algorithm: str) -> Any:
        if kid is None:  # only when exactly one key could have signed it
            return key_set.sole.get(algorithm)
        keys = key_set.by_kid.get(kid)
        return _UNKNOWN_KID if keys is None else keys.get(algorithm)  # a kid of another key type: None

    def _start_fetch(self) -> concurrent.futures.Future[bool] | None:
        """The fetch in flight, else a new one unless the cooldown forbids it (then None)."""
        with self._lock:
            if self._fetch is not None and not self._fetch.done():
                return self._fetch
            now = time.monotonic()
            if now - self._last_attempt < self._cooldown:
                return None
            self._last_attempt = now
            self._fetch = _worker_pool().submit(self._fetch_key_set, now + self._timeout)
            return self._fetch

    def _fetch_key_set(self, deadline: float) -> bool:
        """In a worker thread: fetch, parse and install a key set; on any failure keep the last good one.

        Installing here, not in a waiting request, keeps the result even if every waiter was cancelled.
        """
        try:
            status, body = _http_exchange(self.url, None, {"accept": "application/json"}, deadline)
            if status != 200:
                raise OSError(f"HTTP status {status}")
            self.key_set = _key_set(self._jwt, json.loads(body), self._algorithms)
        except Exception as exc:  # RecursionError from a deeply nested document included
            logger.warning(_LOG_JWKS_FAILED, self.url, f"{type(exc).__name__}: {exc}")
            return False
        return True


def _identifiers(name: str, value: object) -> tuple[str, ...]:
    """A required issuer or audience: one string or several, none empty."""
    values = (value,) if isinstance(value, str) else _strings(name, value)
    if not values or not all(values):
        raise ValueError(f"{name} must be a non-empty string or a non-empty list of them")
    return tuple(_checked_text(name, v, header=False) for v in values)


def _pinned_algorithms(algorithms: object) -> tuple[str, ...]:
    """RFC 8725 section 3.1: the algorithms a provider accepts, fixed by its configuration, never ``none``."""
    pinned = _strings("algorithms", algorithms)
    if not pinned:
        raise ValueError("algorithms must name at least one algorithm, e.g. ('RS256',)")
    for algorithm in pinned:
        if algorithm.lower() == "none":
            raise ValueError("algorithm 'none' means an unsigned token and is never accepted (RFC 8725 3.1)")
        if algorithm not in _KEY_TYPES:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(_KEY_TYPES)}")
    symmetric = [a for a in pinned if a.startswith("HS")]
    if symmetric and len(symmetric) != len(pinned):  # RFC 8725 2.1: a public key must never be read as an HMAC secret
        raise ValueError("HMAC (HS*) algorithms cannot be mixed with public-key algorithms")
    return pinned


def _scopes(claims: Mapping[str, Any]) -> list[str] | None:
    """RFC 9068 section 2.2.3 ``scope`` (space-separated); else ``scp`` (Okta, Entra ID: list or string).

    Any other type is None, and the token is refused: a scope we cannot read must not pass as no scope.
    """
    for name in ("scope", "scp"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            return _scope_list(value)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return [s for s in value if _SCOPE_TOKEN.fullmatch(s)]
        return None
    return []


class JWTProvider(BearerAuthProvider):
    """Signed JWT access tokens from an OAuth authorization server, verified with PyJWT.

    Follows RFC 8725 (JWT best current practices): the accepted algorithms are
    pinned and ``none`` never is (section 3.1); each key verifies one key type only,
    so an RSA key never doubles as an HMAC secret (sections 2.1, 3.1); issuer and
    audience are always checked (sections 3.8, 3.9); headers that would choose
    their own key (``jku``, ``x5u``, ``jwk``, ``x5c``) are ignored, and any ``crit``
    header is refused (RFC 7515 section 4.1.11: we understand no extensions).
    Token types (sections 3.11, 3.12): with ``required_typ="at+jwt"`` only RFC 9068
    access tokens pass; an ID token is refused wherever it shows (a ``nonce`` claim).

    Keys come from ``key`` (a PEM public key, or an HMAC secret) or from ``jwks_url``
    (see ``_JWKSource``). A token from another issuer is None before any key lookup,
    so that one issuer's outage never becomes another's 503 in a :class:`ProviderChain`.
    """

    def __init__(
        self,
        *,
        issuer: str | Sequence[str],
        audience: str | Sequence[str],
        jwks_url: str | None = None,
        key: str | bytes | None = None,
        algorithms: Sequence[str] = ("RS256",),
        leeway: float = 30.0,
        required_claims: Sequence[str] = ("exp", "iss", "aud", "sub"),
        required_typ: str | None = None,
        jwks_cache_seconds: float = 3600.0,
        jwks_refresh_cooldown: float = 30.0,
        jwks_timeout: float = 5.0,
    ) -> None:
        self._issuer = _identifiers("issuer", issuer)
        self._audience = _identifiers("audience", audience)
        self._algorithms = _pinned_algorithms(algorithms)
        symmetric = self._algorithms[0].startswith("HS")
        if (jwks_url is None) == (key is None):
            raise ValueError("give exactly one of jwks_url= (the issuer's JWKS) and key= (a PEM public key or secret)")
        if symmetric and jwks_url is not None:
            raise ValueError("HMAC (HS*) needs a shared secret as key=; a JWKS publishes public keys only")
        self._leeway = _seconds("leeway", leeway, zero=True)
        required = list(_strings("required_claims", required_claims))
        # enforce_minimum_key_length: RFC 7518 3.2 and 3.3 (HMAC secrets, RSA keys of 2048 bits and more).
        self._options = {"require": required, "enforce_minimum_key_length": True}
        self._issuer_required = "iss" in required
        self._typ = _token_type(required_typ)
        cache_seconds = _seconds("jwks_cache_seconds", jwks_cache_seconds)
        cooldown = _seconds("jwks_refresh_cooldown", jwks_refresh_cooldown, zero=True)
        timeout = _seconds("jwks_timeout", jwks_timeout)
        url = None if jwks_url is None else _checked_endpoint("jwks_url", jwks_url)
        self._jwt: Any = _import_pyjwt(crypto=not symmetric)

        self._jwks: _JWKSource | None = None
        self._static_keys: dict[str, Any] = {}  # parsed once, here: no PEM parsing per request
        if url is not None:
            self._jwks = _JWKSource(
                self._jwt, url, self._algorithms, cache_seconds=cache_seconds, cooldown=cooldown, timeout=timeout
            )
        elif not isinstance(key, (str, bytes)):
            raise TypeError(f"key must be a PEM public key or an HMAC secret (str/bytes), not {type(key).__name__}")
        else:
            self._static_keys = {algorithm: self._prepared_key(algorithm, key) for algorithm in self._algorithms}
        # header segment -> (alg, kid), or None for a header we refuse: parsed once per distinct header.
        self._headers: dict[str, tuple[str, str | None] | None] = {}

    def _prepared_key(self, algorithm: str, key: str | bytes) -> Any:
        """The key object PyJWT verifies ``algorithm`` with; messages never quote the key."""
        implementation = self._jwt.get_algorithm_by_name(algorithm)
        if algorithm.startswith("HS") and _looks_like_a_public_key(key):
            raise ValueError("key looks like a public key (PEM, DER or a JWK), not an HMAC secret (RFC 8725 2.1)")
        try:
            prepared = implementation.prepare_key(key)
        except Exception:
            if algorithm.startswith("HS"):
                raise ValueError(
                    "key looks like a PEM/SSH public key or certificate, not an HMAC secret (RFC 8725 2.1)"
                ) from None
            raise ValueError(f"key is not a PEM public key usable with {algorithm}") from None
        if hasattr(prepared, "private_bytes"):
            raise ValueError("key is a private key; give the server the public key only")
        weakness = getattr(implementation, "check_key_length", lambda _: None)(prepared)
        if weakness:
            raise ValueError(f"key is too short for {algorithm} (RFC 7518 section 3)")
        return prepared

    def __repr__(self) -> str:  # never the key: it may be an HMAC secret
        source = f"jwks_url={self._jwks.url!r}" if self._jwks else "key=..."
        names = f"issuer={self._issuer!r}, audience={self._audience!r}"
        return f"JWTProvider({names}, {source}, algorithms={self._algorithms!r})"

    async def verify_token(self, token: str) -> AccessToken | None:
        header = self._header(token)
        if header is None:  # not a JWS we accept: no key lookup, no fetch (an API key in a chain never waits)
            return None
        algorithm, kid = header
        if self._jwks is None:
            key = self._static_keys.get(algorithm)
        else:
            key = self._jwks.cached_key(kid, algorithm)
            if key is _UNKNOWN_KID:
                if not self._from_our_issuer(token):  # another issuer's token never waits on our JWKS
                    return None
                key = await self._jwks.fetched_key(kid, algorithm)
        if key is None:
            return None
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except self._jwt.PyJWTError:
            return None
        scopes = _scopes(claims)
        expires = claims.get("exp")
        if expires is not None and not _is_number(expires):
            return None  # PyJWT reads "exp": "123" as a number; an RFC 7519 NumericDate is a JSON number
        if scopes is None or "nonce" in claims:  # OIDC Core 2: a nonce is an ID token's, never an access token's
            return None
        # exp + leeway: the middleware refuses at the same instant PyJWT would.
        return AccessToken(token, claims, scopes, None if expires is None else expires + self._leeway)

    def _header(self, token: str) -> tuple[str, str | None] | None:
        """The pinned algorithm and the key id of a compact JWS (RFC 7515 section 7.1), else None.

        Three non-empty base64url segments and nothing else: a token PyJWT would also read
        with stray characters dropped is refused, so one token has one spelling (and one cache
        entry). Headers repeat across an issuer's tokens, so each distinct one is read once.
        """
        if not token.isascii() or token.encode().translate(None, _BASE64URL) != b"..":
            return None
        if token[0] == "." or token[-1] == "." or ".." in token:
            return None
        segment = token[: token.index(".")]
        try:
            return self._headers[segment]
        except KeyError:
            pass
        header = self._read_header(segment)
        if len(self._headers) >= _MAX_HEADERS_KEPT:
            del self._headers[next(iter(self._headers))]
        self._headers[segment] = header
        return header

    def _read_header(self, segment: str) -> tuple[str, str | None] | None:
        header = _json_segment(segment)
        if not isinstance(header, dict) or "crit" in header:
            return None
        algorithm, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:  # the header never chooses
            return None
        if kid is not None and not isinstance(kid, str):
            return None
        if self._typ is not None and (
            not isinstance(typ, str) or typ.lower().removeprefix("application/") != self._typ
        ):
            return None  # RFC 9068 section 4 / RFC 8725 section 3.11: explicit typing, compared case-insensitively
        return algorithm, kid

    def _from_our_issuer(self, token: str) -> bool:
        """Whether the token's unverified ``iss`` is one we accept: read only before fetching keys for it."""
        claims = _json_segment(token.split(".")[1])
        issuer = claims.get("iss") if isinstance(claims, dict) else None
        if issuer is None:
            return not self._issuer_required and isinstance(claims, dict)
        return issuer in self._issuer


def _json_segment(segment: str) -> Any:
    """A base64url JSON segment of a JWS (the header, the claims), or None where it is not one."""
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        return None


def _token_type(required_typ: object) -> str | None:
    """The ``typ`` a JWTProvider requires, as compared: lower case, without ``application/`` (RFC 7515 4.1.9)."""
    if required_typ is None:
        return None
    typ = _checked_text("required_typ", required_typ, header=True).lower().removeprefix("application/")
    if not typ:
        raise ValueError("required_typ must name a media type, e.g. 'at+jwt' (RFC 9068), or be None")
    return typ


def _looks_like_a_public_key(key: str | bytes) -> bool:
    """A PEM block, a DER SEQUENCE filling the whole key, or a JWK (Set) in JSON: no HMAC secret (RFC 8725 2.1).

    PyJWT 2.13 refuses these too (CVE-2026-48526); a vendored copy may meet an older one.
    """
    data = key.encode() if isinstance(key, str) else key
    if b"-----BEGIN" in data or data.startswith((b"ssh-", b"ecdsa-")):
        return True
    if (
        isinstance(key, bytes) and len(data) > 2 and data[0] == 0x30
    ):  # ASN.1 SEQUENCE: its length field accounts for the rest exactly
        size = data[1]
        if size < 0x80:
            return 2 + size == len(data)
        width = size & 0x7F
        return 0 < width <= 4 and 2 + width + int.from_bytes(data[2 : 2 + width], "big") == len(data)
    with contextlib.suppress(ValueError, RecursionError):
        document = json.loads(data)
        return isinstance(document, dict) and ("kty" in document or "keys" in document)
    return False


_PYJWT_FLOOR = (2, 13)  # 2.8-2.9 refuse every issuer tuple; < 2.11 skip key lengths; < 2.13 CVE-2026-48526


def _import_pyjwt(*, crypto: bool) -> Any:
    """PyJWT, imported when a JWTProvider is built, never at module import; one too old is refused."""
    install = "pip install 'pyjwt[crypto]>=2.13'"
    try:
        jwt: Any = importlib.import_module("jwt")
    except ImportError:
        raise ImportError(f"JWTProvider needs PyJWT 2.13 or newer with its crypto extra: {install}") from None
    version = str(getattr(jwt, "__version__", "0"))
    found = tuple(int(part) if part.isdigit() else 0 for part in version.split(".")[:2])
    if found < _PYJWT_FLOOR:  # its documented checks silently do nothing on older releases
        raise ImportError(f"JWTProvider needs PyJWT 2.13 or newer, found {version}: {install}")
    if crypto and not jwt.algorithms.has_crypto:
        raise ImportError(f"JWTProvider needs PyJWT's crypto extra (the cryptography package): {install}")
    return jwt


# --- opaque tokens, caching, chains ---------------------------------------------


class IntrospectionProvider(BearerAuthProvider):
    """Opaque tokens, checked at the authorization server's introspection endpoint (RFC 7662).

    Each call POSTs the token with this server's client credentials (RFC 7662 section 2.1;
    RFC 6749 section 2.3.1). ``"active": true`` is an :class:`AccessToken` carrying the
    response as claims; ``"active": false``, or an ``aud`` without ``audience``, is None.
    No usable answer (network error, timeout, a status other than 200, a body that is not
    a JSON object or is over 1 MiB) raises :class:`ProviderUnavailable`: the token may be
    fine, so it is neither a 401 nor a pass. Wrap it in :class:`CachedProvider`.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        client_secret: str,
        audience: str | None = None,
        auth_method: str = "client_secret_basic",
        timeout: float = 5.0,
    ) -> None:
        self._url = _checked_endpoint("url", url)
        for name, value in (("client_id", client_id), ("client_secret", client_secret)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty str")  # never the value: it may be the secret
        if audience is not None and (not isinstance(audience, str) or not audience):
            raise TypeError("audience must be a non-empty str or None")
        self._audience = audience
        self._timeout = _seconds("timeout", timeout)
        self._headers = {"accept": "application/json", "content-type": "application/x-www-form-urlencoded"}
        self._credentials: dict[str, str] = {}  # the secret's only home; __repr__ leaves it out
        if auth_method == "client_secret_basic":  # RFC 6749 2.3.1: each part form-encoded, then Basic
            pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode()
            self._headers["authorization"] = "Basic " + base64.b64encode(pair).decode()
        elif auth_method == "client_secret_post":
            self._credentials = {"client_id": client_id, "client_secret": client_secret}
        else:
            raise ValueError(f"auth_method must be 'client_secret_basic' or 'client_secret_post', not {auth_method!r}")
        self._client_id = client_id

    def __repr__(self) -> str:  # never the secret
        return f"IntrospectionProvider({self._url!r}, client_id={self._client_id!r}, audience={self._audience!r})"

    async def verify_token(self, token: str) -> AccessToken | None:
        form = urlencode({"token": token, "token_type_hint": "access_token", **self._credentials}).encode()
        try:
            status, body = await _http_call(self._url, body=form, headers=self._headers, timeout=self._timeout)
        except OSError as exc:  # its message names the failure, never the form or the headers
            raise ProviderUnavailable(f"introspection endpoint unreachable: {exc}") from None
        if status != 200:
            raise ProviderUnavailable(f"introspection endpoint answered HTTP {status}")
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError included; RecursionError: deeply nested JSON
            answer = None
        scope, expires = (answer.get("scope", ""), answer.get("exp")) if isinstance(answer, dict) else (None, None)
        if not isinstance(scope, str) or not (expires is None or _is_number(expires)):
            raise ProviderUnavailable("introspection endpoint answered something other than an RFC 7662 response")
        assert isinstance(answer, dict)
        if answer.get("active") is not True:  # RFC 7662 2.2: only the JSON literal true is active
            return None
        if _is_refresh_token(answer):  # RFC 8725 3.12 in spirit: a refresh token is no access token
            return None
        if self._audience is not None:
            audience = answer.get("aud")
            if not (audience == self._audience or (isinstance(audience, list) and self._audience in audience)):
                return None  # RFC 7662 section 4: a token issued for another resource server
        return AccessToken(token, answer, _scope_list(scope), None if expires is None else float(expires))


def _is_refresh_token(answer: Mapping[str, Any]) -> bool:
    """Whether an introspection answer says it describes a refresh token. Servers say it in different words:
    ``token_type`` (RFC 7662 2.2; "refresh_token" in Authlib and Spring), ``token_use`` (ORY Hydra),
    ``typ`` (Keycloak: "Refresh")."""
    for name in ("token_type", "token_use", "typ"):
        value = answer.get(name)
        if isinstance(value, str) and "refresh" in value.lower():
            return True
    return False


class _Verdict(NamedTuple):
    """A kept "yes": claims (as a copier), scopes, expiry; never the token."""

    claims: _Claims
    scopes: tuple[str, ...]
    expires_at: float | None
    source: str | None


class CachedProvider(BearerAuthProvider):
    """Remembers another provider's verdicts, so that a token service is asked once per token per ``ttl``.

    - Never past the token's own ``expires_at``; a token already expired is not kept.
    - ``negative_ttl > 0`` also remembers "no" that long (a bad token hammering the service), in a
      table of its own, bounded by ``max_negative_entries`` (default a tenth of ``max_entries``), so
      that a flood of made-up tokens never pushes out the verdicts of real ones.
    - Keyed by the token's SHA-256 digest; entries hold claims, never the token, and each
      request gets its own :class:`AccessToken` and its own copy of the claims.
    - Concurrent first requests for one token share one call (single flight), and its answer:
      a verdict, or the exception (a verdict that cannot be kept is one) the first caller got.
    - Exceptions (:class:`ProviderUnavailable` included: "cannot tell yet") are never kept.
    - At most ``max_entries``, oldest first. ``invalidate(token)`` forgets one (revocation), ``clear()`` all.
    """

    def __init__(
        self,
        provider: BearerAuthProvider,
        *,
        ttl: float = 300.0,
        negative_ttl: float = 0.0,
        max_entries: int = 10_000,
        max_negative_entries: int | None = None,
    ) -> None:
        self._verify = _verifier("provider", provider)
        self._ttl = _seconds("ttl", ttl)
        self._negative_ttl = _seconds("negative_ttl", negative_ttl, zero=True)
        self._max_entries = _positive_int("max_entries", max_entries)
        self._max_refused = (
            max(1, self._max_entries // 10)
            if max_negative_entries is None
            else _positive_int("max_negative_entries", max_negative_entries)
        )
        self._entries: dict[bytes, tuple[float, _Verdict]] = {}  # digest -> (monotonic deadline, "yes")
        self._refused: dict[bytes, float] = {}  # digest -> monotonic deadline of a kept "no"
        self._flights: dict[bytes, concurrent.futures.Future[AccessToken | None]] = {}
        self._generation = 0  # bumped by invalidate/clear: a verdict begun before them is not kept

    def __repr__(self) -> str:
        entries = len(self._entries) + len(self._refused)
        return f"CachedProvider({entries} entries, ttl={self._ttl}, negative_ttl={self._negative_ttl})"

    async def verify_token(self, token: str) -> AccessToken | None:
        key = _digest(token)
        entry = self._entries.get(key)
        if entry is not None:
            deadline, (claims, scopes, expires_at, source) = entry
            if time.monotonic() < deadline:
                return AccessToken(token, claims.copy(), list(scopes), expires_at, source)
            del self._entries[key]
        if self._refused:
            refused_until = self._refused.get(key)
            if refused_until is not None:
                if time.monotonic() < refused_until:
                    return None
                del self._refused[key]
        return await self._ask(key, token)

    async def _ask(self, key: bytes, token: str) -> AccessToken | None:
        """The wrapped provider's verdict, one call for all concurrent requests with this token."""
        while (flight := self._flights.get(key)) is not None:
            with contextlib.suppress(concurrent.futures.CancelledError):  # its caller went away: ask ourselves
                return _own_access(token, await _result(flight))
        flight = self._flights[key] = concurrent.futures.Future()
        generation = self._generation
        try:
            access = await self._verify(token)
            if generation == self._generation:
                self._keep(key, access)
            shared = _own_access(token, access)  # a snapshot: this request's app may change its own
        except Exception as exc:  # shared with the requests waiting on this flight, never kept
            flight.set_exception(exc)
            raise
        except BaseException:  # this caller was cancelled: the waiters ask for themselves
            flight.cancel()
            raise
        finally:
            del self._flights[key]
        flight.set_result(shared)
        return access

    def _keep(self, key: bytes, access: AccessToken | None) -> None:
        now = time.monotonic()
        if access is None:
            if self._negative_ttl > 0:
                self._refused[key] = now + self._negative_ttl
                if len(self._refused) > self._max_refused:
                    del self._refused[next(iter(self._refused))]
            return
        if not isinstance(access, AccessToken):
            return  # not a verdict: the middleware answers it with 500
        ttl = self._ttl
        if access.expires_at is not None:  # never past the token's own expiry; NaN counts as expired
            left = access.expires_at - time.time()
            ttl = min(ttl, left) if left > 0 else 0
        verdict = _Verdict(_Claims(access.claims), tuple(access.scopes), access.expires_at, access.source)
        if ttl > 0:
            self._entries[key] = (now + ttl, verdict)
            if len(self._entries) > self._max_entries:
                del self._entries[next(iter(self._entries))]

    def invalidate(self, token: str) -> None:
        """Forget one token's verdict (say, it was revoked); a verdict being fetched now is not kept either."""
        key = _digest(token)
        self._entries.pop(key, None)
        self._refused.pop(key, None)
        self._generation += 1

    def clear(self) -> None:
        self._entries.clear()
        self._refused.clear()
        self._generation += 1


def _own_access(token: str, shared: AccessToken | None) -> AccessToken | None:
    """Another request's verdict, for this request: its own AccessToken and claims."""
    if not isinstance(shared, AccessToken):
        return shared  # None, or a wrong type the middleware answers with 500
    return AccessToken(token, _copied(shared.claims), list(shared.scopes), shared.expires_at, shared.source)


class ProviderChain(BearerAuthProvider):
    """Several token sources in order (API keys, then JWTs, ...): the first :class:`AccessToken` wins.

    ``None`` moves on to the next provider. An exception stops the chain and reaches the
    middleware (500, or 503 for :class:`ProviderUnavailable`): a broken provider is never
    silently skipped. An answer whose claims name no issuer (no ``iss``, no ``source``) is
    marked with its provider's position, so two providers' subjects never pass for each other.
    """

    def __init__(self, *providers: BearerAuthProvider) -> None:
        if not providers:
            raise ValueError("ProviderChain needs at least one provider")
        self._verifiers = [_verifier(f"provider #{n}", p) for n, p in enumerate(providers, 1)]

    async def verify_token(self, token: str) -> AccessToken | None:
        for position, verify in enumerate(self._verifiers, 1):
            access = await verify(token)
            if access is not None:
                if isinstance(access, AccessToken) and access.source is None and _claimed_issuer(access) is None:
                    access.source = f"{_UNNAMED_SOURCE}#{position}"
                return access
        return None


# --- context helpers ----------------------------------------------------------

_current_token: contextvars.ContextVar[AccessToken | None] = contextvars.ContextVar(
    "mcp_bearer_access_token", default=None
)
_current_hierarchy: contextvars.ContextVar[_ScopeHierarchy | None] = contextvars.ContextVar(
    "mcp_bearer_scope_implies", default=None
)
_HIERARCHY_KEY = "mcp_bearer.scope_implies"  # where scope["state"] carries it, for mcp 1.x sessions


class _ScopeHierarchy:
    """Which scopes each scope implies, transitively; cycles are harmless.

    MCP 2026-07-28, Authorization: "Servers MUST account for scope hierarchies, where a broader
    scope implies narrower ones, when deciding whether a token is sufficient for an operation."
    """

    def __init__(self, implies: object = None) -> None:
        self._closure: dict[str, frozenset[str]] = {}
        if implies is None:
            return
        if not isinstance(implies, Mapping):
            raise TypeError(f"scope_implies must be a mapping of scope -> implied scopes, not {type(implies).__name__}")
        edges = {broad: _scope_tokens(f"scope_implies[{broad!r}]", narrow) for broad, narrow in implies.items()}
        _scope_tokens("scope_implies", list(edges))
        for broad in edges:
            reached, stack = {broad}, [broad]
            while stack:
                for narrow in edges.get(stack.pop(), ()):
                    if narrow not in reached:
                        reached.add(narrow)
                        stack.append(narrow)
            self._closure[broad] = frozenset(reached)

    def effective(self, granted: object) -> frozenset[str]:
        """The scopes a grant amounts to; a grant that is not a list of strings amounts to none."""
        if isinstance(granted, str) or not isinstance(granted, (list, tuple, set, frozenset)):
            return frozenset()
        scopes: set[str] = set()
        for scope in granted:
            if isinstance(scope, str):
                scopes.update(self._closure.get(scope, (scope,)))
        return frozenset(scopes)


_NO_HIERARCHY = _ScopeHierarchy()


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


def _claimed_issuer(access: AccessToken) -> str | None:
    issuer = access.claims.get("iss") if isinstance(access.claims, Mapping) else None
    return issuer if isinstance(issuer, str) and issuer else None


def principal_key(access: AccessToken | None = None) -> str | None:
    """Who is calling, as a stable string: for handles a tool mints and must later give back to the same caller.

    The principal is (issuer, subject): RFC 7519 section 4.1.2 makes ``sub`` unique only within
    its issuer (OIDC Core 5.7). The issuer is the token's source where it has one (API keys are
    ``mcp_bearer:api-key``, never an IdP's), else its ``iss``. Keys of one user that share both
    give the same key (rotation). A token without ``sub`` is its own principal, named by a keyed
    digest that holds only within this process. Defaults to the current request's token;
    None outside a request.
    """
    access = get_access_token() if access is None else access
    return None if access is None else _principal(access)


def _principal(access: AccessToken) -> str:
    subject = access.claims.get("sub") if isinstance(access.claims, Mapping) else None
    if not isinstance(subject, str) or not subject:
        return json.dumps(["mcp_bearer:token", _keyed_digest(access.token)])
    issuer = access.source or _claimed_issuer(access) or _UNNAMED_SOURCE
    return json.dumps([issuer, subject])


def require_auth() -> AccessToken:
    """The current request's token; raises :class:`AuthenticationError` when there is none."""
    token = get_access_token()
    if token is None:
        raise AuthenticationError("Authentication required")
    return token


def require_scopes(*scopes: str) -> AccessToken:
    """The current request's token if it holds every scope, or one that implies it (``scope_implies``);
    else :class:`InsufficientScopeError`."""
    token = require_auth()
    scope = _mcp_request_scope()
    state = scope.get("state") if scope is not None else None
    hierarchy = state.get(_HIERARCHY_KEY) if isinstance(state, Mapping) else _current_hierarchy.get()
    granted = (hierarchy or _NO_HIERARCHY).effective(token.scopes)
    missing = [s for s in scopes if s not in granted]
    if missing:
        raise InsufficientScopeError(missing)
    return token


# --- the middleware -----------------------------------------------------------


class _Response(NamedTuple):
    """A ready-made answer, built once at construction (as Starlette's CORSMiddleware builds its preflight).

    ``error`` is a refusal's code (RFC 6750 section 3.1, or one of ours); None for other answers.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    error: str | None = None


def _json_response(status: int, body: Mapping[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> _Response:
    """The one way every response of this module is built."""
    payload = json.dumps(body).encode()
    length = (b"content-length", str(len(payload)).encode())
    return _Response(status, ((b"content-type", b"application/json"), length, *headers), payload, body.get("error"))


class _Refusals:
    """Every refusal of one middleware, each with its RFC 6750 section 3 challenge, built once.

    Each status means one thing: 400 a request we cannot read, 401 no valid token, 403 a token
    (or an Origin) that may not do this, 404 a session that is not yours, 413 a body over the
    bound, 429 too many refused tokens, 500 our side failed, 503 the token cannot be checked now.
    """

    def __init__(self, *, realm: str | None, scopes: Sequence[str], metadata_url: str | None) -> None:
        self._realm = realm
        self._scopes = tuple(scopes)
        self._metadata_url = metadata_url
        self.unauthorized = self._refusal(401, "unauthorized", "Authentication required")
        self.invalid_token = self._refusal(401, "invalid_token", "Token is invalid or expired")
        self.malformed = self._refusal(400, "invalid_request", "Malformed Authorization header")
        self.insufficient_scope = self._refusal(403, "insufficient_scope", "Insufficient scope")
        self.server_error = self._refusal(500, "server_error", "Authentication failed unexpectedly", challenge=False)
        # Not 401 (the token may be fine) nor 500 (nothing is broken here): ask the client to retry (RFC 9110 15.6.4).
        self.unavailable = self._refusal(
            503, "temporarily_unavailable", "Token verification is temporarily unavailable", challenge=False
        )
        # MCP Streamable HTTP: 404 for a session id is how a client learns to start a new session.
        self.session_not_found = self._refusal(404, "session_not_found", "Session not found", challenge=False)
        # MCP transports: "If the Origin header is present and invalid, servers MUST respond with 403".
        self.forbidden_origin = self._refusal(403, "invalid_origin", "Origin not allowed", challenge=False)
        self.unreadable = self._refusal(
            400, "invalid_request", "Request body is not a JSON-RPC message this server can read", challenge=False
        )
        self.too_large = self._refusal(413, "request_too_large", "Request body is too large", challenge=False)
        self._insufficient: dict[tuple[str, ...], _Response] = {self._scopes: self.insufficient_scope}

    def _refusal(
        self, status: int, error: str, description: str, *, challenge: bool = True, scopes: Sequence[str] = ()
    ) -> _Response:
        scope_text = " ".join(scopes or self._scopes)
        body = {"error": error, "error_description": description}
        if error == "insufficient_scope":
            body["scope"] = scope_text
        if not challenge:
            return _json_response(status, body)
        # RFC 6750 section 3.1: a request without credentials gets no error code.
        code = None if status == 401 and error == "unauthorized" else error
        params = [
            ("realm", self._realm),
            ("error", code),
            ("scope", scope_text or None),  # MCP 2025-11-25: tell the client which scopes to ask for
            ("error_description", code and description),
            ("resource_metadata", self._metadata_url),
        ]
        value = ", ".join(f"{name}={_quote(v)}" for name, v in params if v)
        return _json_response(status, body, ((b"www-authenticate", f"Bearer {value}".rstrip().encode()),))

    def insufficient_for(self, scopes: tuple[str, ...]) -> _Response:
        """403 naming every scope an operation needs in one challenge (MCP 2026-07-28, Scope Challenge
        Handling), so that a client steps up once; built once per distinct set, in a bounded table."""
        refusal = self._insufficient.get(scopes)
        if refusal is None:
            refusal = self._refusal(403, "insufficient_scope", "Insufficient scope for this operation", scopes=scopes)
            if len(self._insufficient) < _MAX_NEEDS_KEPT:
                self._insufficient[scopes] = refusal
        return refusal

    def unavailable_for(self, seconds: int) -> _Response:
        status, headers, body, error = self.unavailable
        return _Response(status, (*headers, (b"retry-after", b"%d" % seconds)), body, error)


def _retry_after(seconds: object) -> int:
    """RFC 9110 section 10.2.3 delay-seconds: whole seconds, rounded up, within [1, 3600] whatever a provider said."""
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 5
    if not value >= 1:  # also NaN
        return 1
    return math.ceil(min(value, 3600.0))


def _is_preflight(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A CORS preflight (Fetch standard): OPTIONS with Origin and Access-Control-Request-Method.

    Browsers never send credentials on a preflight, so it cannot be authenticated.
    """
    names = {name.lower() for name, _ in headers}
    return b"origin" in names and b"access-control-request-method" in names


class _SessionOwners:
    """Which principal owns each MCP session. A session never stands in for authentication (MCP spec).

    - Streamable HTTP: the ``Mcp-Session-Id`` the app returns to a POST belongs to that POST's
      principal. A request naming a session (one header, exactly) must come from its owner;
      the binding ends with a DELETE the app accepts, or when the app answers 404 for it.
    - Legacy HTTP+SSE: the session named by the first (``endpoint``) event of a GET stream
      belongs to the principal that opened the stream. It is bound before that event reaches
      the client, so the owner's first POST finds it, and ends with the stream. A POST to the
      messages path the event names must name, in its query, a session its principal owns.

    One table for both, bounded: the oldest binding is forgotten first (its owner re-initializes).
    Streamable HTTP ids are header bytes, legacy SSE ids canonical hex str.
    """

    def __init__(self, max_sessions: int, not_found: _Response) -> None:
        self.owners: dict[bytes | str, str] = {}
        self._max_sessions = max_sessions
        self._not_found = not_found
        self._message_paths: set[str] = set()  # where the app takes legacy SSE posts, learned from its events

    def admit(
        self, scope: Scope, send: Send, access: AccessToken, session_id: bytes | None
    ) -> tuple[_Response | None, Send, Callable[[], None] | None]:
        """A refusal, or the ``send`` that watches the response, and what to do once the app is done."""
        if scope["type"] != "http":
            return None, send, None
        method = scope.get("method")
        if self._message_paths and self._names_anothers_stream(scope, access):
            return self._not_found, send, None
        if session_id is not None:
            if self.owners.get(session_id) != _principal(access):
                return self._not_found, send, None
            return None, self._ending_send(send, session_id, method == "DELETE"), None
        if method == "POST":  # only an initialize POST creates a session
            return None, self._binding_send(send, access), None
        if method == "GET":  # a GET may open a legacy SSE stream, whose first event names its session
            stream: list[str] = []
            watching = self._stream_send(send, _principal(access), scope.get("root_path", ""), stream)
            return None, watching, lambda: self._end(stream)
        return None, send, None

    def _names_anothers_stream(self, scope: Scope, access: AccessToken) -> bool:
        """Whether a request reaches, or may reach, a legacy SSE session its principal does not own.

        Judged wherever the request is sent, not only on the messages path: servers differ in
        whether ``path`` carries ``root_path`` (uvicorn does; hypercorn, granian and prefix-stripping
        proxies do not), and Starlette routes both spellings to the SDK. Each ``session_id`` is
        read as the SDK reads it. On a messages path a request must name exactly one session, its
        own; elsewhere, naming a session someone else owns is enough to be refused.
        """
        keys = _sse_session_keys(scope.get("query_string", b""))
        on_messages_path = _under(_relative_path(scope), self._message_paths)
        if not keys:
            return False  # no session named: the SDK itself answers 400
        principal = _principal(access)
        if on_messages_path and (len(keys) != 1 or self.owners.get(keys[0]) != principal):
            return True
        return any(self.owners.get(key, principal) != principal for key in keys)

    def _binding_send(self, send: Send, access: AccessToken) -> Send:
        """Watch a response that may create a session, and bind the session to its creator."""

        async def binding_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", ()):
                    if len(name) == 14 and name.lower() == b"mcp-session-id" and value:
                        self._bind(value, _principal(access))
            await send(message)

        return binding_send

    def _ending_send(self, send: Send, session_id: bytes, deleting: bool) -> Send:
        """Watch a response on a session, and forget the session once the app has ended it."""
        owners = self.owners

        async def ending_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 404 or (deleting and 200 <= status < 300):
                    owners.pop(session_id, None)
            await send(message)

        return ending_send

    def _stream_send(self, send: Send, principal: str, root_path: str, stream: list[str]) -> Send:
        """Watch a GET's response for a legacy SSE stream, and bind the session its first event names."""
        watching = False
        seen = b""

        async def stream_send(message: Message) -> None:
            nonlocal watching, seen
            if message["type"] == "http.response.start":
                watching = message["status"] == 200 and any(
                    name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in message.get("headers", ())
                )
            elif watching and message["type"] == "http.response.body":
                seen += message.get("body", b"")
                endpoint = _sse_endpoint(seen)
                if endpoint is not None or len(seen) > _MAX_SSE_PREAMBLE:
                    watching, seen = False, b""
                if endpoint:
                    self._bind_endpoint(endpoint, principal, root_path, stream)
            await send(message)

        return stream_send

    def _bind_endpoint(self, endpoint: str, principal: str, root_path: str, stream: list[str]) -> None:
        parts = urlsplit(endpoint)
        keys = _sse_session_keys(parts.query.encode("latin-1", "replace"))
        if len(keys) == 1 and keys[0]:
            key = keys[0]
            path = _without_root(unquote(parts.path), root_path)  # the SDK puts root_path in front
            if path not in self._message_paths:
                # Too many distinct ones (a mount with a path parameter?): guard session_id on every path.
                full = len(self._message_paths) >= _MAX_MESSAGE_PATHS
                self._message_paths = {"/"} if full else {*self._message_paths, path}
            self._bind(key, principal)
            stream.append(key)

    def _end(self, stream: list[str]) -> None:
        """The stream has ended, and the SDK forgets its session with it."""
        for key in stream:
            self.owners.pop(key, None)

    def _bind(self, session: bytes | str, principal: str) -> None:
        self.owners[session] = principal
        if len(self.owners) > self._max_sessions:  # oldest first; its owner re-initializes
            del self.owners[next(iter(self.owners))]


def _under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether a request path is routed to one of these mounts (Starlette also redirects ``/messages``)."""
    return any(path.startswith(prefix) or path + "/" == prefix for prefix in prefixes)


def _sse_session_keys(query_string: bytes) -> list[str]:
    """The legacy SSE sessions a query string names, canonical; "" for a value the SDK could not route.

    Read as the SDK reads it (Starlette's query parsing, then ``UUID(hex=...)``), so every spelling it
    would route (upper case, ``{id}``, ``urn:uuid:id``, ``session%5Fid=``) names the same session.
    """
    keys = []
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name == "session_id":
            try:
                keys.append(uuid.UUID(hex=value).hex)
            except ValueError:
                keys.append("")
    return keys


def _without_root(path: str, root_path: str) -> str:
    """A path relative to the app's mount point: ``root_path`` taken off where the server left it on."""
    return path[len(root_path) :] if root_path and path.startswith(root_path) else path


def _relative_path(scope: Scope) -> str:
    return _without_root(scope["path"], scope.get("root_path", ""))


def _sse_endpoint(stream: bytes) -> str | None:
    """The data of the ``endpoint`` event among the complete events at the start of an SSE stream."""
    text = stream.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    for event in text.split("\n\n")[:-1]:
        fields = dict(line.partition(":")[::2] for line in event.split("\n") if not line.startswith(":"))
        if fields.get("event", "").strip() == "endpoint":
            return fields.get("data", "").removeprefix(" ")
    return None


def _excluded_paths(paths: object) -> tuple[str, ...]:
    excluded = _strings("exclude_paths", paths)
    for path in excluded:
        if not path.startswith("/"):
            raise ValueError(f"exclude_paths entries must start with '/': {path!r}")
    return excluded


def _checked_url(name: str, value: object) -> str:
    url = _checked_text(name, value, header=True)
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{name} must be an absolute http(s) URL without query or fragment: {url!r}")
    return url


def _resource_metadata(
    resource: str, servers: object, advertised: Sequence[str], resource_name: object
) -> tuple[str, frozenset[str], _Response]:
    """RFC 9728: the metadata URL for challenges (section 5.1), the paths it is served at, and the document.

    Section 3.1: the well-known suffix goes between host and path of the resource identifier.
    """
    parts = urlsplit(_checked_url("resource", resource))
    suffix = "" if parts.path in ("", "/") else parts.path
    metadata_url = f"{parts.scheme}://{parts.netloc}{PROTECTED_RESOURCE_METADATA_PATH}{suffix}"
    paths = frozenset({PROTECTED_RESOURCE_METADATA_PATH, PROTECTED_RESOURCE_METADATA_PATH + suffix})
    servers = [_checked_url("authorization_servers", url) for url in _strings("authorization_servers", servers)]
    document: dict[str, Any] = {
        "resource": resource,
        "authorization_servers": servers,
        "bearer_methods_supported": ["header"],  # RFC 6750 section 2.1 only: no query, no body
    }
    if advertised:
        document["scopes_supported"] = list(advertised)
    if resource_name is not None:
        document["resource_name"] = _checked_text("resource_name", resource_name, header=False)
    return metadata_url, paths, _json_response(200, document, ((b"cache-control", b"public, max-age=3600"),))


# --- per-operation authorization: what a request asks the app to do, and what that needs ----

DEFAULT_MAX_BODY_SIZE = 4 * 1024 * 1024  # as the MCP SDK's own bound on a posted message
_MAX_NEEDS_KEPT = 1024  # distinct (method, name) pairs, and distinct 403 challenges, remembered
# MCP 2026-07-28 Streamable HTTP, Standard Headers: the params member mirrored in Mcp-Name.
# Subscriptions name a resource too, so a rule for a URI pattern can cover them.
_NAMED_BY = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}
_BASE64_SENTINEL = re.compile(r"=\?base64\?(.*)\?=", re.DOTALL)
_ROUTING_HEADERS = (b"mcp-method", b"mcp-name", b"content-length")
_ROUTING_NAME_SIZES = frozenset(len(name) for name in _ROUTING_HEADERS)
_LOG_OPERATION_SCOPES_FAILED = "operation_scopes failed for %r; request refused with 500\n%s"


class _Unreadable(Exception):
    """A request body, or its routing headers, that we cannot read with certainty: refused, never guessed at."""


def _operation_rules(rules: Mapping[Any, Any]) -> dict[str, list[tuple[re.Pattern[str] | None, tuple[str, ...]]]]:
    """``operation_scopes`` as a mapping, compiled once: method -> [(name pattern or None for any, scopes)]."""
    compiled: dict[str, list[tuple[re.Pattern[str] | None, tuple[str, ...]]]] = {}
    for pattern, scopes in rules.items():
        text = _checked_text("operation_scopes", pattern, header=False)
        method, space, name = text.partition(" ")
        if not method or (space and not name):
            raise ValueError(
                f'operation_scopes key {text!r} must be "METHOD" or "METHOD NAME-PATTERN", e.g. "tools/call delete_*"'
            )
        regex = re.compile(fnmatch.translate(name)) if name else None  # fnmatch.fnmatchcase, compiled
        compiled.setdefault(method, []).append((regex, _scope_tokens(f"operation_scopes[{text!r}]", scopes)))
    return compiled


class _OperationGuard:
    """The scopes each MCP operation needs, checked before the app runs (``operation_scopes``).

    The operation is read from what the app will act on, the JSON-RPC body: every element of a
    batch counts, and it is parsed as ``json.loads`` parses it, which accepts all the SDK's
    parsers accept and reads it the same way (a duplicated key: the last one). A 2026-07-28 client
    also names the operation in ``Mcp-Method`` and ``Mcp-Name``; those must agree with the body.
    What cannot be read with certainty is refused (400), a body over ``max_body_size`` too (413),
    and the app then gets the body as it came, message by message. Requests other than POST carry
    no operation and need ``required_scopes`` only.
    """

    def __init__(
        self,
        rules: object,
        *,
        required: tuple[str, ...],
        hierarchy: _ScopeHierarchy,
        max_body_size: int,
        refusals: _Refusals,
    ) -> None:
        self._required = required
        self._hierarchy = hierarchy
        self._max_body_size = max_body_size
        self._refusals = refusals
        self._decide: Callable[[Operation], Iterable[str]] | None = None
        self._rules: dict[str, list[tuple[re.Pattern[str] | None, tuple[str, ...]]]] = {}
        if isinstance(rules, Mapping):
            self._rules = _operation_rules(rules)
        elif callable(rules):
            self._decide = rules
        else:
            raise TypeError(
                "operation_scopes must be a mapping of operation pattern -> scopes, or a callable "
                f"(operation) -> scopes, not {type(rules).__name__}"
            )
        self._needs: dict[tuple[str, str | None], tuple[str, ...]] = {}

    async def admit(self, scope: Scope, receive: Receive, access: AccessToken) -> tuple[_Response | None, Receive]:
        """A refusal, or the ``receive`` that hands the app the body this read."""
        granted = self._hierarchy.effective(access.scopes)
        if scope["type"] != "http" or scope.get("method") != "POST":
            return self._verdict(self._required, granted), receive
        routing = _routing_headers(scope["headers"])
        read = await self._body(receive, routing[2])
        if isinstance(read, _Response):
            return read, receive
        messages, body = read
        try:
            operations = _operations(body, routing[0], routing[1])
        except _Unreadable:
            return self._refusals.unreadable, receive
        try:
            needed = self._needed(operations)
        except Exception as exc:  # a rule of the user's that fails is no reason to let the request through
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            logger.error(_LOG_OPERATION_SCOPES_FAILED, [operation.method for operation in operations], text)
            return self._refusals.server_error, receive
        return self._verdict(needed, granted), _replaying(messages, receive)

    def _verdict(self, needed: tuple[str, ...], granted: frozenset[str]) -> _Response | None:
        if all(scope in granted for scope in needed):
            return None
        return self._refusals.insufficient_for(needed)

    async def _body(self, receive: Receive, declared: int | None) -> tuple[list[Message], bytes] | _Response:
        """The whole body, bounded, and the messages it came in; the client leaving is a body we cannot read."""
        if declared is not None and declared > self._max_body_size:
            return self._refusals.too_large
        messages: list[Message] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return self._refusals.unreadable  # http.disconnect: nobody is left to serve
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_size:
                return self._refusals.too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return messages, b"".join(chunks)

    def _needed(self, operations: list[Operation]) -> tuple[str, ...]:
        """``required_scopes`` and every scope any of the operations needs, in a stable order."""
        needed = dict.fromkeys(self._required)
        for operation in operations:
            if self._decide is not None:
                needed.update(dict.fromkeys(_scope_tokens("operation_scopes()", self._decide(operation))))
            else:
                needed.update(dict.fromkeys(self._by_rule(operation.method, operation.name)))
        return tuple(needed)

    def _by_rule(self, method: str, name: str | None) -> tuple[str, ...]:
        """The union of the scopes of every pattern that matches, remembered per (method, name)."""
        needs = self._needs.get((method, name))
        if needs is None:
            scopes: dict[str, None] = {}
            for regex, rule_scopes in self._rules.get(method, ()):
                if regex is None or (name is not None and regex.match(name)):
                    scopes.update(dict.fromkeys(rule_scopes))
            needs = tuple(scopes)
            if len(self._needs) >= _MAX_NEEDS_KEPT:  # names are the client's: bounded, oldest forgotten
                del self._needs[next(iter(self._needs))]
            self._needs[(method, name)] = needs
        return needs


def _routing_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, str | None, int | None]:
    """``Mcp-Method``, ``Mcp-Name`` (decoded) and the declared ``Content-Length`` of a POST.

    A routing header sent twice, or an ``Mcp-Name`` sentinel the SDK's decoder would refuse, comes
    back as ``_UNREADABLE_HEADER``, which ``_operations`` refuses: first-copy and last-copy readers
    would disagree.
    """
    found: dict[bytes, bytes | None] = {}
    for name, value in headers:
        if len(name) in _ROUTING_NAME_SIZES:
            name = name.lower()
            if name in _ROUTING_HEADERS:
                found[name] = None if name in found else value  # None: present twice
    method, label, length = (found.get(name, b"") for name in _ROUTING_HEADERS)
    declared = int(length) if length and length.isdigit() else None  # else the body is counted as it comes
    return _routing_text(method), _header_name(label), declared


_UNREADABLE_HEADER = "\x00unreadable"  # no JSON-RPC method or name can equal it: a NUL never survives a header


def _routing_text(value: bytes | None) -> str | None:
    if value is None:
        return _UNREADABLE_HEADER
    return value.decode("latin-1") if value else None


def _header_name(value: bytes | None) -> str | None:
    """``Mcp-Name`` as the SDK decodes it: verbatim, or the ``=?base64?...?=`` sentinel's canonical UTF-8."""
    text = _routing_text(value)
    match = _BASE64_SENTINEL.fullmatch(text) if text and text != _UNREADABLE_HEADER else None
    if match is None:
        return text
    try:
        decoded = base64.b64decode(match[1], validate=True)
        if base64.b64encode(decoded).decode("ascii") != match[1]:
            return _UNREADABLE_HEADER
        return decoded.decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return _UNREADABLE_HEADER


def _operations(body: bytes, method_header: str | None, name_header: str | None) -> list[Operation]:
    """Every operation a JSON-RPC body asks for; raises _Unreadable for anything we cannot read with certainty."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise _Unreadable from None
    elements = document if isinstance(document, list) else [document]
    operations = [operation for element in elements if (operation := _operation(element)) is not None]
    if not elements or method_header == _UNREADABLE_HEADER or name_header == _UNREADABLE_HEADER:
        raise _Unreadable
    if method_header is not None:  # MCP 2026-07-28: one request, named in the headers as in the body
        if len(elements) != 1 or len(operations) != 1 or operations[0].method != method_header:
            raise _Unreadable
        if name_header is not None and operations[0].method in _NAMED_BY and operations[0].name != name_header:
            raise _Unreadable
    return operations


def _operation(element: object) -> Operation | None:
    """One JSON-RPC message's operation; None for a response (it answers the server, and asks nothing)."""
    if not isinstance(element, dict):
        raise _Unreadable
    method = element.get("method")
    if method is None and ("result" in element or "error" in element):
        return None
    params = element.get("params", {})
    if not isinstance(method, str) or not isinstance(params, dict):
        raise _Unreadable
    name = None
    if method in _NAMED_BY:
        name = params.get(_NAMED_BY[method])
        if not isinstance(name, str):  # the SDK refuses it too; we never judge by a guess
            raise _Unreadable
    return Operation(method, name, params)


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """The app's ``receive``: the body messages already read, as they came, then the server's own."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


# --- the caller, as the MCP SDK reads it --------------------------------------------


class _SDKCaller:
    """Hands the MCP SDK the caller where it looks: ``scope["user"]`` and its auth context variable.

    Behind this middleware the SDK otherwise sees nobody, and its own protections (stateful
    session owners, the principal a 2026-07-28 ``requestState`` is sealed to) are off. Its
    AccessToken (a pydantic model) is built only when something reads it; its ``token`` is a
    keyed digest, not the token, since its repr would show it.
    """

    def __init__(self) -> None:
        bearer_auth = importlib.import_module("mcp.server.auth.middleware.bearer_auth")
        self.context_var = importlib.import_module("mcp.server.auth.middleware.auth_context").auth_context_var
        self.user = _sdk_user_type(bearer_auth.AuthenticatedUser, importlib.import_module("mcp.server.auth.provider"))

    @staticmethod
    def wanted() -> bool:
        """Whether the app is likely an MCP SDK app: its server code is loaded (never imported here)."""
        return "mcp.server.auth.middleware.bearer_auth" in sys.modules


def _sdk_user_type(base: Any, provider: Any) -> Callable[[AccessToken], Any]:
    class Caller(base):  # type: ignore[misc]
        """The SDK's AuthenticatedUser for one request; its AccessToken is made on first read."""

        def __init__(self, access: AccessToken) -> None:  # no super().__init__: nothing is built yet
            self._access = access
            self._built: Any = None

        @property
        def access_token(self) -> Any:
            if self._built is None:
                self._built = _sdk_access_token(provider.AccessToken, self._access)
            return self._built

        @property
        def scopes(self) -> list[str]:
            return list(self.access_token.scopes)

        @property
        def username(self) -> str:
            return str(self.access_token.client_id)

    return Caller


def _sdk_access_token(model: Any, access: AccessToken) -> Any:
    """Ours as the SDK's: client id from ``client_id``/``azp`` (else the principal), subject, scopes, expiry."""
    claims = dict(access.claims) if isinstance(access.claims, Mapping) else {}
    client_id = claims.get("client_id") or claims.get("azp")
    if access.source is not None or not isinstance(client_id, str):  # API keys: never an IdP's client
        client_id = _principal(access)
    subject = claims.get("sub")
    expires = access.expires_at
    audience = claims.get("aud")
    return model(
        token=_keyed_digest(access.token),
        client_id=client_id,
        scopes=[s for s in access.scopes if isinstance(s, str)] if isinstance(access.scopes, list) else [],
        expires_at=int(expires) if _is_number(expires) and math.isfinite(expires) else None,
        resource=audience if isinstance(audience, str) else None,
        subject=subject if isinstance(subject, str) else None,
        claims=claims,
    )


def _origins(allowed: object) -> frozenset[str] | None:
    """``allowed_origins``: serialized origins (RFC 6454 section 6.2, "scheme://host[:port]"), lower case."""
    if allowed is None:
        return None
    origins = set()
    for origin in _strings("allowed_origins", allowed):
        parts = urlsplit(origin)
        exact = parts.scheme in ("http", "https") and parts.netloc and "@" not in parts.netloc
        if not exact or parts.path or parts.query or parts.fragment or origin.endswith(("?", "#")):
            raise ValueError(f"allowed_origins entries must be origins like 'https://app.example.com', not {origin!r}")
        origins.add(origin.lower())
    return frozenset(origins)


def _origin_allowed(headers: Iterable[tuple[bytes, bytes]], allowed: frozenset[str]) -> bool:
    """No Origin (a client that is not a browser) passes; every Origin present must be one listed."""
    for name, value in headers:
        if len(name) == 6 and name.lower() == b"origin" and value.decode("latin-1").lower() not in allowed:
            return False
    return True


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


_PASS = _Response(0, (), b"")  # a public request: the app answers it, unauthenticated
# A CORS preflight is answered here and never reaches the app: an OPTIONS that an app (or an
# older MCP SDK release) acted on, opening a session or taking a body, would act for anyone.
# Fetch standard: "*" allows any method and header in a request without credentials (a bearer
# token is not one), except Authorization, which must be named. Reading a response still needs
# the app's (or an outer CORSMiddleware's) Access-Control-Allow-Origin on it.
_PREFLIGHT = _Response(
    204,
    (
        (b"access-control-allow-origin", b"*"),
        (b"access-control-allow-methods", b"*"),
        (b"access-control-allow-headers", b"authorization, *"),
        (b"access-control-max-age", b"600"),
    ),
    b"",
)


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
        operation_scopes: Mapping[str, Iterable[str]] | Callable[[Operation], Iterable[str]] | None = None,
        scope_implies: Mapping[str, Iterable[str]] | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        resource: str | None = None,
        authorization_servers: Sequence[str] = (),
        scopes_supported: Sequence[str] | None = None,
        resource_name: str | None = None,
        realm: str | None = None,
        bind_sessions: bool = True,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        allow_cors_preflight: bool = True,
        allowed_origins: Iterable[str] | None = None,
        sdk_identity: bool | None = None,
        audit: bool = False,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI callable, not {type(app).__name__}")
        self.app = app
        self._verify: Callable[[str], Awaitable[AccessToken | None]] = _verifier("provider", provider)
        self._max_token_length = _positive_int("max_token_length", max_token_length)
        max_sessions = _positive_int("max_sessions", max_sessions)
        max_body_size = _positive_int("max_body_size", max_body_size)
        scopes = _scope_tokens("required_scopes", required_scopes)
        advertised = scopes if scopes_supported is None else _scope_tokens("scopes_supported", scopes_supported)
        self._hierarchy = _ScopeHierarchy(scope_implies)
        self._allow_cors_preflight = _flag("allow_cors_preflight", allow_cors_preflight)
        self._origins = _origins(allowed_origins)
        self._audit = _flag("audit", audit)
        wants_sdk = _SDKCaller.wanted() if sdk_identity is None else _flag("sdk_identity", sdk_identity)
        self._sdk = _SDKCaller() if wants_sdk else None

        # Paths answered without a token: excluded ones go to the app; RFC 9728 metadata we serve.
        self._open_paths: dict[str, _Response] = dict.fromkeys(_excluded_paths(exclude_paths), _PASS)
        metadata_url = None
        if resource is not None:
            metadata_url, paths, self._metadata = _resource_metadata(
                resource, authorization_servers, advertised, resource_name
            )
            self._metadata_head = self._metadata._replace(body=b"")
            self._open_paths = {**dict.fromkeys(paths, self._metadata), **self._open_paths}
        elif authorization_servers or resource_name is not None:
            raise ValueError("authorization_servers and resource_name need resource= (the server's canonical URL)")
        if realm is not None:
            _checked_text("realm", realm, header=True)
        self._refusals = _Refusals(realm=realm, scopes=scopes, metadata_url=metadata_url)
        self._sessions = _SessionOwners(max_sessions, self._refusals.session_not_found) if bind_sessions else None
        self._operations = None
        if operation_scopes is not None:
            self._operations = _OperationGuard(
                operation_scopes,
                required=scopes,
                hierarchy=self._hierarchy,
                max_body_size=max_body_size,
                refusals=self._refusals,
            )
        # With per-operation rules, required_scopes join each operation's scopes in its one challenge.
        self._required_scopes = frozenset() if self._operations else frozenset(scopes)
        self._extras = self._audit or self._sdk is not None or scope_implies is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self._other_scope(scope, receive, send)
        maybe_public = (
            scope["path"] in self._open_paths
            or scope.get("root_path")
            or scope.get("method") == "OPTIONS"
            or self._origins is not None
        )
        if maybe_public and (public := self._public(scope)) is not None:
            return await self._answer_public(scope, receive, send, public)

        token, session_id = self._credentials(scope["headers"])
        if not isinstance(token, str):
            return await self._refuse(scope, send, token)
        refusal: _Response | None
        try:
            access = await self._verify(token)
        except Exception as exc:  # fail closed, and say why honestly: a provider crash is not a bad key
            access, refusal = None, self._failure(exc, token)
        else:
            refusal = self._judge(access)
        if refusal is not None:  # sent outside the try: a failing send is the server's error, not the provider's
            return await self._refuse(scope, send, refusal, access)
        assert isinstance(access, AccessToken)  # for the type checker: _judge refused everything else
        ended = None
        if self._sessions is not None:
            refusal, send, ended = self._sessions.admit(scope, send, access, session_id)
        if refusal is None and self._operations is not None:
            refusal, receive = await self._operations.admit(scope, receive, access)
        if refusal is not None:
            return await self._refuse(scope, send, refusal, access)

        scope.setdefault("state", {})["access_token"] = access  # where Starlette's request.state finds it
        after = self._enter(scope, access, ended) if self._extras else ended
        reset = _current_token.set(access)
        try:
            await self.app(scope, receive, send)
        finally:
            _current_token.reset(reset)
            if after is not None:
                after()

    def _enter(self, scope: Scope, access: AccessToken, ended: Callable[[], None] | None) -> Callable[[], None] | None:
        """The optional parts of handing the app its caller; returns what to undo once the app is done.

        The audit record; the scope hierarchy, for ``require_scopes`` in tools; the caller as the MCP
        SDK reads it (``scope["user"]`` and its auth context variable).
        """
        if self._audit:
            self._audit_decision(scope, None, access)
        undo: list[tuple[contextvars.ContextVar[Any], contextvars.Token[Any]]] = []
        if self._hierarchy is not _NO_HIERARCHY:
            scope["state"][_HIERARCHY_KEY] = self._hierarchy
            undo.append((_current_hierarchy, _current_hierarchy.set(self._hierarchy)))
        if self._sdk is not None:
            scope["user"] = user = self._sdk.user(access)
            undo.append((self._sdk.context_var, self._sdk.context_var.set(user)))
        if not undo:
            return ended

        def after() -> None:
            for variable, token in reversed(undo):
                variable.reset(token)
            if ended is not None:
                ended()

        return after

    async def _answer_public(self, scope: Scope, receive: Receive, send: Send, public: _Response) -> None:
        if public is _PASS:
            await self.app(scope, receive, send)
        else:
            await self._respond(scope, send, public)

    async def _other_scope(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            raise RuntimeError(
                f"mcp_bearer: refusing ASGI scope type {scope['type']!r}; only http, websocket, lifespan"
            )
        await self.app(scope, receive, send)  # the MCP SDK starts its session manager here

    def _public(self, scope: Scope) -> _Response | None:
        """The answer to a request that needs no token (``_PASS``: the app's), or None when it needs one.

        Excluded paths and RFC 9728 metadata match exactly, after ``root_path``.
        """
        if self._origins is not None and not _origin_allowed(scope["headers"], self._origins):
            return self._refusals.forbidden_origin  # before any token is looked at, preflights included
        method = scope.get("method")
        answer = self._open_paths.get(_relative_path(scope))
        if answer is _PASS or (answer is not None and method == "GET"):
            return answer
        if answer is not None and method == "HEAD":
            return self._metadata_head
        if method == "OPTIONS" and self._allow_cors_preflight and _is_preflight(scope["headers"]):
            return _PREFLIGHT
        return None

    def _credentials(self, headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | _Response, bytes | None]:
        """The bearer token and the ``Mcp-Session-Id`` of a request, or a refusal instead of the token.

        One pass over the raw header pairs, as uvicorn's ProxyHeadersMiddleware reads them;
        servers send lowercase names, hand-built scopes may not (RFC 9110 section 5.1). A
        repeated header is never guessed at: two Authorization headers are malformed, two
        session ids name no session (b"").
        """
        authorization = session_id = None
        authorizations = 0
        for name, value in headers:
            if len(name) in _WATCHED_NAME_SIZES:
                name = name.lower()
                if name == b"authorization":
                    authorization = value
                    authorizations += 1
                elif name == b"mcp-session-id":
                    session_id = b"" if session_id is not None else value
        if authorization is None:
            return self._refusals.unauthorized, session_id
        if authorizations > 1:  # which one would the app trust? Refuse rather than guess.
            return self._refusals.malformed, session_id
        credentials = _BEARER_CREDENTIALS.fullmatch(authorization)
        if credentials is None:
            return self._refusal_for(authorization), session_id
        token: bytes = credentials[1]
        if len(token) > self._max_token_length:
            return self._refusals.invalid_token, session_id
        return token.decode("ascii"), session_id

    def _refusal_for(self, authorization: bytes) -> _Response:
        """Why a header that is not ``Bearer <token68>`` is refused: no bearer credentials, or malformed ones."""
        credentials = authorization.strip(b" \t")
        # RFC 9110 section 11.1: the scheme ends where tchars end, so "Bearerx" and "Basic" are other schemes.
        if credentials[:6].lower() != b"bearer" or credentials[6:7] in _TCHARS:
            return self._refusals.unauthorized
        if not credentials[6:]:  # "Bearer" alone: no credentials at all (RFC 6750 section 3.1)
            return self._refusals.unauthorized
        return self._refusals.malformed  # "Bearer a b", "Bearer\tx", 'Bearer "x"', non-ASCII, ...

    def _failure(self, exc: Exception, token: str) -> _Response:
        """A provider that raised: 503 with Retry-After when it said it cannot decide now, else 500."""
        if isinstance(exc, ProviderUnavailable):
            seconds = _retry_after(exc.retry_after)
            logger.warning(_LOG_PROVIDER_UNAVAILABLE, str(exc).replace(token, "[token]"), seconds)
            return self._refusals.unavailable_for(seconds)
        # The traceback is logged with the token cut out, in case the provider put it in a message.
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        logger.error(_LOG_PROVIDER_RAISED, text.replace(token, "[token]"))
        return self._refusals.server_error

    def _judge(self, access: object) -> _Response | None:
        """The refusal a provider's answer earns, or None for a token that may pass."""
        if access is None:
            return self._refusals.invalid_token
        if not isinstance(access, AccessToken):
            logger.error(_LOG_PROVIDER_WRONG_TYPE, type(access).__name__)
            return self._refusals.server_error
        # "not >" rather than "<=": an expires_at of NaN (json accepts it) counts as expired.
        if access.expires_at is not None and not access.expires_at > time.time():
            return self._refusals.invalid_token
        if self._required_scopes and not self._required_scopes.issubset(self._hierarchy.effective(access.scopes)):
            return self._refusals.insufficient_scope
        return None

    async def _refuse(self, scope: Scope, send: Send, refusal: _Response, access: object = None) -> None:
        if self._audit:
            self._audit_decision(scope, refusal, access)
        await self._respond(scope, send, refusal)

    def _audit_decision(self, scope: Scope, refusal: _Response | None, access: object) -> None:
        """One INFO record on ``mcp_bearer.audit``: who asked for what, and the answer.

        The principal is the one sessions are bound to, for a token the provider verified;
        a refused token is named by nothing derived from it (no digest can confirm a guess).
        """
        status, error = (None, None) if refusal is None else (refusal.status, refusal.error)
        client = scope.get("client")
        fields = {
            "outcome": "allowed" if refusal is None else f"{status} {error}",
            "status": status,
            "error": error,
            "method": scope.get("method", "WEBSOCKET"),
            "path": scope["path"],
            "client": f"{client[0]}:{client[1]}" if client else None,
            "principal": _principal(access) if isinstance(access, AccessToken) else None,
        }
        values = (fields["outcome"], fields["method"], fields["path"], fields["client"], fields["principal"])
        _audit_logger.info(_LOG_AUDIT, *values, extra={"mcp_bearer": fields})

    @staticmethod
    async def _respond(scope: Scope, send: Send, response: _Response) -> None:
        status, headers, body, _ = response
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


# --- the command line ---------------------------------------------------------

# Never an option: a secret on the command line shows in `ps` and in shell history.
_SECRET_VARIABLE = "MCP_BEARER_CLIENT_SECRET"  # noqa: S105 - the variable's name, not a secret


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


def _cli_provider(args: argparse.Namespace) -> BearerAuthProvider | None:
    """The token sources the options name, chained API keys first; None when they name none."""
    providers: list[BearerAuthProvider] = []
    if args.tokens_file is not None:
        providers.append(StaticTokenProvider(_load_tokens(args.tokens_file)))
    if args.jwks_url is not None:
        if not args.issuer or not args.audience:
            _fail("--jwks-url needs --issuer and --audience (the tokens' iss and aud)")
        providers.append(
            JWTProvider(
                issuer=args.issuer,
                audience=args.audience,
                jwks_url=args.jwks_url,
                algorithms=args.algorithm or ("RS256",),
            )
        )
    elif args.issuer or args.algorithm or (args.audience and args.introspection_url is None):
        _fail("--issuer and --algorithm need --jwks-url; --audience needs --jwks-url or --introspection-url")
    if args.introspection_url is not None:
        secret = os.environ.get(_SECRET_VARIABLE, "")
        if not args.client_id or not secret:
            _fail(f"--introspection-url needs --client-id and the client secret in ${_SECRET_VARIABLE}")
        if len(args.audience) > 1:
            _fail("--introspection-url takes at most one --audience (the introspected token's aud must contain it)")
        audience = args.audience[0] if args.audience else None
        providers.append(
            IntrospectionProvider(
                args.introspection_url, client_id=args.client_id, client_secret=secret, audience=audience
            )
        )
    elif args.client_id is not None:
        _fail("--client-id needs --introspection-url")
    if not providers:
        return None
    return providers[0] if len(providers) == 1 else ProviderChain(*providers)


def _parser() -> argparse.ArgumentParser:
    # Usage names the command the user typed; error lines always start "mcp_bearer: error:".
    installed = os.path.splitext(os.path.basename(sys.argv[0]))[0] == "mcp-bearer"
    parser = _ArgumentParser(
        prog="mcp-bearer" if installed else "python -m mcp_bearer",
        description="Serve an ASGI app or MCP server behind bearer-token authentication; "
        "without APP, a demo MCP server with a whoami tool. Tokens come from --tokens-file, "
        "else MCP_BEARER_TOKENS (comma-separated), else one random token printed once.",
    )
    option = parser.add_argument
    option("app", nargs="?", metavar="MODULE:ATTR", help="an ASGI app, or an object with streamable_http_app()")
    option("--tokens-file", metavar="FILE", help='JSON object of token -> claims, e.g. {"sk-1": {"sub": "alice"}}')
    option(
        "--exclude",
        action="append",
        metavar="PATH",
        help=f"public path, exact match, repeatable (replaces the defaults {', '.join(DEFAULT_EXCLUDED_PATHS)})",
    )
    option("--required-scope", action="append", default=[], metavar="S", help="scope every token must hold, repeatable")
    option(
        "--resource",
        metavar="URL",
        help="canonical URL of this server, e.g. https://mcp.example.com/mcp; serves RFC 9728 metadata",
    )
    option(
        "--authorization-server",
        action="append",
        default=[],
        metavar="URL",
        help="issuer URL listed in the metadata, repeatable",
    )
    option("--jwks-url", metavar="URL", help="verify JWT access tokens with the issuer's JWKS instead of fixed tokens")
    option("--issuer", action="append", default=[], metavar="ISS", help="accepted JWT iss, repeatable")
    option("--audience", action="append", default=[], metavar="AUD", help="accepted JWT aud, repeatable")
    option(
        "--algorithm", action="append", default=[], metavar="ALG", help="accepted JWT alg, repeatable (default RS256)"
    )
    option(
        "--introspection-url",
        metavar="URL",
        help="check opaque tokens at this RFC 7662 endpoint; the client secret comes from $" + _SECRET_VARIABLE,
    )
    option("--client-id", metavar="ID", help="this server's client id at the introspection endpoint")
    option(
        "--cache-ttl", type=float, metavar="SECONDS", help="remember each token's verdict this long (CachedProvider)"
    )
    option("--audit", action="store_true", help="log one line per decision to stderr (mcp_bearer.audit)")
    option("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    option("--port", type=int, default=8000, help="port to listen on (default 8000)")
    return parser


def _demo_tokens() -> tuple[dict[str, dict[str, Any]], str | None]:
    """The demo's keys: MCP_BEARER_TOKENS (comma-separated), else one random key (returned to print once)."""
    if os.environ.get("MCP_BEARER_TOKENS", "").strip():
        keys = [key.strip() for key in os.environ["MCP_BEARER_TOKENS"].split(",") if key.strip()]
        return {key: {"sub": f"user-{n}"} for n, key in enumerate(keys, 1)}, None
    generated = secrets.token_urlsafe(32)
    return {generated: {"sub": "demo-user"}}, generated


def _guarded_app(args: argparse.Namespace, provider: BearerAuthProvider) -> BearerAuthMiddleware:
    try:
        app = _load_app(args.app) if args.app else _demo_app(args.host)
    except ImportError as exc:
        _fail(f"the demo needs the mcp package ({exc}); pip install 'mcp_bearer[demo]'")
    # A bad option is the one stderr line below; the ERROR record the middleware logs for lazy
    # builders would print it a second time (logging's last-resort handler writes to stderr).
    logger.disabled = True
    try:
        return BearerAuthMiddleware(
            app,
            provider,
            exclude_paths=DEFAULT_EXCLUDED_PATHS if args.exclude is None else args.exclude,
            required_scopes=args.required_scope,
            resource=args.resource,
            authorization_servers=args.authorization_server,
            audit=args.audit,
        )
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    finally:
        logger.disabled = False


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``mcp-bearer`` (console script) or ``python -m mcp_bearer``."""
    args = _parser().parse_args(argv)
    generated = None
    try:
        provider = _cli_provider(args)
        if provider is None:
            tokens, generated = _demo_tokens()
            provider = StaticTokenProvider(tokens)
        if args.cache_ttl is not None:
            provider = CachedProvider(provider, ttl=args.cache_ttl)
    except (TypeError, ValueError, ImportError) as exc:
        _fail(str(exc))
    try:
        import uvicorn
    except ImportError:
        _fail("uvicorn is not installed; pip install 'mcp_bearer[demo]'")
    guarded = _guarded_app(args, provider)

    if args.audit:  # nothing else configures logging here, and INFO records would go nowhere
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        _audit_logger.addHandler(handler)
        _audit_logger.setLevel(logging.INFO)

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
